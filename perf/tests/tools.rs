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
        run(bin, &["--addr", &addr, "--rate", "2000", "-z", "1"])
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
