//! Clients other than lapin: the broker's promise is that the AMQP
//! clients people already use work unchanged. `tests/python/pika_client.py`
//! drives RabbitMQ's Python client (pika) through confirms, mandatory
//! returns, topic routing, nack and redelivery, headers, a channel error,
//! transactions and a delayed exchange against a broker started here.
//!
//! `scripts/test.sh` installs pika in a virtualenv and names its Python in
//! `WASMQ_PYTHON`; without it the test uses `python3`, which needs pika
//! installed (`pip install pika`).

use std::path::Path;
use std::time::Duration;

use wasmq_tests::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pika_works_unchanged() {
    let t = TestServer::start().await;
    wasmq_tests::run_pika_script("pika_client.py", [t.addr().port().to_string()]).await;
}

/// amqplib's own live-broker test suites (`test/channel_api.js`,
/// `test/callback_api.js`, `test/connect.js` from its npm package, run with
/// its mocha) against this broker. Two tests are skipped, each for a reason
/// that is not a behaviour a client relies on:
///
/// * `serverProperties` asserts that the server's product is `RabbitMQ`
///   (wasmq says `wasmq`);
/// * `ipv6` dials `[::1]:5672`, and the broker listens on 127.0.0.1 (IPv4
///   loopback by default; exposing it otherwise is a deliberate act).
///
/// Some of the suites' connection tests dial the default address,
/// `amqp://localhost:5672`, so this broker listens there.
///
/// `scripts/test.sh` installs the suites (`tests/node/package.json`) under
/// `target/amqplib` and names that folder in `WASMQ_AMQPLIB`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplibs_own_test_suites_pass() {
    const SKIPPED: &str = "serverProperties|ipv6";
    let dir = std::env::var("WASMQ_AMQPLIB").unwrap_or_else(|_| {
        panic!("amqplib's suites are not installed: run ./scripts/test.sh (it sets WASMQ_AMQPLIB)")
    });
    let dir = Path::new(&dir);
    let t = TestServer::start_with(|c| {
        c.listen = "127.0.0.1:5672".parse().unwrap();
    })
    .await;
    let suites = dir.join("node_modules/amqplib/test");
    let run = tokio::process::Command::new(dir.join("node_modules/.bin/mocha"))
        .current_dir(dir.join("node_modules/amqplib"))
        .args(["--check-leaks", "-u", "tdd", "--exit", "--reporter", "spec"])
        .args(["--grep", SKIPPED, "--invert"])
        .args(["channel_api.js", "callback_api.js", "connect.js"].map(|f| suites.join(f)))
        .env("URL", format!("amqp://guest:guest@{}", t.addr()))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("amqplib's suites finish within 300 s")
        .expect("running mocha");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // mocha's summary: "  74 passing (4s)", "  2 failing".
    let count = |word: &str| {
        stdout
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let n = w.next()?.parse::<u32>().ok()?;
                (w.next()? == word).then_some(n)
            })
            .unwrap_or(0)
    };
    let (passing, failing) = (count("passing"), count("failing"));
    println!("amqplib suites: {passing} passing, {failing} failing, 2 skipped ({SKIPPED})");
    assert!(
        out.status.success() && failing == 0 && passing >= 70,
        "amqplib's suites: {passing} passing, {failing} failing ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
