//! Message groups (SQS FIFO's `MessageGroupId`): with
//! `x-message-group-header`, no two messages of one group are out at once
//! and a group's messages arrive in publish order, while competing
//! consumers take different groups in parallel. Checked with lapin
//! consumers that record what they hold, across a requeue and a restart.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use wasmq_tests::{TestServer, declare_durable, get_all, publish_confirmed, reply_code};

async fn declare(ch: &Channel, name: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-message-group-header".into(),
        AMQPValue::LongString("group".into()),
    );
    declare_durable(ch, name, args).await;
}

fn props(group: Option<AMQPValue>) -> BasicProperties {
    let mut h = FieldTable::default();
    if let Some(g) = group {
        h.insert("group".into(), g);
    }
    BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(2)
}

/// Publish `body` in `group`; whether it was confirmed (acked).
async fn publish(ch: &Channel, queue: &str, group: Option<AMQPValue>, body: &str) -> bool {
    publish_confirmed(ch, "", queue, body.as_bytes(), props(group)).await
}

fn group(g: &str) -> Option<AMQPValue> {
    Some(AMQPValue::LongString(g.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_served_one_message_at_a_time_in_order_while_groups_go_in_parallel() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare(&ch, "orders").await;
    const GROUPS: usize = 6;
    const EACH: usize = 8;
    for i in 0..EACH {
        for g in 0..GROUPS {
            assert!(publish(&ch, "orders", group(&format!("g{g}")), &format!("g{g}:{i}")).await);
        }
    }

    // Three consumers, each with room for several messages: the broker,
    // not the prefetch, keeps a group to one message out at a time.
    let out: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let by_consumer: Arc<Mutex<HashMap<usize, HashSet<String>>>> = Arc::default();
    let mut tasks = Vec::new();
    for c in 0..3 {
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        let mut sub = ch
            .basic_consume(
                "orders".into(),
                format!("c{c}").as_str().into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (out, seen, by_consumer) = (out.clone(), seen.clone(), by_consumer.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_secs(2), sub.next()).await
            {
                let body = String::from_utf8(d.data.clone()).unwrap();
                let (g, i) = body.split_once(':').unwrap();
                let first_out = out.lock().unwrap().insert(g.to_owned());
                assert!(first_out, "two messages of {g} out at once ({body})");
                seen.lock()
                    .unwrap()
                    .entry(g.to_owned())
                    .or_default()
                    .push(i.parse().unwrap());
                by_consumer
                    .lock()
                    .unwrap()
                    .entry(c)
                    .or_default()
                    .insert(g.to_owned());
                tokio::time::sleep(Duration::from_millis(5)).await;
                // Out of the set before the ack: the next of the group can
                // only come after it.
                out.lock().unwrap().remove(g);
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            drop(ch);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), GROUPS);
    for (g, order) in seen.iter() {
        assert_eq!(*order, (0..EACH).collect::<Vec<_>>(), "{g} out of order");
    }
    let by_consumer = by_consumer.lock().unwrap();
    assert!(
        by_consumer.len() >= 2,
        "groups went to one consumer only: {by_consumer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_message_keeps_its_group_waiting_and_groups_survive_a_restart() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare(&ch, "jobs").await;
    for (g, b) in [("a", "a1"), ("a", "a2"), ("b", "b1")] {
        assert!(publish(&ch, "jobs", group(g), b).await);
    }
    assert!(publish(&ch, "jobs", None, "free").await);

    let get = |ch: Channel| async move {
        ch.basic_get("jobs".into(), Default::default())
            .await
            .unwrap()
    };
    let a1 = get(ch.clone()).await.unwrap();
    assert_eq!(a1.delivery.data, b"a1");
    // a is out: b1, then the ungrouped message, then nothing.
    let b1 = get(ch.clone()).await.unwrap();
    assert_eq!(b1.delivery.data, b"b1");
    let free = get(ch.clone()).await.unwrap();
    assert_eq!(free.delivery.data, b"free");
    free.delivery.ack(BasicAckOptions::default()).await.unwrap();
    assert!(get(ch.clone()).await.is_none(), "a2 waits for a1");
    // a1 back (nack, requeue): it heads its group again, a2 still waits.
    a1.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = get(ch.clone()).await.unwrap();
    assert_eq!(again.delivery.data, b"a1");
    assert!(again.delivery.redelivered);
    assert!(get(ch.clone()).await.is_none());
    b1.delivery.ack(BasicAckOptions::default()).await.unwrap();
    // Closed, not dropped: the ack is sent before the connection goes.
    conn.close(200, "bye".into()).await.unwrap();

    // a1 was out when the broker stopped: after the restart it is first
    // again, and a2 still comes only after it.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let first = get(ch.clone()).await.unwrap();
    assert_eq!(first.delivery.data, b"a1");
    assert!(
        get(ch.clone()).await.is_none(),
        "a2 waits for a1 after a restart"
    );
    first
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(get_all(&ch, "jobs").await, vec![("a2".to_owned(), true)]);

    // A group header that is not a string is refused (a nack).
    ch.confirm_select(Default::default()).await.unwrap();
    assert!(!publish(&ch, "jobs", Some(AMQPValue::LongInt(7)), "bad").await);
    assert!(publish(&ch, "jobs", group("a"), "good").await);
    assert_eq!(get_all(&ch, "jobs").await, vec![("good".to_owned(), false)]);

    // A declare that cannot hold groups is refused, naming the argument.
    let bad = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-message-group-header".into(),
        AMQPValue::LongString("group".into()),
    );
    args.insert("x-max-priority".into(), AMQPValue::LongInt(5));
    let e = bad
        .queue_declare("both".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(e.to_string().contains("x-message-group-header"), "{e}");
}
