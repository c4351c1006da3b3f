//! Quorum queues on a single node (RabbitMQ makes them one-replica
//! queues there, and applications declare them by default): accepted,
//! durable only, every message kept on disk whatever its delivery mode,
//! redeliveries counted in `x-delivery-count` across a restart, and
//! quorum queues' refusals kept. Checked with lapin.

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use wasmq_tests::{TestServer, get_all, publish_confirmed, reply_code};

fn quorum(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn delivery_count(d: &lapin::message::Delivery) -> Option<i64> {
    match d
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-delivery-count")?
    {
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_makes_quorum_queues_one_replica_queues() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("orders".into(), durable, quorum(&[]))
        .await
        .unwrap();
    // A transient message is kept on disk too, as a quorum queue keeps it.
    let transient = BasicProperties::default();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    assert!(publish_confirmed(&ch, "", "orders", b"transient", transient).await);
    assert!(publish_confirmed(&ch, "", "orders", b"persistent", persistent).await);
    // A returned delivery comes back counted.
    let first = ch
        .basic_get("orders".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery_count(&first.delivery), None);
    first
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = ch
        .basic_get("orders".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    assert!(again.delivery.redelivered);
    assert_eq!(&again.delivery.data[..], b"transient");
    assert_eq!(delivery_count(&again.delivery), Some(1));
    again
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.unwrap();

    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let back = ch
        .basic_get("orders".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back.delivery.data[..], b"transient");
    assert_eq!(delivery_count(&back.delivery), Some(2), "counted on disk");
    let rest: Vec<String> = get_all(&ch, "orders")
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert_eq!(rest, ["persistent"]);

    // What RabbitMQ refuses of a quorum queue, refused the same way.
    for (opts, args, says) in [
        (QueueDeclareOptions::default(), quorum(&[]), "non-durable"),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            quorum(&[]),
            "exclusive",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            quorum(&[]),
            "auto-delete",
        ),
        (
            durable,
            quorum(&[("x-max-priority", AMQPValue::LongInt(5))]),
            "x-max-priority",
        ),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let e = bad
            .queue_declare("bad".into(), opts, args)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
}
