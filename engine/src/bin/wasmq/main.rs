//! The `wasmq` binary: parse flags, set up logging, load the config, run.
//! The plugin author's subcommands (new, build, shadow, canary, trace...)
//! are in `author.rs`.

mod access;
mod author;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wasmq::Config;
use wasmq::admin::client::{AdminClient, segment};
use wasmq::admin::model::{ExchangeView, GotMessage, PluginView, PublishResult, QueueView};
use wasmq::cluster::NodeStatus;
use wasmq::plugin::{Compiler, PluginHost};
use wasmq::server::Server;

#[global_allocator]
static ALLOCATOR: wasmq::Allocator = wasmq::Allocator;

#[derive(Parser)]
#[command(
    name = "wasmq",
    version,
    about = "An AMQP 0-9-1 broker whose exchange types are Wasm plugins"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Work with plugin files.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// List queues of a running broker (through its admin API).
    Queues(AdminArgs),
    /// List exchanges of a running broker.
    Exchanges(AdminArgs),
    /// List plugins of a running broker: state, roles, hash, calls, faults,
    /// and a staged candidate's figures.
    Plugins(AdminArgs),
    /// Show why a message would go where it goes: run it through an
    /// exchange of a running broker (nothing is enqueued) and print each
    /// step, the version that decided it, and the final queues.
    Trace(author::TraceArgs),
    /// Record messages published to an exchange of a running broker, as
    /// JSON lines on stdout, to test a plugin version against
    /// (`wasmq plugin test`).
    Capture(author::CaptureArgs),
    /// Publish one test message through a running broker.
    Publish {
        #[command(flatten)]
        admin: AdminArgs,
        /// Exchange ("" for the default exchange).
        #[arg(long, short, default_value = "")]
        exchange: String,
        /// Routing key.
        #[arg(long, short = 'k', default_value = "")]
        routing_key: String,
        /// Persistent (delivery mode 2).
        #[arg(long)]
        persistent: bool,
        /// Header `name=value` (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The body.
        body: String,
    },
    /// Take messages from a queue of a running broker (or peek with --requeue).
    Get {
        #[command(flatten)]
        admin: AdminArgs,
        /// Queue.
        queue: String,
        /// How many.
        #[arg(long, short, default_value_t = 1)]
        count: usize,
        /// Put them back instead of taking them.
        #[arg(long)]
        requeue: bool,
    },
    /// Users of a running broker (rabbitmqctl's add_user, delete_user,
    /// change_password, set_user_tags, list_users).
    Users {
        #[command(subcommand)]
        command: access::UsersCommand,
    },
    /// Vhosts of a running broker (add_vhost, delete_vhost, list_vhosts).
    Vhosts {
        #[command(subcommand)]
        command: access::VhostsCommand,
    },
    /// Users' permissions in a vhost (set_permissions, clear_permissions,
    /// list_permissions).
    Permissions {
        #[command(subcommand)]
        command: access::PermissionsCommand,
    },
    /// Policies and operator policies of a vhost (set_policy,
    /// clear_policy, list_policies, set_operator_policy).
    Policies {
        #[command(subcommand)]
        command: access::PoliciesCommand,
    },
    /// Export or import definitions (users, vhosts, permissions,
    /// exchanges, queues, bindings) in RabbitMQ's format.
    Definitions {
        #[command(subcommand)]
        command: DefinitionsCommand,
    },
    /// Change a quorum queue's members (on the queue's leader's node).
    Quorum {
        #[command(subcommand)]
        command: QuorumCommand,
    },
    /// See and change a running node's cluster membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum QuorumCommand {
    /// Add NODE to quorum queue QUEUE's members (RabbitMQ's add_member):
    /// it catches up from the leader, then votes.
    AddMember {
        #[command(flatten)]
        admin: AdminArgs,
        /// Queue.
        queue: String,
        /// Node name.
        node: String,
    },
    /// Remove NODE from quorum queue QUEUE's members (RabbitMQ's
    /// delete_member); its replica is deleted.
    RemoveMember {
        #[command(flatten)]
        admin: AdminArgs,
        /// Queue.
        queue: String,
        /// Node name.
        node: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Members, leader, each member's log position, as this node sees them.
    Status(AdminArgs),
    /// Make this node (not yet a member) join the cluster of the node at PEER.
    Join {
        #[command(flatten)]
        admin: AdminArgs,
        /// The node-to-node address (`[cluster] listen`) of a member.
        peer: String,
    },
    /// Remove the member NODE from the cluster.
    Leave {
        #[command(flatten)]
        admin: AdminArgs,
        /// Node name.
        node: String,
    },
    /// Serve a version of a plugin the cluster keeps on every node
    /// (rollback); `wasmq plugins` lists the kept versions.
    ActivatePlugin {
        #[command(flatten)]
        admin: AdminArgs,
        /// Plugin name.
        name: String,
        /// The version's content hash.
        hash: String,
    },
}

/// Where the admin API is and who asks.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "WASMQ_ADMIN_URL",
        default_value = "http://127.0.0.1:15672"
    )]
    url: String,
    /// User (an AMQP user of the broker).
    #[arg(long, env = "WASMQ_USER", default_value = "guest")]
    user: String,
    /// Password.
    #[arg(
        long,
        env = "WASMQ_PASSWORD",
        default_value = "guest",
        hide_env_values = true
    )]
    password: String,
    /// Virtual host.
    #[arg(long, default_value = "/")]
    pub vhost: String,
    /// CA certificate (PEM) to verify an `https://` admin API against,
    /// instead of the public web roots.
    #[arg(long, env = "WASMQ_ADMIN_CACERT")]
    cacert: Option<PathBuf>,
}

impl AdminArgs {
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        Ok(match &self.cacert {
            None => AdminClient::new(&self.url, &self.user, &self.password),
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading CA file {}", path.display()))?;
                AdminClient::with_ca(&self.url, &self.user, &self.password, &pem)?
            }
        })
    }
}

#[derive(Subcommand)]
enum DefinitionsCommand {
    /// Print the durable definitions as JSON (to a file with --output).
    Export {
        #[command(flatten)]
        admin: AdminArgs,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Declare everything in a definitions file (RabbitMQ's format).
    Import {
        #[command(flatten)]
        admin: AdminArgs,
        /// The JSON file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (every field is optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// AMQP listen address (overrides the file).
    #[arg(long, env = "WASMQ_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// AMQPS listen address (overrides the file; needs its [tls] section).
    #[arg(long, env = "WASMQ_LISTEN_TLS")]
    listen_tls: Option<std::net::SocketAddr>,
    /// RESP (Redis protocol) listen address (overrides `[redis] listen`).
    #[arg(long, env = "WASMQ_LISTEN_REDIS")]
    listen_redis: Option<std::net::SocketAddr>,
    /// RESP over TLS listen address (overrides `[redis] listen_tls`; needs
    /// the file's [tls] section).
    #[arg(long, env = "WASMQ_LISTEN_REDIS_TLS")]
    listen_redis_tls: Option<std::net::SocketAddr>,
    /// Data folder (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Plugin folder (overrides the file).
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Admin API listen address (overrides the file).
    #[arg(long, env = "WASMQ_ADMIN_LISTEN")]
    admin_listen: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a plugin file offline and print its roles, ABI version and exports.
    Check {
        /// The .wasm file.
        file: PathBuf,
    },
    #[command(flatten)]
    Author(author::AuthorCommand),
    /// Upload a plugin to a running broker: validated there, then written
    /// into its plugin folder and hot-swapped in.
    Upload {
        #[command(flatten)]
        admin: AdminArgs,
        /// The .wasm file.
        file: PathBuf,
        /// Plugin name (default: the file name without `.wasm`).
        #[arg(long)]
        name: Option<String>,
        /// Replace a built-in exchange type (`direct`, `topic`, `fanout`,
        /// `headers`) with this file; the predeclared amq.* exchanges keep
        /// the built-in.
        #[arg(long)]
        override_builtin: bool,
    },
}

/// A failed command prints one line saying what failed (the error and
/// its causes), never a backtrace: with `RUST_BACKTRACE=1` set, as many
/// Rust developers have it, anyhow's own report adds thirty frames to a
/// refused connection. Backtraces are for panics.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => check(&file),
        Command::Plugin {
            command: PluginCommand::Author(c),
        } => author::run(c),
        Command::Trace(args) => author::trace(args),
        Command::Capture(args) => author::capture(args),
        Command::Plugin {
            command:
                PluginCommand::Upload {
                    admin,
                    file,
                    name,
                    override_builtin,
                },
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let name = name.unwrap_or_else(|| wasmq::plugin::plugin_name(&file));
            let query = if override_builtin {
                "?override_builtin=true"
            } else {
                ""
            };
            let r = admin
                .client()?
                .put_bytes(&format!("/api/plugins/{}{query}", segment(&name)), &bytes)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
        Command::Queues(a) => {
            let qs: Vec<QueueView> = a
                .client()?
                .get_as(&format!("/api/queues/{}", segment(&a.vhost)))?;
            // In a cluster, the node each queue lives on.
            let clustered = qs.iter().any(|q| q.node.is_some());
            println!(
                "{:<40} {:>10} {:>10} {:>9} {:>7}{}",
                "name",
                "ready",
                "unacked",
                "consumers",
                "durable",
                if clustered { "  node" } else { "" }
            );
            for q in qs {
                println!(
                    "{:<40} {:>10} {:>10} {:>9} {:>7}{}",
                    q.name,
                    q.messages_ready,
                    q.messages_unacknowledged,
                    q.consumers,
                    q.durable,
                    q.node.map(|n| format!("  {n}")).unwrap_or_default()
                );
                // A stream: its offsets, files and readers.
                if let Some(st) = &q.stream {
                    let last = st.last_offset.map_or("-".to_owned(), |o| o.to_string());
                    println!(
                        "    stream: offsets {}..{last}, {} segments, {} bytes",
                        st.first_offset, st.segments, st.bytes
                    );
                    for c in &st.consumers {
                        println!(
                            "    consumer {} (channel {}){}: at offset {}{}",
                            c.consumer_tag,
                            c.channel,
                            c.name
                                .as_ref()
                                .map(|n| format!(" named {n}"))
                                .unwrap_or_default(),
                            c.offset,
                            if c.active { "" } else { ", waiting" }
                        );
                    }
                    for n in &st.named {
                        println!(
                            "    named {}: settled up to {}, lag {}",
                            n.name, n.offset, n.lag
                        );
                    }
                }
                // A quorum queue: its group as this node's replica sees it.
                if let Some(r) = q.quorum {
                    let members: Vec<String> = r
                        .members
                        .iter()
                        .map(|m| match m.matched {
                            Some(i) => format!("{}@{i}", m.node),
                            None => m.node.clone(),
                        })
                        .collect();
                    let opt = |i: Option<u64>| i.map_or("-".to_owned(), |i| i.to_string());
                    println!(
                        "    quorum: leader {}, term {}, members {}; log {}, applied {}, snapshot {}, holds {}",
                        r.leader.as_deref().unwrap_or("?"),
                        r.term,
                        members.join(" "),
                        opt(r.last_log_index),
                        opt(r.last_applied),
                        opt(r.snapshot_index),
                        r.messages
                    );
                }
            }
            Ok(())
        }
        Command::Quorum { command } => {
            let (admin, queue, node, add) = match command {
                QuorumCommand::AddMember { admin, queue, node } => (admin, queue, node, true),
                QuorumCommand::RemoveMember { admin, queue, node } => (admin, queue, node, false),
            };
            let path = format!(
                "/api/queues/{}/{}/members/{}",
                segment(&admin.vhost),
                segment(&queue),
                segment(&node)
            );
            let client = admin.client()?;
            if add {
                client.post(&path, &serde_json::json!({}))?;
                println!("{node} added to quorum queue {queue}");
            } else {
                client.delete(&path)?;
                println!("{node} removed from quorum queue {queue}");
            }
            Ok(())
        }
        Command::Exchanges(a) => {
            let xs: Vec<ExchangeView> = a
                .client()?
                .get_as(&format!("/api/exchanges/{}", segment(&a.vhost)))?;
            println!(
                "{:<40} {:<16} {:>7} {:>12} {:>12}",
                "name", "type", "durable", "published", "unroutable"
            );
            for x in xs {
                println!(
                    "{:<40} {:<16} {:>7} {:>12} {:>12}",
                    if x.name.is_empty() {
                        "(default)"
                    } else {
                        &x.name
                    },
                    x.kind,
                    x.durable,
                    x.message_stats.publish_in,
                    x.message_stats.unroutable
                );
            }
            Ok(())
        }
        Command::Plugins(a) => {
            let ps: Vec<PluginView> = a.client()?.get_as("/api/plugins")?;
            println!(
                "{:<20} {:<9} {:<28} {:<14} {:>10} {:>7} {:>8}",
                "name", "state", "roles", "hash", "calls", "faults", "p99 µs"
            );
            for p in ps {
                println!(
                    "{:<20} {:<9} {:<28} {:<14} {:>10} {:>7} {:>8}",
                    p.name,
                    p.state,
                    p.roles.as_deref().unwrap_or("-"),
                    p.hash.as_deref().map_or("-", |h| &h[..h.len().min(12)]),
                    p.calls,
                    p.faults,
                    p.latency_us
                        .and_then(|l| l.p99)
                        .map_or("-".into(), |v| v.to_string()),
                );
                if let Some(r) = p.rejection {
                    println!("    rejected: {r}");
                }
                if let Some(c) = &p.candidate {
                    author::print_candidate(c);
                }
                author::print_transitions(&p.transitions);
                for v in &p.cluster {
                    let mut line = format!(
                        "    cluster version {} from {}{}: ready on {}",
                        &v.hash[..v.hash.len().min(12)],
                        v.from,
                        if v.active { " (active)" } else { "" },
                        if v.ready.is_empty() {
                            "none yet".to_owned()
                        } else {
                            v.ready.join(", ")
                        }
                    );
                    for (node, why) in &v.refused {
                        line.push_str(&format!("; refused by {node}: {why}"));
                    }
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Publish {
            admin,
            exchange,
            routing_key,
            persistent,
            headers,
            body,
        } => {
            let mut h = serde_json::Map::new();
            for kv in headers {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("header '{kv}': use name=value"))?;
                h.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
            }
            let x = if exchange.is_empty() {
                "amq.default"
            } else {
                &exchange
            };
            let r: PublishResult = admin.client()?.post_as(
                &format!(
                    "/api/exchanges/{}/{}/publish",
                    segment(&admin.vhost),
                    segment(x)
                ),
                &serde_json::json!({
                    "routing_key": routing_key,
                    "payload": body,
                    "properties": {
                        "delivery_mode": if persistent { 2 } else { 1 },
                        "headers": h,
                    },
                }),
            )?;
            println!("routed to {} queue(s)", r.queues);
            for f in r.faults {
                println!("plugin fault: {f}");
            }
            Ok(())
        }
        Command::Get {
            admin,
            queue,
            count,
            requeue,
        } => {
            let msgs: Vec<GotMessage> = admin.client()?.post_as(
                &format!(
                    "/api/queues/{}/{}/get",
                    segment(&admin.vhost),
                    segment(&queue)
                ),
                &serde_json::json!({
                    "count": count,
                    "ackmode": if requeue { "ack_requeue_true" } else { "ack_requeue_false" },
                }),
            )?;
            if msgs.is_empty() {
                println!("(queue is empty)");
            }
            for m in msgs {
                println!(
                    "exchange={:?} routing_key={:?} redelivered={}\n{}",
                    m.exchange, m.routing_key, m.redelivered, m.payload
                );
            }
            Ok(())
        }
        Command::Cluster { command } => cluster(command),
        Command::Users { command } => access::users(command),
        Command::Vhosts { command } => access::vhosts(command),
        Command::Permissions { command } => access::permissions(command),
        Command::Policies { command } => access::policies(command),
        Command::Definitions {
            command: DefinitionsCommand::Export { admin, output },
        } => {
            let defs = admin.client()?.get("/api/definitions")?;
            let text = serde_json::to_string_pretty(&defs)?;
            match output {
                Some(path) => std::fs::write(&path, text + "\n")
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{text}"),
            }
            Ok(())
        }
        Command::Definitions {
            command: DefinitionsCommand::Import { admin, file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let doc: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            admin.client()?.post("/api/definitions", &doc)?;
            println!("imported {}", file.display());
            Ok(())
        }
    }
}

fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status(a) => {
            let st: NodeStatus = a.client()?.get_as("/api/cluster")?;
            println!(
                "node {} ({}), leader {}, term {}, log {} applied {} snapshot {}",
                st.node,
                st.state,
                st.leader.as_deref().unwrap_or("(none)"),
                st.term,
                opt(st.last_log_index),
                opt(st.last_applied),
                opt(st.snapshot_index),
            );
            println!(
                "{:<24} {:<24} {:<8} {:<7} {:>10}",
                "member", "address", "role", "leader", "log index"
            );
            for m in st.members {
                println!(
                    "{:<24} {:<24} {:<8} {:<7} {:>10}",
                    m.name,
                    m.addr,
                    if m.voter { "voter" } else { "learner" },
                    if m.leader { "yes" } else { "" },
                    opt(m.matched_index)
                );
            }
        }
        ClusterCommand::Join { admin, peer } => {
            admin
                .client()?
                .post("/api/cluster/join", &serde_json::json!({ "peer": peer }))?;
            println!("joined through {peer}");
        }
        ClusterCommand::Leave { admin, node } => {
            admin.client()?.post(
                &format!("/api/cluster/leave/{}", segment(&node)),
                &serde_json::json!({}),
            )?;
            println!("{node} removed from the cluster");
        }
        ClusterCommand::ActivatePlugin { admin, name, hash } => {
            admin.client()?.post(
                &format!(
                    "/api/cluster/plugins/{}/activate/{}",
                    segment(&name),
                    segment(&hash)
                ),
                &serde_json::json!({}),
            )?;
            println!("plugin {name} version {hash} activated on every node");
        }
    }
    Ok(())
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The log filter without `RUST_LOG`.
const DEFAULT_LOG: &str = "info,openraft=warn,openraft::core::raft_core=error,\
openraft::replication=off,openraft::engine::handler::replication_handler=off,\
openraft::raft::responder=off";

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // openraft narrates every membership step at info; its warnings
        // and errors are what an operator needs, except routine notices
        // that every election or peer outage makes once per group and per
        // call: the core's stale messages ignored ("vote changed",
        // "membership changed", "leader has removed target"), replication
        // calls to a peer that is down and their backoff, and answers to
        // callers that went away. The node logs a peer's outage once
        // itself. They show with RUST_LOG=openraft=debug.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    // Colour only for a person at a terminal: a log written to a file or a
    // pipe gets no escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(p) = &args.plugin_dir {
        config.plugin_dir = p.clone();
    }
    if let Some(a) = args.admin_listen {
        config.admin.listen = a;
    }
    if let Some(l) = args.listen_tls {
        config.listen_tls = Some(l);
    }
    if let Some(l) = args.listen_redis {
        config.redis.listen = Some(l);
    }
    if let Some(l) = args.listen_redis_tls {
        config.redis.listen_tls = Some(l);
    }
    if let Some(cluster) = &mut config.cluster {
        // One ConfigMap for every pod of a StatefulSet: each pod's name and
        // address come from its environment.
        if let Ok(name) = std::env::var("WASMQ_CLUSTER_NAME") {
            cluster.name = name;
        }
        if let Ok(addr) = std::env::var("WASMQ_CLUSTER_ADVERTISE") {
            cluster.advertise = Some(addr);
        }
    }
    config.check()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let server = Server::start(config).await?;
        shutdown_signal().await;
        tracing::info!("shutting down: closing connections");
        server.shutdown(Duration::from_secs(10)).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn check(file: &std::path::Path) -> anyhow::Result<()> {
    // The code the plugin will run for good: Cranelift's.
    let host = PluginHost::new(Default::default(), None, Compiler::Optimizing)?;
    let v = host.load_file(file)?;
    println!("plugin:      {}", v.name);
    println!("file:        {} ({} bytes)", file.display(), v.size);
    println!("sha256:      {}", v.hash);
    println!("abi version: {}", v.abi_version);
    println!("roles:       {}", v.roles);
    println!("exports:     {}", v.exports.join(", "));
    if v.self_tests > 0 {
        println!("self-test:   {} messages, all as expected", v.self_tests);
    } else {
        println!("self-test:   none shipped (wasmq_sdk::self_test!)");
    }
    println!("result:      valid");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// clap's own checks of every subcommand (unique argument names, valid
    /// defaults), which otherwise run only when that subcommand is used.
    #[test]
    fn every_subcommand_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// The default filter parses, directive by directive (a typo would
    /// otherwise fall back silently to logging everything at `error`).
    #[test]
    fn the_default_log_filter_parses() {
        for directive in super::DEFAULT_LOG.split(',') {
            assert!(
                directive
                    .parse::<tracing_subscriber::filter::Directive>()
                    .is_ok(),
                "{directive}"
            );
        }
        tracing_subscriber::EnvFilter::try_new(super::DEFAULT_LOG).unwrap();
    }
}
