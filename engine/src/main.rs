//! The `wasmq` binary: parse flags, set up logging, load the config, run.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wasmq::Config;
use wasmq::plugin::PluginHost;
use wasmq::server::Server;

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
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (every field is optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// AMQP listen address (overrides the file).
    #[arg(long, env = "WASMQ_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Data folder (overrides the file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Plugin folder (overrides the file).
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a plugin file offline and print its roles, ABI version and exports.
    Check {
        /// The .wasm file.
        file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => check(&file),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
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

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let host = PluginHost::new(Default::default(), None)?;
    let v = host.load_file(file)?;
    println!("plugin:      {}", v.name);
    println!("file:        {} ({} bytes)", file.display(), v.size);
    println!("sha256:      {}", v.hash);
    println!("abi version: {}", v.abi_version);
    println!("roles:       {}", v.roles);
    println!("exports:     {}", v.exports.join(", "));
    println!("result:      valid");
    Ok(())
}
