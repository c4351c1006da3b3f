//! `wasmq-fuzz`: long fuzzing campaigns against wasmq's AMQP input.
//!
//! ```text
//! cargo run --release -p wasmq-fuzz -- run --target all --seconds 3600
//! cargo run --release -p wasmq-fuzz -- replay --target connection --seed 1 --case 42
//! ```
//!
//! `run` executes cases in child processes, a chunk at a time: a panic or
//! a misbehaving broker is reported by the child with its case, and a
//! child that dies (an abort: stack overflow, out of memory) has its chunk
//! bisected in new children until the one case is found. Failing inputs
//! are saved under `target/fuzz-failures/`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use wasmq_fuzz::{Runner, Target};

#[derive(Parser)]
#[command(about = "Fuzz wasmq's AMQP input")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A campaign: cases until the time or count runs out.
    Run {
        /// frames, codecs, traffic, handshake, connection, cluster-hello, admin, resp-parser, resp, or all.
        #[arg(long, default_value = "all")]
        target: String,
        /// Wall-clock budget per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Cases at most per target.
        #[arg(long, default_value_t = u64::MAX)]
        cases: u64,
        /// The run's seed (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run one case in this process, printing its input's size.
    Replay {
        #[arg(long)]
        target: String,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        case: u64,
    },
    /// (internal) run cases `from..from+count` and report the first failure.
    Child {
        #[arg(long)]
        target: String,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        count: u64,
    },
}

fn target(name: &str) -> anyhow::Result<Target> {
    Target::from_name(name).ok_or_else(|| anyhow::anyhow!("unknown target '{name}'"))
}

/// Exit code of a child whose case failed without dying.
const FAILED: i32 = 3;

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Child {
            target: t,
            seed,
            from,
            count,
        } => {
            // Quiet: a case that panics the broker is reported, not printed.
            std::panic::set_hook(Box::new(|_| {}));
            let runner = Runner::new(target(&t)?)?;
            for i in from..from + count {
                if let Err(f) = runner.case(seed, i) {
                    println!("FAILED {} {}", f.index, f.what);
                    std::process::exit(FAILED);
                }
            }
            println!("OUTCOMES {}", runner.outcomes());
            Ok(())
        }
        Cmd::Replay {
            target: t,
            seed,
            case,
        } => {
            let t = target(&t)?;
            println!("input: {} bytes", t.input(seed, case).len());
            match Runner::new(t)?.case(seed, case) {
                Ok(()) => println!("ok"),
                Err(f) => println!("{f}"),
            }
            Ok(())
        }
        Cmd::Run {
            target: t,
            seconds,
            cases,
            seed,
        } => {
            let targets = if t == "all" {
                Target::ALL.to_vec()
            } else {
                vec![target(&t)?]
            };
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            let mut failed = 0;
            for t in targets {
                failed += campaign(t, seed, Duration::from_secs(seconds), cases)?;
            }
            if failed > 0 {
                anyhow::bail!("{failed} failing case(s)");
            }
            Ok(())
        }
    }
}

/// What a child reported for a chunk.
enum Chunk {
    /// Every case passed; how the connections ended, by reply code.
    Passed(Vec<(u16, u64)>),
    Failed(u64, String),
    Died(String),
}

fn run_child(t: Target, seed: u64, from: u64, count: u64) -> anyhow::Result<Chunk> {
    let out = Command::new(std::env::current_exe()?)
        .args(["child", "--target", t.name()])
        .args(["--seed", &seed.to_string()])
        .args(["--from", &from.to_string(), "--count", &count.to_string()])
        .env("RUST_LOG", "off")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(match out.status.code() {
        Some(0) => Chunk::Passed(
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("OUTCOMES "))
                .unwrap_or("")
                .split(", ")
                .filter_map(|pair| {
                    let (code, n) = pair.split_once(": ")?;
                    Some((code.parse().ok()?, n.parse().ok()?))
                })
                .collect(),
        ),
        Some(FAILED) => {
            let line = stdout
                .lines()
                .find(|l| l.starts_with("FAILED "))
                .unwrap_or("");
            let mut parts = line.splitn(3, ' ').skip(1);
            let index = parts.next().and_then(|i| i.parse().ok()).unwrap_or(from);
            Chunk::Failed(index, parts.next().unwrap_or("").to_owned())
        }
        _ => Chunk::Died(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ")
        )),
    })
}

/// Run `t` until `budget` or `max` cases; returns the failures found.
fn campaign(t: Target, seed: u64, budget: Duration, max: u64) -> anyhow::Result<u64> {
    let chunk = if t.needs_broker() { 500 } else { 50_000 };
    let started = Instant::now();
    let (mut next, mut failures) = (0u64, 0u64);
    let mut outcomes = std::collections::BTreeMap::<u16, u64>::new();
    while started.elapsed() < budget && next < max {
        let count = chunk.min(max - next);
        match run_child(t, seed, next, count)? {
            Chunk::Passed(seen) => {
                next += count;
                for (code, n) in seen {
                    *outcomes.entry(code).or_default() += n;
                }
            }
            Chunk::Failed(index, what) => {
                report(t, seed, index, &what)?;
                failures += 1;
                next = index + 1;
            }
            Chunk::Died(why) => {
                let (mut lo, mut n) = (next, count);
                // Halve the range until one case still kills its child.
                while n > 1 {
                    let half = n / 2;
                    if matches!(run_child(t, seed, lo, half)?, Chunk::Died(_)) {
                        n = half;
                    } else {
                        lo += half;
                        n -= half;
                    }
                }
                report(t, seed, lo, &format!("the process died: {why}"))?;
                failures += 1;
                next = lo + 1;
            }
        }
    }
    println!(
        "{t}: {next} inputs in {:.0} s, {failures} failure(s), seed {seed}",
        started.elapsed().as_secs_f64()
    );
    if !outcomes.is_empty() {
        let shown: Vec<String> = outcomes.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        println!(
            "  connections closed with (reply code: count; 0 = no close sent): {}",
            shown.join(", ")
        );
    }
    Ok(failures)
}

fn report(t: Target, seed: u64, index: u64, what: &str) -> anyhow::Result<()> {
    let dir = PathBuf::from("target/fuzz-failures");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{t}-{seed}-{index}.bin"));
    std::fs::write(&path, t.input(seed, index))?;
    println!(
        "FAILURE {t} seed {seed} case {index}: {what}\n  input saved to {}\n  replay: wasmq-fuzz replay --target {t} --seed {seed} --case {index}",
        path.display()
    );
    Ok(())
}
