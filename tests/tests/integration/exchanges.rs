//! Exchanges over AMQP through lapin: exchange-to-exchange bindings,
//! internal exchanges, alternate exchanges, and the rules for deleting
//! exchanges and queues (`if-unused`, `if-empty`).

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use wasmq_tests::{TestServer, get_all};

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind, internal: bool, args: FieldTable) {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            internal,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

async fn queue_bound(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    wasmq_tests::declare_queue(ch, queue).await;
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

/// Publish with confirms and wait for the broker's ack.
async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{exchange}/{key}: {confirm:?}");
}

fn bodies(got: Vec<(String, bool)>) -> Vec<String> {
    got.into_iter().map(|(b, _)| b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_bindings_route_through_internal_exchanges() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    exchange(
        &ch,
        "events",
        ExchangeKind::Topic,
        false,
        FieldTable::default(),
    )
    .await;
    // Clients cannot publish to `orders` itself: only `events` feeds it.
    exchange(
        &ch,
        "orders",
        ExchangeKind::Fanout,
        true,
        FieldTable::default(),
    )
    .await;
    ch.exchange_bind(
        "orders".into(),
        "events".into(),
        "orders.#".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    queue_bound(&ch, "billing", "orders", "").await;
    queue_bound(&ch, "audit", "events", "#").await;

    publish(&ch, "events", "orders.created", "order 1").await;
    publish(&ch, "events", "users.created", "user 1").await;
    assert_eq!(bodies(get_all(&ch, "billing").await), ["order 1"]);
    assert_eq!(bodies(get_all(&ch, "audit").await), ["order 1", "user 1"]);

    // Unbound, `orders` gets nothing more; `events` still routes.
    ch.exchange_unbind(
        "orders".into(),
        "events".into(),
        "orders.#".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "events", "orders.created", "order 2").await;
    assert!(get_all(&ch, "billing").await.is_empty());
    assert_eq!(bodies(get_all(&ch, "audit").await), ["order 2"]);

    // Publishing to the internal exchange closes the channel with 403 (read
    // from lapin's error events: a method sent after the publish may fail
    // first with lapin's own "channel closing" error).
    let code = wasmq_tests::close_code(&conn);
    let bad = conn.create_channel().await.unwrap();
    bad.basic_publish(
        "orders".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"direct",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert_eq!(wasmq_tests::until_close_code(&code).await, Some(403));
    assert!(get_all(&ch, "billing").await.is_empty());
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_go_to_the_alternate_exchange() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    exchange(
        &ch,
        "unrouted",
        ExchangeKind::Fanout,
        false,
        FieldTable::default(),
    )
    .await;
    queue_bound(&ch, "lost", "unrouted", "").await;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("alternate-exchange"),
        AMQPValue::LongString(LongString::from("unrouted")),
    );
    exchange(&ch, "orders", ExchangeKind::Direct, false, args).await;
    queue_bound(&ch, "eu", "orders", "eu").await;

    publish(&ch, "orders", "eu", "routed").await;
    publish(&ch, "orders", "us", "unroutable").await;
    assert_eq!(bodies(get_all(&ch, "eu").await), ["routed"]);
    assert_eq!(bodies(get_all(&ch, "lost").await), ["unroutable"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_unused_and_if_empty_deletes_are_refused_with_406() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    exchange(&ch, "x", ExchangeKind::Direct, false, FieldTable::default()).await;
    queue_bound(&ch, "q", "x", "k").await;
    ch.basic_publish(
        "x".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"waiting",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let consumer = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&consumer, "consumed").await;
    let _c = wasmq_tests::consume(&consumer, "consumed", "c").await;

    let refused = [
        (
            "exchange with a binding, if-unused",
            conn.create_channel()
                .await
                .unwrap()
                .exchange_delete(
                    "x".into(),
                    ExchangeDeleteOptions {
                        if_unused: true,
                        ..Default::default()
                    },
                )
                .await
                .map(|_| 0),
        ),
        (
            "queue with a message, if-empty",
            conn.create_channel()
                .await
                .unwrap()
                .queue_delete(
                    "q".into(),
                    QueueDeleteOptions {
                        if_empty: true,
                        ..Default::default()
                    },
                )
                .await,
        ),
        (
            "queue with a consumer, if-unused",
            conn.create_channel()
                .await
                .unwrap()
                .queue_delete(
                    "consumed".into(),
                    QueueDeleteOptions {
                        if_unused: true,
                        ..Default::default()
                    },
                )
                .await,
        ),
    ];
    for (what, result) in refused {
        let err = result.expect_err(what);
        assert_eq!(wasmq_tests::reply_code(&err), Some(406), "{what}: {err}");
    }
    // Nothing was deleted; without the conditions they go.
    let vhost = t.broker().vhost("/").unwrap();
    assert!(vhost.exchange("x").is_ok() && vhost.queue("consumed").is_ok());
    assert_eq!(
        ch.queue_delete("q".into(), QueueDeleteOptions::default())
            .await
            .unwrap(),
        1,
        "delete-ok counts the messages deleted"
    );
    ch.exchange_delete("x".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    assert!(vhost.exchange("x").is_err());
    consumer
        .queue_delete("consumed".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(vhost.queue("consumed").is_err());
}
