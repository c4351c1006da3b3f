//! The plugin author's whole loop against a real broker, as the guest SDK's
//! README walks it: a plugin scaffolded and built from a temporary folder,
//! a shadow run that finds a planted disagreement, a canary rolled back on
//! its own after a planted fault, a promotion and a rollback to the kept
//! version, and a trace that names the filter that dropped a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use wasmq::admin::client::AdminClient;
use wasmq::admin::model::{CandidateView, PluginView, RolloutsView};
use wasmq::author::trace::{Step, Trace};

mod common;
use common::{BIN, Broker};

/// Run `wasmq ARGS`; its stdout, or a panic with its stderr.
fn wasmq(url: &str, target: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("WASMQ_ADMIN_URL", url)
        // The plugin's own build: not the workspace's target folder, which
        // the test run holds.
        .env("CARGO_TARGET_DIR", target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wasmq {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// [`wasmq`] off the test's async workers (a CLI call waits on the broker
/// this test also talks to).
async fn cli(url: &str, target: &Path, args: &[&str]) -> String {
    let (url, target) = (url.to_owned(), target.to_owned());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        wasmq(&url, &target, &args)
    })
    .await
    .unwrap()
}

/// Edit the scaffolded router's `route` and build it; returns a copy of the
/// built file (each build overwrites the last).
fn build_variant(
    url: &str,
    work: &Path,
    crate_dir: &Path,
    tag: &str,
    route_prelude: &str,
) -> PathBuf {
    let lib = crate_dir.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib).unwrap();
    let marker = "    fn route(&mut self, message: &Message<'_>, out: &mut Destinations) {\n";
    let start = text.find(marker).expect("the stub's route") + marker.len();
    // Drop a previous variant's prelude (it ends at the stub's loop).
    let rest = &text[start..];
    let body = &rest[rest
        .find("        for (id, key) in &self.bindings {")
        .unwrap()..];
    let edited = format!("{}{route_prelude}{body}", &text[..start]);
    std::fs::write(&lib, edited).unwrap();
    let out = wasmq(
        url,
        &work.join("target"),
        &["plugin", "build", crate_dir.to_str().unwrap()],
    );
    assert!(out.contains("result:      valid"), "{out}");
    let built = work.join("target/wasmq/loop-router.wasm");
    let copy = work.join(format!("{tag}.wasm"));
    std::fs::copy(&built, &copy).unwrap();
    copy
}

fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), AMQPValue::LongString((*v).into()));
    }
    t
}

async fn publish(ch: &Channel, key: &str, headers: &[(&str, &str)]) {
    ch.basic_publish(
        "loop".into(),
        key.into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default().with_headers(table(headers)),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn count(ch: &Channel, queue: &str) -> usize {
    let mut n = 0;
    while ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .is_some()
    {
        n += 1;
    }
    n
}

fn serving(api: &AdminClient, name: &str) -> String {
    let p: PluginView = api.get_as(&format!("/api/plugins/{name}")).unwrap();
    p.hash.unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaffold_build_shadow_canary_rollback_and_trace() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let plugins = work.join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let crate_dir = work.join("loop-router");
    let filter_dir = work.join("loop-filter");
    let target = work.join("target");
    let none = "http://127.0.0.1:1";

    // Scaffold and build a router and a filter, outside the workspace.
    let out = wasmq(
        none,
        &target,
        &[
            "plugin",
            "new",
            "loop-router",
            "--role",
            "router",
            "--dir",
            crate_dir.to_str().unwrap(),
        ],
    );
    assert!(out.contains("src/lib.rs"), "{out}");
    wasmq(
        none,
        &target,
        &[
            "plugin",
            "new",
            "loop-filter",
            "--role",
            "filter",
            "--dir",
            filter_dir.to_str().unwrap(),
        ],
    );
    let stable = build_variant(none, work, &crate_dir, "stable", "");
    let out = wasmq(
        none,
        &target,
        &["plugin", "build", filter_dir.to_str().unwrap()],
    );
    assert!(
        out.contains("roles:       filter") && out.contains("self-test:   4 messages"),
        "{out}"
    );
    std::fs::copy(&stable, plugins.join("loop-router.wasm")).unwrap();
    std::fs::copy(
        target.join("wasmq/loop-filter.wasm"),
        plugins.join("loop-filter.wasm"),
    )
    .unwrap();

    let data = tempfile::tempdir().unwrap();
    // Faults here are planted panics; a call's deadline is not what is
    // tested, so a thread that a loaded machine preempts for a few
    // milliseconds must not count as one.
    let config = data.path().join("wasmq.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nplugin_dir = {:?}\n[plugins]\ncall_deadline_ms = 1000\n",
            data.path().join("data"),
            plugins
        ),
    )
    .unwrap();
    let mut broker = Broker::spawn_config(&config);
    let (amqp, admin) = broker.ready().await;
    let url = format!("http://{admin}");
    let api = AdminClient::new(&url, "guest", "guest");
    let conn = Connection::connect(
        &format!("amqp://guest:guest@{amqp}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "loop".into(),
        ExchangeKind::Custom("loop-router".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (queue, key, args) in [
        ("orders", "orders", FieldTable::default()),
        ("audit", "audit", FieldTable::default()),
        (
            "tenants",
            "orders",
            table(&[
                ("x-wasmq-filter", "loop-filter"),
                ("x-require-header", "tenant"),
            ]),
        ),
    ] {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), durable, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            queue.into(),
            "loop".into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .unwrap();
    }
    let stable_hash = serving(&api, "loop-router");

    // Capture live traffic and the definitions, to test new builds on.
    let capture = std::process::Command::new(BIN)
        .args(["capture", "loop", "--count", "4", "--timeout", "20"])
        .env("WASMQ_ADMIN_URL", &url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the capture started", || {
        api.get("/api/exchanges/%2F/loop/capture").is_ok()
    })
    .await;
    for (key, headers) in [
        ("orders", &[("tenant", "acme")][..]),
        ("vip", &[][..]),
        ("audit", &[][..]),
        ("orders", &[][..]),
    ] {
        publish(&ch, key, headers).await;
    }
    let captured = tokio::task::spawn_blocking(move || capture.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(captured.status.success());
    let msgs = work.join("msgs.jsonl");
    std::fs::write(&msgs, &captured.stdout).unwrap();
    assert_eq!(String::from_utf8_lossy(&captured.stdout).lines().count(), 4);
    let defs = work.join("defs.json");
    let exported = cli(&url, &target, &["definitions", "export"]).await;
    std::fs::write(&defs, exported).unwrap();
    for q in ["orders", "audit", "tenants"] {
        count(&ch, q).await;
    }

    // Shadow a version with a planted disagreement: it sends "vip" to
    // every binding, the serving one nowhere.
    let vip = build_variant(
        none,
        work,
        &crate_dir,
        "vip",
        "        if message.routing_key() == \"vip\" {\n            wasmq_sdk::log::info(\"vip goes everywhere\");\n            for (id, _) in &self.bindings {\n                out.push(*id);\n            }\n            return;\n        }\n",
    );
    // Offline first: the new build against the captured messages, alone
    // and against the version the broker serves.
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let (vip_file, defs_file, msgs_file, plugin_dir) =
        (path(&vip), path(&defs), path(&msgs), path(&plugins));
    let test = [
        "plugin",
        "test",
        &vip_file,
        "--name",
        "loop-router",
        "--exchange-definitions",
        &defs_file,
        "--messages",
        &msgs_file,
        "--plugin-dir",
        &plugin_dir,
    ];
    let offline = (
        cli(&url, &target, &test).await,
        cli(
            &url,
            &target,
            &[&test[..], &["--against", "serving"]].concat(),
        )
        .await,
    );
    assert!(
        offline
            .0
            .contains("#1 'orders' to 'loop': queues orders, tenants")
            && offline
                .0
                .contains("#2 'vip' to 'loop': queues audit, orders")
            && offline.0.contains("4 messages decided by loop-router@"),
        "{}",
        offline.0
    );
    assert!(
        offline.1.contains("1 of 4 messages decided differently") && offline.1.contains("#2 'vip'"),
        "{}",
        offline.1
    );

    let stage_shadow = ["plugin", "shadow", "loop-router", &vip_file];
    let out = cli(
        &url,
        &target,
        &[&stage_shadow[..], &["--sample", "1"]].concat(),
    )
    .await;
    assert!(out.contains("shadow, 1 in 1"), "{out}");
    // Follow the plugin's log while the shadow runs.
    let mut follower = std::process::Command::new(BIN)
        .args(["plugin", "logs", "loop-router", "--follow"])
        .env("WASMQ_ADMIN_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, followed) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(follower.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(follower.stderr.take().unwrap()),
    ] {
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let next_line = || {
        followed
            .recv_timeout(Duration::from_secs(20))
            .expect("a line from the follower")
    };
    // It says so once the broker has subscribed it.
    assert!(next_line().starts_with("following the log of 'loop-router'"));
    for _ in 0..10 {
        publish(&ch, "orders", &[("tenant", "acme")]).await;
    }
    for _ in 0..3 {
        publish(&ch, "vip", &[]).await;
    }
    let shadow = || -> CandidateView { api.get_as("/api/plugins/loop-router/candidate").unwrap() };
    eventually("13 comparisons", || {
        let c = shadow();
        c.agreements + c.disagreements == 13
    })
    .await;
    let c = shadow();
    assert_eq!((c.agreements, c.disagreements, c.faults), (10, 3, 0));
    let d = &c.disagreement_samples[0];
    assert_eq!((d.routing_key.as_str(), d.role.as_str()), ("vip", "router"));
    assert_eq!(d.serving, "(no binding)");
    assert!(
        d.candidate.contains("queue:orders") && d.candidate.contains("queue:audit"),
        "{d:?}"
    );
    // The candidate's log lines, live, with its name and version.
    let lines: Vec<String> = (0..3).map(|_| next_line()).collect();
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let candidate_version = format!("loop-router@{}: vip goes everywhere", &c.hash[..12]);
    assert!(
        lines
            .iter()
            .all(|l| l.contains("info") && l.contains(&candidate_version)),
        "{lines:?}"
    );
    let metrics = api.get_text("/metrics").unwrap();
    assert!(
        metrics.contains("wasmq_plugin_log_lines_total{plugin=\"loop-router\",level=\"info\"} 3"),
        "{metrics}"
    );
    // Never applied: the serving version decided every message.
    assert_eq!(count(&ch, "orders").await, 10);
    assert_eq!(count(&ch, "audit").await, 0);
    assert_eq!(count(&ch, "tenants").await, 10);

    // A canary with a planted fault on "boom", for every key: the fault is
    // answered by the serving version, and the canary is rolled back.
    let boom = build_variant(
        none,
        work,
        &crate_dir,
        "boom",
        "        if message.routing_key() == \"boom\" {\n            panic!(\"planted fault\");\n        }\n",
    );
    let canary = [
        "plugin",
        "canary",
        "loop-router",
        &path(&boom),
        "--percent",
        "100",
        "--max-fault-rate",
        "0.01",
    ];
    cli(&url, &target, &canary).await;
    for _ in 0..5 {
        publish(&ch, "orders", &[]).await;
    }
    publish(&ch, "boom", &[]).await;
    let rollouts = || -> RolloutsView { api.get_as("/api/rollouts").unwrap() };
    eventually("the canary rolled back", || {
        rollouts()
            .transitions
            .iter()
            .any(|t| t.event == wasmq::author::candidate::Event::RolledBack)
    })
    .await;
    let r = rollouts();
    assert!(r.candidates.is_empty());
    let back = r.transitions.last().unwrap();
    assert!(
        back.reason.as_deref().unwrap().contains("fault rate 1/6"),
        "{back:?}"
    );
    assert_eq!(serving(&api, "loop-router"), stable_hash);
    assert_eq!(
        count(&ch, "orders").await,
        5,
        "the canary's share was delivered"
    );
    let listed = cli(&url, &target, &["plugins"]).await;
    assert!(
        listed.contains("canary_started at") && listed.contains("rolled_back at"),
        "{listed}"
    );
    let metrics = api.get_text("/metrics").unwrap();
    assert!(
        metrics.contains(
            "wasmq_plugin_rollout_transitions_total{plugin=\"loop-router\",event=\"rolled_back\"} 1"
        ),
        "{metrics}"
    );

    // Promote the vip version by hand, then roll back to the kept one.
    cli(&url, &target, &stage_shadow).await;
    let out = (
        cli(&url, &target, &["plugin", "promote", "loop-router"]).await,
        cli(&url, &target, &["plugin", "versions", "loop-router"]).await,
        cli(&url, &target, &["plugin", "rollback", "loop-router"]).await,
    );
    assert!(!out.0.contains(&stable_hash), "{}", out.0);
    assert!(
        out.1.contains(&stable_hash) && out.1.contains("(serving)"),
        "{}",
        out.1
    );
    assert!(out.2.contains(&stable_hash), "{}", out.2);
    assert_eq!(serving(&api, "loop-router"), stable_hash);
    assert_eq!(
        std::fs::read(plugins.join("loop-router.wasm")).unwrap(),
        std::fs::read(&stable).unwrap(),
        "the folder holds what serves, so a restart serves it too"
    );

    // Why did an order without a tenant not reach "tenants"?
    let printed = (
        cli(&url, &target, &["trace", "loop", "--key", "orders"]).await,
        cli(
            &url,
            &target,
            &["trace", "loop", "--key", "orders", "--json"],
        )
        .await,
    );
    let trace: Trace = serde_json::from_str(&printed.1).unwrap();
    assert_eq!(trace.queues, ["orders"]);
    let dropped = trace.steps.iter().find_map(|s| match s {
        Step::Filter {
            plugin,
            destination,
            passed: false,
            ..
        } => Some((plugin.clone(), destination.clone())),
        _ => None,
    });
    assert_eq!(
        dropped,
        Some(("loop-filter".into(), "tenants".into())),
        "{trace:?}"
    );
    assert!(
        printed.0.contains("filter loop-filter@")
            && printed.0.contains("'tenants' (key 'orders'): DROP"),
        "{}",
        printed.0
    );
    assert_eq!(count(&ch, "orders").await, 0, "a trace enqueues nothing");

    // A publish carrying x-wasmq-trace is delivered and its trace kept.
    publish(&ch, "orders", &[("x-wasmq-trace", "1"), ("tenant", "acme")]).await;
    let kept: Vec<Trace> = api.get_as("/api/traces").unwrap();
    assert_eq!(kept.len(), 1);
    assert!(!kept[0].dry);
    let mut reached = kept[0].queues.clone();
    reached.sort();
    assert_eq!(reached, ["orders", "tenants"]);
    assert_eq!(count(&ch, "orders").await, 1);
    broker.kill().await;
}

/// The binary carries the guest SDK: copied alone to a folder with no
/// wasmq checkout, it scaffolds a plugin crate (the SDK written into it)
/// that builds, passes the broker's checks and loads into a broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_binary_scaffolds_a_plugin_that_builds_without_a_checkout() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let bin = work.join("bin").join("wasmq");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(BIN, &bin).unwrap();
    let target = work.join("target");
    let run = |args: &[&str]| {
        let out = Command::new(&bin)
            .args(args)
            .current_dir(work)
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wasmq {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["plugin", "new", "far-away", "--role", "filter"]);
    let manifest = std::fs::read_to_string(work.join("far-away/Cargo.toml")).unwrap();
    assert!(manifest.contains("vendor/wasmq-sdk"), "{manifest}");
    assert!(!manifest.contains(env!("CARGO_MANIFEST_DIR")), "{manifest}");
    let out = run(&["plugin", "build", "far-away"]);
    assert!(
        out.contains("roles:       filter") && out.contains("self-test:"),
        "{out}"
    );
    let built = target.join("wasmq/far-away.wasm");
    let out = run(&["plugin", "check", built.to_str().unwrap()]);
    assert!(out.contains("filter"), "{out}");

    // Dropped into a broker's plugin folder, it is loaded and serves.
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&built, plugins.join("far-away.wasm")).unwrap();
    let mut broker = Broker::spawn(&work.join("data"), &plugins);
    let (_, admin) = broker.ready().await;
    let api = AdminClient::new(&format!("http://{admin}"), "guest", "guest");
    let loaded = tokio::task::spawn_blocking(move || {
        let plugins: Vec<PluginView> = api.get_as("/api/plugins").unwrap();
        plugins.into_iter().find(|p| p.name == "far-away")
    })
    .await
    .unwrap()
    .expect("the broker lists far-away");
    assert!(
        loaded.rejection.is_none() && loaded.roles.as_deref() == Some("filter"),
        "{loaded:?}"
    );
    broker.kill().await;
}
