//! The load tools against the real broker: they connect, move messages and
//! report, so a figure in docs/performance.md can be reproduced.

use std::process::Command;

use wasmq_tests::TestServer;

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_delivers_every_message_and_reports_percentiles() {
    let t = TestServer::start().await;
    let addr = t.addr().to_string();
    let bin = env!("CARGO_BIN_EXE_wasmq-ping");
    let out = tokio::task::spawn_blocking(move || {
        // A loaded test machine may be slow to deliver; the probe stops as
        // soon as everything is in.
        run(
            bin,
            &[
                "--addr", &addr, "--rate", "2000", "-z", "1", "--drain", "30",
            ],
        )
    })
    .await
    .unwrap();
    // The probe fails (non-zero) if any message is missing; the summary
    // names the rate it sent and the percentiles.
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with("summary: sent"), "{out}");
    assert!(summary.contains("p99"), "{out}");
    let sent: f64 = summary.split_whitespace().nth(2).unwrap().parse().unwrap();
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
    let bin = env!("CARGO_BIN_EXE_wasmq-perf");
    let out = tokio::task::spawn_blocking(move || {
        run(
            bin,
            &["--uri", &uri, "--rate", "2000", "--auto-ack", "-z", "1"],
        )
    })
    .await
    .unwrap();
    let summary = out.lines().last().unwrap();
    let field = |name: &str| -> f64 {
        let at = summary.find(name).unwrap() + name.len();
        summary[at..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(field("sent") > 500.0, "{out}");
    assert!(field("received") > 500.0, "{out}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_unpaced_reports_a_delivered_rate() {
    let t = TestServer::start().await;
    let addr = t.addr().to_string();
    let bin = env!("CARGO_BIN_EXE_wasmq-ping");
    let out = tokio::task::spawn_blocking(move || {
        run(
            bin,
            &["--addr", &addr, "--rate", "0", "-s", "1024", "-z", "1"],
        )
    })
    .await
    .unwrap();
    let summary = out.lines().last().unwrap();
    let received: f64 = summary.split_whitespace().nth(5).unwrap().parse().unwrap();
    assert!(received > 1000.0, "{out}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_through_fanout_and_topic_exchanges_delivers_every_copy() {
    let t = TestServer::start().await;
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
        let addr = t.addr().to_string();
        let bin = env!("CARGO_BIN_EXE_wasmq-ping");
        let mut args = vec![
            "--addr", &addr, "--rate", "1000", "-z", "1", "--drain", "30",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // The probe exits non-zero unless every delivery (three per message
        // through the fanout, one through the topic exchange) arrives.
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(bin, &args)
        })
        .await
        .unwrap();
        assert!(out.lines().last().unwrap().starts_with("summary"), "{out}");
    }
    t.stop().await;
}
