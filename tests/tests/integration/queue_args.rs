//! Queue arguments over AMQP: TTL, dead-letter exchanges with `x-death`,
//! and length limits, as a RabbitMQ client expects them.

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use wasmq_tests::TestServer;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A fanout exchange `dlx` feeding queue `dead`.
async fn dead_letter_target(ch: &Channel) {
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    wasmq_tests::declare_queue(ch, "dead").await;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Publish to `queue` through the default exchange; on a confirm channel,
/// the broker's ack or nack.
async fn publish(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> lapin::Confirmation {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap()
}

/// Take the next message of `queue` and reject it without requeue (so it
/// is dead-lettered).
async fn get_and_reject(ch: &Channel, queue: &str) {
    let m = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message to reject");
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
}

/// Wait for a message on `queue` (polling basic.get).
async fn next(ch: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..200 {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing arrived on {queue}");
}

fn header<'a>(m: &'a lapin::message::BasicGetMessage, key: &str) -> Option<&'a AMQPValue> {
    m.delivery.properties.headers().as_ref()?.inner().get(key)
}

fn first_death(m: &lapin::message::BasicGetMessage) -> FieldTable {
    match header(m, "x-death") {
        Some(AMQPValue::FieldArray(a)) => match &a.as_slice()[0] {
            AMQPValue::FieldTable(t) => t.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("no x-death: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_with_x_death() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_target(&ch).await;
    let args = table(&[
        ("x-message-ttl", AMQPValue::LongInt(50)),
        ("x-dead-letter-exchange", text("dlx")),
    ]);
    ch.queue_declare("work".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(&ch, "work", b"late", BasicProperties::default()).await;
    // Per-message expiration on a queue without a TTL of its own.
    let args = table(&[("x-dead-letter-exchange", text("dlx"))]);
    ch.queue_declare("work2".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(
        &ch,
        "work2",
        b"later",
        BasicProperties::default().with_expiration("30".into()),
    )
    .await;

    // The 30 ms message may die first: match them by body.
    let (a, b) = (next(&ch, "dead").await, next(&ch, "dead").await);
    let (m, later) = if a.delivery.data == b"late" {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(m.delivery.data, b"late");
    let death = first_death(&m);
    assert_eq!(death.inner().get("reason"), Some(&text("expired")));
    assert_eq!(death.inner().get("queue"), Some(&text("work")));
    assert_eq!(death.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
    assert_eq!(header(&m, "x-first-death-reason"), Some(&text("expired")));
    let m = later;
    assert_eq!(m.delivery.data, b"later");
    assert!(
        m.delivery.properties.expiration().is_none(),
        "a dead letter does not expire again"
    );
    assert_eq!(
        first_death(&m).inner().get("original-expiration"),
        Some(&text("30"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_dead_lettered_with_the_dead_letter_routing_key() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    wasmq_tests::declare_queue(&ch, "failed").await;
    ch.queue_bind(
        "failed".into(),
        "dlx".into(),
        "failed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let args = table(&[
        ("x-dead-letter-exchange", text("dlx")),
        ("x-dead-letter-routing-key", text("failed")),
    ]);
    ch.queue_declare("jobs".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(&ch, "jobs", b"bad job", BasicProperties::default()).await;
    get_and_reject(&ch, "jobs").await;
    let dead = next(&ch, "failed").await;
    assert_eq!(dead.delivery.data, b"bad job");
    assert_eq!(dead.delivery.routing_key.as_str(), "failed");
    assert_eq!(
        first_death(&dead).inner().get("reason"),
        Some(&text("rejected"))
    );
    // Requeued messages are not dead-lettered.
    publish(&ch, "jobs", b"retry me", BasicProperties::default()).await;
    let m = ch
        .basic_get("jobs".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = ch
        .basic_get("jobs".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert!(again.delivery.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn length_limits_drop_the_head_or_refuse_the_publish() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_target(&ch).await;
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(2)),
        ("x-dead-letter-exchange", text("dlx")),
    ]);
    ch.queue_declare("recent".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    for body in ["1", "2", "3"] {
        publish(&ch, "recent", body.as_bytes(), BasicProperties::default()).await;
    }
    let dropped = next(&ch, "dead").await;
    assert_eq!(dropped.delivery.data, b"1");
    assert_eq!(
        first_death(&dropped).inner().get("reason"),
        Some(&text("maxlen"))
    );
    assert_eq!(next(&ch, "recent").await.delivery.data, b"2");

    let confirm = wasmq_tests::confirm_channel(&conn).await;
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", text("reject-publish")),
    ]);
    confirm
        .queue_declare("bounded".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let pub1 = publish(&confirm, "bounded", b"a", BasicProperties::default()).await;
    let pub2 = publish(&confirm, "bounded", b"b", BasicProperties::default()).await;
    assert!(pub1.is_ack());
    assert!(
        pub2.is_nack(),
        "a full reject-publish queue nacks the publish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_limits_and_reject_publish_dlx() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    dead_letter_target(&ch).await;
    let confirmed = |body: &'static str, queue| {
        publish(&ch, queue, body.as_bytes(), BasicProperties::default())
    };

    // Ten body bytes at most: the third 4-byte message drops the first.
    let args = table(&[
        ("x-max-length-bytes", AMQPValue::LongInt(10)),
        ("x-dead-letter-exchange", text("dlx")),
    ]);
    ch.queue_declare("sized".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    for body in ["aaaa", "bbbb", "cccc"] {
        assert!(confirmed(body, "sized").await.is_ack());
    }
    let dropped = next(&ch, "dead").await;
    assert_eq!(dropped.delivery.data, b"aaaa");
    assert_eq!(
        first_death(&dropped).inner().get("reason"),
        Some(&text("maxlen"))
    );
    assert_eq!(
        wasmq_tests::get_all(&ch, "sized").await,
        [("bbbb".to_string(), false), ("cccc".to_string(), false)]
    );

    // reject-publish-dlx: the publish is refused (nack) and the refused
    // message is dead-lettered; the queue keeps what it had.
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(1)),
        ("x-overflow", text("reject-publish-dlx")),
        ("x-dead-letter-exchange", text("dlx")),
    ]);
    ch.queue_declare("full".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    assert!(confirmed("kept", "full").await.is_ack());
    assert!(confirmed("refused", "full").await.is_nack());
    let refused = next(&ch, "dead").await;
    assert_eq!(refused.delivery.data, b"refused");
    assert_eq!(
        first_death(&refused).inner().get("reason"),
        Some(&text("maxlen"))
    );
    assert_eq!(
        wasmq_tests::get_all(&ch, "full").await,
        [("kept".to_string(), false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_tables_of_every_type_survive_delivery_and_dead_lettering() {
    use lapin::types::{ByteArray, DecimalValue, FieldArray};
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_target(&ch).await;
    let args = table(&[("x-dead-letter-exchange", text("dlx"))]);
    ch.queue_declare("q".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    let nested = table(&[
        ("inner", text("value")),
        (
            "list",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1), text("two")])),
        ),
    ]);
    let headers = table(&[
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(8)),
        ("i16", AMQPValue::ShortInt(-16)),
        ("u16", AMQPValue::ShortUInt(16)),
        ("i32", AMQPValue::LongInt(-32)),
        ("u32", AMQPValue::LongUInt(32)),
        ("i64", AMQPValue::LongLongInt(-64)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        ("text", text("ünïcode ✓")),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])),
        ),
        ("void", AMQPValue::Void),
    ]);
    let props = BasicProperties::default().with_headers(headers.clone());
    publish(&ch, "q", b"typed", props.clone()).await;
    publish(&ch, "q", b"typed, rejected", props).await;

    // Delivered: the headers as sent.
    let m = next(&ch, "q").await;
    assert_eq!(m.delivery.properties.headers().as_ref(), Some(&headers));
    // Dead-lettered (the broker re-encodes the table to add x-death): every
    // header as sent, beside x-death.
    get_and_reject(&ch, "q").await;
    let dead = next(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"typed, rejected");
    let got = dead.delivery.properties.headers().clone().unwrap();
    for (k, v) in headers.inner() {
        assert_eq!(got.inner().get(k), Some(v), "{k}");
    }
    assert!(got.inner().contains_key("x-death"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_queue_arguments_and_expirations_are_406() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions::default(),
            table(&[("x-overflow", text("explode"))]),
        )
        .await
        .unwrap_err();
    assert_eq!(wasmq_tests::reply_code(&err), Some(406), "{err}");
    let ch = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "q").await;
    let err = ch
        .queue_declare(
            "q".into(),
            QueueDeclareOptions::default(),
            table(&[("x-max-length", AMQPValue::LongInt(1))]),
        )
        .await
        .unwrap_err();
    assert_eq!(
        wasmq_tests::reply_code(&err),
        Some(406),
        "redeclared with other arguments: {err}"
    );
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default().with_expiration("soon".into()),
    )
    .await
    .unwrap();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || !ch.status().connected()).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_queues_expire_but_consumed_ones_stay() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let expiring = || table(&[("x-expires", AMQPValue::LongInt(100))]);
    ch.queue_declare("temp".into(), QueueDeclareOptions::default(), expiring())
        .await
        .unwrap();
    ch.queue_declare("watched".into(), QueueDeclareOptions::default(), expiring())
        .await
        .unwrap();
    let _consumer = wasmq_tests::consume(&ch, "watched", "").await;
    let vhost = t.broker().vhost("/").unwrap();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || vhost.queue("temp").is_err())
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        vhost.queue("watched").is_ok(),
        "a queue with a consumer is in use"
    );
    let err = ch
        .queue_declare(
            "zero".into(),
            QueueDeclareOptions::default(),
            table(&[("x-expires", AMQPValue::LongInt(0))]),
        )
        .await
        .unwrap_err();
    assert_eq!(wasmq_tests::reply_code(&err), Some(406));
}

/// Bodies of everything in `queue`, by `basic.get`, in delivery order.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    wasmq_tests::get_all(ch, queue)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queue_delivers_higher_priorities_first() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    ch.queue_declare(
        "jobs".into(),
        QueueDeclareOptions::default(),
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    )
    .await
    .unwrap();
    // No priority counts as 0; 9 is above the queue's maximum and counts
    // as 5, so it stays behind the earlier priority-5 message.
    for (body, priority) in [
        ("none-1", None),
        ("p2-1", Some(2)),
        ("p5-1", Some(5)),
        ("p9", Some(9)),
        ("p2-2", Some(2)),
        ("none-2", None),
    ] {
        let props = match priority {
            Some(p) => BasicProperties::default().with_priority(p),
            None => BasicProperties::default(),
        };
        publish(&ch, "jobs", body.as_bytes(), props).await;
    }
    assert_eq!(
        drain(&ch, "jobs").await,
        ["p5-1", "p9", "p2-1", "p2-2", "none-1", "none-2"]
    );

    // A consumer that rejects with requeue gets the same message again
    // before lower priorities: it heads its own level.
    for (body, p) in [("low", 1), ("high", 4)] {
        publish(
            &ch,
            "jobs",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    let m = ch
        .basic_get("jobs".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.delivery.data[..], b"high");
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = next(&ch, "jobs").await;
    assert_eq!(&again.delivery.data[..], b"high");
    assert!(again.delivery.redelivered);
    assert_eq!(&next(&ch, "jobs").await.delivery.data[..], b"low");

    // A plain queue ignores priorities.
    wasmq_tests::declare_queue(&ch, "plain").await;
    for (body, p) in [("a", 1), ("b", 9)] {
        publish(
            &ch,
            "plain",
            body.as_bytes(),
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    assert_eq!(drain(&ch, "plain").await, ["a", "b"]);

    // Above RabbitMQ's maximum of 255: 406.
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "too-many".into(),
            QueueDeclareOptions::default(),
            table(&[("x-max-priority", AMQPValue::LongInt(256))]),
        )
        .await
        .unwrap_err();
    assert_eq!(wasmq_tests::reply_code(&err), Some(406), "{err}");
    assert!(err.to_string().contains("x-max-priority"), "{err}");
}

/// `reject-publish-dlx` on a queue whose backlog is paged out to disk: the
/// refused message was paged out before its fate was decided, and its
/// dead letter went out without a body. It keeps its body now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_dlx_dead_letters_the_whole_message_of_a_paged_queue() {
    // A 2 KiB paging threshold (a quarter of the flow watermark).
    let t = TestServer::start_with(|c| c.amqp.queue_flow_bytes = 8 << 10).await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    dead_letter_target(&ch).await;
    let args = table(&[
        ("x-max-length", AMQPValue::LongInt(3)),
        ("x-overflow", text("reject-publish-dlx")),
        ("x-dead-letter-exchange", text("dlx")),
    ]);
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("paged".into(), durable, args)
        .await
        .unwrap();
    let persistent = || BasicProperties::default().with_delivery_mode(2);
    for i in 0..3u8 {
        let body = vec![b'a' + i; 1024];
        assert!(publish(&ch, "paged", &body, persistent()).await.is_ack());
    }
    let refused = vec![b'z'; 1024];
    assert!(
        publish(&ch, "paged", &refused, persistent())
            .await
            .is_nack()
    );
    let dead = next(&ch, "dead").await;
    assert_eq!(dead.delivery.data, refused, "the dead letter has its body");
}
