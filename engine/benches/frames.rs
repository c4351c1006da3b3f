//! The AMQP frame codec on the message path (issue 3).
//!
//! * `frames/decode_publish/{16,1024}`: read 64 published messages (method,
//!   content header with no properties, body) from one buffer, as a
//!   connection does after a socket read.
//! * `frames/decode_publish_props/16`: the same with two properties set
//!   (content-type, delivery-mode), which are parsed.
//! * `frames/decode_publish_headers/16`: the same with a `headers` table
//!   (six entries, one an `x-death`-shaped array of tables), which is
//!   walked for its nesting and then parsed.
//! * `frames/encode_deliver/{16,1024}`: write 64 deliveries (method,
//!   content header, body) into the output buffer.
//!
//! Figures per batch of 64 messages.

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wasmq::amqp::frame::{decode, encode_content, encode_deliver, encode_method};

const BATCH: usize = 64;

fn published(size: usize, properties: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..BATCH {
        encode_method(
            &mut out,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "orders".into(),
                routing_key: "orders.created.eu".into(),
                mandatory: false,
                immediate: false,
            })),
        );
        encode_content(&mut out, 1, properties, &vec![7u8; size], 131_072);
    }
    out
}

fn raw_properties(p: &BasicProperties) -> Vec<u8> {
    // The properties as a content header carries them: encode one with
    // amq-protocol and cut the frame header, the 12-byte class/weight/size
    // prefix and the frame-end.
    let frame = amq_protocol::frame::AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 0,
            properties: p.clone(),
        },
    );
    let out =
        cookie_factory::gen_simple(amq_protocol::frame::gen_frame(&frame), Vec::new()).unwrap();
    out[7 + 12..out.len() - 1].to_vec()
}

fn decode_all(bytes: &[u8]) -> usize {
    let mut buf = BytesMut::from(bytes);
    let mut n = 0;
    while let Some(f) = decode(&mut buf, 131_072).unwrap() {
        std::hint::black_box(&f);
        n += 1;
    }
    n
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(BATCH as u64));
    for size in [16, 1024] {
        let bytes = published(size, &[0, 0]);
        assert_eq!(decode_all(&bytes), 3 * BATCH);
        group.bench_with_input(
            BenchmarkId::new("decode_publish", size),
            &bytes,
            |b, bytes| b.iter(|| decode_all(bytes)),
        );
    }
    let props = raw_properties(
        &BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2),
    );
    let bytes = published(16, &props);
    assert_eq!(decode_all(&bytes), 3 * BATCH);
    group.bench_with_input(
        BenchmarkId::new("decode_publish_props", 16),
        &bytes,
        |b, bytes| b.iter(|| decode_all(bytes)),
    );
    let headers = {
        use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};
        let s = |v: &str| AMQPValue::LongString(v.into());
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("reason".into(), s("expired"));
        death.insert("queue".into(), s("orders"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![s("orders.created.eu")])),
        );
        let mut h = FieldTable::default();
        h.insert("tenant".into(), s("acme"));
        h.insert("region".into(), s("eu"));
        h.insert("attempt".into(), AMQPValue::LongInt(3));
        h.insert("trace".into(), s("4bf92f3577b34da6a3ce929d0e0e4736"));
        h.insert("urgent".into(), AMQPValue::Boolean(true));
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        raw_properties(
            &BasicProperties::default()
                .with_content_type("application/json".into())
                .with_headers(h)
                .with_delivery_mode(2),
        )
    };
    let bytes = published(16, &headers);
    assert_eq!(decode_all(&bytes), 3 * BATCH);
    group.bench_with_input(
        BenchmarkId::new("decode_publish_headers", 16),
        &bytes,
        |b, bytes| b.iter(|| decode_all(bytes)),
    );
    for size in [16, 1024] {
        let body = vec![7u8; size];
        let mut out = Vec::with_capacity(BATCH * (size + 128));
        group.bench_with_input(
            BenchmarkId::new("encode_deliver", size),
            &body,
            |b, body| {
                b.iter(|| {
                    out.clear();
                    for tag in 0..BATCH as u64 {
                        encode_deliver(
                            &mut out,
                            1,
                            "amq.ctag-1",
                            tag,
                            false,
                            "orders",
                            "orders.created.eu",
                        );
                        encode_content(&mut out, 1, &[0, 0], body, 131_072);
                    }
                    std::hint::black_box(&out);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
