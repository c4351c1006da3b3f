//! The delivery limit on classic queues (SQS's `maxReceiveCount`), as
//! quorum queues have it: each return of a delivery (nack or reject with
//! requeue, a channel closed with it unacked) is counted in the
//! `x-delivery-count` header; past `x-delivery-limit` the message is
//! dead-lettered with reason `delivery_limit`, or dropped without a
//! dead-letter exchange. The count of a persistent message survives a
//! restart.

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use wasmq_tests::{TestServer, declare_durable, get_all, publish_confirmed};

fn delivery_count(m: &BasicGetMessage) -> Option<i64> {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-delivery-count")?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        other => panic!("x-delivery-count is {other:?}"),
    }
}

fn death_reason(m: &BasicGetMessage) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        _ => None,
    }
}

async fn get(ch: &lapin::Channel, queue: &str) -> BasicGetMessage {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{queue} is empty"))
}

async fn nack_requeue(m: &BasicGetMessage) {
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn declare(ch: &lapin::Channel, name: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert((*k).into(), v.clone());
    }
    declare_durable(ch, name, table).await;
}

async fn publish(ch: &lapin::Channel, queue: &str, body: &str) {
    let persistent = BasicProperties::default().with_delivery_mode(2);
    assert!(publish_confirmed(ch, "", queue, body.as_bytes(), persistent).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_counts_returns_and_dead_letters_past_its_limit_across_a_restart() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(&ch, "dead", &[]).await;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare(
        &ch,
        "work",
        &[
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString("dlx".into()),
            ),
        ],
    )
    .await;
    publish(&ch, "work", "poison").await;
    publish(&ch, "work", "good").await;

    let first = get(&ch, "work").await;
    assert_eq!(first.delivery.data, b"poison");
    assert_eq!(
        delivery_count(&first),
        None,
        "a first delivery has no count"
    );
    nack_requeue(&first).await;
    let second = get(&ch, "work").await;
    assert!(second.delivery.redelivered);
    assert_eq!(delivery_count(&second), Some(1));
    nack_requeue(&second).await;
    conn.close(200, "bye".into()).await.unwrap();

    // The count is kept with the persistent message.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let third = get(&ch, "work").await;
    assert_eq!(third.delivery.data, b"poison");
    assert_eq!(
        delivery_count(&third),
        Some(2),
        "counted across the restart"
    );
    // Returned by closing its channel: the third return, past the limit.
    ch.close(200, "bye".into()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let dead = get(&ch, "dead").await;
    assert_eq!(dead.delivery.data, b"poison");
    assert_eq!(death_reason(&dead).as_deref(), Some("delivery_limit"));
    // What a restart recovers is flagged redelivered (it may have been
    // out before), as RabbitMQ flags it.
    assert_eq!(get_all(&ch, "work").await, vec![("good".to_owned(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_exchange_a_message_past_its_limit_is_dropped() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare(&ch, "once", &[("x-delivery-limit", AMQPValue::LongInt(0))]).await;
    publish(&ch, "once", "m").await;
    let m = get(&ch, "once").await;
    nack_requeue(&m).await;
    assert_eq!(get_all(&ch, "once").await, vec![]);
    let view = server.admin().get("/api/queues/%2f/once").unwrap();
    assert_eq!(view["messages"], 0, "{view}");

    // A bad limit is the declaring client's error.
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(-1));
    let e = ch
        .queue_declare("bad".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("x-delivery-limit"), "{e}");
}
