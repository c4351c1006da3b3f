//! # wasmq-dedup: what deduplication costs
//!
//! The two figures issue 29 sets for a deduplicating queue: the time a
//! publish spends on its id (keyed by SHA-256, checked and taken in the
//! window, as the queue does under its lock), and the memory of the ids in
//! the window. It fills the same cache the broker uses with `--ids`
//! distinct ids, each 36 bytes like a UUID, then checks them all again
//! (every one a duplicate), and prints ns per id and the resident memory
//! the cache added.
//!
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-dedup -- --ids 1000000
//! ```
//!
//! End to end, `wasmq-perf --dedup` publishes through a deduplicating
//! queue with a fresh id on every message; compare with `--dedup-ids`
//! alone (the same messages, a plain queue).

use std::time::{Duration, Instant};

use clap::Parser;
use wasmq::dedup::{Cache, Settings, key};

#[derive(Parser)]
#[command(about = "Cost of deduplication: time per id, memory per million ids")]
struct Args {
    /// Distinct ids in the window.
    #[arg(long, default_value_t = 1_000_000)]
    ids: usize,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn id(i: usize) -> String {
    format!("{:08x}-4f2a-4c1b-9e3d-{:012x}", i, i * 7919)
}

fn main() {
    let args = Args::parse();
    let ids: Vec<String> = (0..args.ids).map(id).collect();
    let mut cache = Cache::new(Settings {
        window: Some(Duration::from_secs(300)),
        size: args.ids,
    });
    let before = rss_bytes();
    let started = Instant::now();
    let mut taken = 0usize;
    for (i, s) in ids.iter().enumerate() {
        let now = 1_000 + i as u64 / 1000;
        taken += usize::from(cache.admit(key(s.as_bytes()), now, None).is_some());
    }
    let fill = started.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    let started = Instant::now();
    let mut dups = 0usize;
    for s in &ids {
        let now = 2_000;
        dups += usize::from(cache.admit(key(s.as_bytes()), now, None).is_none());
    }
    let check = started.elapsed();
    let per = |d: Duration| d.as_nanos() as f64 / args.ids as f64;
    println!("ids: {} taken, {} duplicates found again", taken, dups);
    println!(
        "new id: {:.0} ns (key + check + take); duplicate: {:.0} ns",
        per(fill),
        per(check)
    );
    println!(
        "memory: {:.1} MB for {} ids ({:.0} bytes per id)",
        grown as f64 / 1e6,
        args.ids,
        grown as f64 / args.ids as f64
    );
}
