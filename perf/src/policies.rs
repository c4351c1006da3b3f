//! # wasmq-policies: what a policy costs
//!
//! Two figures an operator asks for before setting policies on a busy
//! broker:
//!
//! * how long a policy takes to reach every existing queue: `--queues`
//!   queues are declared, then one policy matching all of them is set
//!   through the admin API (the call returns once every queue acts on it)
//!   and timed, then changed and timed again;
//! * what a declare costs with policies: a sample of queue declares is
//!   timed with no policy, then with `--policies` policies that all match
//!   (the highest priority applies), then with as many that miss but one
//!   (every pattern is tried).
//!
//! ```text
//! cargo run --release -p wasmq-perf --bin wasmq-policies -- --queues 10000 --policies 100
//! ```
//!
//! It works against RabbitMQ too (same paths). It leaves what it declared
//! (`pol.*` queues, `pol-*` policies) behind unless `--cleanup`.

use std::time::{Duration, Instant};

use clap::Parser;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use wasmq::admin::client::AdminClient;

#[derive(Parser)]
#[command(about = "Cost of applying policies and of declares under them")]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Admin API URL.
    #[arg(long, default_value = "http://127.0.0.1:15672")]
    admin: String,
    /// Admin user and password.
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    password: String,
    /// Queues that exist when the policy is set.
    #[arg(long, default_value_t = 10_000)]
    queues: usize,
    /// Policies a declare is matched against.
    #[arg(long, default_value_t = 100)]
    policies: usize,
    /// Declares timed per case.
    #[arg(long, default_value_t = 500)]
    sample: usize,
    /// Delete what was made at the end.
    #[arg(long)]
    cleanup: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn time_declares(
    ch: &lapin::Channel,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        ch.queue_declare(
            format!("{prefix}{i}").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

fn print_declares(what: &str, d: &[Duration]) {
    println!(
        "{what:<44} p50 {:>8.1} µs   p99 {:>8.1} µs",
        percentile(d, 0.5).as_secs_f64() * 1e6,
        percentile(d, 0.99).as_secs_f64() * 1e6
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = AdminClient::new(&args.admin, &args.user, &args.password);
    let conn = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    for i in 0..args.queues {
        ch.queue_declare(
            format!("pol.q.{i}").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let put = |name: &str, body: serde_json::Value| {
        let admin = admin.clone();
        let path = format!("/api/policies/%2F/{name}");
        async move {
            tokio::task::spawn_blocking(move || admin.put(&path, &body))
                .await
                .expect("joined")
        }
    };
    for (what, limit) in [("set", 1000), ("changed", 2000)] {
        let t = Instant::now();
        put(
            "pol-all",
            json!({"pattern": "^pol\\.q\\.", "definition": {"max-length": limit}, "apply-to": "queues"}),
        )
        .await?;
        println!(
            "policy {what} on {} existing queues: {:>8.1} ms",
            args.queues,
            t.elapsed().as_secs_f64() * 1e3
        );
    }

    let none = time_declares(&ch, "pol.none.", args.sample).await?;
    print_declares("declare, no policy for it", &none);
    for i in 0..args.policies {
        put(
            &format!("pol-match-{i}"),
            json!({"pattern": "^pol\\.m\\.", "definition": {"max-length": 100 + i}, "priority": i, "apply-to": "queues"}),
        )
        .await?;
    }
    let matching = time_declares(&ch, "pol.m.", args.sample).await?;
    print_declares(
        &format!("declare, {} policies match it", args.policies),
        &matching,
    );
    for i in 0..args.policies {
        let (pattern, priority) = if i == 0 {
            ("^pol\\.x\\.".to_owned(), -1)
        } else {
            (format!("^pol\\.miss{i}\\."), 1000 + i as i64)
        };
        put(
            &format!("pol-miss-{i}"),
            json!({"pattern": pattern, "definition": {"max-length": 10}, "priority": priority, "apply-to": "queues"}),
        )
        .await?;
    }
    let missing = time_declares(&ch, "pol.x.", args.sample).await?;
    print_declares(
        &format!("declare, {} tried before the match", args.policies - 1),
        &missing,
    );
    println!(
        "ratio p50: {:.2}x (all match), {:.2}x (all tried)",
        percentile(&matching, 0.5).as_secs_f64() / percentile(&none, 0.5).as_secs_f64(),
        percentile(&missing, 0.5).as_secs_f64() / percentile(&none, 0.5).as_secs_f64()
    );

    if args.cleanup {
        let names: Vec<String> = (0..args.queues)
            .map(|i| format!("pol.q.{i}"))
            .chain(
                (0..args.sample)
                    .flat_map(|i| ["pol.none.", "pol.m.", "pol.x."].map(|p| format!("{p}{i}"))),
            )
            .collect();
        for q in names {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        let policies: Vec<String> = std::iter::once("pol-all".to_owned())
            .chain(
                (0..args.policies)
                    .flat_map(|i| [format!("pol-match-{i}"), format!("pol-miss-{i}")]),
            )
            .collect();
        tokio::task::spawn_blocking(move || {
            for p in policies {
                let _ = admin.delete(&format!("/api/policies/%2F/{p}"));
            }
        })
        .await?;
    }
    Ok(())
}
