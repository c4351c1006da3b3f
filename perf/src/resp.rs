//! `wasmq-resp`: what redis-benchmark does not measure of a Redis-protocol
//! server, against wasmq's RESP front end or redis-server alike.
//!
//! * `fanout`: N subscribers on one channel, publishers pipelining
//!   `PUBLISH` to it; prints messages published and deliveries received
//!   per second (a publish to 100 subscribers is 100 deliveries).
//! * `idle`: open N connections (logged in, one `PING` each) and hold them;
//!   prints the server's resident memory before and after (`--pid`).
//!
//! ```text
//! wasmq-resp fanout --port 6379 --subscribers 100 --seconds 10
//! wasmq-resp idle --port 6379 --connections 10000 --pid 1234
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The server's port on 127.0.0.1.
    #[arg(long, default_value_t = 6379)]
    port: u16,
    /// `user:password` to log in with (none: no AUTH).
    #[arg(long)]
    auth: Option<String>,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Subscribers on one channel, publishers pipelining PUBLISH to it.
    Fanout {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 2)]
        publishers: usize,
        /// PUBLISH commands in flight per publisher.
        #[arg(long, default_value_t = 16)]
        pipeline: usize,
        /// Message size, bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Hold N idle connections and report the server's memory.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// The server's process id, to read its resident memory.
        #[arg(long)]
        pid: Option<u32>,
    },
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Connect and log in; the AUTH's reply is read.
async fn connect(port: u16, auth: &Option<String>) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    s.set_nodelay(true)?;
    if let Some(a) = auth {
        let (u, p) = a.split_once(':').context("--auth user:password")?;
        s.write_all(&command(&[b"AUTH", u.as_bytes(), p.as_bytes()]))
            .await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        if !buf[..n].starts_with(b"+OK") {
            bail!("AUTH: {}", String::from_utf8_lossy(&buf[..n]));
        }
    }
    Ok(s)
}

/// Count the `message` pushes in `buf` (complete ones), consuming them.
/// Each is `*3\r\n$7\r\nmessage\r\n$<n>\r\n<chan>\r\n$<n>\r\n<body>\r\n`.
fn count_messages(buf: &mut Vec<u8>) -> u64 {
    let mut at = 0;
    let mut n = 0;
    while let Some(used) = skip_reply(&buf[at..]) {
        at += used;
        n += 1;
    }
    buf.drain(..at);
    n
}

/// The length of the complete reply at the start of `b`.
fn skip_reply(b: &[u8]) -> Option<usize> {
    let end = b.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&b[1..end]).ok()?;
    let after = end + 2;
    match b.first()? {
        b'*' | b'>' => {
            let n: i64 = line.parse().ok()?;
            let mut at = after;
            for _ in 0..n.max(0) {
                at += skip_reply(&b[at..])?;
            }
            Some(at)
        }
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some(after);
            }
            let total = after + n as usize + 2;
            (b.len() >= total).then_some(total)
        }
        _ => Some(after),
    }
}

async fn fanout(
    port: u16,
    auth: Option<String>,
    subscribers: usize,
    publishers: usize,
    pipeline: usize,
    size: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let received = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let mut s = connect(port, &auth).await?;
        s.write_all(&command(&[b"SUBSCRIBE", b"bench"])).await?;
        // The subscribe confirmation.
        let mut buf = Vec::new();
        while count_messages(&mut buf) == 0 {
            let mut chunk = [0u8; 256];
            let n = s.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
        }
        let (received, stop) = (received.clone(), stop.clone());
        subs.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1 << 16);
            let mut chunk = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                let n = match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => n,
                    Err(_) => continue,
                };
                buf.extend_from_slice(&chunk[..n]);
                received.fetch_add(count_messages(&mut buf), Ordering::Relaxed);
            }
        }));
    }
    let body = vec![b'x'; size];
    let one = command(&[b"PUBLISH", b"bench", &body]);
    let mut pubs = Vec::new();
    for _ in 0..publishers {
        let mut s = connect(port, &auth).await?;
        let (published, stop, one) = (published.clone(), stop.clone(), one.clone());
        pubs.push(tokio::spawn(async move {
            let batch: Vec<u8> = one.repeat(pipeline);
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                if s.write_all(&batch).await.is_err() {
                    return;
                }
                let mut answered = 0;
                while answered < pipeline {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    answered += count_messages(&mut buf) as usize;
                }
                published.fetch_add(pipeline as u64, Ordering::Relaxed);
            }
        }));
    }
    // A second of warm-up, then the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p0, r0, t0) = (
        published.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (p1, r1, t1) = (
        published.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    let secs = t1.as_secs_f64();
    println!(
        "fanout: {subscribers} subscribers, {publishers} publishers x {pipeline} pipelined, {size} B: {:.0} published/s, {:.0} delivered/s",
        (p1 - p0) as f64 / secs,
        (r1 - r0) as f64 / secs
    );
    for p in pubs {
        p.abort();
    }
    for s in subs {
        let _ = s.await;
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn idle(
    port: u16,
    auth: Option<String>,
    connections: usize,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    let before = pid.and_then(rss_kib);
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut s = connect(port, &auth)
            .await
            .with_context(|| format!("connection {i}"))?;
        s.write_all(&command(&[b"PING"])).await?;
        let mut buf = [0u8; 16];
        let _ = s.read(&mut buf).await?;
        held.push(s);
    }
    // Let the server settle what the logins allocated.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = pid.and_then(rss_kib);
    match (before, after) {
        (Some(b), Some(a)) => println!(
            "idle: {connections} connections: server RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB, {:.1} KiB each)",
            b as f64 / 1024.0,
            a as f64 / 1024.0,
            (a as f64 - b as f64) / 1024.0,
            (a as f64 - b as f64) / connections as f64
        ),
        _ => println!("idle: {connections} connections held (no --pid: memory not read)"),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.what {
        What::Fanout {
            subscribers,
            publishers,
            pipeline,
            size,
            seconds,
        } => {
            fanout(
                args.port,
                args.auth,
                subscribers,
                publishers,
                pipeline,
                size,
                seconds,
            )
            .await
        }
        What::Idle { connections, pid } => idle(args.port, args.auth, connections, pid).await,
    }
}
