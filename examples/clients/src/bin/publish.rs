//! # Example: publish events to wasmq with a stock AMQP client
//!
//! Shows that wasmq needs no special client: this is plain lapin. It
//! declares an exchange of any type (a built-in or a plugin from the plugin
//! folder), publishes events with publisher confirms, and reports each
//! outcome (a plugin fault comes back as a nack).
//!
//! With the broker running (`./scripts/run.sh`):
//!
//! ```text
//! cargo run -p wasmq-example-clients --bin publish -- --exchange shard --type consistent-hash order.1 order.2
//! ```

#![forbid(unsafe_code)]

use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

#[derive(Parser)]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Exchange to publish to.
    #[arg(long, default_value = "events")]
    exchange: String,
    /// Exchange type: direct, topic, fanout, headers, or a plugin name.
    #[arg(long = "type", default_value = "topic")]
    kind: String,
    /// Message body (the routing key is used when absent).
    #[arg(long)]
    body: Option<String>,
    /// Routing keys to publish, one message each.
    #[arg(required = true)]
    keys: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = Connection::connect(&args.uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let kind = wasmq_example_clients::exchange_kind(&args.kind);
    ch.exchange_declare(
        args.exchange.as_str().into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for key in &args.keys {
        let body = args.body.clone().unwrap_or_else(|| key.clone());
        let confirm = ch
            .basic_publish(
                args.exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default().with_content_type("text/plain".into()),
            )
            .await?
            .await?;
        let returned = match &confirm {
            Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
                format!(" (returned: {})", r.reply_text)
            }
            _ => String::new(),
        };
        let verdict = if confirm.is_ack() {
            "confirmed"
        } else {
            "NACKED"
        };
        println!("{key}: {verdict}{returned}");
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
