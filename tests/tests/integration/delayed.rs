//! Delayed delivery: the `x-delayed-message` exchange of RabbitMQ's
//! community plugin (`x-delayed-type`, the `x-delay` header), a queue's
//! own delay (`x-delivery-delay`, SQS's queue-level `DelaySeconds`) and a
//! transform that decides the delay (the `backoff` example), checked with
//! lapin against the real broker and across a restart.
//!
//! Messages must never arrive before their time; that they arrive soon
//! after is checked with a generous bound (the lateness is measured in
//! `docs/performance.md`, not asserted here).

use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
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

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// Publish `body` (persistent) with `x-delay` set to `delay` if given;
/// whether it was confirmed.
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    delay: Option<AMQPValue>,
    body: &str,
) -> bool {
    let headers = match delay {
        Some(d) => table(&[("x-delay", d)]),
        None => FieldTable::default(),
    };
    let props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    publish_confirmed(ch, exchange, key, body.as_bytes(), props).await
}

async fn delayed_exchange(ch: &Channel, name: &str, routing: &str, extra: &[(&str, AMQPValue)]) {
    let mut args = table(&[("x-delayed-type", text(routing))]);
    for (k, v) in extra {
        args.insert((*k).into(), v.clone());
    }
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// A delayed exchange `retry` (routing as `direct`) whose `backoff`
/// transform delays each message `base_ms` × 2^attempts, binding `work`.
async fn retry_exchange(server: &TestServer, ch: &Channel, base_ms: i32, work: FieldTable) {
    server.install("backoff", "backoff");
    delayed_exchange(
        ch,
        "retry",
        "direct",
        &[
            ("x-wasmq-transform", text("backoff")),
            ("x-backoff-base-ms", AMQPValue::LongInt(base_ms)),
        ],
    )
    .await;
    declare_durable(ch, "work", work).await;
    bind(ch, "work", "retry", "work").await;
}

/// Collect `queue`'s messages until there are `n` or `within` passed.
async fn collect(ch: &Channel, queue: &str, n: usize, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < until {
        got.extend(get_all(ch, queue).await.into_iter().map(|(b, _)| b));
        if got.len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_exchange_routes_each_message_when_due_against_the_bindings_of_then() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    delayed_exchange(&ch, "later", "topic", &[]).await;
    declare_durable(&ch, "first", FieldTable::default()).await;
    bind(&ch, "first", "later", "orders.#").await;

    let published = Instant::now();
    assert!(
        publish(
            &ch,
            "later",
            "orders.eu",
            Some(AMQPValue::LongInt(900)),
            "slow"
        )
        .await
    );
    assert!(publish(&ch, "later", "orders.eu", Some(text("300")), "fast").await);
    assert!(publish(&ch, "later", "orders.eu", None, "now").await);
    assert!(
        publish(
            &ch,
            "later",
            "orders.eu",
            Some(AMQPValue::LongLongInt(-5)),
            "negative"
        )
        .await
    );
    assert!(
        publish(
            &ch,
            "later",
            "other",
            Some(AMQPValue::LongInt(300)),
            "nowhere"
        )
        .await
    );
    // Without a delay (or with a negative one) a message is routed at once.
    let now: Vec<String> = get_all(&ch, "first")
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(now, ["now", "negative"]);
    let view = server.admin().get("/api/exchanges/%2f/later").unwrap();
    assert_eq!(view["messages_delayed"], 3, "{view}");
    assert_eq!(view["type"], "x-delayed-message", "{view}");
    let admin = server.admin();
    let metrics = tokio::task::spawn_blocking(move || admin.get_text("/metrics").unwrap())
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wasmq_queue_messages_delayed")
                && l.contains("queue=\"amq.delayed.later\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );

    // Routed when due, so a binding made meanwhile takes it too.
    declare_durable(&ch, "second", FieldTable::default()).await;
    bind(&ch, "second", "later", "orders.*").await;
    // When due it is routed marked as the plugin marks it: x-delay negated.
    let until = Instant::now() + Duration::from_secs(10);
    let fast = loop {
        if let Some(m) = ch
            .basic_get("first".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            break m;
        }
        assert!(Instant::now() < until, "the fast one never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(&fast.delivery.data[..], b"fast");
    let marked = fast
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delay").cloned());
    assert_eq!(marked, Some(AMQPValue::LongLongInt(-300)));
    assert!(
        published.elapsed() >= Duration::from_millis(300),
        "never early"
    );
    let rest = collect(&ch, "first", 1, Duration::from_secs(10)).await;
    assert_eq!(rest, ["slow"]);
    assert!(
        published.elapsed() >= Duration::from_millis(900),
        "never early"
    );
    let second: Vec<String> = get_all(&ch, "second")
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(second, ["fast", "slow"]);
    let view = server.admin().get("/api/exchanges/%2f/later").unwrap();
    assert_eq!(view["messages_delayed"], 0, "{view}");
    assert_eq!(view["message_stats"]["unroutable"], 1, "{view}");

    // A delay that is not one is refused (nacked), as is one past the
    // plugin's maximum; nothing is held for them.
    assert!(!publish(&ch, "later", "orders.eu", Some(text("soon")), "bad").await);
    assert!(
        !publish(
            &ch,
            "later",
            "orders.eu",
            Some(AMQPValue::LongLongInt(1 << 33)),
            "far"
        )
        .await
    );
    // Seven days is well within it.
    let week = AMQPValue::LongLongInt(7 * 24 * 3600 * 1000);
    assert!(publish(&ch, "later", "orders.eu", Some(week), "next week").await);
    let view = server
        .admin()
        .get("/api/queues/%2f/amq.delayed.later")
        .unwrap();
    assert_eq!(view["messages_delayed"], 1, "{view}");
    assert_eq!(view["messages"], 0, "{view}");
    // The export holds what a client declares: the exchange, not its
    // schedule (which the exchange makes again on import).
    let defs = server.admin().get("/api/definitions").unwrap();
    let names = |kind: &str| -> Vec<String> {
        defs[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(names("exchanges").contains(&"later".to_owned()), "{defs}");
    assert!(
        !names("queues")
            .iter()
            .any(|q| q.starts_with("amq.delayed.")),
        "{defs}"
    );

    // The schedule is the exchange's: its queue goes with it, not alone.
    let other = conn.create_channel().await.unwrap();
    let e = other
        .queue_delete("amq.delayed.later".into(), QueueDeleteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "{e}");
    ch.exchange_delete("later".into(), Default::default())
        .await
        .unwrap();
    assert!(
        server
            .admin()
            .get("/api/queues/%2f/amq.delayed.later")
            .is_err()
    );

    // Declaring one needs a routing type that exists.
    for (args, says) in [
        (FieldTable::default(), "x-delayed-type"),
        (
            table(&[("x-delayed-type", text("no-such-type"))]),
            "no-such-type",
        ),
        (
            table(&[("x-delayed-type", text("x-delayed-message"))]),
            "x-delayed-type",
        ),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let e = bad
            .exchange_declare(
                "bad".into(),
                ExchangeKind::Custom("x-delayed-message".into()),
                ExchangeDeclareOptions::default(),
                args,
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_are_kept_across_a_restart_and_delivered_after_it() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    delayed_exchange(&ch, "later", "direct", &[]).await;
    declare_durable(&ch, "out", FieldTable::default()).await;
    bind(&ch, "out", "later", "k").await;
    let published = Instant::now();
    assert!(publish(&ch, "later", "k", Some(AMQPValue::LongInt(1500)), "kept").await);
    // A transient message is not kept, as a transient message in a
    // durable queue is not.
    let transient =
        BasicProperties::default().with_headers(table(&[("x-delay", AMQPValue::LongInt(1500))]));
    assert!(publish_confirmed(&ch, "later", "k", b"transient", transient).await);
    conn.close(200, "bye".into()).await.unwrap();

    let server = server.restart().await;
    let view = server.admin().get("/api/exchanges/%2f/later").unwrap();
    assert_eq!(view["messages_delayed"], 1, "{view}");
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let got = collect(&ch, "out", 1, Duration::from_secs(10)).await;
    assert_eq!(got, ["kept"]);
    assert!(
        published.elapsed() >= Duration::from_millis(1500),
        "never early"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(get_all(&ch, "out").await.is_empty());
    let view = server.admin().get("/api/exchanges/%2f/later").unwrap();
    assert_eq!(view["messages_delayed"], 0, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_a_delivery_delay_holds_every_message_that_long() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let args = table(&[("x-delivery-delay", AMQPValue::LongInt(700))]);
    declare_durable(&ch, "slow", args.clone()).await;
    let published = Instant::now();
    assert!(publish(&ch, "", "slow", None, "one").await);
    assert!(publish(&ch, "", "slow", None, "two").await);
    // Held: not ready, not counted as ready, visible as delayed.
    let q = wasmq_tests::declare_passive(&ch, "slow").await.unwrap();
    assert_eq!(q.message_count(), 0);
    assert!(get_all(&ch, "slow").await.is_empty());
    let view = server.admin().get("/api/queues/%2f/slow").unwrap();
    assert_eq!(view["messages_delayed"], 2, "{view}");
    let got = collect(&ch, "slow", 2, Duration::from_secs(10)).await;
    assert_eq!(got, ["one", "two"]);
    assert!(
        published.elapsed() >= Duration::from_millis(700),
        "never early"
    );

    // Across a restart the delay counts from the publish.
    assert!(publish(&ch, "", "slow", None, "three").await);
    let published = Instant::now();
    conn.close(200, "bye".into()).await.unwrap();
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let got = collect(&ch, "slow", 1, Duration::from_secs(10)).await;
    assert_eq!(got, ["three"]);
    assert!(
        published.elapsed() >= Duration::from_millis(650),
        "never early"
    );

    for v in [
        AMQPValue::LongInt(-1),
        text("soon"),
        AMQPValue::LongLongInt(1 << 33),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let e = bad
            .queue_declare(
                "bad".into(),
                QueueDeclareOptions::default(),
                table(&[("x-delivery-delay", v)]),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains("x-delivery-delay"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_decides_the_delay_of_a_retry() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    retry_exchange(&server, &ch, 150, FieldTable::default()).await;
    // Third attempt: 150 * 2^2 = 600 ms; a first one: 150 ms.
    let third = BasicProperties::default()
        .with_headers(table(&[("x-delivery-count", AMQPValue::LongInt(2))]));
    let published = Instant::now();
    assert!(publish_confirmed(&ch, "retry", "work", b"third", third).await);
    assert!(publish_confirmed(&ch, "retry", "work", b"first", BasicProperties::default()).await);
    let got = collect(&ch, "work", 1, Duration::from_secs(10)).await;
    assert_eq!(got, ["first"]);
    assert!(
        published.elapsed() >= Duration::from_millis(150),
        "never early"
    );
    let got = collect(&ch, "work", 1, Duration::from_secs(10)).await;
    assert_eq!(got, ["third"]);
    assert!(
        published.elapsed() >= Duration::from_millis(600),
        "never early"
    );
}

/// The retry loop the `backoff` example is for: a rejected message is
/// dead-lettered to a delayed exchange whose transform delays it by
/// base × 2^attempts (attempts from `x-death`), and comes back to its
/// queue; each rejection waits twice as long as the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_come_back_with_exponential_back_off() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let work = table(&[("x-dead-letter-exchange", text("retry"))]);
    retry_exchange(&server, &ch, 100, work).await;
    assert!(publish(&ch, "", "work", None, "job").await);
    let take = |ch: Channel| async move {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = ch
                .basic_get("work".into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
            {
                return m;
            }
            assert!(Instant::now() < until, "the job never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // The time before the reject is sent: the broker dead-letters it later.
    let reject = |m: lapin::message::BasicGetMessage| async move {
        let at = Instant::now();
        m.delivery
            .reject(lapin::options::BasicRejectOptions { requeue: false })
            .await
            .unwrap();
        at
    };
    let mut rejected = reject(take(ch.clone()).await).await;
    // Its x-death count is 1, then 2: back after 100 × 2 ms, then 100 × 4.
    for back_off in [200u64, 400] {
        let m = take(ch.clone()).await;
        let waited = rejected.elapsed();
        assert!(
            waited >= Duration::from_millis(back_off),
            "came back after {waited:?}, before its back-off of {back_off} ms"
        );
        rejected = reject(m).await;
    }
}

/// An operator gives existing queues a delay at run time with a policy's
/// `delivery-delay`, as SQS's queue `DelaySeconds` is changed in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sets_a_queues_delivery_delay_at_run_time() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_durable(&ch, "jobs.slow", FieldTable::default()).await;
    assert!(publish(&ch, "", "jobs.slow", None, "before").await);
    assert_eq!(
        collect(&ch, "jobs.slow", 1, Duration::from_secs(5)).await,
        ["before"]
    );
    let admin = server.admin();
    let policy = serde_json::json!({
        "pattern": "^jobs\\.", "definition": {"delivery-delay": 400}, "apply-to": "queues"
    });
    let status = tokio::task::spawn_blocking(move || admin.put("/api/policies/%2F/slow", &policy))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 201);
    let published = Instant::now();
    assert!(publish(&ch, "", "jobs.slow", None, "after").await);
    assert!(
        get_all(&ch, "jobs.slow").await.is_empty(),
        "held by the policy"
    );
    assert_eq!(
        collect(&ch, "jobs.slow", 1, Duration::from_secs(10)).await,
        ["after"]
    );
    assert!(
        published.elapsed() >= Duration::from_millis(400),
        "never early"
    );
}
