//! The `wasmq` subcommands of the plugin author's loop: scaffold and build
//! a plugin crate, stage a candidate (shadow, canary), promote, abort or
//! roll back, list kept versions, and trace a message. The work is in the
//! library (`wasmq::author`, and the broker behind the admin API); this
//! file parses the flags and prints.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use wasmq::admin::client::{AdminClient, segment};
use wasmq::admin::model::{CandidateView, KeptVersionView};
use wasmq::author::candidate::Mode;
use wasmq::author::scaffold::{Role, Sdk};
use wasmq::author::trace::{Step, Trace};
use wasmq::plugin::log::LogLine;

use super::AdminArgs;

/// The bounds of a canary (any not given keeps the broker's default).
#[derive(Args, Debug, Default)]
pub struct PolicyArgs {
    /// Promote after deciding this many messages (default 10000)...
    #[arg(long)]
    promote_after_messages: Option<u64>,
    /// ...and running this many seconds (default 600), within the bounds.
    #[arg(long)]
    promote_after_secs: Option<u64>,
    /// Roll back when faults pass this share of its calls (default 0.001).
    #[arg(long)]
    max_fault_rate: Option<f64>,
    /// Roll back when its p99 call time passes this, µs (default 1000; 0: no bound).
    #[arg(long)]
    max_p99_us: Option<u64>,
}

impl PolicyArgs {
    fn query(&self) -> String {
        let mut q = String::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={v}"));
            }
        };
        add(
            "promote_after_messages",
            self.promote_after_messages.map(|v| v.to_string()),
        );
        add(
            "promote_after_secs",
            self.promote_after_secs.map(|v| v.to_string()),
        );
        add("max_fault_rate", self.max_fault_rate.map(|v| v.to_string()));
        add("max_p99_us", self.max_p99_us.map(|v| v.to_string()));
        q
    }

    fn json(&self, percent: f64) -> serde_json::Value {
        let mut v = serde_json::json!({ "percent": percent });
        let m = v.as_object_mut().expect("object");
        if let Some(x) = self.promote_after_messages {
            m.insert("promote_after_messages".into(), x.into());
        }
        if let Some(x) = self.promote_after_secs {
            m.insert("promote_after_secs".into(), x.into());
        }
        if let Some(x) = self.max_fault_rate {
            m.insert("max_fault_rate".into(), x.into());
        }
        if let Some(x) = self.max_p99_us {
            m.insert("max_p99_us".into(), x.into());
        }
        v
    }
}

/// The author's subcommands under `wasmq plugin`.
#[derive(Subcommand, Debug)]
pub enum AuthorCommand {
    /// Make a new plugin crate that builds on its own: the role's stub,
    /// a native test, a self-test vector and a README of the whole loop.
    New {
        /// Plugin name (lowercase letters, digits, '-').
        name: String,
        /// What it decides.
        #[arg(long, value_enum)]
        role: Role,
        /// Folder to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The guest SDK folder to depend on, for SDK development (default:
        /// the SDK this binary was built with, written into the new crate
        /// as vendor/wasmq-sdk, so it builds wherever it is copied).
        #[arg(long, conflicts_with = "sdk_version")]
        sdk: Option<PathBuf>,
        /// Depend on this version of wasmq-sdk from the registry instead.
        #[arg(long)]
        sdk_version: Option<String>,
    },
    /// Build a plugin crate for the broker (installing the wasm32 target if
    /// missing), then check it as the broker will.
    Build {
        /// The crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Run a version offline against captured messages (`wasmq capture`)
    /// with the exchanges of a definitions export, and print what it
    /// decided for each; with --against, only where another version
    /// decides otherwise.
    Test {
        /// The version's .wasm.
        file: PathBuf,
        /// Definitions (as `wasmq definitions export` writes them): the
        /// exchanges, their arguments and bindings.
        #[arg(long)]
        exchange_definitions: PathBuf,
        /// Captured messages, one JSON object per line.
        #[arg(long)]
        messages: PathBuf,
        /// The plugin's name (default: the file name without `.wasm`).
        #[arg(long)]
        name: Option<String>,
        /// Other plugins the definitions use (filters, transforms).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Another version to compare with: a .wasm file, or `serving` for
        /// the version a running broker serves (through its admin API).
        #[arg(long)]
        against: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run a candidate beside the serving version on live messages: its
    /// decisions are compared and counted, never applied.
    Shadow {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
        /// The candidate .wasm.
        file: PathBuf,
        /// Compare one message in this many.
        #[arg(long, default_value_t = 1)]
        sample: u32,
    },
    /// Serve a candidate for a share of routing keys, promoted or rolled
    /// back on its own by the bounds. Without FILE, the shadow running now
    /// becomes the canary.
    Canary {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
        /// The candidate .wasm.
        file: Option<PathBuf>,
        /// Share of routing keys, percent.
        #[arg(long)]
        percent: f64,
        /// Choose messages by a stable hash of this header's value instead
        /// of the routing key's.
        #[arg(long)]
        by_header: Option<String>,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Serve the candidate for every message now.
    Promote {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
    },
    /// Remove the candidate; the serving version keeps serving.
    Abort {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
    },
    /// Serve a kept version again at once: HASH (a prefix will do), or the
    /// previous one.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
        /// The version's hash.
        hash: Option<String>,
    },
    /// Print a plugin's last log lines (`wasmq_sdk::log`), or follow them
    /// live.
    Logs {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
        /// Keep printing lines as they are written.
        #[arg(long, short)]
        follow: bool,
    },
    /// List the kept versions of a plugin, newest first.
    Versions {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
    },
}

/// `wasmq capture`'s flags.
#[derive(Args, Debug)]
pub struct CaptureArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The exchange.
    exchange: String,
    /// Messages to capture.
    #[arg(long, short = 'n', default_value_t = 100)]
    count: usize,
    /// Keep one message in K, written `1/K` (or `K`).
    #[arg(long, default_value = "1/1")]
    sample: String,
    /// Bytes to keep at most.
    #[arg(long, default_value_t = 16 << 20)]
    max_bytes: usize,
    /// Give up waiting after this many seconds and print what was kept.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// `wasmq trace`'s flags.
#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The exchange.
    exchange: String,
    /// Routing key.
    #[arg(long, short = 'k', default_value = "")]
    key: String,
    /// Header `name=value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// The body.
    #[arg(long, default_value = "")]
    body: String,
    /// Content type.
    #[arg(long)]
    content_type: Option<String>,
    /// Print the trace as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(command: AuthorCommand) -> anyhow::Result<()> {
    match command {
        AuthorCommand::New {
            name,
            role,
            dir,
            sdk,
            sdk_version,
        } => {
            let sdk = match (sdk, sdk_version) {
                (Some(p), _) => Sdk::Path(p),
                (None, Some(v)) => Sdk::Version(v),
                (None, None) => Sdk::Embedded,
            };
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let files = wasmq::author::scaffold::create(&dir, &name, role, &sdk)?;
            for f in files {
                println!("created {}", f.display());
            }
            println!(
                "\nnext: cd {} && cargo test && wasmq plugin build",
                dir.display()
            );
            Ok(())
        }
        AuthorCommand::Build { dir } => {
            let (name, file) = wasmq::author::build::build(&dir)?;
            println!("built plugin '{name}': {}", file.display());
            super::check(&file)
        }
        AuthorCommand::Test {
            file,
            exchange_definitions,
            messages,
            name,
            plugin_dir,
            against,
            admin,
        } => test(
            &file,
            &exchange_definitions,
            &messages,
            name,
            plugin_dir.as_deref(),
            against,
            &admin,
        ),
        AuthorCommand::Shadow {
            admin,
            name,
            file,
            sample,
        } => {
            let bytes = read(&file)?;
            let v = admin.client()?.put_bytes(
                &format!(
                    "/api/plugins/{}/candidate?mode=shadow&sample={sample}",
                    segment(&name)
                ),
                &bytes,
            )?;
            print_candidate(&serde_json::from_value(v)?);
            Ok(())
        }
        AuthorCommand::Canary {
            admin,
            name,
            file,
            percent,
            by_header,
            policy,
        } => {
            let client = admin.client()?;
            let header = by_header.as_deref().map(segment);
            let v = match file {
                Some(file) => client.put_bytes(
                    &format!(
                        "/api/plugins/{}/candidate?mode=canary&percent={percent}{}{}",
                        segment(&name),
                        header
                            .map(|h| format!("&by_header={h}"))
                            .unwrap_or_default(),
                        policy.query()
                    ),
                    &read(&file)?,
                )?,
                None => {
                    let mut body = policy.json(percent);
                    body["by_header"] = serde_json::json!(by_header);
                    client.post(
                        &format!("/api/plugins/{}/candidate/canary", segment(&name)),
                        &body,
                    )?
                }
            };
            print_candidate(&serde_json::from_value(v)?);
            Ok(())
        }
        AuthorCommand::Promote { admin, name } => {
            let v = admin.client()?.post(
                &format!("/api/plugins/{}/candidate/promote", segment(&name)),
                &serde_json::json!({}),
            )?;
            println!("{name}: serving {}", v["serving"].as_str().unwrap_or("?"));
            Ok(())
        }
        AuthorCommand::Abort { admin, name } => {
            admin
                .client()?
                .delete(&format!("/api/plugins/{}/candidate", segment(&name)))?;
            println!("{name}: candidate removed; the serving version keeps serving");
            Ok(())
        }
        AuthorCommand::Rollback { admin, name, hash } => {
            let v = admin.client()?.post(
                &format!("/api/plugins/{}/rollback", segment(&name)),
                &serde_json::json!({ "hash": hash }),
            )?;
            println!("{name}: serving {}", v["serving"].as_str().unwrap_or("?"));
            Ok(())
        }
        AuthorCommand::Logs {
            admin,
            name,
            follow,
        } => {
            let client = admin.client()?;
            let path = format!("/api/plugins/{}/logs", segment(&name));
            if !follow {
                let lines: Vec<LogLine> = client.get_as(&path)?;
                for l in lines {
                    print_log_line(&l);
                }
                return Ok(());
            }
            client.follow(&format!("{path}?follow=true"), |event, data| {
                match event {
                    "open" => eprintln!("following the log of '{name}' (Ctrl-C to stop)"),
                    "missed" => println!("... {data} lines missed (this follower fell behind)"),
                    _ => match serde_json::from_str::<LogLine>(data) {
                        Ok(l) => print_log_line(&l),
                        Err(_) => println!("{data}"),
                    },
                }
                use std::io::Write;
                // A closed pipe (`| head`) ends the follow.
                std::io::stdout().flush().is_ok()
            })?;
            Ok(())
        }
        AuthorCommand::Versions { admin, name } => {
            let kept: Vec<KeptVersionView> = admin
                .client()?
                .get_as(&format!("/api/plugins/{}/versions", segment(&name)))?;
            println!("{:<66} {:>9} {:>12}", "hash", "size", "served at");
            for k in kept {
                println!(
                    "{:<66} {:>9} {:>12}{}",
                    k.hash,
                    k.size,
                    k.served_at,
                    if k.serving { "  (serving)" } else { "" }
                );
            }
            Ok(())
        }
    }
}

fn test(
    file: &Path,
    definitions: &Path,
    messages: &Path,
    name: Option<String>,
    plugin_dir: Option<&Path>,
    against: Option<String>,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    use wasmq::author::test::{Bench, decision, read_messages, steps_of};
    let name = name.unwrap_or_else(|| wasmq::plugin::plugin_name(file));
    let defs = wasmq::store::definitions::Definitions::from_rabbitmq(&read(definitions)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", definitions.display()))?;
    let text = std::fs::read_to_string(messages)
        .with_context(|| format!("reading {}", messages.display()))?;
    let msgs = read_messages(&text).map_err(|e| anyhow::anyhow!("{}: {e}", messages.display()))?;
    let bench = Bench::new(&name, &read(file)?, &defs, plugin_dir)?;
    let other = match against.as_deref() {
        None => None,
        Some("serving") => {
            let bytes = admin
                .client()?
                .get_bytes(&format!("/api/plugins/{}/wasm", segment(&name)))?;
            Some(Bench::new(&name, &bytes, &defs, plugin_dir)?)
        }
        Some(path) => Some(Bench::new(
            &name,
            &read(Path::new(path))?,
            &defs,
            plugin_dir,
        )?),
    };
    let short = |h: &str| h[..h.len().min(12)].to_owned();
    let mut differ = 0;
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("#{} '{}' to '{}'", i + 1, m.routing_key, m.exchange);
        let mine = bench.decide(m).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        match &other {
            None => println!("{at}: {} [{}]", decision(&mine), steps_of(&mine, &name)),
            Some(o) => {
                let theirs = o.decide(m).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
                if decision(&mine) != decision(&theirs) {
                    differ += 1;
                    println!("{at}:");
                    println!(
                        "    {} decides {} [{}]",
                        short(&bench.hash),
                        decision(&mine),
                        steps_of(&mine, &name)
                    );
                    println!(
                        "    {} decides {} [{}]",
                        short(&o.hash),
                        decision(&theirs),
                        steps_of(&theirs, &name)
                    );
                }
            }
        }
    }
    match &other {
        None => println!(
            "{} messages decided by {name}@{}",
            msgs.len(),
            short(&bench.hash)
        ),
        Some(o) => println!(
            "{differ} of {} messages decided differently by {name}@{} and {name}@{}",
            msgs.len(),
            short(&bench.hash),
            short(&o.hash)
        ),
    }
    Ok(())
}

/// Capture messages published to an exchange; JSON lines on stdout.
pub fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    let sample: u64 = args
        .sample
        .strip_prefix("1/")
        .unwrap_or(&args.sample)
        .parse()
        .with_context(|| format!("--sample '{}': use 1/K", args.sample))?;
    let client = args.admin.client()?;
    let path = format!(
        "/api/exchanges/{}/{}/capture",
        segment(&args.admin.vhost),
        segment(&args.exchange)
    );
    client.post(
        &path,
        &serde_json::json!({"count": args.count, "sample": sample, "max_bytes": args.max_bytes}),
    )?;
    eprintln!(
        "capturing up to {} messages (1 in {sample}) published to '{}'...",
        args.count, args.exchange
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    loop {
        let v: wasmq::admin::model::CaptureView = client.get_as(&path)?;
        if v.done || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let kept: Vec<wasmq::author::capture::Captured> =
        client.post_as(&format!("{path}/take"), &serde_json::json!({}))?;
    for m in &kept {
        println!("{}", serde_json::to_string(m)?);
    }
    eprintln!("captured {} messages", kept.len());
    Ok(())
}

fn print_log_line(l: &LogLine) {
    println!(
        "{} {:<5} {}@{}: {}",
        l.at_ms, l.level, l.plugin, l.version, l.message
    );
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("reading {}", file.display()))
}

/// A candidate in a few lines (also under `wasmq plugins`).
pub fn print_candidate(c: &CandidateView) {
    let short = |h: &str| h[..h.len().min(12)].to_owned();
    let mode = match &c.mode {
        Mode::Shadow { every } => format!("shadow, 1 in {every}"),
        Mode::Canary {
            percent,
            by_header: None,
        } => format!("canary, {percent}% of keys"),
        Mode::Canary {
            percent,
            by_header: Some(h),
        } => format!("canary, {percent}% of '{h}' values"),
    };
    println!(
        "    candidate {} ({mode}) beside {}: {} calls, {} faults, p99 {} µs, {} s",
        short(&c.hash),
        short(&c.serving_hash),
        c.calls,
        c.faults,
        c.latency_us
            .as_ref()
            .and_then(|l| l.p99)
            .map_or("-".into(), |v| v.to_string()),
        c.running_secs
    );
    if matches!(c.mode, Mode::Shadow { .. }) {
        println!(
            "    compared: {} agree, {} disagree, {} skipped",
            c.agreements, c.disagreements, c.skipped
        );
    }
    for d in &c.disagreement_samples {
        println!(
            "      {} '{}' at {}: serving {} | candidate {}",
            d.role, d.routing_key, d.exchange, d.serving, d.candidate
        );
    }
    if let Some(f) = &c.failure {
        println!("    failed: {f} (being rolled back)");
    }
}

/// A plugin's latest transitions (under `wasmq plugins`).
pub fn print_transitions(ts: &[wasmq::author::candidate::Transition]) {
    let short = |h: &str| h[..h.len().min(12)].to_owned();
    for t in ts {
        println!(
            "    {} at {}: {} -> {}{}",
            t.event.as_str(),
            t.at,
            short(&t.from),
            short(&t.to),
            t.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
}

/// Trace a message through an exchange.
pub fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let mut h = serde_json::Map::new();
    for kv in &args.headers {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("header '{kv}': use name=value"))?;
        h.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    let client: AdminClient = args.admin.client()?;
    let t: Trace = client.post_as(
        &format!(
            "/api/exchanges/{}/{}/trace",
            segment(&args.admin.vhost),
            segment(&args.exchange)
        ),
        &serde_json::json!({
            "routing_key": args.key,
            "payload": args.body,
            "properties": { "headers": h, "content_type": args.content_type },
        }),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    print_trace(&t);
    Ok(())
}

fn print_trace(t: &Trace) {
    println!(
        "trace of '{}' published to '{}' (vhost {}){}",
        t.routing_key,
        t.exchange,
        t.vhost,
        if t.dry { ", nothing enqueued" } else { "" }
    );
    let who = |plugin: &str, version: &str, candidate: bool| {
        format!(
            "{plugin}@{version}{}",
            if candidate { " (candidate)" } else { "" }
        )
    };
    for (i, s) in t.steps.iter().enumerate() {
        let line = match s {
            Step::Exchange { exchange, kind } => format!("exchange '{exchange}' ({kind})"),
            Step::Transform {
                plugin,
                version,
                candidate,
                outcome,
                routing_key,
                took_us,
                ..
            } => format!(
                "transform {}: {outcome}, routing key now '{routing_key}' [{took_us:.1} µs]",
                who(plugin, version, *candidate)
            ),
            Step::Route {
                plugin,
                version,
                candidate,
                bindings,
                omitted,
                took_us,
                ..
            } => {
                let mut chosen: Vec<String> = bindings
                    .iter()
                    .map(|b| {
                        format!(
                            "{} '{}' (key '{}'{})",
                            b.destination_type,
                            b.destination,
                            b.key,
                            b.filter
                                .as_ref()
                                .map(|f| format!(", filter {f}"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                let count = chosen.len() + omitted;
                if *omitted > 0 {
                    chosen.push(format!("and {omitted} more"));
                }
                format!(
                    "router {} chose {}: {} [{took_us:.1} µs]",
                    who(plugin, version, *candidate),
                    count,
                    if chosen.is_empty() {
                        "nothing".to_owned()
                    } else {
                        chosen.join(", ")
                    }
                )
            }
            Step::Filter {
                plugin,
                version,
                candidate,
                destination,
                key,
                passed,
                took_us,
                ..
            } => format!(
                "filter {} on the binding to '{destination}' (key '{key}'): {} [{took_us:.1} µs]",
                who(plugin, version, *candidate),
                if *passed { "pass" } else { "DROP" }
            ),
            Step::Fault { plugin, fault, .. } => format!("FAULT in {plugin}: {fault}"),
            Step::Alternate { exchange, to } => {
                format!("'{exchange}' routed nothing: to alternate exchange '{to}'")
            }
            Step::DeadLetter {
                exchange,
                to,
                reason,
            } => format!("'{exchange}' dead-letters to '{to}': {reason}"),
            Step::Delayed { exchange, queue } => {
                format!("'{exchange}' holds it for its x-delay, in '{queue}'")
            }
        };
        println!("  {:>2}. {line}", i + 1);
    }
    if t.queues.is_empty() && t.forwarded.is_empty() {
        println!("  => no queue");
    } else {
        let mut all = t.queues.clone();
        all.extend(t.forwarded.iter().cloned());
        println!("  => queues: {}", all.join(", "));
    }
    for f in &t.faults {
        println!("  => the publisher is told: {f}");
    }
    println!("  ({:.1} µs)", t.took_us);
}
