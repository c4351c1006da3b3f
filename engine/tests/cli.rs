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
                        "arguments": {"x-max-length": 100}},
                       {"name": "history", "vhost": "/", "durable": true,
                        "arguments": {"x-queue-type": "stream"}}],
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
            cli(url, &["publish", "-e", "", "-k", "history", "kept"]),
            cli(url, &["queues"]),
        ]
    })
    .await
    .unwrap();
    assert!(out[0].contains("imported"), "{}", out[0]);
    assert!(out[1].contains("routed to 1 queue"), "{}", out[1]);
    assert!(out[2].contains("routed to 0 queue"), "{}", out[2]);
    // A stream shows its offsets and files.
    assert!(out[10].contains("routed to 1 queue"), "{}", out[10]);
    assert!(
        out[11].contains("stream: offsets 0..0, 1 segments"),
        "{}",
        out[11]
    );
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
    let orders = exported["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "orders")
        .expect("orders exported");
    assert_eq!(orders["arguments"]["x-max-length"], 100);
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

/// `wasmq vhosts`, `users` and `permissions`, as `rabbitmqctl` is used: a
/// user made with a password from stdin logs in over AMQP with the
/// permissions set, and loses them when they are cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_users_vhosts_and_permissions() {
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut broker = Broker::spawn(data.path(), plugins.path());
    let (amqp, admin) = broker.ready().await;
    let url = format!("http://{admin}");
    let u = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let url = u.as_str();
        let mut add = Command::new(BIN)
            .args(["users", "add", "svc", "--tags", "monitoring"])
            .env("WASMQ_ADMIN_URL", url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        add.stdin.take().unwrap().write_all(b"svc-pw\n").unwrap();
        let added = add.wait_with_output().unwrap();
        assert!(added.status.success());
        vec![
            cli(
                url,
                &["vhosts", "add", "orders", "--description", "orders service"],
            ),
            String::from_utf8(added.stdout).unwrap(),
            cli(
                url,
                &[
                    "permissions",
                    "set",
                    "svc",
                    "^svc\\.",
                    "^svc\\.",
                    "^svc\\.",
                    "--vhost",
                    "orders",
                ],
            ),
            cli(url, &["users", "list"]),
            cli(url, &["vhosts", "list"]),
            cli(url, &["permissions", "list", "--all"]),
            cli(url, &["vhosts", "set-limit", "orders", "max-queues", "5"]),
            cli(
                url,
                &[
                    "policies",
                    "set",
                    "cap",
                    "^svc\\.",
                    r#"{"max-length": 7}"#,
                    "--vhost",
                    "orders",
                    "--priority",
                    "2",
                ],
            ),
            cli(url, &["policies", "list", "--all"]),
        ]
    })
    .await
    .unwrap();
    assert!(out[1].contains("added user svc"), "{}", out[1]);
    assert!(
        out[3]
            .lines()
            .any(|l| l.starts_with("svc") && l.contains("monitoring")),
        "{}",
        out[3]
    );
    assert!(
        out[4]
            .lines()
            .any(|l| l.starts_with("orders") && l.contains("orders service")),
        "{}",
        out[4]
    );
    assert!(
        out[5]
            .lines()
            .any(|l| l.starts_with("orders") && l.contains("svc") && l.contains("^svc\\.")),
        "{}",
        out[5]
    );
    assert!(out[6].contains("max-queues of orders: 5"), "{}", out[6]);
    assert!(
        out[8].lines().any(|l| l.starts_with("orders")
            && l.contains("cap")
            && l.contains(r#"{"max-length":7}"#)),
        "{}",
        out[8]
    );
    let login = format!("amqp://svc:svc-pw@{amqp}/orders");
    let conn = lapin::Connection::connect(&login, Default::default())
        .await
        .expect("svc logs in with the password given on stdin");
    conn.close(200, "bye".into()).await.unwrap();
    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        cli(&u, &["permissions", "clear", "svc", "--vhost", "orders"]);
    })
    .await
    .unwrap();
    let e = lapin::Connection::connect(&login, Default::default())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("530") || e.to_string().contains("NOT_ALLOWED"),
        "{e}"
    );
    // The last administrator cannot be deleted: a non-zero exit, the reason.
    let bad = Command::new(BIN)
        .args(["users", "delete", "guest"])
        .env("WASMQ_ADMIN_URL", &url)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("administrator"));
    broker.kill().await;
}

/// A log written to a pipe carries no terminal colour codes, and a
/// client's chosen name with a newline stays on its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_to_a_pipe_is_plain_text_one_event_a_line() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let data = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data.path())
        .arg("--plugin-dir")
        .arg(plugins.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut amqp = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(at) = line.find("amqp_addr=") {
            amqp = Some(
                line[at + 10..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
        seen.push(line);
        if amqp.is_some() && seen.iter().any(|l| l.contains("admin API listening")) {
            break;
        }
    }
    // A login whose user name forges a line of its own.
    let amqp = amqp.expect("the AMQP address is logged");
    let mut s = tokio::net::TcpStream::connect(&amqp).await.unwrap();
    s.write_all(b"AMQP\0\0\x09\x01").await.unwrap();
    let mut start = vec![0u8; 512];
    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut start).await;
    let user = "bob\n2026-01-01T00:00:00Z  INFO wasmq: FORGED";
    let response = format!("\0{user}\0wrong");
    let mut p = vec![0, 10, 0, 11, 0, 0, 0, 0, 5];
    p.extend_from_slice(b"PLAIN");
    p.extend_from_slice(&(response.len() as u32).to_be_bytes());
    p.extend_from_slice(response.as_bytes());
    p.extend_from_slice(b"\x05en_US");
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&(p.len() as u32).to_be_bytes());
    frame.extend_from_slice(&p);
    frame.push(0xCE);
    s.write_all(&frame).await.unwrap();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), lines.next_line()).await
    {
        let done = line.contains("authentication failed");
        seen.push(line);
        if done {
            break;
        }
    }
    let all = seen.join("\n");
    assert!(
        !all.contains('\u{1b}'),
        "colour codes in a piped log:\n{all}"
    );
    assert!(all.contains("authentication failed"), "{all}");
    assert!(
        !seen.iter().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line:\n{all}"
    );
    assert!(
        all.contains("bob\\n2026"),
        "the name is shown escaped:\n{all}"
    );
    child.kill().await.unwrap();
}

/// A command that cannot reach the broker says so in one line, naming the
/// address it dialed and how to dial another, with no backtrace even when
/// `RUST_BACKTRACE=1` is set (as many Rust developers have it).
#[test]
fn an_unreachable_broker_is_one_line_naming_the_address() {
    let dead = "http://127.0.0.1:1";
    for args in [
        &["cluster", "status"][..],
        &["queues"],
        &["exchanges"],
        &["plugins"],
        &["users", "list"],
        &["vhosts", "list"],
        &["policies", "list"],
        &["permissions", "list"],
        &["definitions", "export"],
        &["get", "q"],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("WASMQ_ADMIN_URL", dead)
            .arg("--url")
            .arg(dead)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.lines().count() <= 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(dead) && stderr.contains("WASMQ_ADMIN_URL"),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.to_lowercase().contains("backtrace"),
            "{args:?}: {stderr}"
        );
    }
}
