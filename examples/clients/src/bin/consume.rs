//! # Example: consume from wasmq with a stock AMQP client
//!
//! Declares a queue, binds it to an exchange with a binding key (and
//! optionally a filter plugin from the plugin folder), and prints every
//! message it receives, acking each.
//!
//! With the broker running (`./scripts/run.sh`):
//!
//! ```text
//! cargo run -p wasmq-example-clients --bin consume -- --exchange shard --type consistent-hash --key 1
//! cargo run -p wasmq-example-clients --bin consume -- --exchange events --key '#' \
//!     --filter json-filter --filter-arg x-filter-field=region --filter-arg x-filter-equals=eu
//! ```

#![forbid(unsafe_code)]

use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ConnectionProperties};

#[derive(Parser)]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Exchange to bind to (declared if missing).
    #[arg(long, default_value = "events")]
    exchange: String,
    /// Exchange type if it has to be declared: direct, topic, fanout,
    /// headers, or a plugin name.
    #[arg(long = "type", default_value = "topic")]
    kind: String,
    /// Binding key.
    #[arg(long, default_value = "#")]
    key: String,
    /// Queue name (server-named and exclusive when empty).
    #[arg(long, default_value = "")]
    queue: String,
    /// Filter plugin for the binding (`x-wasmq-filter`).
    #[arg(long)]
    filter: Option<String>,
    /// Extra binding arguments, `name=value`.
    #[arg(long = "filter-arg")]
    filter_args: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let kind = wasmq_example_clients::exchange_kind(&args.kind);
    ch.exchange_declare(
        args.exchange.as_str().into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let exclusive = args.queue.is_empty();
    let queue = ch
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                exclusive,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut binding = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        binding.insert(
            ShortString::from(k),
            AMQPValue::LongString(LongString::from(v)),
        );
    };
    if let Some(f) = &args.filter {
        put("x-wasmq-filter", f);
    }
    for kv in &args.filter_args {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--filter-arg wants name=value, got {kv}"))?;
        put(k, v);
    }
    ch.queue_bind(
        queue.name().clone(),
        args.exchange.as_str().into(),
        args.key.as_str().into(),
        QueueBindOptions::default(),
        binding,
    )
    .await?;
    println!(
        "consuming from {} (bound to '{}' with key '{}')",
        queue.name(),
        args.exchange,
        args.key
    );
    let mut consumer = ch
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while let Some(delivery) = consumer.next().await {
        let d = delivery?;
        println!(
            "{} {}: {}",
            if d.redelivered { "(redelivered)" } else { "" },
            d.routing_key,
            String::from_utf8_lossy(&d.data)
        );
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}
