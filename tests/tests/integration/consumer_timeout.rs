//! The consumer timeout (RabbitMQ's `consumer_timeout`, SQS's visibility
//! timeout): a delivery not acknowledged in time closes its channel with
//! 406 and goes back to its queue, flagged redelivered, for another
//! consumer; a consumer that acks in time never notices. Set by the
//! broker's default, a queue's `x-consumer-timeout` or a policy, and kept
//! with a durable queue across a restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde_json::json;
use wasmq_tests::{TestServer, declare_durable, get_all, publish_confirmed, reply_code};

/// Every error lapin reports on `conn` (a channel or the connection
/// closed by the broker), as text, while the returned guard lives.
///
/// lapin's listeners share one queue (each event goes to one of them), so
/// a listener left running would take the next close from the one a later
/// call starts: the guard stops it.
struct Errors {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Errors {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn errors(conn: &Connection) -> Errors {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut events = Box::pin(conn.events_listener());
    let into = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                into.lock().unwrap().push(e.to_string());
            }
        }
    });
    Errors { seen, task }
}

async fn declare(ch: &lapin::Channel, name: &str, timeout_ms: Option<i64>) {
    let mut args = FieldTable::default();
    if let Some(ms) = timeout_ms {
        args.insert("x-consumer-timeout".into(), AMQPValue::LongLongInt(ms));
    }
    declare_durable(ch, name, args).await;
}

async fn publish(ch: &lapin::Channel, queue: &str, bodies: &[&str]) {
    for b in bodies {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        assert!(publish_confirmed(ch, "", queue, b.as_bytes(), persistent).await);
    }
}

/// Consume `queue` on a new channel of `conn` with prefetch 1, take one
/// delivery and never ack it; wait until the broker closes the channel
/// and return the close's text and how long it took.
async fn hold_one(conn: &Connection, queue: &str) -> (String, Duration) {
    let seen = errors(conn);
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "holder".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    assert!(!first.redelivered);
    let took = Instant::now();
    let until = took + Duration::from_secs(10);
    loop {
        if let Some(e) = seen.seen.lock().unwrap().first() {
            return (e.clone(), took.elapsed());
        }
        assert!(Instant::now() < until, "the channel was never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_delivery_past_its_timeout_closes_the_channel_and_is_requeued() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare(&ch, "jobs", Some(300)).await;
    publish(&ch, "jobs", &["m0", "m1"]).await;

    let (text, after) = hold_one(&conn, "jobs").await;
    assert!(
        text.contains("PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out. Timeout value used: 300 ms"),
        "{text}"
    );
    assert!(
        text.contains("soft error: PRECONDITION-FAILED"),
        "406: {text}"
    );
    assert!(
        after >= Duration::from_millis(300),
        "closed early: {after:?}"
    );
    // Only the channel: the connection and its other channel go on, and
    // the message held is back at the head, flagged redelivered.
    assert!(conn.status().connected());
    assert_eq!(
        get_all(&ch, "jobs").await,
        vec![("m0".to_owned(), true), ("m1".to_owned(), false)]
    );

    // A consumer that acks within the timeout keeps its channel.
    publish(&ch, "jobs", &["a", "b", "c", "d", "e"]).await;
    let seen = errors(&conn);
    let worker = conn.create_channel().await.unwrap();
    worker
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut c = worker
        .basic_consume(
            "jobs".into(),
            "worker".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        let d = c.next().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        seen.seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.seen.lock().unwrap()
    );
    assert!(worker.status().connected());
    conn.close(200, "bye".into()).await.unwrap();

    // Kept with the durable queue: after a restart it holds again.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    publish(&ch, "jobs", &["after"]).await;
    let (text, _) = hold_one(&conn, "jobs").await;
    assert!(text.contains("Timeout value used: 300 ms"), "{text}");
    assert_eq!(get_all(&ch, "jobs").await, vec![("after".to_owned(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_comes_from_the_broker_default_a_policy_or_the_queue() {
    let server = TestServer::start_with(|c| c.amqp.consumer_timeout_ms = 400).await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare(&ch, "plain", None).await;
    publish(&ch, "plain", &["x"]).await;
    let (text, _) = hold_one(&conn, "plain").await;
    assert!(text.contains("Timeout value used: 400 ms"), "{text}");

    // A policy's lower value holds for the queues it matches.
    server
        .admin()
        .put(
            "/api/policies/%2f/patient",
            &json!({"pattern": "^pol\\.", "definition": {"consumer-timeout": 250}, "apply-to": "queues"}),
        )
        .unwrap();
    declare(&ch, "pol.q", None).await;
    publish(&ch, "pol.q", &["y"]).await;
    let (text, _) = hold_one(&conn, "pol.q").await;
    assert!(text.contains("Timeout value used: 250 ms"), "{text}");
    let view = server.admin().get("/api/queues/%2f/pol.q").unwrap();
    assert_eq!(view["effective_policy_definition"]["consumer-timeout"], 250);

    // What a queue cannot take is refused at declare.
    for bad in [
        AMQPValue::LongLongInt(0),
        AMQPValue::LongString("soon".into()),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert("x-consumer-timeout".into(), bad);
        let e = ch
            .queue_declare("bad".into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains("x-consumer-timeout"), "{e}");
    }
}
