//! # wasmq-stream: a stream's publish, replay and attach, measured
//!
//! Speaks raw AMQP 0-9-1 (the probes' one-task client, [`wasmq_perf::raw`])
//! so that the figures are the broker's, and works against any broker
//! that serves streams over AMQP (RabbitMQ 3.9+ too):
//!
//! 1. declares the stream (`--queue`, durable, `x-queue-type: stream`);
//! 2. publishes `--messages` of `--size` bytes in confirm mode, at most
//!    `--window` unconfirmed, and prints the confirmed rate;
//! 3. replays it from `first` (`basic.qos` `--prefetch`, acks with
//!    `multiple` every quarter of the prefetch) and prints the rate;
//! 4. attaches at `--attaches` offsets spread over the stream, each from
//!    `basic.consume` to its first delivery, and prints the times.
//!
//! `--skip-publish` replays and attaches to a stream filled earlier.
//!
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-stream -- --messages 1000000
//! ```

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, confirm, queue};
use amq_protocol::types::{AMQPValue, FieldTable};
use anyhow::bail;
use clap::Parser;
use tokio::io::AsyncWriteExt;
use wasmq::amqp::frame::{encode_content, encode_method};
use wasmq_perf::raw::{Conn, FRAME_MAX};

#[derive(Parser)]
#[command(about = "Stream publish, replay and attach figures (raw AMQP)")]
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
    /// The stream.
    #[arg(long, default_value = "wasmq-stream")]
    queue: String,
    /// Messages to publish.
    #[arg(long, short = 'n', default_value_t = 1_000_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Unconfirmed publishes at most.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// Consumer prefetch for the replay.
    #[arg(long, default_value_t = 2000)]
    prefetch: u16,
    /// Offsets to attach at, spread over the stream.
    #[arg(long, default_value_t = 20)]
    attaches: u64,
    /// Replay and attach only (the stream was filled before).
    #[arg(long)]
    skip_publish: bool,
}

async fn open(args: &Args) -> anyhow::Result<Conn> {
    Conn::open(&args.addr, &args.user, &args.password, "/", None).await
}

async fn declare(c: &mut Conn, name: &str) -> anyhow::Result<u64> {
    let mut a = FieldTable::default();
    a.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    c.send(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: a,
        })),
    )
    .await?;
    match c.method().await? {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(u64::from(ok.message_count)),
        other => bail!("expected queue.declare-ok, got {other:?}"),
    }
}

/// Publish `n` confirmed; returns the rate.
async fn publish(args: &Args, n: u64) -> anyhow::Result<f64> {
    let mut c = open(args).await?;
    c.send(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await?;
    c.method().await?;
    let mut template = Vec::new();
    encode_method(
        &mut template,
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: args.queue.as_str().into(),
            mandatory: false,
            immediate: false,
        })),
    );
    encode_content(&mut template, 1, &[0, 0], &vec![7u8; args.size], FRAME_MAX);
    let started = Instant::now();
    let (mut sent, mut confirmed) = (0u64, 0u64);
    while confirmed < n {
        let room = (args.window - (sent - confirmed)).min(n - sent);
        if room > 0 {
            c.out.clear();
            for _ in 0..room.min(64) {
                c.out.extend_from_slice(&template);
            }
            sent += room.min(64);
            c.stream.write_all(&c.out).await?;
            if sent - confirmed < args.window && sent < n {
                continue;
            }
        }
        match c.method().await? {
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                confirmed = if a.multiple {
                    a.delivery_tag
                } else {
                    confirmed.max(a.delivery_tag)
                };
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(_)) => bail!("a publish was nacked"),
            other => bail!("unexpected {other:?}"),
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Consume from `offset` (a value for `x-stream-offset`) until `n`
/// deliveries came; returns the time to the first and the rate.
async fn read(args: &Args, offset: AMQPValue, n: u64) -> anyhow::Result<(Duration, f64)> {
    let mut c = open(args).await?;
    c.send(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: args.prefetch,
            global: false,
        })),
    )
    .await?;
    c.method().await?;
    let mut a = FieldTable::default();
    a.insert("x-stream-offset".into(), offset);
    let started = Instant::now();
    c.send(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: args.queue.as_str().into(),
            consumer_tag: "".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: a,
        })),
    )
    .await?;
    c.method().await?;
    let (mut seen, mut first, mut acked) = (0u64, None, 0u64);
    let every = u64::from(args.prefetch / 4).max(1);
    while seen < n {
        let (kind, _) = c.raw_frame().await?;
        // A body frame ends each delivery (bodies fit in one frame here).
        if kind != 3 {
            continue;
        }
        seen += 1;
        first.get_or_insert_with(|| started.elapsed());
        if seen - acked >= every {
            c.send(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: seen,
                    multiple: true,
                })),
            )
            .await?;
            acked = seen;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    Ok((first.unwrap_or_default(), rate))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut c = open(&args).await?;
    let before = declare(&mut c, &args.queue).await?;
    drop(c);
    if !args.skip_publish {
        let rate = publish(&args, args.messages).await?;
        println!(
            "publish: {} confirmed messages of {} B: {rate:.0} msg/s",
            args.messages, args.size
        );
    }
    let total = if args.skip_publish {
        before
    } else {
        before + args.messages
    };
    let (first, rate) = read(&args, AMQPValue::LongString("first".into()), total).await?;
    println!(
        "replay: {total} messages from first: {rate:.0} msg/s (first delivery after {first:?})"
    );
    let mut times = Vec::new();
    for i in 0..args.attaches {
        let offset = total * i / args.attaches.max(1);
        let (first, _) = read(&args, AMQPValue::LongLongInt(offset as i64), 1).await?;
        times.push(first);
    }
    times.sort();
    if let (Some(min), Some(max)) = (times.first(), times.last()) {
        println!(
            "attach at {} offsets: median {:?}, max {:?}, min {min:?}",
            times.len(),
            times[times.len() / 2],
            max
        );
    }
    Ok(())
}
