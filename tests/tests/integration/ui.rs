//! The web management UI in a real browser: Debian's Chromium, headless,
//! driven by playwright-core (`tests/node/ui.mjs`) against the real
//! broker. It logs in (a wrong password first), sees a queue declared over
//! AMQP with its message count, pages, sorts and filters 251 queues
//! through the broker, opens a queue's page (peeks, publishes, purges,
//! deletes another), sees an exchange with its type, traces a message and
//! opens its page (bindings with their filters),
//! a plugin with its hash, stages a canary of it from a file and aborts
//! it on its page and sees its log lines arrive live, the connections and
//! channels (and closes a connection), and on the admin page adds a user,
//! sets its permissions, adds a policy, sees a refused one's reason and
//! deletes the policy and the user, logs out, and no page logs a
//! JavaScript error. Screenshots of each page are kept in `target/ui-screenshots/`.
//!
//! `scripts/test.sh` installs Chromium (Debian's package) when missing and
//! playwright-core (`tests/node/package.json`) under `target/amqplib`.

use std::path::PathBuf;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use wasmq_tests::{TestServer, publish_confirmed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_the_broker_in_a_real_browser() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "ui.orders".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    wasmq_tests::declare_queue(&ch, "ui.ledger").await;
    ch.queue_bind(
        "ui.ledger".into(),
        "ui.orders".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..3 {
        assert!(publish_confirmed(&ch, "ui.orders", "o.1", b"x", BasicProperties::default()).await);
    }
    // Enough queues for three pages of the queues view.
    let vhost = server.broker().vhost("/").unwrap();
    for i in 0..250 {
        server
            .broker()
            .declare_queue(
                &vhost,
                wasmq::broker::QueueDecl {
                    name: format!("ui.page.{i:03}"),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    // A policy for the admin page to list.
    let admin = server.admin();
    tokio::task::spawn_blocking(move || {
        admin.put(
            "/api/policies/%2F/ui-cap",
            &serde_json::json!({"pattern": "^ui\\.page\\.", "apply-to": "queues",
                                "definition": {"max-length": 1000}}),
        )
    })
    .await
    .unwrap()
    .unwrap();
    // A plugin to stage a canary of from the browser: the candidate is the
    // same filter with one more custom section (another content hash).
    server.install("ui-filter", "json-filter");
    let mut candidate = wasmq_tests::plugin_bytes("json-filter");
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: "wasmq-ui-test".into(),
            data: b"candidate".as_slice().into(),
        },
        &mut candidate,
    );
    let mut filter = FieldTable::default();
    filter.insert(
        "x-wasmq-filter".into(),
        AMQPValue::LongString("ui-filter".into()),
    );
    filter.insert(
        "x-filter-field".into(),
        AMQPValue::LongString("region".into()),
    );
    filter.insert("x-filter-equals".into(), AMQPValue::LongString("eu".into()));
    ch.queue_bind(
        "ui.page.001".into(),
        "ui.orders".into(),
        "eu.#".into(),
        QueueBindOptions::default(),
        filter,
    )
    .await
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let candidate_file = work.path().join("ui-filter.wasm");
    std::fs::write(&candidate_file, candidate).unwrap();
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let admin = server.admin().base().to_owned();
    let args = [&admin, "guest", "guest", "ui.ledger", "ui.orders"]
        .map(std::ffi::OsString::from)
        .into_iter()
        .chain([
            shots.clone().into_os_string(),
            candidate_file.clone().into_os_string(),
        ]);
    // A spare connection for the browser to close.
    let spare = server.connect().await;
    // Lines in the plugin's log while the browser watches it (the host's
    // own log of the plugin, which a guest's `wasmq_sdk::log` writes to).
    let log = server.broker().host().plugin_log("ui-filter");
    let writer = tokio::spawn(async move {
        for n in 0u64.. {
            log.write("ui-filter", "test", 3, format!("live line {n}"));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    wasmq_tests::run_node_script("ui.mjs", args, Duration::from_secs(120)).await;
    writer.abort();
    assert!(
        !spare.status().connected(),
        "the browser closed the spare connection"
    );
    for page in [
        "overview",
        "queues",
        "queue",
        "exchanges",
        "exchange",
        "plugins",
        "connections",
        "admin",
        "plugin",
    ] {
        assert!(shots.join(format!("{page}.png")).is_file(), "{page}.png");
    }
    drop(conn);
}
