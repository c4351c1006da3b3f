//! Clients other than lapin: the broker's promise is that the AMQP
//! clients people already use work unchanged. `tests/python/pika_client.py`
//! drives RabbitMQ's Python client (pika) through confirms, mandatory
//! returns, topic routing, nack and redelivery, headers, a channel error and
//! transactions against a broker started here.
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
    let python = std::env::var("WASMQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pika_client.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(t.addr().port().to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the pika client finishes within 60 s")
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stderr.contains("No module named 'pika'"),
        "pika is not installed for {python}: run ./scripts/test.sh, or pip install pika"
    );
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "pika client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
