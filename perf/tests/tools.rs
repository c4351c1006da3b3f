//! The load tools against the real broker: they connect, move messages and
//! report, so a figure in docs/performance.md can be reproduced.

use std::process::Command;

use wasmq_tests::TestServer;

const PING: &str = env!("CARGO_BIN_EXE_wasmq-ping");
const PERF: &str = env!("CARGO_BIN_EXE_wasmq-perf");

/// Run a tool to the end (off the runtime's threads, which serve the
/// broker); it must succeed. Returns its standard output.
async fn run(bin: &'static str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(bin).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{bin} {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    })
    .await
    .unwrap()
}

/// The number after `name` in the summary line both tools end with
/// (`summary: sent N msg/s, received N msg/s, ...`).
fn summary_field(out: &str, name: &str) -> f64 {
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with("summary: sent"), "{out}");
    let at = summary.find(name).unwrap() + name.len();
    summary[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_delivers_every_message_and_reports_percentiles() {
    let t = TestServer::start().await;
    let addr = t.addr().to_string();
    // A loaded test machine may be slow to deliver; the probe stops as soon
    // as everything is in. It fails (non-zero) if any message is missing.
    let out = run(
        PING,
        &[
            "--addr", &addr, "--rate", "2000", "-z", "1", "--drain", "30",
        ],
    )
    .await;
    assert!(out.lines().last().unwrap().contains("p99"), "{out}");
    let sent = summary_field(&out, "sent");
    assert!(
        sent > 500.0,
        "paced at 2000/s for 1 s, sent {sent}/s: {out}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_paced_run_receives_what_it_sends() {
    let t = TestServer::start().await;
    let uri = t.url();
    let out = run(
        PERF,
        &["--uri", &uri, "--rate", "2000", "--auto-ack", "-z", "1"],
    )
    .await;
    assert!(summary_field(&out, "sent") > 500.0, "{out}");
    assert!(summary_field(&out, "received") > 500.0, "{out}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_unpaced_reports_a_delivered_rate() {
    let t = TestServer::start().await;
    let addr = t.addr().to_string();
    let out = run(
        PING,
        &["--addr", &addr, "--rate", "0", "-s", "1024", "-z", "1"],
    )
    .await;
    assert!(summary_field(&out, "received") > 1000.0, "{out}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_through_fanout_and_topic_exchanges_delivers_every_copy() {
    let t = TestServer::start().await;
    let addr = t.addr().to_string();
    for extra in [
        &["--exchange-type", "fanout", "--queues", "3"][..],
        &[
            "--exchange-type",
            "topic",
            "--queues",
            "3",
            "--bindings-per-queue",
            "4",
        ],
    ] {
        let mut args = vec![
            "--addr", &addr, "--rate", "1000", "-z", "1", "--drain", "30",
        ];
        args.extend_from_slice(extra);
        // The probe exits non-zero unless every delivery (three per message
        // through the fanout, one through the topic exchange) arrives.
        let out = run(PING, &args).await;
        assert!(summary_field(&out, "sent") > 0.0, "{out}");
    }
    t.stop().await;
}
