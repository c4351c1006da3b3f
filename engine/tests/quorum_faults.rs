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
//! It runs twice: with quiescent groups (the default; `WASMQ_QUIESCENT=0`
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
    for (i, n) in nodes.iter().enumerate() {
        if Some(i) == stopped || n.broker.is_none() {
            continue;
        }
        let Ok(qs) = n.api().get("/api/queues/%2F") else {
            continue;
        };
        let leader = qs.as_array().and_then(|qs| {
            qs.iter()
                .find(|q| q["name"] == QUEUE)
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

async fn checker(quiescent: bool) {
    let faults: usize = std::env::var("WASMQ_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let seed: u64 = std::env::var("WASMQ_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        .max(1);
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
                let i = leader_of(&nodes, None).unwrap_or(rng.below(3) as usize);
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
                let i = leader_of(&nodes, None).unwrap_or(rng.below(3) as usize);
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
                let i = leader_of(&nodes, None).unwrap_or(rng.below(3) as usize);
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
                        leader = leader_of(&nodes, None);
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
        eprintln!("{}", log.last().unwrap());
        // Back to normal for a while: a leader, and messages flowing.
        eventually("a leader after the fault", Duration::from_secs(30), || {
            leader_of(&nodes, None).is_some()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(1000))).await;
    }

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
    }
    {
        let r = record.lock().unwrap();
        for m in verdict.unflagged_duplicates.iter().take(5) {
            let seen: Vec<_> = r.deliveries.iter().filter(|d| d.1 == *m).collect();
            eprintln!("unflagged duplicate {m}: {seen:?}");
        }
        for o in verdict.out_of_order.iter().take(5) {
            eprintln!("out of order: {o}");
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
