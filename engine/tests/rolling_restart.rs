//! A rolling restart, as a Kubernetes StatefulSet update does it: each node
//! of a three-node cluster of real processes stopped gracefully (SIGTERM),
//! started again, and the next one taken only once `/ready` says the
//! restarted node has caught up; all the while publishers confirm and
//! consumers ack on a quorum queue and on a classic queue. Afterwards
//! every confirmed message was delivered, none twice without the
//! redelivered flag, and every consumer was still getting messages at the
//! end (none stranded).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

mod common;
use common::checker::*;
use common::cluster::*;

const QUORUM: &str = "rolling.quorum";
const CLASSIC: &str = "rolling.classic";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_no_confirmed_message_and_strands_no_consumer() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let mut nodes = [a, b, c];
    {
        let conn = nodes[0].connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut quorum = FieldTable::default();
        quorum.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(QUORUM.into(), durable, quorum)
            .await
            .unwrap();
        // The classic queue lives on b: its node goes down too.
        let conn_b = nodes[1].connect().await;
        let ch_b = conn_b.create_channel().await.unwrap();
        ch_b.queue_declare(CLASSIC.into(), durable, FieldTable::default())
            .await
            .unwrap();
    }
    for n in &nodes {
        eventually(
            &format!("{} ready", n.name),
            Duration::from_secs(30),
            || n.is_ready(),
        )
        .await;
    }
    let addrs: Addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| Some(n.amqp.clone())).collect(),
    ));
    let record: Shared = Arc::default();
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let (mut publishers, mut consumers) = (Vec::new(), Vec::new());
    // Publisher and consumer ids are unique across the two queues.
    for (i, queue) in [QUORUM, CLASSIC].into_iter().enumerate() {
        for k in 0..2 {
            let id = i * 2 + k;
            publishers.push(tokio::spawn(publisher(
                id,
                queue,
                addrs.clone(),
                record.clone(),
                stop_publishing.clone(),
            )));
            consumers.push(tokio::spawn(consumer(
                id,
                queue,
                addrs.clone(),
                record.clone(),
                stop_consuming.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut gates = Vec::new();
    for (i, node) in nodes.iter_mut().enumerate() {
        addrs.lock().unwrap()[i] = None;
        node.stop().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        node.restart().await;
        let start = Instant::now();
        eventually(
            &format!("{} ready after its restart", node.name),
            Duration::from_secs(60),
            || node.is_ready(),
        )
        .await;
        gates.push((node.name.clone(), start.elapsed()));
        addrs.lock().unwrap()[i] = Some(node.amqp.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // None stranded: after the last restart every consumer gets messages
    // again.
    let before: Vec<usize> = {
        let r = record.lock().unwrap();
        (0..4)
            .map(|c| r.deliveries.iter().filter(|d| d.0 == c).count())
            .collect()
    };
    eventually(
        "every consumer receiving after the rolling restart",
        Duration::from_secs(30),
        || {
            let r = record.lock().unwrap();
            (0..4).all(|c| r.deliveries.iter().filter(|d| d.0 == c).count() > before[c])
        },
    )
    .await;
    drain(
        &record,
        &stop_publishing,
        publishers,
        &stop_consuming,
        consumers,
        || print_consumers(&nodes),
    )
    .await;
    let verdict = check(&record.lock().unwrap());
    eprintln!(
        "rolling restart: published {}, confirmed {}, delivered {}, lost {}, unflagged duplicates {}, out of order {}; ready after restart: {gates:?}",
        verdict.published,
        verdict.confirmed,
        verdict.delivered,
        verdict.lost.len(),
        verdict.unflagged_duplicates.len(),
        verdict.out_of_order.len()
    );
    assert!(verdict.confirmed > 0, "{verdict:?}");
    assert!(
        verdict.lost.is_empty()
            && verdict.unknown.is_empty()
            && verdict.unflagged_duplicates.is_empty()
            && verdict.out_of_order.is_empty(),
        "{verdict:#?}"
    );
}
