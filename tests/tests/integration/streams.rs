//! Stream queues (`x-queue-type: stream`) through AMQP 0-9-1 as RabbitMQ
//! serves them, checked with lapin against the real broker: every
//! consumer reads the whole log from where it asked (first, last, next, an
//! offset, a time), nothing is removed by reading, every delivery carries
//! its `x-stream-offset`, filter values select exactly, a named consumer
//! resumes where it settled across a restart, retention removes whole
//! segments, and what RabbitMQ refuses of a stream is refused with its
//! codes.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use wasmq_tests::{TestServer, confirm_channel, publish_confirmed, reply_code};

fn stream_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

async fn declare_stream(ch: &lapin::Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    ch.queue_declare(name.into(), DURABLE, stream_args(extra))
        .await
        .unwrap();
}

/// Publish `bodies` confirmed, each with its filter value (if any).
async fn publish_all(ch: &lapin::Channel, queue: &str, bodies: &[(String, Option<&str>)]) {
    for (body, filter) in bodies {
        let mut props = BasicProperties::default();
        if let Some(f) = filter {
            let mut h = FieldTable::default();
            h.insert("x-stream-filter-value".into(), s(f));
            props = props.with_headers(h);
        }
        assert!(publish_confirmed(ch, "", queue, body.as_bytes(), props).await);
    }
}

fn offset_of(d: &lapin::message::Delivery) -> i64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset"))
    {
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("a stream delivery without its offset: {other:?}"),
    }
}

/// A consumer of `queue` on a new channel with prefetch 50, starting as
/// `args` say.
async fn reader(
    conn: &lapin::Connection,
    queue: &str,
    args: &[(&str, AMQPValue)],
) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    let c = ch
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), t)
        .await
        .unwrap();
    (ch, c)
}

/// Take `n` deliveries (acking each), as (offset, body).
async fn take(c: &mut lapin::Consumer, n: usize) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries came: {out:?}", out.len()))
            .unwrap()
            .unwrap();
        out.push((offset_of(&d), String::from_utf8(d.data.clone()).unwrap()));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// Take `n` deliveries without settling them, as (offset, body).
async fn take_unacked(c: &mut lapin::Consumer, n: usize) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        out.push((offset_of(&d), String::from_utf8(d.data.clone()).unwrap()));
    }
    out
}

/// Nothing more arrives within a short while.
async fn quiet(c: &mut lapin::Consumer) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), c.next()).await {
        panic!("unexpected delivery: {:?}", d.map(|d| offset_of(&d)));
    }
}

fn bodies(range: std::ops::Range<usize>) -> Vec<(String, Option<&'static str>)> {
    range.map(|i| (format!("m{i}"), None)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_replay_a_stream_from_any_offset_and_reading_removes_nothing() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "events", &[]).await;
    publish_all(&ch, "events", &bodies(0..100)).await;

    // Two consumers from the start read everything, independently.
    let (_a, mut a) = reader(&conn, "events", &[("x-stream-offset", s("first"))]).await;
    let (_b, mut b) = reader(&conn, "events", &[("x-stream-offset", s("first"))]).await;
    let from_a = take(&mut a, 100).await;
    let from_b = take(&mut b, 100).await;
    let expected: Vec<(i64, String)> = (0..100).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(from_a, expected);
    assert_eq!(from_b, expected);

    // A numeric offset, `last` and `next`.
    let (_c, mut at50) = reader(
        &conn,
        "events",
        &[("x-stream-offset", AMQPValue::LongLongInt(50))],
    )
    .await;
    assert_eq!(take(&mut at50, 50).await, expected[50..]);
    let (_d, mut last) = reader(&conn, "events", &[("x-stream-offset", s("last"))]).await;
    assert_eq!(take(&mut last, 1).await, [(99, "m99".to_string())]);
    let (_e, mut next) = reader(&conn, "events", &[]).await;
    quiet(&mut next).await;

    // New messages reach every live consumer.
    publish_all(&ch, "events", &bodies(100..103)).await;
    let new: Vec<(i64, String)> = (100..103).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(take(&mut next, 3).await, new);
    assert_eq!(take(&mut a, 3).await, new);
    assert_eq!(take(&mut last, 3).await, new);

    // Reading removed nothing: the queue still counts 103 messages.
    let passive = ch
        .queue_declare(
            "events".into(),
            QueueDeclareOptions {
                passive: true,
                ..DURABLE
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(passive.message_count(), 103);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_attaches_at_the_first_message_written_since() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "clock", &[]).await;
    publish_all(&ch, "clock", &bodies(0..5)).await;
    // AMQP timestamps are whole seconds: wait for the next second to begin.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let boundary = now.as_secs() + 1;
    tokio::time::sleep(Duration::from_millis(
        boundary * 1000 - now.as_millis() as u64 + 20,
    ))
    .await;
    publish_all(&ch, "clock", &bodies(5..8)).await;
    let (_c, mut c) = reader(
        &conn,
        "clock",
        &[("x-stream-offset", AMQPValue::Timestamp(boundary))],
    )
    .await;
    let got = take(&mut c, 3).await;
    assert_eq!(got[0], (5, "m5".to_string()));
    quiet(&mut c).await;
    // A time before everything reads from the first message.
    let (_d, mut d) = reader(
        &conn,
        "clock",
        &[("x-stream-offset", AMQPValue::Timestamp(1))],
    )
    .await;
    assert_eq!(take(&mut d, 1).await[0].0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_values_select_exactly_the_matching_messages() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "regions", &[]).await;
    let mut sent = Vec::new();
    for i in 0..300 {
        let region = match i % 3 {
            0 => Some("eu"),
            1 => Some("us"),
            _ => None,
        };
        sent.push((format!("m{i}"), region));
    }
    publish_all(&ch, "regions", &sent).await;
    let (_a, mut eu) = reader(
        &conn,
        "regions",
        &[
            ("x-stream-offset", s("first")),
            ("x-stream-filter", s("eu")),
        ],
    )
    .await;
    let got = take(&mut eu, 100).await;
    assert!(got.iter().all(|(o, _)| o % 3 == 0), "{got:?}");
    quiet(&mut eu).await;
    let (_b, mut eu_and_none) = reader(
        &conn,
        "regions",
        &[
            ("x-stream-offset", s("first")),
            (
                "x-stream-filter",
                AMQPValue::FieldArray(vec![s("eu")].into()),
            ),
            ("x-stream-match-unfiltered", AMQPValue::Boolean(true)),
        ],
    )
    .await;
    let got = take(&mut eu_and_none, 200).await;
    assert!(got.iter().all(|(o, _)| o % 3 != 1), "no 'us' message");
    quiet(&mut eu_and_none).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_consumer_resumes_where_it_settled_across_a_restart() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "audit", &[]).await;
    publish_all(&ch, "audit", &bodies(0..20)).await;
    let named = [
        ("x-stream-consumer-name", s("billing")),
        ("x-stream-offset", s("first")),
    ];
    let (rch, mut c) = reader(&conn, "audit", &named).await;
    // A second consumer of the same name waits while the first reads.
    let (standby_ch, mut standby) = reader(&conn, "audit", &named).await;
    assert_eq!(take(&mut c, 10).await.last().unwrap().0, 9);
    quiet(&mut standby).await;
    let q = server.admin().get("/api/queues/%2F/audit").unwrap();
    let active: Vec<bool> = q["stream"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["active"].as_bool().unwrap())
        .collect();
    assert_eq!(active, [true, false]);
    // The first goes (10 delivered and acked, prefetch 50: 10 more were
    // sent and never settled); the waiting one takes over right after
    // what was settled.
    let unsettled = take_unacked(&mut c, 10).await;
    assert_eq!(unsettled[0].0, 10);
    rch.close(200, "bye".into()).await.unwrap();
    let got = take(&mut standby, 10).await;
    assert_eq!(
        got[0],
        (10, "m10".to_string()),
        "took over after the last ack"
    );
    assert_eq!(got[9].0, 19);
    standby_ch.close(200, "bye".into()).await.unwrap();
    // The admin API shows the group's stored offset and its lag.
    let q = server.admin().get("/api/queues/%2F/audit").unwrap();
    assert_eq!(q["type"], "stream");
    assert_eq!(q["stream"]["first_offset"], 0);
    assert_eq!(q["stream"]["last_offset"], 19);
    assert_eq!(q["stream"]["named"][0]["name"], "billing");
    assert_eq!(q["stream"]["named"][0]["offset"], 19);
    assert_eq!(q["stream"]["named"][0]["lag"], 0);
    publish_all(&ch, "audit", &bodies(20..30)).await;
    conn.close(200, "bye".into()).await.unwrap();

    let server = server.restart().await;
    let conn = server.connect().await;
    let (_c, mut c) = reader(&conn, "audit", &named).await;
    let got = take(&mut c, 10).await;
    assert_eq!(
        got[0],
        (20, "m20".to_string()),
        "resumed after its last ack"
    );
    assert_eq!(got[9].0, 29);
    quiet(&mut c).await;
    // Unnamed readers still see the whole stream after the restart.
    let (_d, mut d) = reader(&conn, "audit", &[("x-stream-offset", s("first"))]).await;
    assert_eq!(take(&mut d, 30).await.len(), 30);
    // And new offsets continue the old ones.
    let ch = confirm_channel(&conn).await;
    publish_all(&ch, "audit", &bodies(30..31)).await;
    assert_eq!(take(&mut d, 1).await, [(30, "m30".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_gives_credit_back_and_redelivers_nothing() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "once", &[]).await;
    publish_all(&ch, "once", &bodies(0..4)).await;
    let rch = conn.create_channel().await.unwrap();
    rch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut t = FieldTable::default();
    t.insert("x-stream-offset".into(), s("first"));
    let mut c = rch
        .basic_consume("once".into(), "".into(), BasicConsumeOptions::default(), t)
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(offset_of(&d));
        d.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(seen, [0, 1, 2, 3], "prefetch 1 moves on with each nack");
    quiet(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_whole_segments_past_the_byte_limit() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(
        &ch,
        "bounded",
        &[
            (
                "x-stream-max-segment-size-bytes",
                AMQPValue::LongLongInt(8192),
            ),
            ("x-max-length-bytes", AMQPValue::LongLongInt(40_000)),
        ],
    )
    .await;
    let big: Vec<(String, Option<&str>)> = (0..200)
        .map(|i| (format!("{i:04}{}", "x".repeat(500)), None))
        .collect();
    publish_all(&ch, "bounded", &big).await;
    server.broker().expire_queues();
    let q = server.admin().get("/api/queues/%2F/bounded").unwrap();
    let first = q["stream"]["first_offset"].as_u64().unwrap();
    let bytes = q["stream"]["bytes"].as_u64().unwrap();
    assert!(first > 0, "old segments removed: {q}");
    assert!(bytes <= 40_000, "{bytes} bytes kept");
    assert_eq!(q["stream"]["last_offset"], 199);
    // Prometheus sees the same.
    let metrics = server.admin().get_text("/metrics").unwrap();
    let sample = |name: &str| -> f64 {
        let prefix = format!("{name}{{vhost=\"/\",queue=\"bounded\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(sample("wasmq_stream_first_offset"), first as f64);
    assert_eq!(sample("wasmq_stream_committed_offset"), 200.0);
    assert_eq!(sample("wasmq_stream_bytes"), bytes as f64);
    // A reader from `first` starts at the oldest kept message, in order.
    let (_c, mut c) = reader(&conn, "bounded", &[("x-stream-offset", s("first"))]).await;
    let got = take(&mut c, (200 - first) as usize).await;
    assert_eq!(got[0].0 as u64, first);
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1), "no gaps");
    // An offset that retention removed starts at the oldest kept.
    let (_d, mut d) = reader(
        &conn,
        "bounded",
        &[("x-stream-offset", AMQPValue::LongLongInt(0))],
    )
    .await;
    assert_eq!(take(&mut d, 1).await[0].0 as u64, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_rabbitmq_refuses_of_a_stream_is_refused_with_its_codes() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "s", &[]).await;
    for (opts, args, says) in [
        (
            QueueDeclareOptions::default(),
            stream_args(&[]),
            "non-durable",
        ),
        (
            QueueDeclareOptions {
                exclusive: true,
                ..DURABLE
            },
            stream_args(&[]),
            "exclusive",
        ),
        (
            QueueDeclareOptions {
                auto_delete: true,
                ..DURABLE
            },
            stream_args(&[]),
            "auto-delete",
        ),
        (
            DURABLE,
            stream_args(&[("x-max-length", AMQPValue::LongInt(5))]),
            "invalid arg 'x-max-length'",
        ),
        (
            DURABLE,
            stream_args(&[("x-max-age", s("a week"))]),
            "x-max-age",
        ),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let e = bad
            .queue_declare("bad".into(), opts, args)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
    // basic.get: 540, as RabbitMQ (a connection error: a new connection
    // after it).
    let bad = server.connect().await.create_channel().await.unwrap();
    let e = bad
        .basic_get("s".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(540), "{e}");
    // Consuming without a prefetch, with automatic acks, or from an
    // offset that is not one.
    let bad = conn.create_channel().await.unwrap();
    let e = bad
        .basic_consume(
            "s".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(e.to_string().contains("prefetch"), "{e}");
    let bad = server.connect().await.create_channel().await.unwrap();
    bad.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let e = bad
        .basic_consume(
            "s".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(540), "{e}");
    for offset in [
        s("beginning"),
        AMQPValue::LongLongInt(-3),
        AMQPValue::Boolean(true),
    ] {
        let bad = conn.create_channel().await.unwrap();
        bad.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        let mut t = FieldTable::default();
        t.insert("x-stream-offset".into(), offset);
        let e = bad
            .basic_consume("s".into(), "".into(), BasicConsumeOptions::default(), t)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains("x-stream-offset"), "{e}");
    }
    // An ack for a delivery that was never made closes the channel (406).
    let other = server.connect().await;
    let code = wasmq_tests::close_code(&other);
    let bad = other.create_channel().await.unwrap();
    bad.basic_ack(7, BasicAckOptions::default()).await.unwrap();
    assert_eq!(wasmq_tests::until_close_code(&code).await, Some(406));
    // The stream itself is untouched by all of this.
    let ok = confirm_channel(&conn).await;
    publish_all(&ok, "s", &bodies(0..1)).await;
    let (_c, mut c) = reader(&conn, "s", &[("x-stream-offset", s("first"))]).await;
    assert_eq!(take(&mut c, 1).await, [(0, "m0".to_string())]);
}

/// pika, the way RabbitMQ's documentation uses streams from Python
/// (`tests/python/pika_streams.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_reads_streams_unchanged() {
    let server = TestServer::start().await;
    wasmq_tests::run_pika_script("pika_streams.py", [server.addr().port().to_string()]).await;
}

/// amqplib's own stream examples (`examples/stream_queues` in its
/// package), each offset form their comments list
/// (`tests/node/streams.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplibs_stream_examples_work_unchanged() {
    let server = TestServer::start().await;
    wasmq_tests::run_node_script(
        "streams.mjs",
        [format!("amqp://guest:guest@{}", server.addr())],
        Duration::from_secs(60),
    )
    .await;
}

/// A consumer may name a Wasm filter plugin (`x-wasmq-filter`, its other
/// consume arguments the plugin's, as on a binding): the broker filters
/// next to the data and the consumer gets exactly what matches. Here the
/// built-in `sns-filter` with an SNS filter policy on the headers; then a
/// filter that faults on some messages: those are delivered marked with
/// `x-wasmq-filter-fault`, the others as usual, and another consumer of
/// the stream is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumers_wasm_filter_decides_what_it_gets() {
    let server = TestServer::start().await;
    server.install("faulty", "faulty");
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(&ch, "orders", &[]).await;
    for i in 0..40 {
        let mut h = FieldTable::default();
        h.insert("country".into(), s(if i % 4 == 0 { "NO" } else { "SE" }));
        h.insert("total".into(), AMQPValue::LongLongInt(i * 10));
        let body = if i == 8 {
            "trap".to_string()
        } else {
            format!("m{i}")
        };
        let props = BasicProperties::default().with_headers(h);
        assert!(publish_confirmed(&ch, "", "orders", body.as_bytes(), props).await);
    }
    let (_a, mut norway) = reader(
        &conn,
        "orders",
        &[
            ("x-stream-offset", s("first")),
            ("x-wasmq-filter", s("sns-filter")),
            (
                "x-filter-policy",
                s(r#"{"country": ["NO"], "total": [{"numeric": [">=", 100]}]}"#),
            ),
        ],
    )
    .await;
    let got = take(&mut norway, 7).await;
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        [12, 16, 20, 24, 28, 32, 36]
    );
    quiet(&mut norway).await;

    let (_b, mut faulty) = reader(
        &conn,
        "orders",
        &[
            ("x-stream-offset", s("first")),
            ("x-wasmq-filter", s("faulty")),
        ],
    )
    .await;
    let mut marked = Vec::new();
    for _ in 0..40 {
        let d = tokio::time::timeout(Duration::from_secs(10), faulty.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let fault = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-wasmq-filter-fault").cloned());
        if fault.is_some() {
            marked.push(offset_of(&d));
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(marked, [8], "only the message it trapped on is marked");
    let (_c, mut all) = reader(&conn, "orders", &[("x-stream-offset", s("first"))]).await;
    assert_eq!(take(&mut all, 40).await.len(), 40);

    // An unknown filter plugin is refused at consume (406).
    let bad = conn.create_channel().await.unwrap();
    bad.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut t = FieldTable::default();
    t.insert("x-wasmq-filter".into(), s("no-such-filter"));
    let e = bad
        .basic_consume(
            "orders".into(),
            "".into(),
            BasicConsumeOptions::default(),
            t,
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
}

/// A super stream in one call: a durable `super-stream` exchange with
/// `x-super-stream-partitions: 3` makes three streams (`orders-0` ...)
/// bound as its partitions; every message goes to exactly one, chosen by
/// its routing key's hash, so one key's messages stay together and in
/// order; each partition is consumed by one of a named group at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_super_stream_spreads_keys_over_partitions_declared_in_one_call() {
    use lapin::options::ExchangeDeclareOptions;
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-super-stream-partitions".into(), AMQPValue::LongInt(3));
    args.insert("x-max-age".into(), s("7D"));
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "orders".into(),
        lapin::ExchangeKind::Custom("super-stream".into()),
        durable,
        args.clone(),
    )
    .await
    .unwrap();
    for i in 0..3 {
        let q = server
            .admin()
            .get(&format!("/api/queues/%2F/orders-{i}"))
            .unwrap();
        assert_eq!(q["type"], "stream", "{q}");
        assert_eq!(q["arguments"]["x-max-age"], "7D", "retention passed on");
    }
    // 20 customers, 5 orders each, interleaved.
    for n in 0..5 {
        for c in 0..20 {
            let body = format!("customer-{c}:{n}");
            let key = format!("customer-{c}");
            assert!(
                publish_confirmed(
                    &ch,
                    "orders",
                    &key,
                    body.as_bytes(),
                    BasicProperties::default()
                )
                .await
            );
        }
    }
    let mut partition_of = std::collections::HashMap::new();
    let mut total = 0;
    for i in 0..3 {
        let group = [
            ("x-stream-consumer-name", s("shipping")),
            ("x-stream-offset", s("first")),
        ];
        let (_a, mut active) = reader(&conn, &format!("orders-{i}"), &group).await;
        let (_b, mut waiting) = reader(&conn, &format!("orders-{i}"), &group).await;
        let q = server
            .admin()
            .get(&format!("/api/queues/%2F/orders-{i}"))
            .unwrap();
        let n = q["messages"].as_u64().unwrap() as usize;
        assert!(n > 0, "every partition gets some keys");
        let got = take(&mut active, n).await;
        quiet(&mut waiting).await;
        let mut last_seen = std::collections::HashMap::new();
        for (_, body) in got {
            let (customer, seq) = body.split_once(':').unwrap();
            let seq: u32 = seq.parse().unwrap();
            assert_eq!(
                *partition_of.entry(customer.to_string()).or_insert(i),
                i,
                "{customer} in one partition"
            );
            let before = last_seen.insert(customer.to_string(), seq);
            assert!(
                before.is_none_or(|b| b < seq),
                "{customer}'s orders in order"
            );
        }
        total += n;
    }
    assert_eq!(total, 100, "each message in exactly one partition");
    // Declaring it again is a no-op; bad partition counts are refused.
    ch.exchange_declare(
        "orders".into(),
        lapin::ExchangeKind::Custom("super-stream".into()),
        durable,
        args,
    )
    .await
    .unwrap();
    for (kind, n, durable, says) in [
        ("super-stream", AMQPValue::LongInt(0), true, "1 to 1000"),
        ("super-stream", AMQPValue::LongInt(3), false, "durable"),
        (
            "direct",
            AMQPValue::LongInt(3),
            true,
            "only a 'super-stream'",
        ),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let mut a = FieldTable::default();
        a.insert("x-super-stream-partitions".into(), n);
        let e = bad
            .exchange_declare(
                "bad".into(),
                lapin::ExchangeKind::Custom(kind.into()),
                ExchangeDeclareOptions {
                    durable,
                    ..Default::default()
                },
                a,
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(says), "{says}: {e}");
    }
}

/// Retention by policy, as RabbitMQ's operators set it: a policy with
/// `max-age` applying to `streams` removes a stream's old segments; a
/// `max-age` that is not an age is refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sets_a_streams_max_age() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (ok, bad) = tokio::task::spawn_blocking(move || {
        (
            admin.put(
                "/api/policies/%2F/short-history",
                &serde_json::json!({"pattern": "^aged$", "apply-to": "streams",
                                    "definition": {"max-age": "1s"}}),
            ),
            admin.put(
                "/api/policies/%2F/bad",
                &serde_json::json!({"pattern": "^x$", "apply-to": "streams",
                                    "definition": {"max-age": "a second"}}),
            ),
        )
    })
    .await
    .unwrap();
    ok.unwrap();
    assert!(bad.unwrap_err().to_string().contains("400"));
    let conn = server.connect().await;
    let ch = confirm_channel(&conn).await;
    declare_stream(
        &ch,
        "aged",
        &[(
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(8192),
        )],
    )
    .await;
    let big: Vec<(String, Option<&str>)> = (0..100)
        .map(|i| (format!("{i:04}{}", "x".repeat(500)), None))
        .collect();
    publish_all(&ch, "aged", &big).await;
    server.broker().expire_queues();
    let q = server.admin().get("/api/queues/%2F/aged").unwrap();
    assert_eq!(q["stream"]["first_offset"], 0, "nothing old yet: {q}");
    assert_eq!(q["policy"], "short-history");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.broker().expire_queues();
    let q = server.admin().get("/api/queues/%2F/aged").unwrap();
    assert!(
        q["stream"]["first_offset"].as_u64().unwrap() > 0,
        "segments older than the policy's max-age removed: {q}"
    );
    assert_eq!(q["stream"]["segments"], 1, "all but the newest");
}
