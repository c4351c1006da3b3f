//! # wasmq-ping: end-to-end latency and throughput with as little client as possible
//!
//! `wasmq-perf` measures through lapin, which on a two-core machine costs
//! the client about three times the broker's CPU at 10k msg/s (two IO-loop
//! threads and a runtime per process), so its latency tail is mostly the
//! client's scheduling. This probe speaks AMQP 0-9-1 itself on one thread:
//! one connection publishes timestamped messages at a fixed rate to a
//! server-named queue through the default exchange, a second connection
//! consumes them (no-ack), and it prints the latency percentiles from
//! publish to delivery. It works against any AMQP 0-9-1 broker.
//!
//! With `--rate 0` it publishes as fast as the broker takes messages (in
//! batches of 64 per socket write) and reports the rate delivered to the
//! consumer within the run: a throughput figure with a client that needs
//! at most one core.
//!
//! `--exchange-type`, `--queues` and `--bindings-per-queue` publish through
//! an exchange instead, to that many server-named queues, each consumed on
//! its own connection, with `wasmq-perf`'s binding and routing keys.
//!
//! `--publish-addr` publishes through another node of a cluster than the
//! one consumed from: the queues are then shared (not exclusive) and live
//! on the consumer's node, so every message crosses from one node to the
//! other, which is what a cluster adds to a message's path.
//!
//! `--tls-ca CA.pem` speaks AMQPS instead (point `--addr` at the TLS
//! port), to measure what TLS costs.
//!
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-ping -- --addr 127.0.0.1:5672 --rate 10000
//! cargo run --release -p wasmq-perf --bin wasmq-ping -- --addr 127.0.0.1:5672 --rate 0
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, exchange, queue};
use amq_protocol::types::FieldTable;
use anyhow::bail;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use wasmq::amqp::frame::{encode_content, encode_method};
use wasmq_perf::raw::{Conn, FRAME_MAX};
use wasmq_perf::{Ticker, binding_key, routing_key};

#[derive(Parser, Clone)]
#[command(about = "AMQP publish-to-delivery latency probe (one client thread, raw AMQP)")]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:5672")]
    addr: String,
    /// User (PLAIN).
    #[arg(long, default_value = "guest")]
    user: String,
    /// Password.
    #[arg(long, default_value = "guest")]
    password: String,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    vhost: String,
    /// Messages per second (0: as fast as the broker takes them).
    #[arg(long, short = 'r', default_value_t = 10_000)]
    rate: u64,
    /// Message size in bytes (at least 8: it carries a timestamp).
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Seconds to run.
    #[arg(long, short = 'z', default_value_t = 10)]
    duration: u64,
    /// Publish to an exchange of this type (direct, topic, fanout, or a
    /// plugin name) instead of the default exchange.
    #[arg(long)]
    exchange_type: Option<String>,
    /// Queues, each with its own consuming connection.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Bindings per queue (keys as `wasmq-perf` makes them).
    #[arg(long, default_value_t = 1)]
    bindings_per_queue: usize,
    /// Connect over TLS (AMQPS), verifying the broker against the CA
    /// certificates in this PEM file; `--addr` names the AMQPS port.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Publish through this address (another node of a cluster) instead
    /// of `--addr`, where the queues are declared and consumed.
    #[arg(long)]
    publish_addr: Option<String>,
    /// Seconds to wait after the run for deliveries still on their way (a
    /// paced run ends as soon as all are in).
    #[arg(long, default_value_t = 0.5)]
    drain: f64,
}

impl Args {
    fn exchange(&self) -> String {
        self.exchange_type
            .as_ref()
            .map_or_else(String::new, |t| format!("wasmq-ping.{t}"))
    }
}

async fn open(args: &Args) -> anyhow::Result<Conn> {
    open_at(args, &args.addr).await
}

async fn open_at(args: &Args, addr: &str) -> anyhow::Result<Conn> {
    Conn::open(
        addr,
        &args.user,
        &args.password,
        &args.vhost,
        args.tls_ca.as_deref(),
    )
    .await
}

fn now_nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

async fn publish(
    mut c: Conn,
    keys: Vec<String>,
    args: Args,
    start: Instant,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut pacer = match args.rate {
        0 => None,
        rate => Some(Ticker::start(Duration::from_nanos(1_000_000_000 / rate))?),
    };
    // Unpaced, publishes go out 64 to a write.
    let batch = if pacer.is_some() { 1 } else { 64 };
    // Each routing key's message frames, encoded once; each send copies
    // them and writes the timestamp into the body, so the probe's own cost
    // stays small next to the broker's.
    let exchange = args.exchange();
    let templates: Vec<(Vec<u8>, usize)> = keys
        .iter()
        .map(|key| {
            let mut t = Vec::new();
            encode_method(
                &mut t,
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: exchange.as_str().into(),
                    routing_key: key.as_str().into(),
                    mandatory: false,
                    immediate: false,
                })),
            );
            // The body starts after the content header frame (7 + 12 + 2
            // property flag bytes + frame-end) and the body frame's header.
            let stamp_at = t.len() + 22 + 7;
            // No properties: flags 0.
            encode_content(&mut t, 1, &[0, 0], &vec![0u8; args.size.max(8)], FRAME_MAX);
            (t, stamp_at)
        })
        .collect();
    let end = Duration::from_secs(args.duration);
    let mut n = 0;
    while start.elapsed() < end {
        if let Some(p) = &mut pacer {
            p.tick().await?;
        }
        c.out.clear();
        for _ in 0..batch {
            let (template, stamp_at) = &templates[n % templates.len()];
            n += 1;
            let at = c.out.len() + stamp_at;
            c.out.extend_from_slice(template);
            c.out[at..at + 8].copy_from_slice(&now_nanos(start).to_le_bytes());
        }
        c.stream.write_all(&c.out).await?;
        c.stream.flush().await?;
        sent.fetch_add(batch as u64, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

/// What one consumer saw.
struct Seen {
    latency: Histogram<u64>,
    /// Deliveries in all, and before the run's end.
    received: u64,
    in_run: u64,
}

/// Open a consuming connection on a new server-named queue bound as
/// queue `q` of the run; returns it once basic.consume-ok is in.
async fn consumer(args: &Args, q: usize) -> anyhow::Result<Conn> {
    let mut c = open(args).await?;
    c.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "".into(),
            passive: false,
            durable: false,
            // Shared when published to from another node: exclusive
            // queues stay on their connection's node.
            exclusive: args.publish_addr.is_none(),
            auto_delete: true,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    let name = match c.method().await? {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => ok.queue.to_string(),
        other => bail!("expected queue.declare-ok, got {other:?}"),
    };
    if let Some(kind) = &args.exchange_type {
        for b in 0..args.bindings_per_queue {
            c.send(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: name.as_str().into(),
                    exchange: args.exchange().as_str().into(),
                    routing_key: binding_key(kind, q, b).as_str().into(),
                    nowait: false,
                    arguments: FieldTable::default(),
                })),
            )
            .await?;
            c.expect(|m| matches!(m, AMQPClass::Queue(queue::AMQPMethod::BindOk(_))))
                .await?;
        }
    }
    c.send(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: name.as_str().into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await?;
    c.expect(|m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))))
        .await?;
    c.queue = name;
    Ok(c)
}

/// Read deliveries until the run's end plus a drain time.
/// Whether the run's deliveries are all in: the publisher has stopped and
/// the consumers together have every copy of what it sent.
struct AllIn {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// Deliveries per message (the queues, through a fanout).
    copies: u64,
}

impl AllIn {
    fn check(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            && self.received.load(Ordering::Relaxed)
                >= self.sent.load(Ordering::Relaxed) * self.copies
    }
}

async fn consume(
    mut c: Conn,
    start: Instant,
    duration: Duration,
    deadline: tokio::time::Instant,
    all_in: Arc<AllIn>,
) -> anyhow::Result<Seen> {
    let mut seen = Seen {
        latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        received: 0,
        in_run: 0,
    };
    // The delivery being read: body bytes still expected, and its first
    // bytes (the timestamp).
    let mut pending: Option<(u64, Vec<u8>)> = None;
    loop {
        // Wake now and then to see whether the run is over.
        let now = tokio::time::Instant::now();
        let wake = deadline.min(now + Duration::from_millis(50)).max(now);
        let (kind, payload) = match tokio::time::timeout_at(wake, c.raw_frame()).await {
            Ok(f) => f?,
            Err(_) if all_in.check() || tokio::time::Instant::now() >= deadline => {
                return Ok(seen);
            }
            Err(_) => continue,
        };
        let u16_at = |i: usize| {
            payload
                .get(i..i + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        match kind {
            // Methods: basic.deliver (60, 60) starts a delivery; a close
            // of the connection (10, 50) or channel (20, 40) ends the run.
            1 => match (u16_at(0), u16_at(2)) {
                (Some(60), Some(60)) => pending = Some((u64::MAX, Vec::new())),
                (Some(10), Some(50)) | (Some(20), Some(40)) => {
                    bail!("closed by the broker, reply code {:?}", u16_at(4))
                }
                _ => {}
            },
            // Content header: class, weight, then the body size.
            2 => {
                if let (Some(p), Some(b)) = (&mut pending, payload.get(4..12)) {
                    p.0 = u64::from_be_bytes(b.try_into()?);
                }
            }
            3 => {
                let Some((left, head)) = &mut pending else {
                    bail!("body frame without a delivery");
                };
                if head.len() < 8 {
                    head.extend_from_slice(&payload[..payload.len().min(8 - head.len())]);
                }
                *left = left.saturating_sub(payload.len() as u64);
                if *left == 0 {
                    let sent = u64::from_le_bytes(head[..8].try_into()?);
                    let micros = now_nanos(start).saturating_sub(sent) / 1000;
                    seen.latency.saturating_record(micros.max(1));
                    seen.received += 1;
                    if start.elapsed() < duration {
                        seen.in_run += 1;
                    }
                    all_in.received.fetch_add(1, Ordering::Relaxed);
                    pending = None;
                }
            }
            _ => {}
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.queues > 0 && args.bindings_per_queue > 0,
        "--queues and --bindings-per-queue must be positive"
    );
    let mut first = open(&args).await?;
    let keys: Vec<String> = match &args.exchange_type {
        Some(kind) => {
            first
                .send(
                    1,
                    AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                        exchange: args.exchange().as_str().into(),
                        kind: kind.as_str().into(),
                        passive: false,
                        durable: false,
                        auto_delete: false,
                        internal: false,
                        nowait: false,
                        arguments: FieldTable::default(),
                    })),
                )
                .await?;
            first
                .expect(|m| matches!(m, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_))))
                .await?;
            let distinct = (args.queues * args.bindings_per_queue) as u64;
            (0..distinct)
                .map(|n| routing_key(kind, n, args.queues, args.bindings_per_queue))
                .collect()
        }
        None => Vec::new(),
    };
    let mut consumers = Vec::new();
    for q in 0..args.queues {
        consumers.push(consumer(&args, q).await?);
    }
    // The default exchange routes by queue name: one queue.
    let keys = if args.exchange_type.is_none() {
        anyhow::ensure!(
            args.queues == 1,
            "--queues needs --exchange-type (the default exchange reaches one queue)"
        );
        vec![consumers[0].queue.clone()]
    } else {
        keys
    };
    // Each message reaches one queue, or every queue through a fanout.
    let copies = if args.exchange_type.as_deref() == Some("fanout") {
        args.queues as u64
    } else {
        1
    };

    let publisher = match &args.publish_addr {
        Some(addr) => {
            // The queues' declarations reach the other node within a
            // heartbeat or two of their declare-ok.
            tokio::time::sleep(Duration::from_millis(500)).await;
            open_at(&args, addr).await?
        }
        None => open(&args).await?,
    };
    let start = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let all_in = Arc::new(AllIn {
        stop: stop.clone(),
        sent: sent.clone(),
        received: received.clone(),
        copies,
    });
    let deadline = tokio::time::Instant::from_std(start)
        + duration
        + Duration::from_secs_f64(args.drain.max(0.0));
    let tasks: Vec<_> = consumers
        .into_iter()
        .map(|c| tokio::spawn(consume(c, start, duration, deadline, all_in.clone())))
        .collect();
    let producer = tokio::spawn(publish(
        publisher,
        keys,
        args.clone(),
        start,
        stop.clone(),
        sent.clone(),
    ));
    let mut last = 0;
    for second in 1..=args.duration {
        tokio::time::sleep_until(
            tokio::time::Instant::from_std(start) + Duration::from_secs(second),
        )
        .await;
        let now = received.load(Ordering::Relaxed);
        println!("time {second:>3}s, received {:>8} msg/s", now - last);
        last = now;
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut received, mut in_run) = (0, 0);
    for t in tasks {
        let seen = t.await??;
        all.add(&seen.latency)?;
        received += seen.received;
        in_run += seen.in_run;
    }
    drop(first);
    // An unpaced publisher may be held back by the broker's flow control
    // when the run ends; it has nothing left to do.
    stop.store(true, Ordering::Relaxed);
    if producer.is_finished() {
        producer.await??;
    } else {
        producer.abort();
    }
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "summary: sent {:.0} msg/s, received {:.0} msg/s, latency p50 {} µs p75 {} µs p95 {} µs p99 {} µs p99.9 {} µs max {} µs",
        sent as f64 / args.duration as f64,
        in_run as f64 / args.duration as f64,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.75),
        all.value_at_quantile(0.95),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max()
    );
    // Paced, every message must arrive within the drain time. Unpaced, a
    // backlog may be left in the (auto-deleted) queue.
    if args.rate > 0 && received < sent * copies {
        bail!(
            "{} of {} deliveries did not arrive",
            sent * copies - received,
            sent * copies
        );
    }
    Ok(())
}
