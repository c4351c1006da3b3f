//! A three-node cluster of real `wasmq` processes on loopback: nodes join
//! through the first, definitions made on any node reach every node, a
//! refusal is the same everywhere, a node killed with SIGKILL catches up
//! when it comes back, the leader's death elects another, a node left
//! alone (no majority) refuses changes instead of half-making them, and a
//! node cut off by a TCP proxy in front of every node's link does too,
//! and agrees with the others again once the link heals. Messages cross
//! nodes: published on one, queued on a second, consumed on a third, every
//! one exactly once, and what was out for delivery through a node that dies
//! is delivered again, marked redelivered.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

mod common;
use common::Broker;
use common::cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_agrees_on_definitions_through_failures() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(15);

    // Declared on b: it lives on b and every node knows it.
    let conn_b = b.connect().await;
    let ch = conn_b.create_channel().await.unwrap();
    ch.exchange_declare(
        "events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1000));
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args.clone(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "orders".into(),
        "events".into(),
        "orders.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // The node that answered declare-ok has applied it; the others apply
    // it as they learn it is committed (within a heartbeat or two).
    assert_eq!(b.queue_node("orders").as_deref(), Some("b"));
    for n in [&a, &c] {
        eventually(&format!("queue and binding known on {}", n.name), t, || {
            n.queue_node("orders").as_deref() == Some("b")
                && n.api().get("/api/bindings/%2F").is_ok_and(|bindings| {
                    bindings
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["source"] == "events" && x["destination"] == "orders")
                })
        })
        .await;
    }

    // Routed and consumed where the queue lives.
    let body = b"first order".to_vec();
    ch.basic_publish(
        "events".into(),
        "orders.new".into(),
        BasicPublishOptions::default(),
        &body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "orders".into(),
            "c1".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(t, consumer.next())
        .await
        .expect("delivery")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, body);

    ch.basic_cancel("c1".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // Elsewhere a consumer of it gets its deliveries through its own node.
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    let mut remote = ch_a
        .basic_consume(
            "orders".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_publish(
        "events".into(),
        "orders.second".into(),
        BasicPublishOptions::default(),
        b"second order",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let d = tokio::time::timeout(t, remote.next())
        .await
        .expect("delivery on a from b's queue")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"second order");
    d.ack(BasicAckOptions::default()).await.unwrap();
    // basic.get through a too: a message, then nothing. (The consumer c2
    // is cancelled first so that the queue keeps the message.)
    ch_a.basic_cancel("c2".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "events".into(),
        "orders.third".into(),
        BasicPublishOptions::default(),
        b"third order",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = ch_a
            .basic_get("orders".into(), BasicGetOptions::default())
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.expect("basic.get on a of b's queue");
    assert_eq!(got.delivery.data, b"third order");
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    assert!(
        ch_a.basic_get("orders".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    eventually("the get's ack reached b", t, || {
        b.api()
            .get("/api/queues/%2F/orders")
            .is_ok_and(|q| q["messages"].as_u64() == Some(0))
    })
    .await;

    // A queue that deletes itself on its node (auto-delete after its last
    // consumer) is forgotten by every node.
    ch.queue_declare(
        "temporary".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    eventually("a knows the auto-delete queue", t, || {
        a.queue_node("temporary").as_deref() == Some("b")
    })
    .await;
    ch.basic_consume(
        "temporary".into(),
        "t1".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_cancel("t1".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    eventually("every node forgets the auto-deleted queue", t, || {
        [&a, &b, &c]
            .iter()
            .all(|n| n.queue_node("temporary").is_none())
    })
    .await;

    // A refusal is reached by every node: an inequivalent redeclaration on c.
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    let mut other = FieldTable::default();
    other.insert("x-max-length".into(), AMQPValue::LongInt(5));
    let err = ch_c
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            other,
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(406), "{err}");
    drop((conn_a, conn_c));

    // c is killed; a and b are a majority and go on; c catches up.
    c.kill().await;
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    ch_a.queue_declare(
        "while-c-was-down".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    c.restart().await;
    eventually("c catches up after kill -9", t, || {
        c.queue_node("while-c-was-down").as_deref() == Some("a")
            && c.queue_node("orders").as_deref() == Some("b")
    })
    .await;
    drop(conn_a);

    // The leader is killed: another is elected and changes go on.
    let leader = a.status().and_then(|s| s.leader).expect("a leader");
    let mut nodes = vec![a, b, c];
    let at = nodes.iter().position(|n| n.name == leader).unwrap();
    nodes[at].kill().await;
    let survivor = nodes.iter().find(|n| n.broker.is_some()).unwrap();
    eventually("a new leader", t, || {
        survivor
            .status()
            .and_then(|s| s.leader)
            .is_some_and(|l| l != leader)
    })
    .await;
    let conn = survivor.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "after-the-leader-died".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(conn);

    // One node alone has no majority: its change is refused, not half made.
    let others: Vec<usize> = (0..3)
        .filter(|i| *i != at && nodes[*i].broker.is_some())
        .collect();
    let (alone, killed) = (others[0], others[1]);
    nodes[killed].kill().await;
    // Long enough for the node left alone to notice it lost the majority.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let conn = nodes[alone].connect().await;
    let ch = conn.create_channel().await.unwrap();
    let started = Instant::now();
    let err = ch
        .queue_declare(
            "in-a-minority".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(541), "{err}");
    assert!(err.to_string().contains("no quorum"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(nodes[alone].queue_node("in-a-minority"), None);

    // Everyone back: one history, and the refused change is nowhere.
    nodes[at].restart().await;
    nodes[killed].restart().await;
    eventually("all three agree again", Duration::from_secs(30), || {
        nodes.iter().all(|n| {
            n.queue_node("after-the-leader-died").is_some()
                && n.queue_node("while-c-was-down").is_some()
        })
    })
    .await;
    for n in &nodes {
        assert_eq!(n.queue_node("in-a-minority"), None, "on {}", n.name);
    }
    for n in &mut nodes {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_secret_cannot_join() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Node::start(root.path(), "a", &[]).await;
    formed(&[&a]).await;
    let dir = root.path().join("intruder");
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let config = write_config(
        &dir,
        "intruder",
        "127.0.0.1:0",
        None,
        &[a.cluster.clone()],
        "",
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(SECRET, "not the secret, but long enough");
    std::fs::write(&config, text).unwrap();
    let mut intruder = Broker::spawn_config(&config);
    let (_, intruder_admin) = intruder.ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = a.status().unwrap();
    assert_eq!(st.members.len(), 1, "{st:?}");
    // Readiness (open, for Kubernetes): a member with a leader is ready,
    // a node that could not join is not.
    let ready = |admin: &str| {
        ureq::get(&format!("http://{admin}/ready"))
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or_else(|e| match e {
                ureq::Error::StatusCode(code) => code,
                other => panic!("{other}"),
            })
    };
    assert_eq!(ready(&a.admin), 200);
    assert_eq!(ready(&intruder_admin), 503);
    intruder.kill().await;
    a.kill().await;
}

/// Resident memory of a process, bytes (Linux).
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

/// An unauthenticated peer costs a node a few KiB: a hello that announces
/// 64 MiB is refused at its length, connections past the handshake bounds
/// are closed at once, and a client publishing with confirms meanwhile is
/// not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_cannot_take_a_nodes_memory() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().unwrap();
    let mut a = Node::start(root.path(), "a", &[]).await;
    formed(&[&a]).await;
    let pid = a.broker.as_ref().unwrap().child.id().unwrap();
    let before = rss_of(pid);
    // 50 peers each announce a 64 MiB hello and send 4 MiB of it.
    let mut floods = Vec::new();
    for _ in 0..50 {
        let addr = a.cluster.clone();
        floods.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                return;
            };
            let mut frame = (64u32 << 20).to_le_bytes().to_vec();
            frame.resize(4 << 20, b'x');
            let _ = s.write_all(&frame).await;
        }));
    }
    // Meanwhile a confirming publisher.
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "calm".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..100 {
        ch.basic_publish(
            "".into(),
            "calm".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    for f in floods {
        let _ = f.await;
    }
    let after = rss_of(pid);
    assert!(
        after < before + (32 << 20),
        "resident memory went from {} to {} MiB",
        before >> 20,
        after >> 20
    );
    // Peers that say nothing hold a place each, up to the per-source
    // bound; one more is closed at once.
    let mut silent = Vec::new();
    for _ in 0..wasmq::cluster::link::MAX_HANDSHAKES_PER_SOURCE {
        silent.push(tokio::net::TcpStream::connect(&a.cluster).await.unwrap());
    }
    eventually(
        "the silent peers are in their handshakes",
        Duration::from_secs(5),
        || {
            a.api()
                .get_text("/metrics")
                .is_ok_and(|m| m.contains(&format!("wasmq_cluster_handshakes {}", silent.len())))
        },
    )
    .await;
    let mut one_more = tokio::net::TcpStream::connect(&a.cluster).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), one_more.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a handshake past the bound is closed at once"
    );
    drop(silent);
    eventually("the places are given back", Duration::from_secs(10), || {
        a.api()
            .get_text("/metrics")
            .is_ok_and(|m| m.contains("wasmq_cluster_handshakes 0"))
    })
    .await;
    a.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_refuses_changes_and_agrees_again_after_healing() {
    let root = tempfile::tempdir().unwrap();
    let cuts = Arc::new(Mutex::new(HashSet::new()));
    let (pa, pb, pc) = (
        Proxy::start("a", cuts.clone()).await,
        Proxy::start("b", cuts.clone()).await,
        Proxy::start("c", cuts.clone()).await,
    );
    let a = Node::start_behind(root.path(), "a", &[], Some(&pa), "").await;
    let seeds = vec![a.cluster.clone()];
    let b = Node::start_behind(root.path(), "b", &seeds, Some(&pb), "").await;
    let c = Node::start_behind(root.path(), "c", &seeds, Some(&pc), "").await;
    formed(&[&a, &b, &c]).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    // Definitions imported through one node's admin API go through the
    // log like AMQP declares; so does a delete through another's.
    c.api()
        .post(
            "/api/definitions",
            &serde_json::json!({
                "exchanges": [{"name": "imported-x", "vhost": "/", "type": "fanout", "durable": true}],
                "queues": [{"name": "imported", "vhost": "/", "durable": true}],
                "bindings": [{"source": "imported-x", "vhost": "/", "destination": "imported",
                              "destination_type": "queue", "routing_key": ""}],
            }),
        )
        .unwrap();
    eventually("the import reaches a", Duration::from_secs(15), || {
        a.queue_node("imported").as_deref() == Some("c")
    })
    .await;
    a.api().delete("/api/queues/%2F/imported").unwrap();
    eventually(
        "the delete reaches every node",
        Duration::from_secs(15),
        || {
            [&a, &b, &c]
                .iter()
                .all(|n| n.queue_node("imported").is_none())
        },
    )
    .await;

    // Cut c off from a and b, both ways.
    let proxies = [&pa, &pb, &pc];
    cut(&proxies, &[("a", "c"), ("b", "c")], true);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The majority goes on (electing a new leader first if c led).
    let majority = &a;
    let conn = majority.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "made-by-the-majority".into(),
        durable,
        FieldTable::default(),
    )
    .await
    .unwrap();

    // The minority refuses, and nothing of its attempt survives.
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    let err = ch_c
        .queue_declare(
            "made-in-the-minority".into(),
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(541), "{err}");
    assert_eq!(c.queue_node("made-by-the-majority"), None, "c is cut off");

    // Healed: one history everywhere.
    cut(&proxies, &[("a", "c"), ("b", "c")], false);
    eventually(
        "c catches up after the partition heals",
        Duration::from_secs(30),
        || c.queue_node("made-by-the-majority").as_deref() == Some(majority.name.as_str()),
    )
    .await;
    let listing = |n: &Node| -> Vec<String> {
        let qs = n.api().get("/api/queues/%2F").unwrap();
        let mut names: Vec<String> = qs
            .as_array()
            .unwrap()
            .iter()
            .map(|q| format!("{}@{}", q["name"], q["node"]))
            .collect();
        names.sort();
        names
    };
    eventually(
        "every node lists the same queues",
        Duration::from_secs(15),
        || {
            let l = listing(&a);
            l == listing(&b) && l == listing(&c)
        },
    )
    .await;
    for n in [&a, &b, &c] {
        assert_eq!(n.queue_node("made-in-the-minority"), None, "on {}", n.name);
    }
    drop((conn, conn_c));
    for mut n in [a, b, c] {
        n.kill().await;
    }
}

/// Publish with confirms on a, to a queue on b, consumed on c with manual
/// acks: every message arrives once, in order. Then c's consumer dies with
/// deliveries unacked (its node killed): b requeues them and a consumer on
/// a gets them, marked redelivered; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_nodes_once_each_and_survive_a_consumer_node_dying() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);

    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.queue_declare(
        "work".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    known_on(&[&a, &c], "work", "b").await;

    // The consumer on c, before anything is published.
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    ch_c.basic_qos(50, BasicQosOptions::default())
        .await
        .unwrap();
    let mut on_c = ch_c
        .basic_consume(
            "work".into(),
            "on-c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    // Published on a through the default exchange, persistent, confirmed.
    const N: u32 = 2000;
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    ch_a.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            ch_a.basic_publish(
                "".into(),
                "work".into(),
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

    // Every message once, in order, acked from c; the last few are left
    // unacked when c dies.
    const LEFT: u32 = 20;
    let mut seen = Vec::new();
    while seen.len() < N as usize {
        let d = tokio::time::timeout(t, on_c.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {} on c", seen.len()))
            .unwrap()
            .unwrap();
        let n: u32 = std::str::from_utf8(&d.data).unwrap().parse().unwrap();
        assert!(!d.redelivered, "message {n}");
        seen.push(n);
        if n < N - LEFT {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every message once, in order"
    );

    // The acks reached b: only the LEFT deliveries are out.
    eventually("b has the acks from c", t, || {
        b.api().get("/api/queues/%2F/work").is_ok_and(|q| {
            q["messages"].as_u64() == Some(u64::from(LEFT))
                && q["messages_unacknowledged"].as_u64() == Some(u64::from(LEFT))
        })
    })
    .await;
    // c dies with LEFT deliveries unacked: b requeues them, and a consumer
    // on a gets each again, marked redelivered.
    c.kill().await;
    let ch_a2 = conn_a.create_channel().await.unwrap();
    let mut on_a = ch_a2
        .basic_consume(
            "work".into(),
            "on-a".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut again = Vec::new();
    while again.len() < LEFT as usize {
        let d = tokio::time::timeout(t, on_a.next())
            .await
            .expect("the unacked deliveries again, on a")
            .unwrap()
            .unwrap();
        assert!(d.redelivered);
        again.push(
            std::str::from_utf8(&d.data)
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(again, (N - LEFT..N).collect::<Vec<_>>());
    // Nothing else is left in the queue.
    eventually("the queue on b is empty and settled", t, || {
        b.api().get("/api/queues/%2F/work").is_ok_and(|q| {
            q["messages"].as_u64() == Some(0) && q["messages_unacknowledged"].as_u64() == Some(0)
        })
    })
    .await;

    // The queue's node dies: a basic.get of it elsewhere is told so.
    drop(conn_b);
    let mut b = b;
    b.kill().await;
    let ch_a3 = conn_a.create_channel().await.unwrap();
    let err = ch_a3
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&err), Some(404), "{err}");
    assert!(err.to_string().contains("down or inaccessible"), "{err}");
    drop(conn_a);
}

/// A plugin file dropped into one node's folder serves on all three; one
/// that a node refuses (c does not allow replacing a built-in, a and b
/// do) activates nowhere, and every node says who refused it and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_roll_out_to_every_node_or_to_none() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes_with(root.path(), |name| match name {
        "c" => String::new(),
        _ => "[plugins]\noverride_builtins = true\n".into(),
    })
    .await;
    let t = Duration::from_secs(30);
    let direct = wasmq::builtins::BUILTINS
        .iter()
        .find(|(n, _)| *n == "direct")
        .unwrap()
        .1;
    let plugin = |n: &Node, name: &str| -> Option<serde_json::Value> {
        n.api().get(&format!("/api/plugins/{name}")).ok()
    };

    // The direct router's module as a new exchange type, dropped into a's
    // folder only.
    std::fs::write(a.dir.join("plugins").join("routed.wasm"), direct).unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("'routed' serves on {}", n.name), t, || {
            plugin(n, "routed").is_some_and(|p| {
                p["state"] == "serving"
                    && p["cluster"][0]["active"] == true
                    && p["cluster"][0]["ready"].as_array().map(Vec::len) == Some(3)
            })
        })
        .await;
    }
    // Declared through b, consumed on c, published on a: it routes by key.
    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.exchange_declare(
        "by-key".into(),
        ExchangeKind::Custom("routed".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch_b.queue_declare(
        "keyed".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch_b.queue_bind(
        "keyed".into(),
        "by-key".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    known_on(&[&c], "keyed", "b").await;
    let mut on_c = ch_c
        .basic_consume(
            "keyed".into(),
            "k".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    eventually("a knows the binding", t, || a.queue_node("keyed").is_some()).await;
    for key in ["other", "k"] {
        ch_a.basic_publish(
            "by-key".into(),
            key.into(),
            BasicPublishOptions::default(),
            key.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let d = tokio::time::timeout(t, on_c.next())
        .await
        .expect("a delivery routed by the plugin")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"k", "only the bound key is routed");

    // A replacement of the built-in `topic` that c refuses.
    let topic_before: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|n| plugin(n, "topic").unwrap()["hash"].clone())
        .collect();
    std::fs::write(a.dir.join("plugins").join("topic.wasm"), direct).unwrap();
    for n in [&a, &b, &c] {
        eventually(
            &format!("{} knows c refused the new topic", n.name),
            t,
            || {
                plugin(n, "topic").is_some_and(|p| {
                    p["cluster"]
                        .as_array()
                        .is_some_and(|vs| vs.iter().any(|v| v["refused"]["c"].is_string()))
                })
            },
        )
        .await;
    }
    // Give a straggling activation every chance, then: served nowhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (n, before) in [&a, &b, &c].iter().zip(&topic_before) {
        let p = plugin(n, "topic").unwrap();
        assert_eq!(&p["hash"], before, "topic unchanged on {}", n.name);
        assert_eq!(p["cluster"][0]["active"], false, "{p}");
    }
    // An operator cannot activate the refused version either.
    let refused = plugin(&a, "topic").unwrap()["cluster"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let err = a
        .api()
        .post(
            &format!("/api/cluster/plugins/topic/activate/{refused}"),
            &serde_json::json!({}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    drop((conn_a, conn_b, conn_c));
    for mut n in [a, b, c] {
        n.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_is_staged_judged_and_promoted_on_every_node() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes_with(root.path(), |_| String::new()).await;
    let t = Duration::from_secs(30);
    let builtin = |name: &str| {
        wasmq::builtins::BUILTINS
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    };
    let (direct, fanout) = (builtin("direct"), builtin("fanout"));
    let (v1, v2) = (
        wasmq::plugin::content_hash(direct),
        wasmq::plugin::content_hash(fanout),
    );
    let plugin = |n: &Node| n.api().get("/api/plugins/routed").unwrap();
    let candidate = |n: &Node| n.api().get("/api/plugins/routed/candidate").ok();

    // v1 routes by key: the direct router's module as a new type.
    std::fs::write(a.dir.join("plugins").join("routed.wasm"), direct).unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("v1 serves on {}", n.name), t, || {
            n.api()
                .get("/api/plugins/routed")
                .is_ok_and(|p| p["hash"] == v1.as_str())
        })
        .await;
    }
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    ch_c.exchange_declare(
        "by-key".into(),
        ExchangeKind::Custom("routed".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch_c.queue_declare(
        "keyed".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch_c.queue_bind(
        "keyed".into(),
        "by-key".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut keyed = ch_c
        .basic_consume(
            "keyed".into(),
            "t".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let conns = [a.connect().await, b.connect().await];
    let (ch_a, ch_b) = (
        conns[0].create_channel().await.unwrap(),
        conns[1].create_channel().await.unwrap(),
    );
    eventually("a and b know the binding", t, || {
        a.queue_node("keyed").is_some() && b.queue_node("keyed").is_some()
    })
    .await;
    let publish = |ch: &lapin::Channel, key: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "by-key".into(),
                key.into(),
                BasicPublishOptions::default(),
                key.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    };
    let mut next = async || -> Vec<u8> {
        tokio::time::timeout(t, keyed.next())
            .await
            .expect("a delivery")
            .unwrap()
            .unwrap()
            .data
    };

    // v2 (fans out, whatever the key) staged through b as a canary for
    // every key: every node stages it and lets it decide.
    let staged = b
        .api()
        .put_bytes(
            "/api/plugins/routed/candidate?mode=canary&percent=100&promote_after_messages=1000000",
            fanout,
        )
        .unwrap();
    assert_eq!(staged["hash"], v2.as_str(), "{staged}");
    for n in [&a, &b, &c] {
        eventually(&format!("the canary runs on {}", n.name), t, || {
            candidate(n).is_some_and(|v| v["hash"] == v2.as_str())
        })
        .await;
    }
    publish(&ch_a, "other-a").await;
    assert_eq!(next().await, b"other-a", "a's canary routed it");
    publish(&ch_b, "other-b").await;
    assert_eq!(next().await, b"other-b", "b's canary routed it");

    // Aborted through c: v1 decides everywhere again.
    c.api().delete("/api/plugins/routed/candidate").unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("no canary on {}", n.name), t, || {
            candidate(n).is_none()
        })
        .await;
    }
    publish(&ch_a, "other").await;
    publish(&ch_a, "k").await;
    assert_eq!(next().await, b"k", "v1 routes by key again");
    for n in [&a, &b, &c] {
        assert_eq!(plugin(n)["hash"], v1.as_str(), "v1 serves on {}", n.name);
    }

    // Staged again through a, promoted by b's judge after three messages
    // b routed: every node serves v2, as one kept version every node took.
    a.api()
        .put_bytes(
            "/api/plugins/routed/candidate?mode=canary&percent=100&promote_after_messages=3&promote_after_secs=0&max_p99_us=0",
            fanout,
        )
        .unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("the canary runs on {}", n.name), t, || {
            candidate(n).is_some()
        })
        .await;
    }
    for key in ["p1", "p2", "p3"] {
        publish(&ch_b, key).await;
        next().await;
    }
    for n in [&a, &b, &c] {
        eventually(&format!("v2 promoted on {}", n.name), t, || {
            let p = plugin(n);
            p["hash"] == v2.as_str()
                && p["candidate"].is_null()
                && p["cluster"].as_array().is_some_and(|vs| {
                    vs.iter().any(|v| {
                        v["hash"] == v2.as_str()
                            && v["active"] == true
                            && v["ready"].as_array().map(Vec::len) == Some(3)
                    })
                })
        })
        .await;
        let promoted = plugin(n)["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| {
                t["event"] == "promoted"
                    && t["reason"].as_str().is_some_and(|r| r.contains("node b"))
            });
        assert!(promoted, "{} records b's promotion: {}", n.name, plugin(n));
    }
    publish(&ch_c, "fanned").await;
    assert_eq!(next().await, b"fanned", "v2 serves on c");

    // An operator rolls back to v1 through any node.
    let back = b
        .api()
        .post("/api/plugins/routed/rollback", &serde_json::json!({}))
        .unwrap();
    assert_eq!(back["serving"], v1.as_str(), "{back}");
    for n in [&a, &b, &c] {
        eventually(&format!("v1 serves on {} again", n.name), t, || {
            plugin(n)["hash"] == v1.as_str()
        })
        .await;
    }
    // Nothing left to end.
    let err = a.api().delete("/api/plugins/routed/candidate").unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    drop((conns, ch_c, conn_c));
    for mut n in [a, b, c] {
        n.kill().await;
    }
}

/// A CA for the node-to-node TLS test, and node certificates it signs
/// (for 127.0.0.1, good for serving and for presenting as a client).
struct TestCa(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa(rcgen::CertifiedIssuer::self_signed(params, key).unwrap())
    }

    /// `[tls]` files for a node in `dir`, and the TOML that names them.
    fn node_files(&self, dir: &Path, node: &str) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), self.0.pem()).unwrap();
        format!(
            "tls = true\n\n[tls]\ncert_file = \"{0}/node.pem\"\nkey_file = \"{0}/node.key\"\nca_file = \"{0}/ca.pem\"\n",
            dir.display()
        )
    }
}

/// With `[cluster] tls = true` the links are TLS with the `[tls]`
/// certificates, verified both ways against the CA: the cluster forms and
/// carries messages, and a node holding the secret but a certificate from
/// another CA cannot join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_over_tls_carry_the_cluster_and_keep_out_other_cas() {
    let root = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster CA");
    let (a, b, c) = three_nodes_with(root.path(), |n| {
        ca.node_files(&root.path().join("certs").join(n), n)
    })
    .await;
    let t = Duration::from_secs(20);

    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.queue_declare(
        "over-tls".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    known_on(&[&a, &c], "over-tls", "b").await;
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    let mut on_c = ch_c
        .basic_consume(
            "over-tls".into(),
            "t".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    ch_a.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch_a
        .basic_publish(
            "".into(),
            "over-tls".into(),
            BasicPublishOptions::default(),
            b"sealed",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(t, confirm)
            .await
            .unwrap()
            .unwrap()
            .is_ack()
    );
    let d = tokio::time::timeout(t, on_c.next())
        .await
        .expect("delivery over TLS links")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"sealed");
    d.ack(BasicAckOptions::default()).await.unwrap();

    // The secret, but a certificate from another CA: refused.
    let other = TestCa::new("another CA");
    let dir = root.path().join("intruder");
    std::fs::create_dir_all(dir.join("plugins")).unwrap();
    let files = other.node_files(&dir.join("certs"), "intruder");
    let config = write_config(
        &dir,
        "intruder",
        "127.0.0.1:0",
        None,
        std::slice::from_ref(&a.cluster),
        &files,
    );
    let mut intruder = Broker::spawn_config(&config);
    intruder.ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = a.status().unwrap();
    assert_eq!(st.members.len(), 3, "{st:?}");
    intruder.kill().await;
    drop((conn_a, conn_b, conn_c));
    for mut n in [a, b, c] {
        n.kill().await;
    }
}

/// The rest of what a client of a queue on another node meets: a passive
/// declare and a purge work there, a nack with requeue comes back
/// redelivered, an exclusive consumer there keeps
/// others out (403), a publish the queue refuses (`reject-publish`) is
/// nacked, and a queue deleted on its node cancels its consumers elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_queues_nack_refuse_and_cancel_as_local_ones_do() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch_b.queue_declare("bounded".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    known_on(&[&a, &c], "bounded", "b").await;

    // Confirms from a: the first fits, the second is refused by b.
    let conn_a = a.connect().await;
    let ch_a = conn_a.create_channel().await.unwrap();
    ch_a.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut acks = Vec::new();
    for body in [&b"fits"[..], b"refused"] {
        let c = ch_a
            .basic_publish(
                "".into(),
                "bounded".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
        acks.push(tokio::time::timeout(t, c).await.unwrap().unwrap().is_ack());
    }
    assert_eq!(acks, [true, false], "the refused copy is a nack");
    // A passive declare on another node finds it.
    ch_a.queue_declare(
        "bounded".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A purge from another node runs on the queue's: its count comes back.
    let purged = ch_a
        .queue_purge("bounded".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 1);
    let again = ch_a
        .basic_publish(
            "".into(),
            "bounded".into(),
            BasicPublishOptions::default(),
            b"fits",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(t, again)
            .await
            .unwrap()
            .unwrap()
            .is_ack()
    );

    // An exclusive consumer on c holds the queue: a's consumer is refused.
    let conn_c = c.connect().await;
    let ch_c = conn_c.create_channel().await.unwrap();
    let mut on_c = ch_c
        .basic_consume(
            "bounded".into(),
            "only".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(t, on_c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"fits");
    assert!(!d.redelivered);
    // A nack with requeue: back in the queue, delivered again, redelivered.
    d.nack(BasicNackOptions {
        requeue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let d = tokio::time::timeout(t, on_c.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"fits");
    assert!(d.redelivered, "a requeued message is marked redelivered");
    d.ack(BasicAckOptions::default()).await.unwrap();
    let ch_a2 = conn_a.create_channel().await.unwrap();
    // consume-ok comes at once; b's refusal closes the channel when it
    // comes, and the consumer's stream ends with it.
    let mut second = ch_a2
        .basic_consume(
            "bounded".into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let err = match tokio::time::timeout(t, second.next()).await.unwrap() {
        Some(Err(e)) => e,
        other => panic!("expected the channel's error, got {other:?}"),
    };
    assert_eq!(reply_code(&err), Some(403), "{err}");

    // Deleted on its node: the consumer on c is cancelled.
    ch_b.queue_delete("bounded".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let end = tokio::time::timeout(t, on_c.next())
        .await
        .expect("cancelled");
    assert!(end.is_none(), "the consumer stream ends: {end:?}");
    drop((conn_a, conn_b, conn_c));
    for mut n in [a, b, c] {
        n.kill().await;
    }
}

/// Users, vhosts and permissions made on any node are every node's (the
/// same verdict everywhere for a bad one), a user deleted is closed out on
/// every node, and a node that was down learns it all when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_and_permissions_are_the_same_on_every_node() {
    use serde_json::json;
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(15);
    let full = json!({"configure": ".*", "write": ".*", "read": ".*"});
    b.api().put("/api/vhosts/orders", &json!({})).unwrap();
    b.api()
        .put("/api/users/app", &json!({"password": "pw", "tags": ""}))
        .unwrap();
    b.api().put("/api/permissions/orders/app", &full).unwrap();
    let login = |n: &Node, user: &str, password: &str| {
        let url = format!("amqp://{user}:{password}@{}/orders", n.amqp);
        async move { lapin::Connection::connect(&url, Default::default()).await }
    };
    let mut open = Vec::new();
    for n in [&a, &b, &c] {
        eventually(&format!("app's permissions on {}", n.name), t, || {
            n.api().get("/api/permissions/orders/app").is_ok()
        })
        .await;
        let conn = login(n, "app", "pw")
            .await
            .expect("app logs in on every node");
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            format!("orders.{}", n.name).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        open.push(conn);
    }
    // A policy set on one node holds for the queues of every node.
    c.api()
        .put(
            "/api/policies/orders/one",
            &json!({"pattern": "^orders\\.", "definition": {"max-length": 1}, "apply-to": "queues"}),
        )
        .unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("the policy on {}", n.name), t, || {
            n.api().get("/api/policies/orders/one").is_ok()
        })
        .await;
    }
    for (n, conn) in [&a, &b, &c].into_iter().zip(&open) {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let q = format!("orders.{}", n.name);
        for i in 0..3 {
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let view = n.api().get(&format!("/api/queues/orders/{q}")).unwrap();
        assert_eq!(view["messages_ready"], 1, "{view}");
        assert_eq!(view["policy"], "one");
    }
    // Refused alike wherever it is asked.
    let status = |r: Result<u16, wasmq::admin::client::ClientError>| match r {
        Err(wasmq::admin::client::ClientError::Status { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let bad = json!({"configure": "(", "write": "", "read": ""});
    assert_eq!(
        status(c.api().put("/api/permissions/orders/app", &bad)),
        400
    );
    assert!(matches!(
        a.api().delete("/api/users/guest"),
        Err(wasmq::admin::client::ClientError::Status { status: 409, .. })
    ));

    c.kill().await;
    a.api().delete("/api/users/app").unwrap();
    a.api()
        .put(
            "/api/users/ops",
            &json!({"password": "ops-pw", "tags": "administrator"}),
        )
        .unwrap();
    // The user's connections close on the nodes that are up.
    eventually("app's connections on a and b closed", t, || {
        open[..2].iter().all(|conn| !conn.status().connected())
    })
    .await;
    c.restart().await;
    eventually("c learned of the deletion", t, || {
        c.api().get("/api/users/ops").is_ok() && c.api().get("/api/users/app").is_err()
    })
    .await;
    let e = login(&c, "app", "pw").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "{e}");
    let ops =
        wasmq::admin::client::AdminClient::new(&format!("http://{}", c.admin), "ops", "ops-pw");
    assert_eq!(ops.get("/api/whoami").unwrap()["name"], "ops");

    // A vhost deleted through one node takes its queues on every node;
    // made again, it is empty everywhere.
    a.api().delete("/api/vhosts/orders").unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("vhost orders gone on {}", n.name), t, || {
            n.api().get("/api/vhosts/orders").is_err() && n.api().get("/api/queues/orders").is_err()
        })
        .await;
    }
    b.api().put("/api/vhosts/orders", &json!({})).unwrap();
    b.api().put("/api/permissions/orders/guest", &full).unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("vhost orders empty on {}", n.name), t, || {
            n.api()
                .get("/api/queues/orders")
                .is_ok_and(|qs| qs == serde_json::json!([]))
                && n.api()
                    .get("/api/policies/orders")
                    .is_ok_and(|p| p == serde_json::json!([]))
        })
        .await;
    }
}

/// A vhost's and a user's connection limit and a user's channel limit
/// count the connections of every node, as RabbitMQ's do: a client at the
/// limit on two nodes is refused on the third. A node that dies takes its
/// connections out of the count, so its clients can move to a survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_channel_limits_count_every_node() {
    use serde_json::json;
    let root = tempfile::tempdir().unwrap();
    let (mut a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(15);
    let api = b.api();
    api.put("/api/vhosts/orders", &json!({})).unwrap();
    api.put("/api/users/app", &json!({"password": "pw", "tags": ""}))
        .unwrap();
    api.put(
        "/api/permissions/orders/app",
        &json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .unwrap();
    api.put(
        "/api/vhost-limits/orders/max-connections",
        &json!({"value": 2}),
    )
    .unwrap();
    api.put("/api/user-limits/app/max-channels", &json!({"value": 3}))
        .unwrap();
    for n in [&a, &b, &c] {
        eventually(&format!("the limits on {}", n.name), t, || {
            n.api()
                .get("/api/user-limits/app")
                .is_ok_and(|v| v.to_string().contains("max-channels"))
        })
        .await;
    }
    let login = |n: &Node| {
        let url = format!("amqp://app:pw@{}/orders", n.amqp);
        async move { lapin::Connection::connect(&url, Default::default()).await }
    };
    let on_a = login(&a).await.unwrap();
    let _a1 = on_a.create_channel().await.unwrap();
    let _a2 = on_a.create_channel().await.unwrap();
    let on_b = login(&b).await.unwrap();
    let _b1 = on_b.create_channel().await.unwrap();

    // a's and b's reports reach c within moments; until then c may let a
    // third in, which is closed and tried again.
    let started = Instant::now();
    let refusal = loop {
        match login(&c).await {
            Err(e) => break e.to_string(),
            Ok(conn) => {
                let _ = conn.close(200, "retry".into()).await;
                assert!(
                    started.elapsed() < t,
                    "c never counted the connections of a and b"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(
        refusal.contains(
            "access to vhost 'orders' refused for user 'app': connection limit (2) is reached"
        ),
        "{refusal}"
    );

    // a dies: its connection and channels no longer count once its link
    // is gone, and a client of a's gets in on c.
    drop((_a1, _a2, on_a));
    a.kill().await;
    let started = Instant::now();
    let on_c = loop {
        match login(&c).await {
            Ok(conn) => break conn,
            Err(_) => {
                assert!(started.elapsed() < t, "a's connection still counted on c");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // b holds one channel of app's three: two more on c, and no third.
    let _c1 = on_c.create_channel().await.unwrap();
    let _c2 = on_c.create_channel().await.unwrap();
    let e = on_c.create_channel().await.unwrap_err().to_string();
    assert!(
        e.contains("number of channels opened for user 'app' has reached the maximum allowed user limit of (3)"),
        "{e}"
    );
}

/// The consumer timeout holds for a consumer of a queue on another node:
/// the consuming node closes the channel (406) and the delivery goes back
/// to the queue's node, flagged redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_another_node_times_out_and_its_delivery_goes_back() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, _c) = three_nodes_with(root.path(), |_| {
        "[amqp]\nconsumer_timeout_ms = 600\n".into()
    })
    .await;
    let t = Duration::from_secs(15);
    let conn_a = a.connect().await;
    let ch = conn_a.create_channel().await.unwrap();
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert!(
        ch.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            b"job",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
    );
    eventually("b knows the queue", t, || {
        b.api().get("/api/queues/%2F/work").is_ok()
    })
    .await;

    let conn_b = b.connect().await;
    let errors = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let mut events = Box::pin(conn_b.events_listener());
    let seen = errors.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                seen.lock().unwrap().push(e.to_string());
            }
        }
    });
    let chb = conn_b.create_channel().await.unwrap();
    chb.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut sub = chb
        .basic_consume(
            "work".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(t, sub.next())
        .await
        .expect("a delivery through b")
        .unwrap()
        .unwrap();
    assert!(!d.redelivered);
    eventually("b closes the channel", t, || {
        !errors.lock().unwrap().is_empty()
    })
    .await;
    let e = errors.lock().unwrap()[0].clone();
    assert!(
        e.contains("delivery acknowledgement on channel 1 timed out. Timeout value used: 600 ms"),
        "{e}"
    );
    assert!(conn_b.status().connected(), "only the channel closes");
    let back = tokio::time::timeout(t, async {
        loop {
            if let Some(m) = ch
                .basic_get("work".into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the delivery back in its queue on a");
    assert_eq!(back.delivery.data, b"job");
    assert!(back.delivery.redelivered);
}

/// The web UI's cluster views in a real browser (Debian's Chromium driven
/// by `tests/node/ui_cluster.mjs`, as `tests/tests/integration/ui.rs`
/// drives the single node's): the overview on node a lists the three
/// nodes running, the Raft leader and term, and a quorum queue's page its
/// three replicas and leader; after c is killed, the overview shows c not
/// running and the queue led by a survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_the_cluster_and_a_dead_node() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        "ui.replicated".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let leader_of = |n: &Node| -> Option<String> {
        let q = n.api().get("/api/queues/%2F/ui.replicated").ok()?;
        q["quorum"]["leader"].as_str().map(str::to_owned)
    };
    eventually("the queue has a leader", Duration::from_secs(20), || {
        leader_of(&a).is_some()
    })
    .await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let url = format!("http://{}", a.admin);
    ui_cluster(&url, &shots, "up", None).await;

    c.kill().await;
    eventually(
        "the queue is led by a survivor",
        Duration::from_secs(20),
        || leader_of(&a).is_some_and(|l| l != "c") && leader_of(&b).is_some_and(|l| l != "c"),
    )
    .await;
    ui_cluster(&url, &shots, "c-down", Some("c")).await;
    drop(conn);
}

/// Run `tests/node/ui_cluster.mjs` against the admin API at `url`, with
/// the Node.js packages `scripts/test.sh` installs (`WASMQ_AMQPLIB`), and
/// assert it prints "ok".
async fn ui_cluster(url: &str, shots: &Path, tag: &str, down: Option<&str>) {
    let modules = std::env::var("WASMQ_AMQPLIB").unwrap_or_else(|_| {
        panic!(
            "the Node.js packages are not installed: run ./scripts/test.sh (it sets WASMQ_AMQPLIB)"
        )
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/node/ui_cluster.mjs");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script)
        .args([url, "guest", "guest", "ui.replicated"])
        .arg(shots)
        .arg(tag)
        .args(down)
        .env("WASMQ_NODE_MODULES", format!("{modules}/node_modules"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("ui_cluster.mjs finishes within 90 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "ui_cluster.mjs ({tag}) failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Redis front end on a cluster node: a list whose queue lives on
/// another node is pushed to, popped (one, a count, blocking), moved from
/// and into, and purged from any node, with redis-py unchanged; what only
/// the queue's own node can answer says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clients_use_lists_of_any_node() {
    let root = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let (a, b, c) = three_nodes_with(root.path(), |n| {
        let i = (n.as_bytes()[0] - b'a') as usize;
        redis_section(ports[i], "classic")
    })
    .await;
    let out = redis_py(
        &["across".into(), ports[0].to_string(), ports[1].to_string()],
        Duration::from_secs(90),
    )
    .await;
    assert!(out.trim_end().ends_with("ok"), "{out}");
    // Both lists were declared through the cluster: known on every node,
    // each living where its first push came.
    for n in [&a, &b, &c] {
        assert_eq!(
            n.queue_node("rc.across").as_deref(),
            Some("a"),
            "on {}",
            n.name
        );
        assert_eq!(
            n.queue_node("rc.on-b").as_deref(),
            Some("b"),
            "on {}",
            n.name
        );
    }
}

/// Exclusive queues, which live and die with their connection on its
/// node, are reached from every node, as in RabbitMQ: a subscriber's
/// private queue on b hears a confirmed publish made on a; an RPC reply
/// published on a to the default exchange reaches the reply queue of a
/// client on c; another node's client is refused it (405); and once b is
/// killed, a's publisher is confirmed at once (b's bindings went with its
/// link), never held for a node that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queues_hear_publishes_made_on_every_node() {
    let root = tempfile::tempdir().unwrap();
    let (a, mut b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(10);
    let conn_a = a.connect().await;
    let pub_a = conn_a.create_channel().await.unwrap();
    pub_a
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    pub_a
        .exchange_declare(
            "news".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // A subscriber on b: a server-named exclusive queue bound to news.
    let conn_b = b.connect().await;
    let sub_b = conn_b.create_channel().await.unwrap();
    let private = sub_b
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let private = private.name().as_str().to_owned();
    sub_b
        .queue_bind(
            private.as_str().into(),
            "news".into(),
            "eu.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut heard = sub_b
        .basic_consume(
            private.as_str().into(),
            "sub".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publish = |ch: &lapin::Channel, x: &'static str, key: String, body: Vec<u8>| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                x.into(),
                key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    // a hears of the binding within a report: until then its publishes
    // route nowhere.
    let deadline = Instant::now() + t;
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "a never routed to b's private queue"
        );
        publish(&pub_a, "news", "eu.fr".into(), b"first".to_vec()).await;
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(100), heard.next()).await {
            break d.unwrap();
        }
    };
    assert_eq!(first.data, b"first");
    for i in 0..100 {
        let confirm = publish(&pub_a, "news", "eu.de".into(), format!("m{i}").into_bytes()).await;
        assert!(confirm.is_ack(), "publish {i} nacked");
    }
    for i in 0..100 {
        let d = tokio::time::timeout(t, heard.next())
            .await
            .expect("b's subscriber hears every confirmed publish")
            .unwrap()
            .unwrap();
        // Any "first" sent before a knew arrives first, then in order.
        if d.data == b"first" {
            continue;
        }
        assert_eq!(d.data, format!("m{i}").into_bytes());
    }
    // A key b did not bind reaches nothing there.
    publish(&pub_a, "news", "us.ny".into(), b"no".to_vec()).await;
    // The admin API's test publish on a reaches b too.
    let routed = a
        .api()
        .post(
            "/api/exchanges/%2F/news/publish",
            &serde_json::json!({"routing_key": "eu.it", "payload": "by the api"}),
        )
        .unwrap();
    assert_eq!(routed["routed"], true, "{routed}");
    let d = tokio::time::timeout(t, heard.next())
        .await
        .expect("the admin API's publish reached b")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"by the api", "nothing else came first (not us.ny)");

    // RPC: a client on c waits on its reply queue; the server on a replies
    // through the default exchange.
    let conn_c = c.connect().await;
    let rpc_c = conn_c.create_channel().await.unwrap();
    let reply_q = rpc_c
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .as_str()
        .to_owned();
    let mut replies = rpc_c
        .basic_consume(
            reply_q.as_str().into(),
            "rpc".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    eventually("a knows c's reply queue", t, || {
        a.queue_node(&reply_q).as_deref() == Some("c")
    })
    .await;
    publish(&pub_a, "", reply_q.clone(), b"the answer".to_vec()).await;
    let reply = tokio::time::timeout(t, replies.next())
        .await
        .expect("the reply reached c")
        .unwrap()
        .unwrap();
    assert_eq!(reply.data, b"the answer");

    // Another node's client may not take from it.
    let other = conn_a.create_channel().await.unwrap();
    let refused = other
        .basic_get(private.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&refused), Some(405), "{refused}");

    // b dies: its private queue goes with its link, and a's publisher is
    // confirmed at once instead of waiting for it.
    b.kill().await;
    eventually("a forgot b's private queue", t, || {
        a.queue_node(&private).is_none()
    })
    .await;
    let started = Instant::now();
    for _ in 0..10 {
        let confirm = publish(&pub_a, "news", "eu.fr".into(), b"after".to_vec()).await;
        assert!(confirm.is_ack());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop((conn_b, conn_c));
}
