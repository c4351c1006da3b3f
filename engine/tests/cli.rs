//! The `wasmq` CLI subcommands against a running broker (the real binary
//! both as the server and as the client of its admin API).

use std::process::Command;

mod common;
use common::{BIN, Broker};

/// Run a CLI subcommand against `url`; its stdout, or a panic with stderr.
fn cli(url: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("WASMQ_ADMIN_URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wasmq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_subcommands_drive_a_running_broker() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let url = format!("http://{}", broker.ready().await.1);
    let work = tempfile::tempdir().unwrap();
    let defs = work.path().join("defs.json");
    std::fs::write(
        &defs,
        r#"{"exchanges": [{"name": "events", "vhost": "/", "type": "topic", "durable": true}],
            "queues": [{"name": "orders", "vhost": "/", "durable": true,
                        "arguments": {"x-max-length": 100}}],
            "bindings": [{"source": "events", "vhost": "/", "destination": "orders",
                          "destination_type": "queue", "routing_key": "orders.#"}]}"#,
    )
    .unwrap();
    let url2 = url.clone();
    let defs2 = defs.clone();
    let out = tokio::task::spawn_blocking(move || {
        let url = url2.as_str();
        vec![
            cli(url, &["definitions", "import", defs2.to_str().unwrap()]),
            cli(
                url,
                &[
                    "publish",
                    "-e",
                    "events",
                    "-k",
                    "orders.eu",
                    "--persistent",
                    "-H",
                    "k=v",
                    "hello",
                ],
            ),
            cli(url, &["publish", "-e", "events", "-k", "other", "lost"]),
            cli(url, &["queues"]),
            cli(url, &["exchanges"]),
            cli(url, &["plugins"]),
            cli(url, &["get", "orders", "--requeue"]),
            cli(url, &["get", "orders"]),
            cli(url, &["get", "orders"]),
            cli(url, &["definitions", "export"]),
        ]
    })
    .await
    .unwrap();
    assert!(out[0].contains("imported"), "{}", out[0]);
    assert!(out[1].contains("routed to 1 queue"), "{}", out[1]);
    assert!(out[2].contains("routed to 0 queue"), "{}", out[2]);
    let orders = out[3]
        .lines()
        .find(|l| l.starts_with("orders"))
        .expect("orders listed");
    assert_eq!(
        orders.split_whitespace().nth(1),
        Some("1"),
        "one ready: {orders}"
    );
    assert!(
        out[4]
            .lines()
            .any(|l| l.starts_with("events") && l.contains("topic")),
        "{}",
        out[4]
    );
    assert!(
        out[5]
            .lines()
            .any(|l| l.starts_with("topic") && l.contains("serving")),
        "{}",
        out[5]
    );
    assert!(
        out[6].contains("hello") && out[6].contains("redelivered=false"),
        "{}",
        out[6]
    );
    assert!(
        out[7].contains("hello") && out[7].contains("redelivered=true"),
        "{}",
        out[7]
    );
    assert!(out[8].contains("queue is empty"), "{}", out[8]);
    let exported: serde_json::Value = serde_json::from_str(&out[9]).unwrap();
    assert_eq!(exported["queues"][0]["arguments"]["x-max-length"], 100);
    assert_eq!(exported["bindings"][0]["routing_key"], "orders.#");

    // A refused call exits non-zero with the API's reason.
    let bad = Command::new(BIN)
        .args(["get", "no-such-queue"])
        .env("WASMQ_ADMIN_URL", &url)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("404"));
    broker.kill().await;
}
