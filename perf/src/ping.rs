//! # wasmq-ping: end-to-end latency with as little client as possible
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
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-ping -- --addr 127.0.0.1:5672 --rate 10000
//! ```

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::FieldTable;
use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmq::amqp::frame::{Frame, PROTOCOL_HEADER, decode, encode_content, encode_method};
use wasmq_perf::Pacer;

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
    /// Messages per second.
    #[arg(long, short = 'r', default_value_t = 10_000)]
    rate: u64,
    /// Message size in bytes (at least 8: it carries a timestamp).
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Seconds to run.
    #[arg(long, short = 'z', default_value_t = 10)]
    duration: u64,
}

const FRAME_MAX: u32 = 131_072;

/// One AMQP connection with channel 1 open.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Conn {
    async fn open(args: &Args) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(&args.addr)
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
            out: Vec::new(),
        };
        c.stream.write_all(PROTOCOL_HEADER).await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::Start(_))))
            .await?;
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0{}\0{}", args.user, args.password).into(),
                locale: "en_US".into(),
            })),
        )
        .await?;
        let tune = match c.method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            other => bail!("expected connection.tune, got {other:?}"),
        };
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 1,
                frame_max: if tune.frame_max == 0 {
                    FRAME_MAX
                } else {
                    tune.frame_max.min(FRAME_MAX)
                },
                heartbeat: 0,
            })),
        )
        .await?;
        c.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: args.vhost.as_str().into(),
            })),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))))
            .await?;
        c.send(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        c.expect(|m| matches!(m, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
            .await?;
        Ok(c)
    }

    async fn send(&mut self, ch: u16, m: AMQPClass) -> anyhow::Result<()> {
        self.out.clear();
        encode_method(&mut self.out, ch, m);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    async fn frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some(f) = decode(&mut self.buf, FRAME_MAX).map_err(|e| anyhow::anyhow!("{e}"))? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    async fn method(&mut self) -> anyhow::Result<AMQPClass> {
        loop {
            match self.frame().await? {
                Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    bail!("connection closed: {} {}", c.reply_code, c.reply_text)
                }
                Frame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                    bail!("channel closed: {} {}", c.reply_code, c.reply_text)
                }
                Frame::Method(_, m) => return Ok(m),
                Frame::Heartbeat(_) => continue,
                other => bail!("expected a method, got {other:?}"),
            }
        }
    }

    async fn expect(&mut self, want: impl Fn(&AMQPClass) -> bool) -> anyhow::Result<AMQPClass> {
        let m = self.method().await?;
        if !want(&m) {
            bail!("unexpected reply {m:?}");
        }
        Ok(m)
    }
}

fn now_nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

async fn publish(
    mut c: Conn,
    queue: String,
    args: Args,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<u64> {
    let pacer = Pacer::start(
        Duration::from_nanos(1_000_000_000 / args.rate.max(1)),
        stop.clone(),
    );
    let mut body = vec![0u8; args.size.max(8)];
    // No properties: flags 0.
    let properties = [0u8, 0];
    let mut sent = 0;
    let end = Duration::from_secs(args.duration);
    while start.elapsed() < end {
        pacer.tick().await;
        c.out.clear();
        encode_method(
            &mut c.out,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: queue.as_str().into(),
                mandatory: false,
                immediate: false,
            })),
        );
        body[..8].copy_from_slice(&now_nanos(start).to_le_bytes());
        encode_content(&mut c.out, 1, &properties, &body, FRAME_MAX);
        c.stream.write_all(&c.out).await?;
        sent += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(sent)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut consumer = Conn::open(&args).await?;
    consumer
        .send(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "".into(),
                passive: false,
                durable: false,
                exclusive: true,
                auto_delete: true,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
    let queue = match consumer.method().await? {
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => ok.queue.to_string(),
        other => bail!("expected queue.declare-ok, got {other:?}"),
    };
    consumer
        .send(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: queue.as_str().into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack: true,
                exclusive: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
        )
        .await?;
    consumer
        .expect(|m| matches!(m, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))))
        .await?;

    let publisher = Conn::open(&args).await?;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(publish(publisher, queue, args.clone(), start, stop.clone()));

    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut window = all.clone();
    let mut received = 0u64;
    let mut second = 1;
    let drain = Duration::from_secs(args.duration) + Duration::from_millis(500);
    // Content of the delivery being read: bytes still expected, and the
    // first body bytes (the timestamp).
    let mut pending: Option<(u64, Vec<u8>)> = None;
    loop {
        let frame = match tokio::time::timeout_at(
            (tokio::time::Instant::from_std(start) + drain).max(tokio::time::Instant::now()),
            consumer.frame(),
        )
        .await
        {
            Ok(f) => f?,
            Err(_) => break,
        };
        match frame {
            Frame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Deliver(_))) => {
                pending = Some((u64::MAX, Vec::new()));
            }
            Frame::Header { body_size, .. } => {
                if let Some(p) = &mut pending {
                    p.0 = body_size;
                }
            }
            Frame::Body(_, bytes) => {
                let Some((left, head)) = &mut pending else {
                    bail!("body frame without a delivery");
                };
                if head.len() < 8 {
                    head.extend_from_slice(&bytes[..bytes.len().min(8 - head.len())]);
                }
                *left = left.saturating_sub(bytes.len() as u64);
                if *left == 0 {
                    let sent = u64::from_le_bytes(head[..8].try_into()?);
                    let micros = now_nanos(start).saturating_sub(sent) / 1000;
                    all.saturating_record(micros.max(1));
                    window.saturating_record(micros.max(1));
                    received += 1;
                    pending = None;
                }
            }
            Frame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                bail!("connection closed: {} {}", c.reply_code, c.reply_text)
            }
            _ => {}
        }
        if start.elapsed() >= Duration::from_secs(second) && second <= args.duration {
            println!(
                "time {second:>3}s, received {:>8} msg/s, latency p50 {:>6} µs p99 {:>6} µs",
                window.len(),
                window.value_at_quantile(0.5),
                window.value_at_quantile(0.99)
            );
            window.reset();
            second += 1;
        }
    }
    let sent = producer.await??;
    println!(
        "summary: sent {:.0} msg/s, received {:.0} msg/s, latency p50 {} µs p75 {} µs p95 {} µs p99 {} µs p99.9 {} µs max {} µs",
        sent as f64 / args.duration as f64,
        received as f64 / args.duration as f64,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.75),
        all.value_at_quantile(0.95),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max()
    );
    if received < sent {
        bail!("{} of {sent} messages were not delivered", sent - received);
    }
    Ok(())
}
