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

/// Wait until every node agrees on `queue`'s leader; the nodes as a
/// vector, the leader's index, and the other two.
async fn agreed_leader(
    nodes: [Node; 3],
    queue: &str,
    t: Duration,
) -> (Vec<Node>, String, usize, Vec<usize>) {
    eventually("every node knows the leader", t, || {
        let l: Vec<Option<String>> = nodes.iter().map(|n| leader_on(n, queue)).collect();
        l[0].is_some() && l.iter().all(|x| *x == l[0])
    })
    .await;
    let leader = leader_on(&nodes[0], queue).unwrap();
    let nodes: Vec<Node> = nodes.into_iter().collect();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    (nodes, leader, li, others)
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
    let (mut nodes, leader, li, others) = agreed_leader(nodes, "orders", t).await;

    // Published through a follower, confirmed once a majority has it.
    const N: u32 = 500;
    let conn_p = nodes[others[0]].connect().await;
    let ch_p = conn_p.create_channel().await.unwrap();
    ch_p.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Declared again through this follower, as applications declare their
    // queues at start: placed afresh here, which must move nothing (it
    // once pointed every node at this follower, which nacked).
    ch_p.queue_declare("orders".into(), durable(), quorum(&[]))
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
    // Every survivor answers for the queue itself, and where it lives is
    // one truth: its `node` is its leader.
    for i in &others {
        let n = &nodes[*i];
        eventually(
            &format!("{} shows the queue at its leader", n.name),
            t,
            || {
                n.api().get("/api/queues/%2F/orders").is_ok_and(|q| {
                    q["quorum"]["leader"].as_str().is_some_and(|l| l != leader)
                        && q["node"] == q["quorum"]["leader"]
                })
            },
        )
        .await;
    }
}

/// The quorum queue named `queue` as `node`'s admin API shows it.
fn view(node: &Node, queue: &str) -> Option<serde_json::Value> {
    let qs = node.api().get("/api/queues/%2F").ok()?;
    qs.as_array()?.iter().find(|q| q["name"] == queue).cloned()
}

fn members(node: &Node, queue: &str) -> Vec<String> {
    view(node, queue)
        .and_then(|q| {
            q["quorum"]["members"].as_array().map(|m| {
                m.iter()
                    .filter_map(|m| m["node"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Publish `body` to `queue` on `ch` (in confirm mode) and wait for its
/// confirm: whether it was an ack.
async fn confirmed(ch: &lapin::Channel, queue: &str, body: &[u8]) -> bool {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .is_ack()
}

/// A no-ack consumer of `queue` on a channel of its own.
async fn no_ack_consumer(conn: &lapin::Connection, queue: &str, tag: &str) -> lapin::Consumer {
    conn.create_channel()
        .await
        .unwrap()
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

fn long(n: i64) -> AMQPValue {
    AMQPValue::LongLongInt(n)
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// What RabbitMQ's quorum queues refuse is refused; `x-delivery-limit`
/// dead-letters with reason `delivery_limit` after `x-delivery-count`
/// counted the returns; `reject-publish` nacks at the limit; a single
/// active consumer gets everything; members grow and shrink; a killed
/// member catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_behave_as_rabbitmqs() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, mut c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let conn = b.connect().await;

    // Refusals, each closing its channel with 406.
    for (opts, args, what) in [
        (QueueDeclareOptions::default(), quorum(&[]), "durable"),
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
            durable(),
            quorum(&[("x-max-priority", long(5))]),
            "x-max-priority",
        ),
        (
            durable(),
            quorum(&[("x-queue-leader-locator", text("min-masters"))]),
            "x-queue-leader-locator",
        ),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let e = ch
            .queue_declare("refused".into(), opts, args)
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{what}: {e}");
        assert!(e.to_string().contains(what), "{e}");
    }

    // `client-local`: every queue declared through b is led by b (the
    // default spreads them: the second would go to a or c).
    let ch = conn.create_channel().await.unwrap();
    for i in 0..3 {
        ch.queue_declare(
            format!("local-{i}").as_str().into(),
            durable(),
            quorum(&[("x-queue-leader-locator", text("client-local"))]),
        )
        .await
        .unwrap();
    }
    eventually("b leads the client-local queues", t, || {
        (0..3).all(|i| leader_on(&a, &format!("local-{i}")).as_deref() == Some("b"))
    })
    .await;
    // The same from a policy (RabbitMQ's `queue-leader-locator` key), for
    // queues declared without the argument.
    a.api()
        .put(
            "/api/policies/%2F/local",
            &serde_json::json!({"pattern": "^pol-", "definition": {"queue-leader-locator": "client-local"}, "apply-to": "quorum_queues"}),
        )
        .unwrap();
    eventually("the policy on b", t, || {
        b.api().get("/api/policies/%2F/local").is_ok()
    })
    .await;
    for i in 0..3 {
        ch.queue_declare(format!("pol-{i}").as_str().into(), durable(), quorum(&[]))
            .await
            .unwrap();
    }
    eventually("b leads the queues its policy places", t, || {
        (0..3).all(|i| leader_on(&a, &format!("pol-{i}")).as_deref() == Some("b"))
    })
    .await;

    // Delivery limit 1 with a dead-letter exchange.
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("dead".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "limited".into(),
        durable(),
        quorum(&[
            ("x-delivery-limit", long(1)),
            ("x-dead-letter-exchange", text("dlx")),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert!(confirmed(&ch, "limited", b"poison").await);
    let mut sub = ch
        .basic_consume(
            "limited".into(),
            "l".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(t, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!first.redelivered);
    first
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let second = tokio::time::timeout(t, sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(second.redelivered);
    let count = second
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    assert_eq!(count, Some(long(1)), "x-delivery-count on the redelivery");
    second
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Returned twice: past the limit of 1, dead-lettered.
    let mut dead = None;
    for _ in 0..100 {
        if let Some(m) = ch
            .basic_get("dead".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            dead = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = dead.expect("the message dead-lettered");
    assert_eq!(dead.delivery.data, b"poison");
    let reason = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-first-death-reason").cloned());
    assert_eq!(reason, Some(text("delivery_limit")));

    // reject-publish: the third message is nacked.
    ch.queue_declare(
        "bounded".into(),
        durable(),
        quorum(&[
            ("x-max-length", long(2)),
            ("x-overflow", text("reject-publish")),
        ]),
    )
    .await
    .unwrap();
    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(confirmed(&ch, "bounded", format!("{i}").as_bytes()).await);
    }
    assert_eq!(acks, [true, true, false]);

    // A single active consumer.
    ch.queue_declare(
        "single".into(),
        durable(),
        quorum(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    let mut s1 = no_ack_consumer(&conn, "single", "s1").await;
    let mut s2 = no_ack_consumer(&conn, "single", "s2").await;
    for i in 0..5 {
        confirmed(&ch, "single", format!("{i}").as_bytes()).await;
    }
    for _ in 0..5 {
        tokio::time::timeout(t, s1.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s2.next())
            .await
            .is_err(),
        "the second consumer waits"
    );

    // Two members, grown to three on the leader, shrunk back.
    ch.queue_declare(
        "pair".into(),
        durable(),
        quorum(&[("x-quorum-initial-group-size", long(2))]),
    )
    .await
    .unwrap();
    let nodes = [&a, &b, &c];
    eventually("two members and a leader", t, || {
        nodes.iter().any(|n| {
            view(n, "pair")
                .is_some_and(|q| q["quorum"]["leader"].is_string() && members(n, "pair").len() == 2)
        })
    })
    .await;
    let holder = nodes
        .iter()
        .find(|n| members(n, "pair").len() == 2)
        .unwrap();
    let leader = view(holder, "pair").unwrap()["quorum"]["leader"]
        .as_str()
        .unwrap()
        .to_owned();
    let leader_node = nodes.iter().find(|n| n.name == leader).unwrap();
    let third = ["a", "b", "c"]
        .into_iter()
        .find(|n| !members(holder, "pair").iter().any(|m| m == n))
        .unwrap();
    leader_node
        .api()
        .post(
            &format!("/api/queues/%2F/pair/members/{third}"),
            &serde_json::json!({}),
        )
        .unwrap();
    eventually("three members", t, || {
        members(leader_node, "pair").len() == 3
    })
    .await;
    let third_node = nodes.iter().find(|n| n.name == third).unwrap();
    eventually("the new member holds a replica", t, || {
        view(third_node, "pair").is_some_and(|q| q["quorum"]["last_applied"].is_number())
    })
    .await;
    leader_node
        .api()
        .delete(&format!("/api/queues/%2F/pair/members/{third}"))
        .unwrap();
    eventually("two members again", t, || {
        members(leader_node, "pair").len() == 2
    })
    .await;

    // A member killed and restarted catches up with what was committed
    // meanwhile.
    drop(conn);
    let before = view(&a, "limited").unwrap()["quorum"]["last_applied"]
        .as_u64()
        .unwrap_or(0);
    c.kill().await;
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        confirmed(&ch, "limited", format!("{i}").as_bytes()).await;
    }
    c.restart().await;
    eventually(
        "the restarted member caught up",
        Duration::from_secs(30),
        || {
            view(&c, "limited")
                .is_some_and(|q| q["quorum"]["last_applied"].as_u64().unwrap_or(0) >= before + 20)
        },
    )
    .await;
}

/// Publish `body` to `queue` and wait up to `within` for its confirm:
/// `Some(ack)` once answered, `None` if no answer came.
async fn answered(ch: &lapin::Channel, queue: &str, body: &[u8], within: Duration) -> Option<bool> {
    let confirm = match ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("publish refused: {e}");
            return None;
        }
    };
    match tokio::time::timeout(within, confirm).await {
        Ok(Ok(c)) => Some(c.is_ack()),
        _ => None,
    }
}

/// A leader behind a black hole (its links say nothing and close nothing,
/// as a paused process or a network that drops packets): a publisher on a
/// follower has its waiting confirm answered once the link has been silent
/// past the election timeout, not when the leader comes back, and is
/// confirmed by the new leader soon after. A follower cut off the same way
/// answers its own publisher with a nack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leader_holds_no_confirm_and_a_silent_node_nacks() {
    let root = tempfile::tempdir().unwrap();
    let (proxies, nodes) = three_nodes_behind_proxies(root.path()).await;
    let all: Vec<&std::sync::Arc<Proxy>> = proxies.iter().collect();
    let t = Duration::from_secs(20);
    let ch = nodes[0].connect().await.create_channel().await.unwrap();
    ch.queue_declare("silent".into(), durable(), quorum(&[]))
        .await
        .unwrap();
    eventually("every node knows the leader", t, || {
        let l: Vec<Option<String>> = nodes.iter().map(|n| leader_on(n, "silent")).collect();
        l[0].is_some() && l.iter().all(|x| *x == l[0])
    })
    .await;
    let leader = leader_on(&nodes[0], "silent").unwrap();
    let others: Vec<&Node> = nodes.iter().filter(|n| n.name != leader).collect();
    let (f, g) = (others[0], others[1]);
    let conn = f.connect().await;
    let pch = conn.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        assert_eq!(
            answered(&pch, "silent", format!("before-{i}").as_bytes(), t).await,
            Some(true)
        );
    }

    // The leader goes silent.
    silence(&all, &[(&leader, &f.name), (&leader, &g.name)], true);
    let started = std::time::Instant::now();
    let first = answered(&pch, "silent", b"during", t).await;
    let answered_after = started.elapsed();
    assert!(
        first.is_some(),
        "no answer in {t:?} while the leader was silent"
    );
    let mut acked_after = None;
    let mut pch = pch;
    for i in 0..200 {
        match answered(&pch, "silent", format!("after-{i}").as_bytes(), t).await {
            Some(true) => {
                acked_after = Some(started.elapsed());
                break;
            }
            Some(false) => tokio::time::sleep(Duration::from_millis(50)).await,
            // The channel closed: a client opens another.
            None => {
                pch = conn.create_channel().await.unwrap();
                pch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .unwrap();
            }
        }
    }
    let acked_after = acked_after.expect("the new leader confirms");
    eprintln!(
        "silent leader {leader}: the waiting publish answered ({first:?}) after {answered_after:?}, \
         the first confirm from the new leader after {acked_after:?}"
    );
    assert!(
        answered_after < Duration::from_secs(8),
        "{answered_after:?}"
    );
    assert!(acked_after < Duration::from_secs(12), "{acked_after:?}");
    silence(&all, &[(&leader, &f.name), (&leader, &g.name)], false);

    // Now the publisher's own node goes silent to both others: its
    // publishes are nacked, not held until the heal.
    let new_leader = leader_on(g, "silent").unwrap_or_default();
    eprintln!("new leader: {new_leader}");
    silence(&all, &[(&f.name, &g.name), (&f.name, &leader)], true);
    let started = std::time::Instant::now();
    let mut nacked = None;
    for i in 0..50 {
        match answered(&pch, "silent", format!("cut-{i}").as_bytes(), t).await {
            Some(false) => {
                nacked = Some(started.elapsed());
                break;
            }
            // Confirmed by a leader the node still thought it could reach
            // before the silence was noticed: fine, and try again.
            Some(true) if f.name == new_leader => {
                nacked = Some(started.elapsed());
                break;
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(50)).await,
            None => break,
        }
    }
    let nacked = nacked.expect("a node cut off answers its publisher");
    eprintln!(
        "publisher's node {} silent: answered after {nacked:?}",
        f.name
    );
    assert!(nacked < Duration::from_secs(8), "{nacked:?}");
    silence(&all, &[(&f.name, &g.name), (&f.name, &leader)], false);
}

/// A counter of `node`'s Prometheus metrics.
fn counter(node: &Node, name: &str) -> f64 {
    let text = node.api().get_text("/metrics").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// With `quiescent_quorum`, idle quorum queues cost nothing between
/// nodes: groups have no heartbeats of their own (the links' keep-alives
/// tell a node's peers it lives), so once the last write's commit has
/// reached the followers, no group calls another. With a heartbeat per
/// group, 30 queues would make about 900 calls in these 3 s. The queues
/// still fail over: the leader of one is killed and the survivors elect
/// another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiescent_quorum_queues_send_nothing_when_idle_and_still_fail_over() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes_with(root.path(), |_| "quiescent_quorum = true".into()).await;
    let ch = a.connect().await.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..30 {
        ch.queue_declare(format!("idle-{i}").as_str().into(), durable(), quorum(&[]))
            .await
            .unwrap();
        assert!(confirmed(&ch, &format!("idle-{i}"), b"kept").await);
    }
    let nodes = [&a, &b, &c];
    let t = Duration::from_secs(20);
    eventually("every queue's leader is known everywhere", t, || {
        (0..30).all(|i| {
            let q = format!("idle-{i}");
            let l: Vec<Option<String>> = nodes.iter().map(|n| leader_on(n, &q)).collect();
            l[0].is_some() && l.iter().all(|x| *x == l[0])
        })
    })
    .await;
    // Let the last commits and the heartbeat after them settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = |_: ()| -> f64 {
        nodes
            .iter()
            .map(|n| counter(n, "wasmq_cluster_quorum_calls_received_total"))
            .sum()
    };
    let before = calls(());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = calls(()) - before;
    eprintln!("calls between 30 idle quorum queues' replicas in 3 s: {idle}");
    assert!(idle <= 6.0, "idle groups made {idle} calls in 3 s");

    // Kill the leader of idle-0; a survivor takes over and confirms.
    let leader = leader_on(&a, "idle-0").unwrap();
    let (mut victim, survivors): (Vec<Node>, Vec<Node>) =
        [a, b, c].into_iter().partition(|n| n.name == leader);
    let killed = std::time::Instant::now();
    victim[0].kill().await;
    let conn = survivors[0].connect().await;
    let mut pch = conn.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut acked = None;
    for _ in 0..400 {
        match answered(&pch, "idle-0", b"after", t).await {
            Some(true) => {
                acked = Some(killed.elapsed());
                break;
            }
            Some(false) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                pch = conn.create_channel().await.unwrap();
                pch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .unwrap();
            }
        }
    }
    let acked = acked.expect("a survivor confirms on the idle queue");
    eprintln!("idle quorum queue: kill to first confirm {acked:?}");
    let got = pch
        .basic_get("idle-0".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("the message confirmed before the kill");
    assert_eq!(got.delivery.data, b"kept");
}

/// An idle quorum queue gives its log back: a replica holds its entries
/// (the messages' bodies among them) until a snapshot covers them, and
/// openraft's policy waits for 1,000 entries. Once a queue that carried
/// a few hundred has been drained and stays quiet, every replica
/// snapshots and purges its log, so the node's shared log holds nothing
/// live for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_quorum_queue_compacts_its_log_on_every_replica() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes_with(root.path(), |_| "quiescent_quorum = true".into()).await;
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare("compacted".into(), durable(), quorum(&[]))
        .await
        .unwrap();
    let body = vec![b'x'; 1024];
    for _ in 0..150 {
        assert!(confirmed(&ch, "compacted", &body).await);
    }
    let nodes = [&a, &b, &c];
    let live = |n: &Node| counter(n, "wasmq_quorum_log_live_bytes");
    let before: Vec<f64> = nodes.iter().map(|n| live(n)).collect();
    assert!(
        before.iter().all(|b| *b > 150.0 * 1024.0),
        "live log bytes while the messages are queued: {before:?}"
    );
    for _ in 0..150 {
        let got = ch
            .basic_get("compacted".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        assert!(got.is_some());
    }
    let compacted = |n: &Node| {
        let q = view(n, "compacted").unwrap_or_default();
        let quorum = &q["quorum"];
        quorum["snapshot_index"].as_u64().is_some()
            && quorum["snapshot_index"] == quorum["last_applied"]
            && live(n) < 1024.0
    };
    eventually(
        "every replica snapshotted and purged its idle log",
        Duration::from_secs(30),
        || nodes.iter().all(|n| compacted(n)),
    )
    .await;
    // Still a working queue.
    assert!(confirmed(&ch, "compacted", b"after").await);
    let got = ch
        .basic_get("compacted".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message published after compaction");
    assert_eq!(got.delivery.data, b"after");
}

/// Message groups on a quorum queue: while its leader lives, two
/// consumers never hold two messages of one group and each group arrives
/// in order; when the leader is killed, the new leader goes on with no
/// message lost and no group's message delivered before an earlier one
/// of its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_groups_hold_on_a_quorum_queue_through_its_leaders_death() {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::{Arc, Mutex};
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let nodes = [a, b, c];
    let conn = nodes[0].connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "groups".into(),
        durable(),
        quorum(&[("x-message-group-header", text("group"))]),
    )
    .await
    .unwrap();
    let (mut nodes, _, li, others) = agreed_leader(nodes, "groups", t).await;

    const GROUPS: u32 = 4;
    const EACH: u32 = 30;
    let conn_p = nodes[others[0]].connect().await;
    let ch_p = conn_p.create_channel().await.unwrap();
    ch_p.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..EACH {
        for g in 0..GROUPS {
            let mut h = FieldTable::default();
            h.insert("group".into(), text(&format!("g{g}")));
            let c = ch_p
                .basic_publish(
                    "".into(),
                    "groups".into(),
                    BasicPublishOptions::default(),
                    format!("g{g}:{i}").as_bytes(),
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(h),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(c.is_ack());
        }
    }

    // Two consumers on a follower, each with room for many messages.
    let conn_c = nodes[others[1]].connect().await;
    let out: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Per group: the highest number delivered so far, and every number seen.
    type Seen = BTreeMap<String, (i64, HashSet<u32>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..2 {
        let ch = conn_c.create_channel().await.unwrap();
        ch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
        let mut sub = ch
            .basic_consume(
                "groups".into(),
                format!("c{c}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (out, seen, killed) = (out.clone(), seen.clone(), killed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let all_seen = seen
                    .lock()
                    .unwrap()
                    .values()
                    .map(|(_, s)| s.len())
                    .sum::<usize>();
                if all_seen == (GROUPS * EACH) as usize {
                    break;
                }
                // The other consumer may be taking the rest: wait a
                // second at a time (the caller bounds the whole).
                let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_secs(1), sub.next()).await
                else {
                    continue;
                };
                let body = String::from_utf8(d.data.clone()).unwrap();
                let (g, i) = body.split_once(':').unwrap();
                let i: u32 = i.parse().unwrap();
                if !killed.load(std::sync::atomic::Ordering::SeqCst) {
                    assert!(
                        out.lock().unwrap().insert(g.to_owned()),
                        "two messages of {g} out at once"
                    );
                }
                {
                    let mut seen = seen.lock().unwrap();
                    let (high, all) = seen.entry(g.to_owned()).or_insert((-1, HashSet::new()));
                    assert!(
                        i64::from(i) <= *high + 1,
                        "{body} before {g}:{} was ever delivered",
                        *high + 1
                    );
                    *high = (*high).max(i64::from(i));
                    all.insert(i);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                out.lock().unwrap().remove(g);
                let _ = d.ack(BasicAckOptions::default()).await;
            }
            drop(ch);
        }));
    }
    // Half way, the leader dies.
    eventually("half consumed", t, || {
        seen.lock()
            .unwrap()
            .values()
            .map(|(_, s)| s.len())
            .sum::<usize>()
            >= (GROUPS * EACH / 2) as usize
    })
    .await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    nodes[li].kill().await;
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every message consumed after the failover")
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    for g in 0..GROUPS {
        let (_, all) = &seen[&format!("g{g}")];
        assert_eq!(all.len(), EACH as usize, "g{g} lost messages");
    }
}

/// Deduplication on a quorum queue is decided by the replicated log: the
/// ids taken before its leader is killed are known to the new leader, so
/// messages published again after the failover (a publisher retrying what
/// it is unsure of) are confirmed and not enqueued twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_deduplicates_across_its_leaders_death() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let nodes = [a, b, c];
    let conn = nodes[0].connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "payments".into(),
        durable(),
        quorum(&[("x-message-deduplication", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    drop(conn);
    let (mut nodes, leader, li, others) = agreed_leader(nodes, "payments", t).await;

    let publish_ids = |node: &Node, ids: std::ops::Range<u32>| {
        let url = format!("amqp://guest:guest@{}/%2f", node.amqp);
        async move {
            let conn = lapin::Connection::connect(&url, Default::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for i in ids {
                let mut h = FieldTable::default();
                h.insert("x-deduplication-header".into(), text(&format!("pay-{i}")));
                // A nack (the queue's leader changing hands) is retried
                // with the same id, as a publisher unsure of a message
                // does: deduplication is what makes that safe.
                let mut tries = 0;
                loop {
                    let confirm = ch
                        .basic_publish(
                            "".into(),
                            "payments".into(),
                            BasicPublishOptions::default(),
                            i.to_string().as_bytes(),
                            BasicProperties::default()
                                .with_delivery_mode(2)
                                .with_headers(h.clone()),
                        )
                        .await
                        .unwrap();
                    let c = tokio::time::timeout(Duration::from_secs(30), confirm)
                        .await
                        .expect("a confirm in time")
                        .unwrap();
                    if c.is_ack() {
                        break;
                    }
                    tries += 1;
                    assert!(tries < 50, "pay-{i} never confirmed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    publish_ids(&nodes[others[0]], 0..20).await;
    nodes[li].kill().await;
    let survivor = &nodes[others[1]];
    eventually("another node leads", t, || {
        leader_on(survivor, "payments").is_some_and(|l| l != leader)
    })
    .await;
    // 10..20 again (duplicates), and 20..30 new.
    publish_ids(survivor, 10..30).await;

    let conn = survivor.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("payments".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(
            std::str::from_utf8(&m.delivery.data)
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
    }
    got.sort_unstable();
    assert_eq!(got, (0..30).collect::<Vec<_>>(), "each id enqueued once");
}

/// Publish messages `0..n` through `node`, each due `delay` ms from now
/// (with an `x-delay` header when `header`), confirmed.
async fn publish_due(node: &Node, exchange: &str, key: &str, n: u64, delay: u64, header: bool) {
    let conn = node.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if header {
            let mut h = FieldTable::default();
            h.insert("x-delay".into(), AMQPValue::LongLongInt(delay as i64));
            props = props.with_headers(h);
        }
        let c = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                common::on_time::body(i, delay).as_bytes(),
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
}

/// Consume `queue` through `node` until `n` distinct messages came, each
/// once and none early (at most a minute).
async fn consume_on_time(node: &Node, queue: &str, n: usize) {
    let conn = node.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut sub = ch
        .basic_consume(
            queue.into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = common::on_time::OnTime::default();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while got.count() < n && std::time::Instant::now() < until {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            got.delivered(&d.data);
        }
    }
    assert_eq!(got.count(), n, "every confirmed message");
}

/// Longer than a failover takes, so a new leader must hold the messages.
const DELAY: u64 = 8000;

/// A quorum queue's `x-delivery-delay` counts from the publish time its
/// log replicated: when the leader dies with every message still waiting,
/// the new leader holds them until the same due times, and each is
/// delivered once and never early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queues_delayed_messages_wait_out_their_leaders_death() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let nodes = [a, b, c];
    let conn = nodes[0].connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "later".into(),
        durable(),
        quorum(&[("x-delivery-delay", AMQPValue::LongLongInt(DELAY as i64))]),
    )
    .await
    .unwrap();
    drop(conn);
    let (mut nodes, _, li, others) = agreed_leader(nodes, "later", t).await;
    publish_due(&nodes[others[0]], "", "later", 100, DELAY, false).await;
    nodes[li].kill().await;
    consume_on_time(&nodes[others[1]], "later", 100).await;
}

/// A delayed exchange's schedule in a cluster is a quorum queue the
/// cluster's log declares with the exchange: when its leader dies with
/// messages scheduled, the new leader routes each once, at its time,
/// through the bindings (here to a quorum queue); the schedule cannot be
/// deleted alone, and deleting the exchange deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_exchanges_schedule_is_replicated_and_survives_its_leaders_death() {
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = three_nodes(root.path()).await;
    let t = Duration::from_secs(20);
    let nodes = [a, b, c];
    let conn = nodes[0].connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-delayed-type".into(), text("direct"));
    ch.exchange_declare(
        "later".into(),
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_declare("out".into(), durable(), quorum(&[]))
        .await
        .unwrap();
    ch.queue_bind(
        "out".into(),
        "later".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(conn);
    let (mut nodes, _, li, others) = agreed_leader(nodes, "amq.delayed.later", t).await;
    // Published through a node that does not lead the schedule.
    publish_due(&nodes[others[0]], "later", "k", 100, DELAY, true).await;
    nodes[li].kill().await;
    consume_on_time(&nodes[others[1]], "out", 100).await;

    let conn = nodes[others[1]].connect().await;
    let other = conn.create_channel().await.unwrap();
    let e = other
        .queue_delete("amq.delayed.later".into(), QueueDeleteOptions::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("delayed exchange"), "{e}");
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete("later".into(), Default::default())
        .await
        .unwrap();
    for n in others {
        let node = &nodes[n];
        eventually("the schedule deleted", t, || {
            node.api()
                .get("/api/queues/%2F")
                .ok()
                .and_then(|qs| qs.as_array().cloned())
                .is_some_and(|qs| qs.iter().all(|q| q["name"] != "amq.delayed.later"))
        })
        .await;
    }
}

/// A single node's quorum queue, with messages, becomes a replicated one:
/// the node restarted with a `[cluster]` section starts a cluster and
/// adopts what it had (definitions, users, the queue's messages, in order),
/// two nodes join, `add-member` grows the queue onto them, and the first
/// node's death loses none of those messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_quorum_queue_grows_into_a_replicated_one() {
    let root = tempfile::tempdir().unwrap();
    let t = Duration::from_secs(30);
    let a_dir = root.path().join("a");
    std::fs::create_dir_all(a_dir.join("plugins")).unwrap();
    {
        let mut alone = common::Broker::spawn(&a_dir.join("data"), &a_dir.join("plugins"));
        let (amqp, admin) = alone.ready().await;
        let api =
            wasmq::admin::client::AdminClient::new(&format!("http://{admin}"), "guest", "guest");
        api.put(
            "/api/users/alice",
            &serde_json::json!({"password": "s3cret", "tags": "management"}),
        )
        .unwrap();
        let conn = lapin::Connection::connect(
            &format!("amqp://guest:guest@{amqp}/%2f"),
            lapin::ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.queue_declare("orders".into(), durable(), quorum(&[]))
            .await
            .unwrap();
        ch.queue_declare("jobs".into(), durable(), FieldTable::default())
            .await
            .unwrap();
        for i in 0..5 {
            assert!(confirmed(&ch, "orders", format!("o{i}").as_bytes()).await);
        }
        // One taken before the move: four remain.
        let first = ch
            .basic_get("orders".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(first.delivery.data, b"o0");
        let persistent = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish(
            "".into(),
            "jobs".into(),
            BasicPublishOptions::default(),
            b"j0",
            persistent,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        drop(conn);
        alone.stop().await;
    }

    // The same data folder, now as the first node of a cluster.
    let mut a = Node::start(root.path(), "a", &[]).await;
    eventually("a adopted the orders queue with its messages", t, || {
        view(&a, "orders").is_some_and(|q| {
            q["type"] == "quorum" && q["messages"] == 4 && q["quorum"]["leader"] == "a"
        })
    })
    .await;
    eventually("the classic queue kept its message", t, || {
        view(&a, "jobs").is_some_and(|q| q["messages"] == 1)
    })
    .await;
    eventually("alice came along", t, || {
        a.api().get("/api/users/alice").is_ok()
    })
    .await;
    let b = Node::start(root.path(), "b", std::slice::from_ref(&a.cluster)).await;
    let c = Node::start(root.path(), "c", std::slice::from_ref(&a.cluster)).await;
    formed(&[&a, &b, &c]).await;
    for n in ["b", "c"] {
        a.api()
            .post(
                &format!("/api/queues/%2F/orders/members/{n}"),
                &serde_json::json!({}),
            )
            .unwrap();
    }
    eventually("the queue has three members", t, || {
        members(&a, "orders").len() == 3
    })
    .await;
    eventually("b's replica holds the four messages", t, || {
        b.api()
            .get("/api/queues/%2F/orders")
            .is_ok_and(|q| q["quorum"]["messages"] == 4)
    })
    .await;

    // The node that had them alone dies: the others still have them all.
    a.kill().await;
    let conn = b.connect().await;
    let mut got = no_ack_consumer(&conn, "orders", "grown").await;
    let mut bodies = Vec::new();
    while bodies.len() < 4 {
        let d = tokio::time::timeout(t, got.next())
            .await
            .expect("the adopted messages, from the new leader")
            .unwrap()
            .unwrap();
        bodies.push(String::from_utf8(d.data).unwrap());
    }
    assert_eq!(bodies, ["o1", "o2", "o3", "o4"]);
    drop(conn);
    for mut n in [b, c] {
        n.kill().await;
    }
}

/// Lists as quorum queues through the Redis front end, with redis-py
/// unchanged: pushes through one node, the queue's leader killed while a
/// client of a survivor pushes, and every push the client was answered
/// for is popped from the other survivor (a push answered with an error
/// is tried again by the client, so it may come twice, never lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pushes_acknowledged_survive_the_leaders_death() {
    let root = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let (a, b, c) = three_nodes_with(root.path(), |n| {
        let i = (n.as_bytes()[0] - b'a') as usize;
        redis_section(ports[i], "quorum")
    })
    .await;
    let key = "rq.jobs";
    let t = Duration::from_secs(30);
    let pushed = |out: &str| -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect(out);
        let list = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect()
        };
        (list("acked"), list("retried"))
    };
    // The first push declares the list through the cluster: a quorum queue
    // on the three nodes.
    let args = |port: u16, from: u32, to: u32| -> Vec<String> {
        vec![
            "push".into(),
            port.to_string(),
            key.into(),
            from.to_string(),
            to.to_string(),
        ]
    };
    let (mut acked, mut retried) =
        pushed(&redis_py(&args(ports[0], 0, 100), Duration::from_secs(90)).await);
    assert_eq!(acked.len(), 100);
    let (mut nodes, leader, li, others) = agreed_leader([a, b, c], key, t).await;
    let (pusher, drainer) = (others[0], others[1]);
    let port_of = |i: usize| ports[(nodes[i].name.as_bytes()[0] - b'a') as usize];
    let (push_port, drain_port) = (port_of(pusher), port_of(drainer));

    // A survivor's client pushes while the leader is killed.
    let during_args = args(push_port, 100, 1500);
    let during =
        tokio::spawn(async move { redis_py(&during_args, Duration::from_secs(150)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[li].kill().await;
    let (more, again) = pushed(&during.await.unwrap());
    acked.extend(more);
    retried.extend(again);
    assert_eq!(acked.len(), 1500, "every push was answered in the end");

    let out = redis_py(
        &["drain".into(), drain_port.to_string(), key.into()],
        Duration::from_secs(120),
    )
    .await;
    let drained: Vec<String> = serde_json::from_str(out.trim()).expect(&out);
    eprintln!(
        "leader {leader} killed: {} pushes answered, {} tried again, {} popped",
        acked.len(),
        retried.len(),
        drained.len()
    );
    // The kill came while the survivor's client pushed through the leader.
    assert!(!retried.is_empty(), "no push met the leader's death");
    let mut seen = std::collections::HashMap::new();
    for m in &drained {
        *seen.entry(m.clone()).or_insert(0) += 1;
    }
    let lost: Vec<&String> = acked.iter().filter(|m| !seen.contains_key(*m)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged pushes lost when leader {leader} died: {lost:?}"
    );
    for (m, n) in &seen {
        assert!(
            *n == 1 || retried.contains(m),
            "{m} popped {n} times, and its push was never tried again"
        );
    }
    // In the order they were pushed, each after the one before it.
    let firsts: Vec<u32> = drained
        .iter()
        .map(|m| m.parse().unwrap())
        .scan(std::collections::HashSet::new(), |s, m| {
            Some((s.insert(m), m))
        })
        .filter_map(|(first, m)| first.then_some(m))
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "out of order: {firsts:?}"
    );
}
