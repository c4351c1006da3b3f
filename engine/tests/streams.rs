//! Replicated streams on a three-node cluster of real `wasmq` processes on
//! loopback: every node holds a replica and serves its readers, a confirm
//! means a majority has the message, the leader's death loses no
//! confirmed message and readers read on from their offsets, a named
//! consumer resumes on another node where it acknowledged, and a replica
//! that was away fills what it missed from the others.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

mod common;
use common::cluster::*;

fn stream_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    // Small segments: the replicas roll over many times.
    t.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(64 * 1024),
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

/// The stream `name` as `node`'s admin API shows it.
fn view(node: &Node, name: &str) -> Option<serde_json::Value> {
    let qs = node.api().get("/api/queues/%2F").ok()?;
    qs.as_array()?.iter().find(|q| q["name"] == name).cloned()
}

/// The leader of `name` as `node` sees it.
fn leader_on(node: &Node, name: &str) -> Option<String> {
    view(node, name).and_then(|q| q["quorum"]["leader"].as_str().map(str::to_owned))
}

/// The last offset `node`'s replica of `name` holds.
fn last_offset(node: &Node, name: &str) -> Option<u64> {
    view(node, name).and_then(|q| q["stream"]["last_offset"].as_u64())
}

/// Publish `range` to `name` through `ch` (confirms on), each body its
/// number; every one must be confirmed.
async fn publish(ch: &lapin::Channel, name: &str, range: std::ops::Range<u64>) {
    let mut confirms = Vec::new();
    for i in range.clone() {
        confirms.push(
            ch.basic_publish(
                "".into(),
                name.into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for (i, c) in range.zip(confirms) {
        let c = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .unwrap_or_else(|_| panic!("confirm of {i} in time"))
            .unwrap();
        assert!(c.is_ack(), "message {i} confirmed");
    }
}

/// A consumer of `name` on `conn` from `offset`, named `consumer` if given.
async fn reader(
    conn: &lapin::Connection,
    name: &str,
    offset: AMQPValue,
    consumer: Option<&str>,
) -> (lapin::Channel, lapin::Consumer) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    if let Some(c) = consumer {
        args.insert(
            "x-stream-consumer-name".into(),
            AMQPValue::LongString(c.into()),
        );
    }
    let sub = ch
        .basic_consume(name.into(), "".into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap();
    (ch, sub)
}

/// Read the next `n` deliveries: (offset header, body), each acked.
async fn read(sub: &mut lapin::Consumer, n: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {} of {n} in time", got.len()))
            .unwrap()
            .unwrap();
        let offset = stream_offset(&d);
        let body = std::str::from_utf8(&d.data)
            .unwrap()
            .parse::<u64>()
            .unwrap();
        got.push((offset, body));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    got
}

/// `n` records from offset `from`, each offset's body its own number.
fn run(from: u64, n: u64) -> Vec<(u64, u64)> {
    (from..from + n).map(|i| (i, i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_keeps_every_confirmed_message_when_its_leader_dies() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    {
        let conn = a.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare("events".into(), durable(), stream_args(&[]))
            .await
            .unwrap();
        // RabbitMQ's refusals hold in a cluster too.
        let e = ch
            .queue_declare(
                "temp".into(),
                QueueDeclareOptions::default(),
                stream_args(&[]),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
    }
    let mut nodes = vec![a, b, c];
    eventually("every node knows the stream's leader", t, || {
        let l: Vec<Option<String>> = nodes.iter().map(|n| leader_on(n, "events")).collect();
        l[0].is_some() && l.iter().all(|x| *x == l[0])
    })
    .await;
    let leader = leader_on(&nodes[0], "events").unwrap();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();

    // Published through a follower: forwarded to the leader, confirmed
    // once a majority has it.
    const N: u64 = 600;
    let conn_p = nodes[others[0]].connect().await;
    let ch_p = conn_p.create_channel().await.unwrap();
    ch_p.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Declared again on this node, as applications declare what they use
    // at start: placed afresh here, which must move nothing.
    ch_p.queue_declare("events".into(), durable(), stream_args(&[]))
        .await
        .unwrap();
    publish(&ch_p, "events", 0..N).await;
    assert_eq!(leader_on(&nodes[others[0]], "events"), Some(leader.clone()));
    // Every replica holds every message, in the same place.
    for n in &nodes {
        eventually(&format!("{} holds all {N}", n.name), t, || {
            last_offset(n, "events") == Some(N - 1)
        })
        .await;
    }

    // Readers on every node read their own replica: from the start, on
    // the leader's node and on a follower's.
    let conn_l = nodes[li].connect().await;
    let (_ch_l, mut on_leader) = reader(
        &conn_l,
        "events",
        AMQPValue::LongString("first".into()),
        None,
    )
    .await;
    assert_eq!(read(&mut on_leader, N as usize).await, run(0, N));
    let conn_f = nodes[others[1]].connect().await;
    let (_ch_f, mut on_follower) = reader(
        &conn_f,
        "events",
        AMQPValue::LongString("first".into()),
        None,
    )
    .await;
    assert_eq!(read(&mut on_follower, N as usize).await, run(0, N));
    // A named consumer on the same follower acknowledges the first 400.
    let conn_named = nodes[others[1]].connect().await;
    let (ch_named, mut named) = reader(
        &conn_named,
        "events",
        AMQPValue::LongString("first".into()),
        Some("audit"),
    )
    .await;
    assert_eq!(read(&mut named, 400).await, run(0, 400));
    // Its offset goes through the stream's log to every replica.
    for n in &nodes {
        eventually(&format!("{} knows where 'audit' is", n.name), t, || {
            view(n, "events").is_some_and(|q| {
                q["stream"]["named"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|o| o["name"] == "audit" && o["offset"] == 399))
            })
        })
        .await;
    }

    // The leader dies. A survivor leads; publishes through either survivor
    // are confirmed again, and the follower's readers read on from where
    // they were, without a gap.
    nodes[li].kill().await;
    drop(on_leader);
    let survivor = &nodes[others[0]];
    for i in &others {
        let n = &nodes[*i];
        eventually(
            &format!("{} sends the stream's publishes to its new leader", n.name),
            Duration::from_secs(30),
            || {
                view(n, "events").is_some_and(|q| {
                    q["quorum"]["leader"].as_str().is_some_and(|l| l != leader)
                        && q["node"] == q["quorum"]["leader"]
                })
            },
        )
        .await;
    }
    const M: u64 = 400;
    // The first publish may still be sent to the dead leader while the
    // survivors' records of where the stream lives catch up: nacked, and
    // sent again (unless it was appended after all).
    let mut tries = 0;
    loop {
        let confirm = ch_p
            .basic_publish(
                "".into(),
                "events".into(),
                BasicPublishOptions::default(),
                N.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        if tokio::time::timeout(t, confirm)
            .await
            .unwrap()
            .unwrap()
            .is_ack()
        {
            break;
        }
        tries += 1;
        assert!(tries < 50, "publishes confirmed again after the failover");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if last_offset(survivor, "events") == Some(N) {
            break;
        }
    }
    publish(&ch_p, "events", N + 1..N + M).await;
    assert_eq!(read(&mut on_follower, M as usize).await, run(N, M));

    // The named consumer goes; one of its name on the other survivor
    // resumes after what it acknowledged, whatever offset it asks for:
    // the offset travelled through the stream's log.
    ch_named.close(200, "bye".into()).await.unwrap();
    let conn_s = survivor.connect().await;
    let (_ch_s, mut resumed) = reader(
        &conn_s,
        "events",
        AMQPValue::LongString("first".into()),
        Some("audit"),
    )
    .await;
    assert_eq!(
        read(&mut resumed, (N + M - 400) as usize).await,
        run(400, N + M - 400)
    );

    // Every confirmed message is readable from the start on a survivor,
    // in order, no gaps.
    let (_ch_all, mut all) = reader(
        &conn_s,
        "events",
        AMQPValue::LongString("first".into()),
        None,
    )
    .await;
    assert_eq!(read(&mut all, (N + M) as usize).await, run(0, N + M));

    // The dead node comes back and catches up with what it missed.
    nodes[li].restart().await;
    let back = &nodes[li];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last_offset(back, "events") != Some(N + M - 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted node holds everything: {:?}",
            view(back, "events")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn_b = back.connect().await;
    let (_ch_b, mut from_back) = reader(
        &conn_b,
        "events",
        AMQPValue::LongLongInt(N as i64 - 5),
        None,
    )
    .await;
    assert_eq!(
        read(&mut from_back, (M + 5) as usize).await,
        run(N - 5, M + 5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replica_that_was_away_fills_what_it_missed_from_the_others() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(30);
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // Led by `a` (declared there), so that `c` is a follower.
    ch.queue_declare(
        "history".into(),
        durable(),
        stream_args(&[(
            "x-queue-leader-locator",
            AMQPValue::LongString("client-local".into()),
        )]),
    )
    .await
    .unwrap();
    eventually("c holds a replica", t, || {
        view(&c, "history").is_some_and(|q| q["stream"].is_object())
    })
    .await;
    c.kill().await;

    // Published one at a time while `c` is away: an entry each, more
    // than the stream's group keeps in its write-ahead log past a
    // snapshot, so `c` can only catch up from a snapshot and the others'
    // stream logs.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const N: u64 = 1_500;
    for i in 0..N {
        publish(&ch, "history", i..i + 1).await;
    }
    eventually("the leader compacted the group's log", t, || {
        view(&a, "history").is_some_and(|q| q["quorum"]["snapshot_index"].as_u64().is_some())
    })
    .await;

    c.restart().await;
    eventually("c holds everything again", t, || {
        last_offset(&c, "history") == Some(N - 1)
    })
    .await;
    let status = view(&c, "history").unwrap();
    assert!(
        status["quorum"]["snapshot_index"].as_u64().is_some(),
        "c caught up through a snapshot: {status}"
    );
    let conn_c = c.connect().await;
    let (_ch_c, mut sub) = reader(
        &conn_c,
        "history",
        AMQPValue::LongString("first".into()),
        None,
    )
    .await;
    assert_eq!(read(&mut sub, N as usize).await, run(0, N));

    // A stream on fewer nodes than the cluster: a consumer on a node
    // without a replica reads the leader's, as RabbitMQ serves one, and a
    // publisher there reaches the leader too.
    ch.queue_declare(
        "two".into(),
        durable(),
        stream_args(&[("x-initial-cluster-size", AMQPValue::LongLongInt(2))]),
    )
    .await
    .unwrap();
    let with_members = || {
        [&a, &b, &c].into_iter().find_map(|n| {
            let q = view(n, "two")?;
            let m = q["quorum"]["members"].as_array()?;
            (m.len() == 2).then(|| {
                m.iter()
                    .map(|m| m["node"].as_str().unwrap().to_owned())
                    .collect::<Vec<String>>()
            })
        })
    };
    eventually("the small stream has two replicas", t, || {
        with_members().is_some()
    })
    .await;
    let members = with_members().unwrap();
    let outside = [&a, &b, &c]
        .into_iter()
        .find(|n| !members.contains(&n.name))
        .expect("one node holds no replica of a two-replica stream");
    publish(&ch, "two", 0..10).await;
    let conn_o = outside.connect().await;
    let ch_o = conn_o.create_channel().await.unwrap();
    ch_o.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish(&ch_o, "two", 10..20).await;
    let (_rch, mut far) = reader(&conn_o, "two", AMQPValue::LongString("first".into()), None).await;
    assert_eq!(read(&mut far, 20).await, run(0, 20));
    // From an offset, and what is published after the consumer started.
    let (_rch2, mut mid) = reader(&conn_o, "two", AMQPValue::LongLongInt(15), None).await;
    publish(&ch_o, "two", 20..25).await;
    assert_eq!(read(&mut mid, 10).await, run(15, 10));
    assert_eq!(read(&mut far, 5).await, run(20, 5));
    // A named consumer there: what it acknowledged is stored in the
    // stream's log, and one of its name resumes after it.
    let (ch_named, mut named) = reader(
        &conn_o,
        "two",
        AMQPValue::LongString("first".into()),
        Some("remote-audit"),
    )
    .await;
    assert_eq!(read(&mut named, 12).await, run(0, 12));
    let holder = [&a, &b, &c]
        .into_iter()
        .find(|n| members.contains(&n.name))
        .unwrap();
    eventually("the remote consumer's offset is stored", t, || {
        view(holder, "two").is_some_and(|q| {
            q["stream"]["named"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|o| o["name"] == "remote-audit" && o["offset"] == 11)
            })
        })
    })
    .await;
    ch_named.close(200, "bye".into()).await.unwrap();
    let (_ch_again, mut again) = reader(
        &conn_o,
        "two",
        AMQPValue::LongString("first".into()),
        Some("remote-audit"),
    )
    .await;
    assert_eq!(read(&mut again, 13).await, run(12, 13));
    // RabbitMQ's rules hold there too: a stream consumer needs a prefetch,
    // and `basic.get` is refused.
    let ch_n = conn_o.create_channel().await.unwrap();
    let e = ch_n
        .basic_consume(
            "two".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    let ch_g = conn_o.create_channel().await.unwrap();
    let e = ch_g
        .basic_get("two".into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(540), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_super_stream_is_declared_in_one_call_and_partitioned_across_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let conn_a = a.connect().await;
    let ch = conn_a.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-super-stream-partitions".into(),
        AMQPValue::LongLongInt(3),
    );
    ch.exchange_declare(
        "orders".into(),
        lapin::ExchangeKind::Custom("super-stream".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    // Its partitions are replicated streams, on every node.
    for n in [&a, &b, &c] {
        for p in 0..3 {
            let name = format!("orders-{p}");
            eventually(&format!("{} holds {name}", n.name), t, || {
                view(n, &name).is_some_and(|q| q["type"] == "stream" && q["stream"].is_object())
            })
            .await;
        }
    }
    // Published through another node: each key's messages go to one
    // partition, in order.
    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const KEYS: u64 = 12;
    const EACH: u64 = 20;
    let mut confirms = Vec::new();
    for i in 0..KEYS * EACH {
        let key = format!("customer-{}", i % KEYS);
        confirms.push(
            ch_b.basic_publish(
                "orders".into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                format!("{key}:{}", i / KEYS).as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(tokio::time::timeout(t, c).await.unwrap().unwrap().is_ack());
    }
    // Read back on a third node, every partition from the start.
    let conn_c = c.connect().await;
    let mut seen: std::collections::HashMap<String, (u32, Vec<u64>)> = Default::default();
    let mut total = 0;
    for p in 0..3u32 {
        let name = format!("orders-{p}");
        let held = loop {
            if let Some(n) = last_offset(&c, &name) {
                break n + 1;
            }
            if view(&c, &name).is_some_and(|q| q["stream"]["last_offset"].is_null()) {
                break 0;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if held == 0 {
            continue;
        }
        let ch = conn_c.create_channel().await.unwrap();
        ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
        let mut a = FieldTable::default();
        a.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        let mut sub = ch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                a,
            )
            .await
            .unwrap();
        for _ in 0..held {
            let d = tokio::time::timeout(t, sub.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let body = String::from_utf8(d.data.clone()).unwrap();
            let (key, n) = body.split_once(':').unwrap();
            let e = seen.entry(key.to_owned()).or_insert((p, Vec::new()));
            assert_eq!(e.0, p, "{key} in partitions {} and {p}", e.0);
            e.1.push(n.parse().unwrap());
            total += 1;
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    assert_eq!(total, KEYS * EACH);
    assert_eq!(seen.len() as u64, KEYS);
    for (key, (_, ns)) in &seen {
        assert_eq!(*ns, (0..EACH).collect::<Vec<_>>(), "{key} in order");
    }
    let used: std::collections::HashSet<u32> = seen.values().map(|(p, _)| *p).collect();
    assert!(used.len() > 1, "keys spread over partitions: {used:?}");
}
