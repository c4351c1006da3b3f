//! The quorum queue checker: a three-node cluster of real processes on
//! loopback, each node's links behind a TCP proxy; publishers with
//! confirms and consumers with manual acks on several nodes; and faults
//! injected at random moments: kill -9 and restart a node, SIGSTOP and
//! SIGCONT the queue's leader, cut a node off from the others and heal
//! it. Afterwards every message is accounted for:
//!
//! * confirmed but never delivered: must be 0;
//! * delivered but never published: 0;
//! * delivered again without the redelivered flag: 0;
//! * first deliveries out of a publisher's order (per consumer): 0.
//!
//! Faults: kill -9 (and restart), SIGSTOP of the leader, a node cut off
//! (its links reset), the leader black-holed (its links open and silent),
//! and the sequence that once left the survivors without an election for
//! 50 s (the leader killed and restarted, then whichever leads paused
//! twice). Every third fault comes after a quiet spell, once idle
//! replicas have compacted their logs.
//!
//! A replicated stream goes through the same faults
//! (`replicated_streams_lose_no_confirmed_message_through_random_faults`):
//! afterwards every replica is read from `first` and must hold every
//! confirmed message, at offsets from 0 without a gap, none unknown, none
//! twice, each publisher's in order, and the same records as the others.
//!
//! The quorum checker runs twice: with quiescent groups (the default; `WASMQ_QUIESCENT=0`
//! turns the first run's off) and with groups on openraft's own timers.
//! `WASMQ_FAULTS` sets the number of faults (the suite runs a few),
//! `WASMQ_FAULT_SEED` replays a run (the seed is printed). The long
//! campaign is `scripts/quorum-campaign.sh` (docs/cluster.md).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

mod common;
use common::checker::*;
use common::cluster::*;

const QUEUE: &str = "checked";

fn signal(node: &Node, sig: &str) {
    let pid = node
        .broker
        .as_ref()
        .expect("running")
        .child
        .id()
        .expect("pid");
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

fn leader_of(nodes: &[Node], stopped: Option<usize>) -> Option<usize> {
    leader_of_named(nodes, stopped, QUEUE)
}

fn leader_of_named(nodes: &[Node], stopped: Option<usize>, queue: &str) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if Some(i) == stopped || n.broker.is_none() {
            continue;
        }
        let Ok(qs) = n.api().get("/api/queues/%2F") else {
            continue;
        };
        let leader = qs.as_array().and_then(|qs| {
            qs.iter()
                .find(|q| q["name"] == queue)
                .and_then(|q| q["quorum"]["leader"].as_str().map(str::to_owned))
        });
        if let Some(l) = leader {
            return nodes.iter().position(|n| n.name == l);
        }
    }
    None
}

/// Quiescent groups (the default), or, with `WASMQ_QUIESCENT=0`, groups on
/// openraft's own timers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_lose_no_confirmed_message_through_random_faults() {
    let quiescent = std::env::var("WASMQ_QUIESCENT").map_or(true, |v| v != "0");
    checker(quiescent).await;
}

/// Groups on openraft's own heartbeats and election timers
/// (`quiescent_quorum = false`) keep the same guarantees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_on_openraft_timers_lose_nothing_either() {
    checker(false).await;
}

/// A replicated stream under the same faults: afterwards every replica
/// holds every confirmed message, at offsets from 0 without a gap, in
/// each publisher's order, none twice, and all replicas the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_streams_lose_no_confirmed_message_through_random_faults() {
    let faults: usize = std::env::var("WASMQ_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed = seed();
    eprintln!("stream checker: {faults} faults, WASMQ_FAULT_SEED={seed}");
    let mut rng = Rng(seed);
    let root = tempfile::tempdir().unwrap();
    let (proxies, nodes) = three_nodes_behind_proxies(root.path()).await;
    let mut nodes = Vec::from(nodes);
    {
        let conn = nodes[0].connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(32 * 1024),
        );
        ch.queue_declare(
            STREAM.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    }
    eventually("the stream has a leader", Duration::from_secs(20), || {
        leader_of_named(&nodes, None, STREAM).is_some()
    })
    .await;
    known_everywhere(&nodes, STREAM).await;
    let addrs: Addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| Some(n.amqp.clone())).collect(),
    ));
    let record: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            tokio::spawn(publisher_with_quiet(
                p,
                STREAM,
                addrs.clone(),
                record.clone(),
                stop.clone(),
                quiet.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = strike(
        faults, &mut rng, &mut nodes, &proxies, &addrs, &quiet, STREAM,
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in publishers {
        let _ = p.await;
    }

    // Every replica reaches the same end, then each is read from `first`.
    let end = |n: &Node| -> Option<u64> {
        let qs = n.api().get("/api/queues/%2F").ok()?;
        let q = qs.as_array()?.iter().find(|q| q["name"] == STREAM)?.clone();
        q["stream"]["last_offset"].as_u64()
    };
    let mut last = None;
    eventually(
        "every replica holds the same end",
        Duration::from_secs(60),
        || {
            let ends: Vec<Option<u64>> = nodes.iter().map(end).collect();
            last = ends[0];
            ends[0].is_some() && ends.iter().all(|e| *e == ends[0])
        },
    )
    .await;
    let count = last.expect("an end") + 1;
    let mut replicas = Vec::new();
    for n in &nodes {
        replicas.push(read_stream(n, count).await);
    }
    let confirmed = record.lock().unwrap().confirmed.clone();
    let published = record.lock().unwrap().published.clone();
    for (n, records) in nodes.iter().zip(&replicas) {
        // Offsets from 0, one after the other.
        for (i, (offset, _)) in records.iter().enumerate() {
            assert_eq!(
                *offset, i as u64,
                "{}: offset {offset} at {i} (seed {seed})",
                n.name
            );
        }
        let r = Record {
            published: published.clone(),
            confirmed: confirmed.clone(),
            deliveries: records.iter().map(|(_, m)| (0, m.clone(), false)).collect(),
            ..Record::default()
        };
        let verdict = check(&r);
        eprintln!(
            "stream checker (seed {seed}), replica {}: {} records, {} published, {} confirmed, {} lost, {} unknown, {} twice, {} out of order",
            n.name,
            records.len(),
            verdict.published,
            verdict.confirmed,
            verdict.lost.len(),
            verdict.unknown.len(),
            verdict.unflagged_duplicates.len(),
            verdict.out_of_order.len()
        );
        assert!(verdict.confirmed > 0, "nothing was confirmed: {verdict:?}");
        assert!(
            verdict.lost.is_empty()
                && verdict.unknown.is_empty()
                && verdict.unflagged_duplicates.is_empty()
                && verdict.out_of_order.is_empty(),
            "seed {seed}, replica {}: {verdict:#?}\nfaults: {log:#?}",
            n.name
        );
    }
    assert!(
        replicas.iter().all(|r| *r == replicas[0]),
        "seed {seed}: the replicas differ\nfaults: {log:#?}"
    );
    eprintln!("faults: {log:#?}");
}

const STREAM: &str = "checked-stream";

/// The run's seed: `WASMQ_FAULT_SEED`, or the clock.
fn seed() -> u64 {
    std::env::var("WASMQ_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        .max(1)
}

/// The first `count` records of `node`'s replica of the checked stream:
/// (offset, body).
async fn read_stream(node: &Node, count: u64) -> Vec<(u64, String)> {
    use futures_lite::StreamExt;
    let conn = node.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut sub = ch
        .basic_consume(
            STREAM.into(),
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < count {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{}: record {} of {count}", node.name, out.len()))
            .unwrap()
            .unwrap();
        let offset = stream_offset(&d);
        out.push((offset, String::from_utf8_lossy(&d.data).into_owned()));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "".into()).await;
    out
}

async fn checker(quiescent: bool) {
    let faults: usize = std::env::var("WASMQ_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed = seed();
    eprintln!("quorum checker: {faults} faults, WASMQ_FAULT_SEED={seed}");
    let mut rng = Rng(seed);

    let root = tempfile::tempdir().unwrap();
    eprintln!("quiescent_quorum = {quiescent}");
    let (proxies, nodes) =
        three_nodes_behind_proxies_with(root.path(), &format!("quiescent_quorum = {quiescent}"))
            .await;
    let mut nodes = Vec::from(nodes);
    {
        let conn = nodes[0].connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    }
    eventually("the queue has a leader", Duration::from_secs(20), || {
        leader_of(&nodes, None).is_some()
    })
    .await;
    known_everywhere(&nodes, QUEUE).await;

    let addrs: Addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| Some(n.amqp.clone())).collect(),
    ));
    let record: Shared = Arc::default();
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let quiet = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..2 {
        tasks.push(tokio::spawn(publisher_with_quiet(
            p,
            QUEUE,
            addrs.clone(),
            record.clone(),
            stop_publishing.clone(),
            quiet.clone(),
        )));
    }
    let mut consumers = Vec::new();
    for c in 0..2 {
        consumers.push(tokio::spawn(consumer(
            c,
            QUEUE,
            addrs.clone(),
            record.clone(),
            stop_consuming.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let log = strike(
        faults, &mut rng, &mut nodes, &proxies, &addrs, &quiet, QUEUE,
    )
    .await;

    // Drain: every confirmed message must arrive.
    drain(
        &record,
        &stop_publishing,
        tasks,
        &stop_consuming,
        consumers,
        || print_consumers(&nodes),
    )
    .await;
    let verdict = check(&record.lock().unwrap());
    let firsts: BTreeMap<&str, usize> = BTreeMap::from([
        ("published", verdict.published),
        ("confirmed", verdict.confirmed),
        ("delivered", verdict.delivered),
        ("lost", verdict.lost.len()),
        ("unknown", verdict.unknown.len()),
        ("unflagged duplicates", verdict.unflagged_duplicates.len()),
        ("out of order", verdict.out_of_order.len()),
    ]);
    eprintln!("quorum checker (seed {seed}): {firsts:?}\nfaults: {log:#?}");
    if !verdict.lost.is_empty() {
        for n in &nodes {
            eprintln!("{}: {:?}", n.name, n.api().get("/api/queues/%2F"));
        }
        let r = record.lock().unwrap();
        let lost: Vec<&str> = verdict.lost.iter().take(3).map(String::as_str).collect();
        for line in timeline(&r, &lost) {
            eprintln!("  {line}");
        }
    }
    {
        let r = record.lock().unwrap();
        for m in verdict.unflagged_duplicates.iter().take(5) {
            let seen: Vec<_> = r.deliveries.iter().filter(|d| d.1 == *m).collect();
            eprintln!("unflagged duplicate {m}: {seen:?}");
        }
        for o in verdict.out_of_order.iter().take(5) {
            eprintln!("out of order: {o}");
            // "consumer C: P-LATE after P-EARLY"
            let words: Vec<&str> = o.split_whitespace().collect();
            if let [_, _, late, _, early] = words[..] {
                for line in timeline(&r, &[late, early]) {
                    eprintln!("  {line}");
                }
            }
        }
    }
    assert!(verdict.confirmed > 0, "nothing was confirmed: {verdict:?}");
    assert!(
        verdict.lost.is_empty()
            && verdict.unknown.is_empty()
            && verdict.unflagged_duplicates.is_empty()
            && verdict.out_of_order.is_empty(),
        "seed {seed}: {verdict:#?}"
    );
}

/// Inject `faults` faults at random (see the module's doc) into the
/// cluster of `nodes`, whose leader of `queue` the leader faults aim at;
/// `addrs` follows which nodes are up, `quiet` holds the publishers for a
/// quiet spell. Returns what was done.
#[allow(clippy::too_many_arguments)]
/// Wait until every node has applied the declaration of `name`: the
/// others apply it a heartbeat or two after the declaring node answers,
/// and a publish a node cannot route yet is confirmed as unroutable (as
/// AMQP has it), which the checker would count as lost.
async fn known_everywhere(nodes: &[Node], name: &str) {
    eventually(
        "every node knows the queue",
        Duration::from_secs(20),
        || nodes.iter().all(|n| n.queue_node(name).is_some()),
    )
    .await;
}

async fn strike(
    faults: usize,
    rng: &mut Rng,
    nodes: &mut [Node],
    proxies: &[Arc<Proxy>; 3],
    addrs: &Addrs,
    quiet: &AtomicBool,
    queue: &str,
) -> Vec<String> {
    let names = ["a", "b", "c"];
    let mut log = Vec::new();
    for round in 0..faults {
        let pause = Duration::from_millis(1000 + rng.below(2000));
        // Every third fault strikes a queue gone quiet: the publishers
        // hold off and the consumers drain it long enough for idle
        // replicas to compact their logs (a snapshot and a purge), so
        // the fault meets logs cut short (a member that comes back
        // behind catches up by snapshot).
        let spell = round % 3 == 2;
        if spell {
            quiet.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
        match rng.below(5) {
            0 => {
                let i = rng.below(3) as usize;
                log.push(format!("{round}: kill -9 {} for {pause:?}", names[i]));
                addrs.lock().unwrap()[i] = None;
                nodes[i].kill().await;
                tokio::time::sleep(pause).await;
                nodes[i].restart().await;
                addrs.lock().unwrap()[i] = Some(nodes[i].amqp.clone());
            }
            1 => {
                let i = leader_of_named(nodes, None, queue).unwrap_or(rng.below(3) as usize);
                log.push(format!(
                    "{round}: SIGSTOP leader {} for {pause:?}",
                    names[i]
                ));
                signal(&nodes[i], "STOP");
                tokio::time::sleep(pause).await;
                signal(&nodes[i], "CONT");
            }
            2 => {
                let i = rng.below(3) as usize;
                let pairs: Vec<(&str, &str)> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| (names[i], names[j]))
                    .collect();
                log.push(format!("{round}: cut {} off for {pause:?}", names[i]));
                let ps: Vec<&Arc<Proxy>> = proxies.iter().collect();
                cut(&ps, &pairs, true);
                tokio::time::sleep(pause).await;
                cut(&ps, &pairs, false);
            }
            3 => {
                // A black hole: the links stay open and carry nothing.
                let i = leader_of_named(nodes, None, queue).unwrap_or(rng.below(3) as usize);
                let pairs: Vec<(&str, &str)> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| (names[i], names[j]))
                    .collect();
                log.push(format!(
                    "{round}: black-hole leader {} for {pause:?}",
                    names[i]
                ));
                let ps: Vec<&Arc<Proxy>> = proxies.iter().collect();
                silence(&ps, &pairs, true);
                tokio::time::sleep(pause).await;
                silence(&ps, &pairs, false);
            }
            _ => {
                // Once, the survivors of this sequence asked for no votes
                // for over 50 s: kill the leader, restart it, then pause
                // whichever node leads, twice.
                let i = leader_of_named(nodes, None, queue).unwrap_or(rng.below(3) as usize);
                log.push(format!(
                    "{round}: kill -9 leader {}, restart, then SIGSTOP the leader twice for {pause:?}",
                    names[i]
                ));
                addrs.lock().unwrap()[i] = None;
                nodes[i].kill().await;
                tokio::time::sleep(pause).await;
                nodes[i].restart().await;
                addrs.lock().unwrap()[i] = Some(nodes[i].amqp.clone());
                for _ in 0..2 {
                    // The leader as one answer names it (it may change, or
                    // be unknown for a moment, between two questions).
                    let mut leader = None;
                    eventually("a leader to pause", Duration::from_secs(30), || {
                        leader = leader_of_named(nodes, None, queue);
                        leader.is_some()
                    })
                    .await;
                    let l = leader.expect("a leader");
                    signal(&nodes[l], "STOP");
                    tokio::time::sleep(pause).await;
                    signal(&nodes[l], "CONT");
                }
            }
        }
        if spell {
            quiet.store(false, std::sync::atomic::Ordering::Relaxed);
            let last = log.last_mut().unwrap();
            last.push_str(" (after a quiet spell)");
        }
        let at = elapsed_ms() as f64 / 1000.0;
        let last = log.last_mut().unwrap();
        last.push_str(&format!(", ended at {at:.3}s"));
        eprintln!("{last}");
        // Back to normal for a while: a leader, and messages flowing.
        eventually("a leader after the fault", Duration::from_secs(30), || {
            leader_of_named(nodes, None, queue).is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
    }

    log
}
