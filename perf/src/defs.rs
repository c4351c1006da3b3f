//! # wasmq-defs: what a definition costs as their number grows
//!
//! Grows a broker's definitions in steps (durable queues bound to one
//! durable topic exchange, `--bindings-per-queue` bindings each) and, at
//! each step, times a sample of single
//! operations, each awaited before the next as a client would: a durable
//! queue declare, a bind, an unbind, a durable queue delete. A broker whose
//! cost per definition change grows with the number of definitions shows
//! it here as rising figures down the table.
//!
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-defs -- --addr 127.0.0.1:5672 --steps 100,10000,100000
//! ```
//!
//! It works against any AMQP 0-9-1 broker (RabbitMQ included). It leaves
//! what it declared (`defs.*`) behind; `--cleanup` deletes it at the end.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

#[derive(Parser)]
#[command(about = "Cost of definition changes as their number grows")]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Numbers of bindings (durable definitions) to time at.
    #[arg(long, value_delimiter = ',', default_value = "100,10000,100000")]
    steps: Vec<usize>,
    /// Bindings per durable queue (1: as many durable queues as bindings).
    #[arg(long, default_value_t = 1)]
    bindings_per_queue: usize,
    /// Operations timed of each kind at each step.
    #[arg(long, default_value_t = 300)]
    sample: usize,
    /// Connections that grow the definitions between steps (in parallel).
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Delete everything declared at the end.
    #[arg(long)]
    cleanup: bool,
}

const EXCHANGE: &str = "defs.x";

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Definition `i`: a binding of queue `i / per_queue` (declared with its
/// first binding).
async fn declare_and_bind(ch: &Channel, i: usize, per_queue: usize) -> lapin::Result<()> {
    let name = format!("defs.q{}", i / per_queue);
    if i.is_multiple_of(per_queue) {
        ch.queue_declare(name.as_str().into(), durable(), FieldTable::default())
            .await?;
    }
    ch.queue_bind(
        name.as_str().into(),
        EXCHANGE.into(),
        format!("defs.k{i}.#").as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Make bindings `from..to` (and their queues) over `channels`; each
/// channel makes whole queues, so a queue is declared before its bindings.
async fn grow(
    channels: &[Channel],
    from: usize,
    to: usize,
    per_queue: usize,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        let ch = ch.clone();
        let n = channels.len();
        tasks.push(tokio::spawn(async move {
            for i in from..to {
                if (i / per_queue) % n == c {
                    declare_and_bind(&ch, i, per_queue).await?;
                }
            }
            Ok::<_, lapin::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Mean time of `op` over `n` runs, each awaited.
async fn time<F, Fut>(n: usize, mut op: F) -> anyhow::Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<()>>,
{
    let start = Instant::now();
    for i in 0..n {
        op(i).await?;
    }
    Ok(start.elapsed() / n as u32)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    // One connection each: a connection's channels are served in order.
    let mut growers = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..args.parallel.max(1) {
        let c = Connection::connect(&args.url, ConnectionProperties::default()).await?;
        channels.push(c.create_channel().await?);
        growers.push(c);
    }
    println!(
        "{:>10} {:>16} {:>12} {:>12} {:>16} {:>14}",
        "bindings", "durable declare", "bind", "unbind", "durable delete", "grow rate/s"
    );
    let mut have = 0;
    for &step in &args.steps {
        let started = Instant::now();
        grow(&channels, have, step, args.bindings_per_queue.max(1)).await?;
        let grew = step.saturating_sub(have);
        let rate = grew as f64 / started.elapsed().as_secs_f64();
        have = have.max(step);
        let n = args.sample;
        let name = |i: usize| format!("defs.s{step}.{i}");
        let declare = time(n, |i| {
            let ch = ch.clone();
            let q = name(i);
            async move {
                ch.queue_declare(q.as_str().into(), durable(), FieldTable::default())
                    .await
                    .map(|_| ())
            }
        })
        .await?;
        let bind = time(n, |i| {
            let ch = ch.clone();
            let q = name(i);
            async move {
                ch.queue_bind(
                    q.as_str().into(),
                    EXCHANGE.into(),
                    format!("{q}.#").as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
            }
        })
        .await?;
        let unbind = time(n, |i| {
            let ch = ch.clone();
            let q = name(i);
            async move {
                ch.queue_unbind(
                    q.as_str().into(),
                    EXCHANGE.into(),
                    format!("{q}.#").as_str().into(),
                    FieldTable::default(),
                )
                .await
            }
        })
        .await?;
        let delete = time(n, |i| {
            let ch = ch.clone();
            let q = name(i);
            async move {
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(|_| ())
            }
        })
        .await?;
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!(
            "{:>10} {:>16} {:>12} {:>12} {:>16} {:>14.0}",
            step,
            us(declare),
            us(bind),
            us(unbind),
            us(delete),
            rate
        );
    }
    if args.cleanup {
        for i in 0..have.div_ceil(args.bindings_per_queue.max(1)) {
            ch.queue_delete(
                format!("defs.q{i}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
        }
        ch.exchange_delete(EXCHANGE.into(), ExchangeDeleteOptions::default())
            .await?;
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
