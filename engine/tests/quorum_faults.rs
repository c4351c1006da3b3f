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
//! twice).
//!
//! `WASMQ_FAULTS` sets the number of faults (the suite runs a few),
//! `WASMQ_FAULT_SEED` replays a run (the seed is printed). The long
//! campaign is `scripts/quorum-campaign.sh` (docs/cluster.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

mod common;
use common::cluster::*;

const QUEUE: &str = "checked";

/// xorshift64*: a seeded sequence, so that a run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the clients saw.
#[derive(Default)]
struct Record {
    published: HashSet<String>,
    confirmed: HashSet<String>,
    /// (consumer, message, redelivered), in the order each consumer got
    /// them.
    deliveries: Vec<(usize, String, bool)>,
}

type Shared = Arc<Mutex<Record>>;
type Addrs = Arc<Mutex<Vec<Option<String>>>>;

async fn connect(addrs: &Addrs, start: usize) -> Option<(Connection, usize)> {
    let n = addrs.lock().unwrap().len();
    for k in 0..n {
        let i = (start + k) % n;
        let Some(addr) = addrs.lock().unwrap()[i].clone() else {
            continue;
        };
        let url = format!("amqp://guest:guest@{addr}/%2f");
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(2),
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        {
            return Some((c, i));
        }
    }
    None
}

async fn publisher(id: usize, addrs: Addrs, record: Shared, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    let mut node = id;
    while !stop.load(Ordering::Relaxed) {
        let Some((conn, at)) = connect(&addrs, node).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        node = at;
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        'batches: while !stop.load(Ordering::Relaxed) {
            let mut waiting = Vec::new();
            for _ in 0..10 {
                let m = format!("p{id}-{seq}");
                seq += 1;
                record.lock().unwrap().published.insert(m.clone());
                let publish = ch.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    m.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                );
                match tokio::time::timeout(Duration::from_secs(3), publish).await {
                    Ok(Ok(confirm)) => waiting.push((m, confirm)),
                    _ => break 'batches,
                }
            }
            for (m, confirm) in waiting {
                match tokio::time::timeout(Duration::from_secs(5), confirm).await {
                    Ok(Ok(c)) if c.is_ack() => {
                        record.lock().unwrap().confirmed.insert(m);
                    }
                    Ok(Ok(_)) => {}
                    _ => break 'batches,
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another node next time.
        node += 1;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "".into())).await;
    }
}

async fn consumer(id: usize, addrs: Addrs, record: Shared, stop: Arc<AtomicBool>) {
    let mut node = id + 1;
    while !stop.load(Ordering::Relaxed) {
        let Some((conn, at)) = connect(&addrs, node).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        node = at;
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        let _ = ch.basic_qos(10, BasicQosOptions::default()).await;
        let Ok(mut sub) = ch
            .basic_consume(
                QUEUE.into(),
                format!("c{id}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        else {
            node += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                Err(_) => {
                    if !conn.status().connected() {
                        break;
                    }
                }
                Ok(Some(Ok(d))) => {
                    let m = String::from_utf8_lossy(&d.data).into_owned();
                    record
                        .lock()
                        .unwrap()
                        .deliveries
                        .push((id, m, d.redelivered));
                    let _ = d.ack(BasicAckOptions::default()).await;
                }
                // The connection or the consumer ended.
                Ok(_) => break,
            }
        }
        node += 1;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "".into())).await;
    }
}

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

/// What the checker found.
#[derive(Debug, Default)]
struct Verdict {
    published: usize,
    confirmed: usize,
    delivered: usize,
    lost: Vec<String>,
    unknown: Vec<String>,
    unflagged_duplicates: Vec<String>,
    out_of_order: Vec<String>,
}

fn check(r: &Record) -> Verdict {
    let mut v = Verdict {
        published: r.published.len(),
        confirmed: r.confirmed.len(),
        delivered: r.deliveries.len(),
        ..Verdict::default()
    };
    let delivered: HashSet<&String> = r.deliveries.iter().map(|(_, m, _)| m).collect();
    v.lost = r
        .confirmed
        .iter()
        .filter(|m| !delivered.contains(m))
        .cloned()
        .collect();
    v.unknown = delivered
        .iter()
        .filter(|m| !r.published.contains(**m))
        .map(|m| (*m).clone())
        .collect();
    // Deliveries without the flag, per message: at most one.
    let mut unflagged: HashMap<&String, usize> = HashMap::new();
    // Per consumer and publisher: the last sequence number first-delivered.
    let mut last: HashMap<(usize, String), u64> = HashMap::new();
    for (c, m, redelivered) in &r.deliveries {
        if !redelivered {
            let n = unflagged.entry(m).or_default();
            *n += 1;
            if *n == 2 {
                v.unflagged_duplicates.push(m.clone());
            }
        }
        if *redelivered {
            continue;
        }
        let Some((p, seq)) = m.split_once('-') else {
            continue;
        };
        let seq: u64 = seq.parse().unwrap_or(0);
        let key = (*c, p.to_owned());
        if let Some(prev) = last.get(&key)
            && seq < *prev
        {
            v.out_of_order
                .push(format!("consumer {c}: {m} after {p}-{prev}"));
        }
        last.insert(key, seq);
    }
    v.lost.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_lose_no_confirmed_message_through_random_faults() {
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
    // WASMQ_QUIESCENT=1 checks the opt-in quiescent groups instead.
    let quiescent = std::env::var_os("WASMQ_QUIESCENT").is_some();
    eprintln!("quiescent_quorum = {quiescent}");
    let (proxies, nodes) = three_nodes_behind_proxies_with(
        root.path(),
        if quiescent {
            "quiescent_quorum = true"
        } else {
            ""
        },
    )
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
    let mut tasks = Vec::new();
    for p in 0..2 {
        tasks.push(tokio::spawn(publisher(
            p,
            addrs.clone(),
            record.clone(),
            stop_publishing.clone(),
        )));
    }
    let mut consumers = Vec::new();
    for c in 0..2 {
        consumers.push(tokio::spawn(consumer(
            c,
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
                    eventually("a leader to pause", Duration::from_secs(30), || {
                        leader_of(&nodes, None).is_some()
                    })
                    .await;
                    let l = leader_of(&nodes, None).unwrap();
                    signal(&nodes[l], "STOP");
                    tokio::time::sleep(pause).await;
                    signal(&nodes[l], "CONT");
                }
            }
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
    stop_publishing.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let done = {
            let r = record.lock().unwrap();
            let delivered: HashSet<&String> = r.deliveries.iter().map(|(_, m, _)| m).collect();
            r.confirmed.iter().all(|m| delivered.contains(m))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, for duplicates still on their way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_consuming.store(true, Ordering::Relaxed);
    for t in consumers {
        let _ = t.await;
    }
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
