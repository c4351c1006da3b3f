//! Deduplication (SQS FIFO's `MessageDeduplicationId`, the community
//! `rabbitmq-message-deduplication` plugin's arguments): a queue with
//! `x-message-deduplication` confirms a message whose
//! `x-deduplication-header` it took within its window and does not
//! enqueue it again, across a restart; an `x-message-deduplication`
//! exchange drops duplicates before routing. Checked with lapin.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use wasmq_tests::{TestServer, declare_durable, get_all, publish_confirmed, reply_code};

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn id(s: &str) -> (&'static str, AMQPValue) {
    ("x-deduplication-header", AMQPValue::LongString(s.into()))
}

/// Publish `body` with `headers`; whether it was confirmed (acked).
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    headers: &[(&str, AMQPValue)],
    body: &str,
) -> bool {
    let props = BasicProperties::default()
        .with_headers(table(headers))
        .with_delivery_mode(2);
    publish_confirmed(ch, exchange, key, body.as_bytes(), props).await
}

fn bodies(got: Vec<(String, bool)>) -> Vec<String> {
    got.into_iter().map(|(b, _)| b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_takes_an_id_once_within_its_window_across_a_restart() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let args = table(&[
        ("x-message-deduplication", AMQPValue::Boolean(true)),
        ("x-cache-ttl", AMQPValue::LongInt(3000)),
    ]);
    declare_durable(&ch, "payments", args).await;
    // A duplicate is confirmed (as SQS reports success) and not enqueued;
    // messages without an id are never deduplicated.
    assert!(publish(&ch, "", "payments", &[id("p-1")], "first").await);
    assert!(publish(&ch, "", "payments", &[id("p-1")], "again").await);
    assert!(publish(&ch, "", "payments", &[id("p-2")], "second").await);
    assert!(publish(&ch, "", "payments", &[], "plain").await);
    assert!(publish(&ch, "", "payments", &[], "plain").await);
    assert_eq!(
        bodies(get_all(&ch, "payments").await),
        ["first", "second", "plain", "plain"]
    );
    // Consumed or not, the id holds for the window.
    assert!(publish(&ch, "", "payments", &[id("p-1")], "late").await);
    assert!(get_all(&ch, "payments").await.is_empty());
    let view = server.admin().get("/api/queues/%2f/payments").unwrap();
    assert_eq!(view["deduplication_ids"], 2, "{view}");

    // An id the queue cannot take is refused (nacked), with nothing else
    // lost.
    let long = "x".repeat(129);
    assert!(!publish(&ch, "", "payments", &[id(&long)], "long").await);
    assert!(
        !publish(
            &ch,
            "",
            "payments",
            &[("x-deduplication-header", AMQPValue::LongInt(7))],
            "number"
        )
        .await
    );
    conn.close(200, "bye".into()).await.unwrap();

    // The ids are on disk with the queue.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    assert!(publish(&ch, "", "payments", &[id("p-2")], "after restart").await);
    assert!(get_all(&ch, "payments").await.is_empty(), "p-2 remembered");
    // Past the window, an id is new again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert!(publish(&ch, "", "payments", &[id("p-1")], "next window").await);
    assert_eq!(bodies(get_all(&ch, "payments").await), ["next window"]);

    // Bad arguments are the declaring client's error.
    for (arg, v) in [
        (
            "x-message-deduplication",
            AMQPValue::LongString("yes".into()),
        ),
        ("x-cache-size", AMQPValue::LongInt(0)),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let mut args = table(&[("x-message-deduplication", AMQPValue::Boolean(true))]);
        args.insert(arg.into(), v);
        let e = bad
            .queue_declare("bad".into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(arg), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduplicating_exchange_drops_duplicates_before_routing() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "events".into(),
        ExchangeKind::Custom("x-message-deduplication".into()),
        ExchangeDeclareOptions::default(),
        table(&[("x-cache-size", AMQPValue::LongInt(1000))]),
    )
    .await
    .unwrap();
    for q in ["a", "b"] {
        wasmq_tests::declare_queue(&ch, q).await;
        ch.queue_bind(
            q.into(),
            "events".into(),
            "ignored".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    // It routes as fanout; a duplicate reaches no queue (and is no
    // unroutable message: a mandatory publish is not returned).
    assert!(publish(&ch, "events", "k", &[id("e-1")], "one").await);
    assert!(publish(&ch, "events", "k", &[id("e-1")], "dup").await);
    // A message's own x-cache-ttl header bounds its id's window.
    let short = [id("e-2"), ("x-cache-ttl", AMQPValue::LongInt(200))];
    assert!(publish(&ch, "events", "k", &short, "two").await);
    assert!(publish(&ch, "events", "k", &short, "two-dup").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(publish(&ch, "events", "k", &short, "two-later").await);
    for q in ["a", "b"] {
        assert_eq!(
            bodies(get_all(&ch, q).await),
            ["one", "two", "two-later"],
            "queue {q}"
        );
    }

    // The plugin requires a size; wasmq too.
    let bad = conn.create_channel().await.unwrap();
    let e = bad
        .exchange_declare(
            "no-size".into(),
            ExchangeKind::Custom("x-message-deduplication".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(e.to_string().contains("x-cache-size"), "{e}");
}

/// Declare the durable deduplicating exchange `events` (a window of a
/// minute) and bind queue `a` to it.
async fn durable_dedup_exchange(ch: &Channel) {
    ch.exchange_declare(
        "events".into(),
        ExchangeKind::Custom("x-message-deduplication".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            ("x-cache-size", AMQPValue::LongInt(1000)),
            ("x-cache-ttl", AMQPValue::LongInt(60_000)),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "a".into(),
        "events".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_deduplicating_exchange_keeps_its_ids_across_a_restart() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_durable(&ch, "a", FieldTable::default()).await;
    durable_dedup_exchange(&ch).await;
    assert!(publish(&ch, "events", "k", &[id("e-1")], "one").await);
    assert!(publish(&ch, "events", "k", &[id("e-2")], "two").await);
    assert_eq!(bodies(get_all(&ch, "a").await), ["one", "two"]);
    conn.close(200, "bye".into()).await.unwrap();

    // The ids taken before the restart are still taken after it.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    assert!(publish(&ch, "events", "k", &[id("e-1")], "one again").await);
    assert!(publish(&ch, "events", "k", &[id("e-3")], "three").await);
    assert_eq!(bodies(get_all(&ch, "a").await), ["three"]);
    // Deleting the exchange takes its ids: declared again, it starts empty.
    ch.exchange_delete("events".into(), Default::default())
        .await
        .unwrap();
    durable_dedup_exchange(&ch).await;
    assert!(publish(&ch, "events", "k", &[id("e-1")], "new life").await);
    assert_eq!(bodies(get_all(&ch, "a").await), ["new life"]);
}
