//! Quorum queues on a three-node cluster of real `wasmq` processes on
//! loopback: replicated on every node, served by their leader to clients
//! of any node, and keeping every confirmed message when the leader's node
//! is killed.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

mod common;
use common::cluster::*;

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

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// The leader of `queue` as `node` sees it.
fn leader_on(node: &Node, queue: &str) -> Option<String> {
    let qs = node.api().get("/api/queues/%2F").ok()?;
    qs.as_array()?
        .iter()
        .find(|q| q["name"] == queue)
        .and_then(|q| q["quorum"]["leader"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_keeps_every_confirmed_message_when_its_leader_dies() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let conn_a = a.connect().await;
    let ch = conn_a.create_channel().await.unwrap();
    ch.queue_declare("orders".into(), durable(), quorum(&[]))
        .await
        .unwrap();
    let nodes = [a, b, c];
    eventually("every node knows the leader", t, || {
        let l: Vec<Option<String>> = nodes.iter().map(|n| leader_on(n, "orders")).collect();
        l[0].is_some() && l.iter().all(|x| *x == l[0])
    })
    .await;
    let leader = leader_on(&nodes[0], "orders").unwrap();
    let mut nodes: Vec<Node> = nodes.into_iter().collect();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();

    // Published through a follower, confirmed once a majority has it.
    const N: u32 = 500;
    let conn_p = nodes[others[0]].connect().await;
    let ch_p = conn_p.create_channel().await.unwrap();
    ch_p.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            ch_p.basic_publish(
                "".into(),
                "orders".into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for (i, c) in confirms.into_iter().enumerate() {
        let c = tokio::time::timeout(t, c)
            .await
            .unwrap_or_else(|_| panic!("confirm {i} in time"))
            .unwrap();
        assert!(c.is_ack(), "message {i} confirmed");
    }

    // Consumed on the other follower: the first half acked.
    let conn_c = nodes[others[1]].connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    ch_c.basic_qos(20, BasicQosOptions::default())
        .await
        .unwrap();
    let mut sub = ch_c
        .basic_consume(
            "orders".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < (N / 2) as usize {
        let d = tokio::time::timeout(t, sub.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap();
        assert!(!d.redelivered);
        got.push(
            std::str::from_utf8(&d.data)
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(got, (0..N / 2).collect::<Vec<_>>());

    // The leader dies; the consumer keeps consuming from the new one, and
    // every message not acked arrives (those possibly seen before marked
    // redelivered).
    nodes[li].kill().await;
    let mut rest = std::collections::BTreeSet::new();
    while rest.len() < (N / 2) as usize {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("deliveries from the new leader")
            .unwrap()
            .unwrap();
        let n = std::str::from_utf8(&d.data)
            .unwrap()
            .parse::<u32>()
            .unwrap();
        assert!(n >= N / 2 || d.redelivered, "{n} again without the flag");
        if n >= N / 2 {
            rest.insert(n);
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        rest.into_iter().collect::<Vec<_>>(),
        (N / 2..N).collect::<Vec<_>>()
    );
    let survivor = &nodes[others[0]];
    eventually("another node leads", t, || {
        leader_on(survivor, "orders").is_some_and(|l| l != leader)
    })
    .await;
}
