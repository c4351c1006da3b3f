//! Crash tests: the real `wasmq` binary as a child process, killed with
//! SIGKILL at random moments while a publisher (confirm mode, persistent
//! messages) and a consumer (manual acks) run against a durable queue, then
//! restarted on the same data folder. Across every round:
//!
//! - every message whose confirm arrived is delivered at least once;
//! - no message is delivered again after its ack was known to be processed
//!   (the ack followed by a round trip on the same channel);
//! - messages delivered with `redelivered = false` arrive in publish order.
//!
//! The kill point is random; the seed is printed and can be replayed with
//! `WASMQ_CRASH_SEED`. `WASMQ_CRASH_ROUNDS` sets the number of rounds.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

mod common;
use common::Broker;

const QUEUE: &str = "crash";

/// xorshift64*: enough randomness for kill points, and replayable.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// What the clients observed, across all rounds.
#[derive(Default)]
struct Observed {
    next_seq: u64,
    confirmed: BTreeSet<u64>,
    /// Acks the broker is known to have processed.
    acked: HashSet<u64>,
    deliveries: HashMap<u64, u32>,
    last_fresh: Option<u64>,
    violations: Vec<String>,
}

impl Observed {
    /// Confirmed messages never delivered.
    fn lost(&self) -> Vec<u64> {
        self.confirmed
            .iter()
            .copied()
            .filter(|seq| !self.deliveries.contains_key(seq))
            .collect()
    }

    fn delivered(&mut self, seq: u64, redelivered: bool) {
        if self.acked.contains(&seq) {
            self.violations
                .push(format!("message {seq} delivered again after its ack"));
        }
        if !redelivered {
            if let Some(last) = self.last_fresh
                && seq <= last
            {
                self.violations.push(format!(
                    "message {seq} delivered (not redelivered) after {last}: order broken"
                ));
            }
            self.last_fresh = Some(seq);
        }
        *self.deliveries.entry(seq).or_default() += 1;
    }
}

async fn connect(addr: &str) -> Connection {
    Connection::connect(
        &format!("amqp://guest:guest@{addr}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect")
}

async fn declare(ch: &Channel) {
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
}

/// Publish numbered persistent messages in confirm mode, up to `window`
/// unconfirmed at a time, forever (until the broker dies).
async fn publish(conn: &Connection, seen: &Mutex<Observed>, window: usize) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&ch).await;
    loop {
        let mut pending = Vec::with_capacity(window);
        for _ in 0..window {
            let seq = {
                let mut s = seen.lock().unwrap();
                s.next_seq += 1;
                s.next_seq
            };
            let confirm = ch
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &seq.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            pending.push((seq, confirm));
        }
        for (seq, confirm) in pending {
            if let Confirmation::Ack(_) = confirm.await? {
                seen.lock().unwrap().confirmed.insert(seq);
            }
        }
    }
}

/// Consume with manual acks; after every few acks, a round trip on the
/// channel proves the broker processed them, and only then do they count.
async fn consume(conn: &Connection, seen: &Mutex<Observed>) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    declare(&ch).await;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let mut deliveries = ch
        .basic_consume(
            QUEUE.into(),
            "crash-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut unproven = Vec::new();
    while let Some(d) = deliveries.next().await {
        let d = d?;
        let seq = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        seen.lock().unwrap().delivered(seq, d.redelivered);
        d.acker.ack(BasicAckOptions::default()).await?;
        unproven.push(seq);
        if unproven.len() >= 25 {
            ch.basic_qos(100, BasicQosOptions::default()).await?;
            seen.lock().unwrap().acked.extend(unproven.drain(..));
        }
    }
    Ok(())
}

/// Take every message left in the queue (no-ack), recording each.
async fn drain(ch: &Channel, seen: &Mutex<Observed>) {
    declare(ch).await;
    while let Some(m) = ch
        .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let seq = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap());
        seen.lock().unwrap().delivered(seq, m.delivery.redelivered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let seed = std::env::var("WASMQ_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let rounds: u32 = std::env::var("WASMQ_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("crash test: seed {seed}, {rounds} rounds");
    let mut rng = Rng(seed);
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let seen = Mutex::new(Observed::default());
    let started = Instant::now();

    for round in 0..rounds {
        if started.elapsed() > Duration::from_secs(90) {
            eprintln!("time bound reached after {round} rounds");
            break;
        }
        let mut broker = Broker::spawn(data.path(), plugins.path());
        // Sometimes during start-up and recovery, mostly under traffic.
        let kill_after = Duration::from_millis(if rng.below(5) == 0 {
            rng.below(150)
        } else {
            200 + rng.below(1200)
        });
        let window = [1, 10, 100, 500][rng.below(4) as usize];
        let traffic = async {
            let addr = broker.ready().await.0;
            let conn = connect(&addr).await;
            let _ = tokio::join!(publish(&conn, &seen, window), consume(&conn, &seen));
            std::future::pending::<()>().await
        };
        let _ = tokio::time::timeout(kill_after, traffic).await;
        broker.kill().await;
        let s = seen.lock().unwrap();
        eprintln!(
            "round {round}: killed after {kill_after:?} (window {window}); {} confirmed, {} acked so far",
            s.confirmed.len(),
            s.acked.len()
        );
    }

    // A last, clean life: drain the queue and account for every message.
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    drain(&ch, &seen).await;
    conn.close(200, "done".into()).await.unwrap();
    broker.kill().await;

    let s = seen.into_inner().unwrap();
    let lost = s.lost();
    eprintln!(
        "seed {seed}: {} published, {} confirmed, {} delivered, {} redeliveries",
        s.next_seq,
        s.confirmed.len(),
        s.deliveries.len(),
        s.deliveries.values().map(|n| n - 1).sum::<u32>()
    );
    assert!(
        s.confirmed.len() > 100,
        "seed {seed}: too little traffic to prove anything ({} confirmed)",
        s.confirmed.len()
    );
    assert!(
        lost.is_empty(),
        "seed {seed}: {} confirmed messages lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        s.violations.is_empty(),
        "seed {seed}: {:?}",
        &s.violations[..s.violations.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_confirmed_publishing_exits_0_and_loses_nothing_confirmed() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let seen = Mutex::new(Observed::default());
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let mut events = Box::pin(conn.events_listener());
    let pid = broker.child.id().expect("pid").to_string();
    let term = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(ok.success());
    };
    // Publishing ends when the broker closes the connection (320).
    let (published, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), publish(&conn, &seen, 200)),
        term
    );
    let ended = published.expect("the broker closed the connection on SIGTERM");
    ended.expect_err("publishing ends with the close");
    // The close's reply code, from lapin's error events (the publish itself
    // may fail with a channel-state error first).
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event
                && let lapin::ErrorKind::ProtocolError(p) = e.kind()
            {
                return Some(p.get_id());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    assert_eq!(
        code,
        Some(320),
        "the client is told CONNECTION_FORCED, not just disconnected"
    );
    let status = tokio::time::timeout(Duration::from_secs(15), broker.child.wait())
        .await
        .expect("exits within its grace period")
        .unwrap();
    assert!(status.success(), "exit status {status}");

    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    drain(&ch, &seen).await;
    broker.kill().await;
    let s = seen.into_inner().unwrap();
    let lost = s.lost();
    assert!(s.confirmed.len() > 100, "{} confirmed", s.confirmed.len());
    assert!(lost.is_empty(), "{} confirmed messages lost", lost.len());
    assert!(s.violations.is_empty(), "{:?}", s.violations);
}

/// A deduplicating queue's ids survive kill -9: every id whose publish was
/// confirmed before the kill is still a duplicate after it (its messages
/// consumed or not), and a message retried after the restart is not
/// enqueued twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_ids_survive_kill_9() {
    use lapin::types::AMQPValue;
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    ch.queue_declare(
        "once".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |ch: Channel, i: u32, persistent: bool| async move {
        let mut h = FieldTable::default();
        h.insert(
            "x-deduplication-header".into(),
            AMQPValue::LongString(format!("id-{i}").into()),
        );
        let props = BasicProperties::default().with_headers(h);
        let props = if persistent {
            props.with_delivery_mode(2)
        } else {
            props
        };
        ch.basic_publish(
            "".into(),
            "once".into(),
            BasicPublishOptions::default(),
            i.to_string().as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
    };
    // Persistent and transient messages alike: a confirmed id is on disk.
    for i in 0..200 {
        assert!(publish(ch.clone(), i, i % 2 == 0).await);
    }
    // Half of them consumed and acked before the kill.
    for _ in 0..100 {
        let m = ch
            .basic_get("once".into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("a message");
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.kill().await;

    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Every id again (a publisher retrying all it sent), and ten new.
    for i in 0..210 {
        assert!(publish(ch.clone(), i, true).await);
    }
    let mut left = Vec::new();
    while let Some(m) = ch
        .basic_get("once".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        left.push(
            std::str::from_utf8(&m.delivery.data)
                .unwrap()
                .parse::<u32>()
                .unwrap(),
        );
    }
    // The persistent half of the unconsumed ones came back from the log;
    // the transient ones were lost with the process, as transient
    // messages are, but their ids were not: retried, they are still
    // duplicates. The ten new ids are taken.
    let expected: Vec<u32> = (100..200).filter(|i| i % 2 == 0).chain(200..210).collect();
    left.sort_unstable();
    assert_eq!(left, expected);
    broker.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_survive_kill_9_and_arrive_once_and_not_early() {
    use common::on_time::{OnTime, body};
    use lapin::types::AMQPValue;
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    let durable = || ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "later".into(),
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        durable(),
        args,
    )
    .await
    .unwrap();
    ch.queue_declare(
        "out".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
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
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Bodies say when each is due (wall clock), so the checker can tell
    // an early delivery; every tenth has no delay.
    let mut pending = Vec::new();
    for i in 0..300u64 {
        let delay = if i % 10 == 0 { 0 } else { 1500 + i * 3 };
        let mut h = FieldTable::default();
        h.insert("x-delay".into(), AMQPValue::LongLongInt(delay as i64));
        let body = body(i, delay);
        let props = BasicProperties::default()
            .with_headers(h)
            .with_delivery_mode(2);
        pending.push(
            ch.basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    for p in pending {
        assert!(p.await.unwrap().is_ack());
    }
    broker.kill().await;

    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let ch = conn.create_channel().await.unwrap();
    let mut seen = OnTime::default();
    let until = Instant::now() + Duration::from_secs(20);
    while seen.count() < 300 && Instant::now() < until {
        match ch
            .basic_get("out".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => seen.delivered(&m.delivery.data),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(seen.count(), 300, "every confirmed message, once");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        ch.basic_get("out".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );
    broker.kill().await;
}

/// A stream's view of a crash campaign: what was confirmed, and what its
/// named consumer was handed, by offset.
#[derive(Default)]
struct StreamSeen {
    next_seq: u64,
    confirmed: BTreeSet<u64>,
    /// Offsets the named consumer was given.
    named: BTreeSet<u64>,
}

fn stream_declare_args() -> FieldTable {
    use lapin::types::AMQPValue;
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    // Small segments, so that kills land across segment rolls too.
    t.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(64 * 1024),
    );
    t
}

fn stream_offset(d: &lapin::message::Delivery) -> u64 {
    use lapin::types::AMQPValue;
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset"))
    {
        Some(AMQPValue::LongLongInt(n)) => *n as u64,
        other => panic!("a stream delivery without its offset: {other:?}"),
    }
}

/// Declare the campaign's stream (durable, small segments).
async fn declare_stream(ch: &Channel) -> lapin::Result<()> {
    ch.queue_declare(
        "events".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        stream_declare_args(),
    )
    .await
    .map(drop)
}

async fn stream_reader(
    conn: &Connection,
    args: &[(&str, lapin::types::AMQPValue)],
) -> lapin::Result<lapin::Consumer> {
    let ch = conn.create_channel().await?;
    declare_stream(&ch).await?;
    ch.basic_qos(200, BasicQosOptions::default()).await?;
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert((*k).into(), v.clone());
    }
    ch.basic_consume(
        "events".into(),
        "".into(),
        BasicConsumeOptions::default(),
        t,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_every_confirmed_message_in_order_through_kill_9() {
    use lapin::types::AMQPValue;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("stream crash test: seed {seed}");
    let mut rng = Rng(seed);
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let seen = Mutex::new(StreamSeen::default());
    let named = || {
        [
            (
                "x-stream-consumer-name",
                AMQPValue::LongString("checker".into()),
            ),
            ("x-stream-offset", AMQPValue::LongString("first".into())),
        ]
    };
    for round in 0..6 {
        let mut broker = Broker::spawn(data.path(), plugins.path());
        let kill_after = Duration::from_millis(300 + rng.below(900));
        let window = [1, 20, 200][rng.below(3) as usize];
        let traffic = async {
            let addr = broker.ready().await.0;
            let conn = connect(&addr).await;
            let publish = async {
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                declare_stream(&ch).await?;
                loop {
                    let mut pending = Vec::new();
                    for _ in 0..window {
                        let seq = {
                            let mut s = seen.lock().unwrap();
                            s.next_seq += 1;
                            s.next_seq
                        };
                        let body = [seq.to_be_bytes().as_slice(), &[0u8; 200]].concat();
                        let c = ch
                            .basic_publish(
                                "".into(),
                                "events".into(),
                                BasicPublishOptions::default(),
                                &body,
                                BasicProperties::default(),
                            )
                            .await?;
                        pending.push((seq, c));
                    }
                    for (seq, c) in pending {
                        if let Confirmation::Ack(_) = c.await? {
                            seen.lock().unwrap().confirmed.insert(seq);
                        }
                    }
                }
                #[allow(unreachable_code)]
                lapin::Result::Ok(())
            };
            let read = async {
                let mut c = stream_reader(&conn, &named()).await?;
                while let Some(d) = c.next().await {
                    let d = d?;
                    seen.lock().unwrap().named.insert(stream_offset(&d));
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
                lapin::Result::Ok(())
            };
            let _ = tokio::join!(publish, read);
            std::future::pending::<()>().await
        };
        let _ = tokio::time::timeout(kill_after, traffic).await;
        broker.kill().await;
        eprintln!(
            "round {round}: killed after {kill_after:?} (window {window}); {} confirmed",
            seen.lock().unwrap().confirmed.len()
        );
    }

    // A clean life: read the whole stream from `first`, and let the named
    // consumer catch up.
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let addr = broker.ready().await.0;
    let conn = connect(&addr).await;
    let mut all = stream_reader(
        &conn,
        &[("x-stream-offset", AMQPValue::LongString("first".into()))],
    )
    .await
    .unwrap();
    let mut checker = stream_reader(&conn, &named()).await.unwrap();
    let mut stream: Vec<(u64, u64)> = Vec::new();
    let last_offset = loop {
        let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), all.next()).await else {
            break stream.last().map(|(o, _)| *o);
        };
        let d = d.unwrap();
        stream.push((
            stream_offset(&d),
            u64::from_be_bytes(d.data[..8].try_into().unwrap()),
        ));
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    };
    if let Some(last) = last_offset {
        while seen.lock().unwrap().named.last() != Some(&last) {
            let d = tokio::time::timeout(Duration::from_secs(10), checker.next())
                .await
                .expect("the named consumer catches up")
                .unwrap()
                .unwrap();
            seen.lock().unwrap().named.insert(stream_offset(&d));
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    conn.close(200, "done".into()).await.unwrap();
    broker.kill().await;

    let s = seen.into_inner().unwrap();
    eprintln!(
        "seed {seed}: {} published, {} confirmed, {} in the stream",
        s.next_seq,
        s.confirmed.len(),
        stream.len()
    );
    assert!(s.confirmed.len() > 100, "seed {seed}: too little traffic");
    // Offsets from 0 with no gap; each message once, in publish order.
    for (i, (offset, _)) in stream.iter().enumerate() {
        assert_eq!(*offset, i as u64, "seed {seed}: offsets have a gap");
    }
    assert!(
        stream.windows(2).all(|w| w[1].1 > w[0].1),
        "seed {seed}: a message twice or out of order"
    );
    let kept: BTreeSet<u64> = stream.iter().map(|(_, seq)| *seq).collect();
    let lost: Vec<&u64> = s.confirmed.difference(&kept).collect();
    assert!(lost.is_empty(), "seed {seed}: confirmed and lost: {lost:?}");
    // The named consumer was handed every offset at least once: resuming
    // never skipped what it had not settled.
    let expected: BTreeSet<u64> = (0..stream.len() as u64).collect();
    let missed: Vec<&u64> = expected.difference(&s.named).collect();
    assert!(
        missed.is_empty(),
        "seed {seed}: the named consumer missed {missed:?}"
    );
}
