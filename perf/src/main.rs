//! # wasmq-perf: an AMQP load generator modeled on RabbitMQ's PerfTest
//!
//! Producers publish timestamped messages, consumers receive them; every
//! second it prints sent and received msg/s and end-to-end latency
//! percentiles, and it stops by itself after `--duration`. It speaks plain
//! AMQP (lapin), so it measures wasmq and RabbitMQ alike.
//!
//! ```text
//! # 1 producer, 1 consumer, 16-byte messages, auto-ack, 10 s
//! cargo run --release -p wasmq-perf -- --size 16 --auto-ack
//! # topic exchange, 100 bindings over 10 queues, 10 consumers
//! cargo run --release -p wasmq-perf -- --exchange-type topic --queues 10 --bindings-per-queue 10 --consumers 10 --auto-ack
//! # latency at a fixed 10k msg/s
//! cargo run --release -p wasmq-perf -- --rate 10000 --auto-ack
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

// The broker's allocator: lapin allocates a message on its reader thread
// and the consumer frees it on another, as the broker does.
#[global_allocator]
static ALLOCATOR: wasmq::Allocator = wasmq::Allocator;
use tokio::sync::Mutex;
use wasmq_perf::{Pacer, binding_key};

#[derive(Parser, Clone)]
#[command(about = "AMQP load generator (PerfTest-like)")]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Producers (one connection each).
    #[arg(long, short = 'x', default_value_t = 1)]
    producers: usize,
    /// Consumers (one connection each, spread over the queues).
    #[arg(long, short = 'y', default_value_t = 1)]
    consumers: usize,
    /// Message size in bytes (at least 16: it carries a timestamp).
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Publisher confirms with at most this many outstanding (0: off).
    #[arg(long, short = 'c', default_value_t = 0)]
    confirm: usize,
    /// Persistent messages (delivery mode 2) on durable queues.
    #[arg(long)]
    persistent: bool,
    /// Consumer prefetch (basic.qos); 0 for none.
    #[arg(long, short = 'q', default_value_t = 1000)]
    prefetch: u16,
    /// Consumers do not ack (no-ack mode).
    #[arg(long, short = 'a')]
    auto_ack: bool,
    /// Ack every N messages with multiple=true.
    #[arg(long, default_value_t = 1)]
    multi_ack: u64,
    /// Publishing rate per producer, msg/s (0: as fast as possible).
    #[arg(long, short = 'r', default_value_t = 0)]
    rate: u64,
    /// Seconds to run.
    #[arg(long, short = 'z', default_value_t = 10)]
    duration: u64,
    /// Exchange name.
    #[arg(long, default_value = "perf")]
    exchange: String,
    /// Exchange type: direct, topic, fanout, or a plugin name.
    #[arg(long, default_value = "direct")]
    exchange_type: String,
    /// Queues (consumers are spread over them, every queue consumed).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Keep existing queues and their messages (default: delete and
    /// redeclare them first). With `-x 0`, drains a backlog left earlier.
    #[arg(long)]
    keep: bool,
    /// Stop each producer after this many messages (0: no limit).
    #[arg(long, default_value_t = 0)]
    pmessages: u64,
    /// Bindings per queue (topic/direct keys `k.{queue}.{binding}`).
    #[arg(long, default_value_t = 1)]
    bindings_per_queue: usize,
    /// Declare quorum queues (`x-queue-type = quorum`, durable): on a
    /// cluster, replicated queues.
    #[arg(long)]
    quorum: bool,
    /// With `--quorum`: `x-queue-leader-locator` (`client-local` puts
    /// every queue's leader on the node this tool connects to).
    #[arg(long)]
    leader_locator: Option<String>,
    /// Give each message a header `group` of one of this many values, in
    /// turn (0: none).
    #[arg(long, default_value_t = 0)]
    groups: u64,
    /// Declare the queues with `x-message-group-header = group` (message
    /// groups; compare with `--groups N` alone, the same messages on plain
    /// queues).
    #[arg(long)]
    grouped: bool,
    /// Give each message a fresh `x-deduplication-header`.
    #[arg(long)]
    dedup_ids: bool,
    /// Declare the queues with `x-message-deduplication` (and give each
    /// message a fresh id; compare with `--dedup-ids` alone).
    #[arg(long)]
    dedup: bool,
    /// Publish through an `x-delayed-message` exchange (routing with
    /// `--exchange-type`), each message with this `x-delay` in ms; the
    /// latency printed is then the lateness: time past the delay.
    #[arg(long, default_value_t = 0)]
    delay: u64,
}

struct Stats {
    sent: AtomicU64,
    received: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    window: Mutex<Histogram<u64>>,
}

fn queue_name(i: usize) -> String {
    format!("perf-q{i}")
}

fn routing_key(kind: &str, n: u64, args: &Args) -> String {
    wasmq_perf::routing_key(kind, n, args.queues, args.bindings_per_queue)
}

async fn setup(args: &Args) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let kind = match args.exchange_type.as_str() {
        "direct" => ExchangeKind::Direct,
        "topic" => ExchangeKind::Topic,
        "fanout" => ExchangeKind::Fanout,
        other => ExchangeKind::Custom(other.into()),
    };
    // Start clean. A delete of something missing closes its channel (404),
    // so each runs on a throwaway channel.
    if !args.keep {
        let throwaway = conn.create_channel().await?;
        throwaway
            .exchange_delete(
                args.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .ok();
        // Closed here, not by its drop: a channel lapin is still closing
        // in the background makes the connection's close below fail.
        throwaway.close(200, "".into()).await.ok();
        for q in 0..args.queues {
            let name = queue_name(q);
            let throwaway = conn.create_channel().await?;
            throwaway
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .ok();
            throwaway.close(200, "".into()).await.ok();
        }
    }
    let (kind, exchange_args) = if args.delay > 0 {
        let mut t = FieldTable::default();
        t.insert(
            "x-delayed-type".into(),
            lapin::types::AMQPValue::LongString(args.exchange_type.as_str().into()),
        );
        (ExchangeKind::Custom("x-delayed-message".into()), t)
    } else {
        (kind, FieldTable::default())
    };
    ch.exchange_declare(
        args.exchange.as_str().into(),
        kind,
        ExchangeDeclareOptions {
            durable: args.persistent && args.delay > 0,
            ..Default::default()
        },
        exchange_args,
    )
    .await?;
    for q in 0..args.queues {
        let name = queue_name(q);
        let opts = QueueDeclareOptions {
            durable: args.persistent || args.quorum,
            ..Default::default()
        };
        let mut queue_args = FieldTable::default();
        if args.quorum {
            queue_args.insert(
                "x-queue-type".into(),
                lapin::types::AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(l) = &args.leader_locator {
            queue_args.insert(
                "x-queue-leader-locator".into(),
                lapin::types::AMQPValue::LongString(l.as_str().into()),
            );
        }
        if args.dedup {
            queue_args.insert(
                "x-message-deduplication".into(),
                lapin::types::AMQPValue::Boolean(true),
            );
        }
        if args.grouped {
            queue_args.insert(
                "x-message-group-header".into(),
                lapin::types::AMQPValue::LongString("group".into()),
            );
        }
        ch.queue_declare(name.as_str().into(), opts, queue_args)
            .await?;
        for b in 0..args.bindings_per_queue {
            let key = binding_key(&args.exchange_type, q, b);
            ch.queue_bind(
                name.as_str().into(),
                args.exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    conn.close(200, "setup done".into()).await?;
    Ok(())
}

async fn produce(
    id: usize,
    args: Args,
    start: Instant,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    if args.confirm > 0 {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let props = if args.persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let mut body = vec![0u8; args.size.max(16)];
    let mut outstanding = VecDeque::new();
    let pacer = (args.rate > 0).then(|| {
        Pacer::start(
            Duration::from_nanos(1_000_000_000 / args.rate),
            stop.clone(),
        )
    });
    let mut n = id as u64;
    // Unpaced, publishes go out in batches polled together, as PerfTest
    // pipelines them; awaiting each one would measure the client's
    // round trip to its own IO thread instead of the broker.
    let batch = if pacer.is_some() { 1 } else { 64 };
    let mut published = 0u64;
    while !stop.load(Ordering::Relaxed) && (args.pmessages == 0 || published < args.pmessages) {
        published += batch as u64;
        if let Some(p) = &pacer {
            p.tick().await;
        }
        let mut publishes = Vec::with_capacity(batch);
        for _ in 0..batch {
            body[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
            let key = routing_key(&args.exchange_type, n, &args);
            n += args.producers as u64;
            let payload = body.clone();
            let ch = &ch;
            let mut h = FieldTable::default();
            if args.groups > 0 {
                h.insert(
                    "group".into(),
                    lapin::types::AMQPValue::LongString(format!("g{}", n % args.groups).into()),
                );
            }
            if args.delay > 0 {
                h.insert(
                    "x-delay".into(),
                    lapin::types::AMQPValue::LongLongInt(args.delay as i64),
                );
            }
            if args.dedup || args.dedup_ids {
                h.insert(
                    "x-deduplication-header".into(),
                    lapin::types::AMQPValue::LongString(format!("{id}-{n}").into()),
                );
            }
            let props = if h.inner().is_empty() {
                props.clone()
            } else {
                props.clone().with_headers(h)
            };
            let exchange = args.exchange.as_str();
            publishes.push(async move {
                ch.basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    props,
                )
                .await
            });
        }
        for c in futures::future::join_all(publishes).await {
            let c = c?;
            stats.sent.fetch_add(1, Ordering::Relaxed);
            if args.confirm > 0 {
                outstanding.push_back(c);
                if outstanding.len() >= args.confirm {
                    let confirmation = outstanding.pop_front().unwrap().await?;
                    let counter = if confirmation.is_ack() {
                        &stats.confirmed
                    } else {
                        &stats.nacked
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    for c in outstanding {
        let confirmation = c.await?;
        let counter = if confirmation.is_ack() {
            &stats.confirmed
        } else {
            &stats.nacked
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}

async fn consume(
    id: usize,
    args: Args,
    start: Instant,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    if args.prefetch > 0 && !args.auto_ack {
        ch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
    }
    let opts = BasicConsumeOptions {
        no_ack: args.auto_ack,
        ..Default::default()
    };
    // Every queue has a consumer: consumer `id` takes queues `id`,
    // `id + consumers`, ... (and with fewer queues than consumers, queue
    // `id % queues`), on its one channel.
    let mine: Vec<usize> = if args.queues <= args.consumers {
        vec![id % args.queues]
    } else {
        (id..args.queues).step_by(args.consumers).collect()
    };
    let mut subs = Vec::with_capacity(mine.len());
    for q in mine {
        subs.push(
            ch.basic_consume(
                queue_name(q).as_str().into(),
                format!("perf-{id}-{q}").as_str().into(),
                opts,
                FieldTable::default(),
            )
            .await?,
        );
    }
    let mut consumer = futures::stream::select_all(subs);
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut unacked = 0u64;
    let (mut max_tag, mut acked_to) = (0u64, 0u64);
    loop {
        let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
        let d = match next {
            Ok(Some(d)) => d?,
            Ok(None) => break,
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(_) => continue,
        };
        let sent = u64::from_le_bytes(d.data[..8].try_into()?);
        let micros = (start.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000;
        let micros = micros.saturating_sub(args.delay * 1000);
        let _ = local.record(micros.max(1));
        let count = stats.received.fetch_add(1, Ordering::Relaxed) + 1;
        if !args.auto_ack {
            unacked += 1;
            // The channel's consumers' deliveries may be taken out of tag
            // order: a multiple ack names the highest tag seen.
            max_tag = max_tag.max(d.delivery_tag);
            if unacked >= args.multi_ack {
                if args.multi_ack > 1 {
                    // A delivery below a tag acked already was acked with it.
                    if max_tag > acked_to {
                        ch.basic_ack(max_tag, BasicAckOptions { multiple: true })
                            .await?;
                        acked_to = max_tag;
                    }
                } else {
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
                unacked = 0;
            }
        }
        if count.is_multiple_of(1024) {
            stats.window.lock().await.add(&local)?;
            stats.latency.lock().await.add(&local)?;
            local.reset();
        }
    }
    stats.window.lock().await.add(&local)?;
    stats.latency.lock().await.add(&local)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.queues > 0 && args.bindings_per_queue > 0,
        "--queues and --bindings-per-queue must be positive"
    );
    setup(&args).await?;
    let stats = Arc::new(Stats {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        nacked: AtomicU64::new(0),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        window: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..args.consumers {
        tasks.push(tokio::spawn(consume(
            id,
            args.clone(),
            start,
            stop.clone(),
            stats.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let producers: Vec<_> = (0..args.producers)
        .map(|id| {
            tokio::spawn(produce(
                id,
                args.clone(),
                start,
                stop.clone(),
                stats.clone(),
            ))
        })
        .collect();
    let (mut last_sent, mut last_recv) = (0, 0);
    for second in 1..=args.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (sent, recv) = (
            stats.sent.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
        );
        let mut w = stats.window.lock().await;
        println!(
            "time {second:>3}s, sent {:>8} msg/s, received {:>8} msg/s, latency p50 {:>6} µs p99 {:>6} µs",
            sent - last_sent,
            recv - last_recv,
            w.value_at_quantile(0.5),
            w.value_at_quantile(0.99)
        );
        w.reset();
        (last_sent, last_recv) = (sent, recv);
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await??;
    }
    for t in tasks {
        t.await??;
    }
    let secs = args.duration as f64;
    let lat = stats.latency.lock().await;
    println!(
        "summary: sent {:.0} msg/s, received {:.0} msg/s, confirmed {} nacked {}, latency p50 {} µs p75 {} µs p95 {} µs p99 {} µs max {} µs",
        stats.sent.load(Ordering::Relaxed) as f64 / secs,
        stats.received.load(Ordering::Relaxed) as f64 / secs,
        stats.confirmed.load(Ordering::Relaxed),
        stats.nacked.load(Ordering::Relaxed),
        lat.value_at_quantile(0.5),
        lat.value_at_quantile(0.75),
        lat.value_at_quantile(0.95),
        lat.value_at_quantile(0.99),
        lat.max()
    );
    Ok(())
}
