//! The message checker the fault tests share: publishers that confirm and
//! consumers that ack, on whichever node answers, recording what they saw;
//! and the accounting afterwards (every confirmed message delivered, none
//! delivered twice without the redelivered flag, none unknown, first
//! deliveries in each publisher's order).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// xorshift64*: a seeded sequence, so that a run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the clients saw.
#[derive(Default)]
pub struct Record {
    pub published: HashSet<String>,
    pub confirmed: HashSet<String>,
    /// (consumer, message, redelivered), in the order each consumer got
    /// them.
    pub deliveries: Vec<(usize, String, bool)>,
    /// What each client did and when (ms since the first note): where it
    /// connected, each publish's answer, each delivery. Printed for the
    /// messages a failed check names.
    pub events: Vec<(u64, String)>,
}

/// Milliseconds since the checker's first look at the clock: the time
/// the events and the fault log share.
pub fn elapsed_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Note `what` in the record's timeline.
pub fn note(record: &Shared, what: String) {
    record.lock().unwrap().events.push((elapsed_ms(), what));
}

/// The timeline's lines that bear on `messages`: those naming one of
/// them, and every client's connections.
pub fn timeline(r: &Record, messages: &[&str]) -> Vec<String> {
    r.events
        .iter()
        .filter(|(_, e)| {
            e.contains(" on node ")
                || messages
                    .iter()
                    .any(|m| e.split_whitespace().any(|w| w == *m))
        })
        .map(|(t, e)| format!("{:>7.3}s {e}", *t as f64 / 1000.0))
        .collect()
}

pub type Shared = Arc<Mutex<Record>>;
pub type Addrs = Arc<Mutex<Vec<Option<String>>>>;

pub async fn connect(addrs: &Addrs, start: usize) -> Option<(Connection, usize)> {
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

pub async fn publisher(
    id: usize,
    queue: &'static str,
    addrs: Addrs,
    record: Shared,
    stop: Arc<AtomicBool>,
) {
    publisher_with_quiet(id, queue, addrs, record, stop, Arc::default()).await;
}

/// [`publisher`], holding its next batch while `quiet` is set (so that
/// the queue goes idle between faults).
pub async fn publisher_with_quiet(
    id: usize,
    queue: &'static str,
    addrs: Addrs,
    record: Shared,
    stop: Arc<AtomicBool>,
    quiet: Arc<AtomicBool>,
) {
    let mut seq = 0u64;
    let mut node = id;
    while !stop.load(Ordering::Relaxed) {
        let Some((conn, at)) = connect(&addrs, node).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        node = at;
        note(&record, format!("p{id} on node {at}"));
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
            while quiet.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut waiting = Vec::new();
            for _ in 0..10 {
                let m = format!("p{id}-{seq}");
                seq += 1;
                record.lock().unwrap().published.insert(m.clone());
                let publish = ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    m.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                );
                match tokio::time::timeout(Duration::from_secs(3), publish).await {
                    Ok(Ok(confirm)) => waiting.push((m, confirm)),
                    _ => {
                        note(&record, format!("p{id} publish of {m} failed"));
                        break 'batches;
                    }
                }
            }
            for (m, confirm) in waiting {
                match tokio::time::timeout(Duration::from_secs(5), confirm).await {
                    Ok(Ok(c)) if c.is_ack() => {
                        note(&record, format!("p{id} ack {m}"));
                        record.lock().unwrap().confirmed.insert(m);
                    }
                    Ok(Ok(_)) => note(&record, format!("p{id} nack {m}")),
                    _ => {
                        note(&record, format!("p{id} no confirm for {m}"));
                        break 'batches;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Another node next time.
        node += 1;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "".into())).await;
    }
}

pub async fn consumer(
    id: usize,
    queue: &'static str,
    addrs: Addrs,
    record: Shared,
    stop: Arc<AtomicBool>,
) {
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
                queue.into(),
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
        note(&record, format!("c{id} consuming on node {node}"));
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                Err(_) => {
                    if !conn.status().connected() {
                        break;
                    }
                }
                Ok(Some(Ok(d))) => {
                    let m = String::from_utf8_lossy(&d.data).into_owned();
                    let flag = if d.redelivered { " (redelivered)" } else { "" };
                    {
                        let mut r = record.lock().unwrap();
                        r.events
                            .push((elapsed_ms(), format!("c{id} got {m}{flag} via node {node}")));
                        r.deliveries.push((id, m, d.redelivered));
                    }
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

/// What the checker found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub published: usize,
    pub confirmed: usize,
    pub delivered: usize,
    pub lost: Vec<String>,
    pub unknown: Vec<String>,
    pub unflagged_duplicates: Vec<String>,
    pub out_of_order: Vec<String>,
}

pub fn check(r: &Record) -> Verdict {
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

/// Stop the publishers, wait (up to a minute) until every confirmed
/// message was delivered, then stop the consumers. `stuck` runs first if
/// some never came, while the consumers are still there to be seen.
pub async fn drain(
    record: &Shared,
    stop_publishing: &AtomicBool,
    publishers: Vec<tokio::task::JoinHandle<()>>,
    stop_consuming: &AtomicBool,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    stuck: impl FnOnce(),
) {
    stop_publishing.store(true, Ordering::Relaxed);
    for t in publishers {
        let _ = t.await;
    }
    let start = Instant::now();
    let mut done = false;
    while start.elapsed() < Duration::from_secs(60) {
        done = {
            let r = record.lock().unwrap();
            let delivered: HashSet<&String> = r.deliveries.iter().map(|(_, m, _)| m).collect();
            r.confirmed.iter().all(|m| delivered.contains(m))
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !done {
        stuck();
    }
    // A little longer, for duplicates still on their way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_consuming.store(true, Ordering::Relaxed);
    for t in consumers {
        let _ = t.await;
    }
}
