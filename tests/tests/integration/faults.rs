//! Every fault kind a plugin can commit: the broker survives, the message
//! gets a defined outcome, other exchanges keep serving, and bad files are
//! rejected while the previous version keeps serving.

use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;
use wasmq::plugin::{PluginFault, PluginLimits};
use wasmq_tests::{TestBroker, header, plugin_bytes, table, with_self_test};

fn limits() -> PluginLimits {
    PluginLimits {
        deadline: Duration::from_millis(20),
        memory: 4 << 20,
        circuit_threshold: 3,
        circuit_cooldown: Duration::from_millis(300),
        ..PluginLimits::default()
    }
}

/// A broker with a `faulty` exchange bound to queue `ok`, and a healthy
/// topic exchange bound to queue `other`.
fn setup(dlx: bool) -> TestBroker {
    let t = TestBroker::with_limits(limits());
    t.install("faulty", "faulty");
    let args = if dlx {
        t.exchange("dlx", "fanout", FieldTable::default());
        t.queue("dead");
        t.bind("dlx", "dead", "", FieldTable::default());
        table(&[("x-dead-letter-exchange", "dlx")])
    } else {
        FieldTable::default()
    };
    t.exchange("bad", "faulty", args);
    t.queue("ok");
    t.bind("bad", "ok", "", FieldTable::default());
    t.exchange("good", "topic", FieldTable::default());
    t.queue("other");
    t.bind("good", "other", "#", FieldTable::default());
    t
}

fn fault_of(t: &TestBroker, key: &str) -> PluginFault {
    let out = t.publish("bad", key, b"", FieldTable::default());
    assert_eq!(out.delivered, 0);
    assert_eq!(out.faults.len(), 1, "{out:?}");
    assert_eq!(out.faults[0].exchange, "bad");
    out.faults[0].fault.clone()
}

#[test]
fn each_fault_kind_is_reported_and_the_instance_recovers() {
    let t = setup(false);
    let started = Instant::now();
    for (key, kind) in [
        ("trap", "trap"),
        ("loop", "deadline"),
        ("memory", "memory"),
        ("malformed", "malformed"),
    ] {
        let fault = fault_of(&t, key);
        assert_eq!(fault.kind(), kind, "{key}: {fault:?}");
        // The instance was discarded and rebuilt with its bindings replayed:
        // the next message routes normally.
        assert_eq!(
            t.publish("bad", "fine", b"", FieldTable::default())
                .delivered,
            1,
            "after {key}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline stopped the loop"
    );
    assert_eq!(t.depth("ok"), 4);
    // The other exchange never noticed.
    assert_eq!(
        t.publish("good", "x", b"", FieldTable::default()).delivered,
        1
    );
    let faults = t
        .broker
        .plugins()
        .list()
        .into_iter()
        .find(|p| p.name == "faulty")
        .unwrap()
        .faults;
    assert_eq!(faults, 4);
}

#[test]
fn faulted_messages_are_dead_lettered_with_the_reason() {
    let t = setup(true);
    let out = t.publish("bad", "trap", b"payload", FieldTable::default());
    assert!(
        out.faults.is_empty(),
        "dead-lettered, so nothing to report: {out:?}"
    );
    assert_eq!(out.dead_lettered, 1);
    let dead = t.drain("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], b"payload");
    assert_eq!(header(&dead[0], "x-wasmq-fault").as_deref(), Some("trap"));
    assert_eq!(
        header(&dead[0], "x-wasmq-fault-exchange").as_deref(),
        Some("bad")
    );
    assert_eq!(
        header(&dead[0], "x-wasmq-fault-plugin").as_deref(),
        Some("faulty")
    );
    assert!(
        header(&dead[0], "x-wasmq-fault-reason")
            .unwrap()
            .contains("trapped")
    );
}

#[test]
fn repeated_faults_open_the_circuit_then_it_closes() {
    let t = setup(false);
    for _ in 0..3 {
        assert!(matches!(fault_of(&t, "trap"), PluginFault::Trap(_)));
    }
    // Open: refused without running the plugin, even for a good message.
    assert!(matches!(fault_of(&t, "fine"), PluginFault::CircuitOpen(_)));
    assert!(t.vhost().exchange("bad").unwrap().router().circuit_open());
    assert_eq!(
        t.publish("good", "x", b"", FieldTable::default()).delivered,
        1
    );
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(
        t.publish("bad", "fine", b"", FieldTable::default())
            .delivered,
        1
    );
    assert!(!t.vhost().exchange("bad").unwrap().router().circuit_open());
}

#[test]
fn a_stuck_plugin_does_not_slow_other_exchanges_down() {
    // A long deadline makes "blocked behind the stuck exchange" (>= 200 ms)
    // unmistakable from scheduling noise on a busy 2-core machine.
    let t = TestBroker::with_limits(PluginLimits {
        deadline: Duration::from_millis(200),
        ..limits()
    });
    t.install("faulty", "faulty");
    t.exchange("bad", "faulty", FieldTable::default());
    t.exchange("good", "topic", FieldTable::default());
    t.queue("other");
    t.bind("good", "other", "#", FieldTable::default());
    let looping = {
        let b = t.broker.clone();
        std::thread::spawn(move || {
            let v = b.vhost("/").unwrap();
            for _ in 0..3 {
                let m = wasmq::Message::new("bad", "loop", Default::default(), Vec::new());
                let _ = b.publish(&v, "bad", m);
            }
        })
    };
    let mut worst = Duration::ZERO;
    for _ in 0..200 {
        let started = Instant::now();
        assert_eq!(
            t.publish("good", "a.b", b"", FieldTable::default())
                .delivered,
            1
        );
        worst = worst.max(started.elapsed());
    }
    looping.join().unwrap();
    // Not a timing assertion on speed: only that the healthy exchange never
    // waited behind the looping one's deadline (20 ms) or its rebuilds.
    assert!(
        worst < Duration::from_millis(20),
        "healthy exchange waited {worst:?}"
    );
}

#[test]
fn filter_and_transform_faults_have_outcomes_too() {
    let t = setup(false);
    t.exchange("tx", "direct", table(&[("x-wasmq-transform", "faulty")]));
    t.queue("tq");
    t.bind("tx", "tq", "trap", FieldTable::default());
    t.bind("tx", "tq", "k", FieldTable::default());
    let out = t.publish("tx", "trap", b"", FieldTable::default());
    assert_eq!(out.faults.len(), 1);
    assert_eq!(out.faults[0].plugin, "faulty");
    assert_eq!(
        t.publish("tx", "k", b"", FieldTable::default()).delivered,
        1
    );

    t.exchange("fx", "fanout", FieldTable::default());
    t.queue("fq");
    t.queue("plain");
    t.bind("fx", "fq", "", table(&[("x-wasmq-filter", "faulty")]));
    t.bind("fx", "plain", "", FieldTable::default());
    let out = t.publish("fx", "", b"trap", FieldTable::default());
    // The unfiltered binding still got it; the fault is reported.
    assert_eq!(out.delivered, 1);
    assert_eq!(out.faults.len(), 1);
    assert_eq!(
        t.publish("fx", "", b"ok", FieldTable::default()).delivered,
        2
    );
}

#[test]
fn a_trap_in_init_refuses_the_declaration() {
    let t = TestBroker::with_limits(limits());
    t.install("faulty", "faulty");
    let spec = wasmq::ExchangeSpec {
        name: "x".into(),
        kind: "faulty".into(),
        arguments: table(&[("x-fault-in-init", "trap")]),
        ..Default::default()
    };
    let err = t
        .broker
        .declare_exchange(&t.vhost(), spec, false)
        .unwrap_err();
    assert_eq!(err.reply_code(), 406);
    assert!(err.to_string().contains("trapped"), "{err}");
}

const WRONG_ABI: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "wasmq_abi_version") (result i32) i32.const 2)
  (func (export "wasmq_roles") (result i32) i32.const 1)
  (func (export "wasmq_buffer") (param i32) (result i32) i32.const 1024)
  (func (export "wasmq_init") (param i32 i32) (result i64) i64.const 0))"#;

const WASI: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1))"#;

const NO_ROUTE_EXPORT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "wasmq_abi_version") (result i32) i32.const 1)
  (func (export "wasmq_roles") (result i32) i32.const 1)
  (func (export "wasmq_buffer") (param i32) (result i32) i32.const 1024)
  (func (export "wasmq_init") (param i32 i32) (result i64) i64.const 0))"#;

const HUGE_MEMORY: &str = r#"(module
  (memory (export "memory") 1000)
  (func (export "wasmq_abi_version") (result i32) i32.const 1)
  (func (export "wasmq_roles") (result i32) i32.const 1))"#;

#[test]
fn bad_files_are_rejected_with_a_clear_reason_and_the_old_version_serves() {
    let t = TestBroker::with_limits(limits());
    t.install("mine", "topic");
    t.exchange("x", "mine", FieldTable::default());
    t.queue("q");
    t.bind("x", "q", "a.*", FieldTable::default());
    let good = t.broker.plugins().get("mine").unwrap().hash.clone();

    let truncated = plugin_bytes("topic")[..1000].to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"this is not wasm at all".to_vec(),
            "not a valid Wasm module",
        ),
        ("truncated", truncated, "not a valid Wasm module"),
        (
            "wrong abi",
            wat::parse_str(WRONG_ABI).unwrap(),
            "ABI version 2, but this broker speaks version 1",
        ),
        (
            "wasi",
            wat::parse_str(WASI).unwrap(),
            "wasi_snapshot_preview1::fd_write",
        ),
        (
            "missing export",
            wat::parse_str(NO_ROUTE_EXPORT).unwrap(),
            "wasmq_route",
        ),
        (
            "memory above cap",
            wat::parse_str(HUGE_MEMORY).unwrap(),
            "memory limit",
        ),
        (
            "forty memories (the cap is per memory)",
            wat::parse_str(format!("(module {})", "(memory 1) ".repeat(40))).unwrap(),
            "has 40 memories, more than the 1 a plugin may have",
        ),
        (
            "tables past the element cap",
            wat::parse_str("(module (table 60000 funcref) (table 60000 funcref))").unwrap(),
            "has 120000 table elements",
        ),
        (
            "a function bomb, refused before compiling",
            wat::parse_str(format!("(module {})", "(func) ".repeat(60_000))).unwrap(),
            "has 60000 functions, more than the 50000",
        ),
        (
            "filter as exchange type",
            plugin_bytes("json-filter"),
            "is not a router",
        ),
        (
            "a self-test vector it fails",
            with_self_test(
                &plugin_bytes("direct"),
                r#"{"router": [{"bindings": [{"key": "a"}, {"key": "b"}],
                    "messages": [{"routing_key": "b", "expect": [1]},
                                 {"routing_key": "a", "expect": [1]}]}]}"#,
            ),
            "failed its self-test: router case 0, message 1 (routing key 'a'): expected bindings [1], the plugin chose [0]",
        ),
        (
            "malformed self-test vectors",
            with_self_test(&plugin_bytes("direct"), "{not json"),
            "the self-test section is not valid: key must be a string",
        ),
        (
            "self-test vectors for a role it lacks",
            with_self_test(
                &plugin_bytes("direct"),
                r#"{"filter": [{"messages": [{"expect": "pass"}]}]}"#,
            ),
            "it has filter vectors but no filter role",
        ),
    ];
    for (what, bytes, expect) in cases {
        let err = t.broker.install_plugin("mine", &bytes).unwrap_err();
        assert!(err.contains(expect), "{what}: {err}");
        let status = t
            .broker
            .plugins()
            .list()
            .into_iter()
            .find(|p| p.name == "mine")
            .unwrap();
        assert_eq!(
            status.hash.as_deref(),
            Some(good.as_str()),
            "{what}: old version still serving"
        );
        assert!(status.rejection.is_some());
        assert_eq!(
            t.publish("x", "a.b", b"", FieldTable::default()).delivered,
            1,
            "{what}: still routing"
        );
    }
}

#[test]
fn deadlines_hold_after_the_deadline_clock_has_slept() {
    // Short set-up deadline: the clock parks ~60 ms after the last call.
    let t = TestBroker::with_limits(PluginLimits {
        setup_deadline: Duration::from_millis(50),
        ..limits()
    });
    t.install("faulty", "faulty");
    t.exchange("bad", "faulty", FieldTable::default());
    t.queue("ok");
    t.bind("bad", "ok", "", FieldTable::default());
    assert!(
        wasmq_tests::eventually(Duration::from_secs(5), || t
            .broker
            .host()
            .deadline_clock_idle()),
        "an unused clock goes to sleep"
    );
    // The first call wakes it, and a runaway plugin is still stopped.
    let started = Instant::now();
    assert_eq!(fault_of(&t, "loop").kind(), "deadline");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stopped after {:?}",
        started.elapsed()
    );
    assert!(!t.broker.host().deadline_clock_idle());
    assert_eq!(
        t.publish("bad", "fine", b"", FieldTable::default())
            .delivered,
        1
    );
}

/// Self-test vectors a plugin ships run when each version loads: the
/// built-ins' and the examples' pass, and vectors appended to a plugin
/// that ships none are run too.
#[test]
fn shipped_self_test_vectors_run_at_load() {
    let t = TestBroker::new();
    let checked = |name: &str| t.broker.plugins().get(name).unwrap().self_tests;
    assert_eq!(checked("topic"), 7, "RabbitMQ's topic cases");
    assert_eq!(checked("headers"), 5);
    assert_eq!(checked("direct"), 0, "ships none");
    t.install("json-filter", "json-filter");
    assert_eq!(checked("json-filter"), 6);
    t.install("redact", "redact");
    assert_eq!(checked("redact"), 3);
    t.install("ring", "consistent-hash");
    assert_eq!(checked("ring"), 6, "the pinned key-to-shard mapping");
    let passing = with_self_test(
        &plugin_bytes("direct"),
        r#"{"router": [{"bindings": [{"key": "a"}, {"key": "a"}, {"key": "b"}],
            "messages": [{"routing_key": "a", "expect": [1, 0]}, {"routing_key": "c", "expect": []}]}]}"#,
    );
    let v = t.broker.install_plugin("mine", &passing).unwrap();
    assert_eq!(v.self_tests, 2);
}

/// Each exchange has its own circuit, but many exchanges of one faulting
/// plugin would each spend their threshold of faults per cooldown: faults
/// in a row across all uses of a version open the plugin's own circuit,
/// and then every exchange of that plugin refuses calls, including ones
/// that never faulted themselves. Other plugins are not affected.
#[test]
fn faults_in_a_row_across_a_plugins_exchanges_open_its_own_circuit() {
    let t = TestBroker::with_limits(limits());
    t.install("faulty", "faulty");
    // limits(): an exchange's circuit opens after 3 faults; the plugin's
    // after 4 times that, 12.
    for i in 0..12 {
        let x = format!("bad{i}");
        t.exchange(&x, "faulty", FieldTable::default());
        let out = t.publish(&x, "trap", b"", FieldTable::default());
        assert!(matches!(out.faults[0].fault, PluginFault::Trap(_)), "{i}");
    }
    // The plugin's status (what the admin API and the UI show) says so.
    let circuit_open = |name: &str| {
        t.broker
            .plugins()
            .list()
            .into_iter()
            .find(|p| p.name == name)
            .is_some_and(|p| p.circuit_open)
    };
    assert!(circuit_open("faulty"));
    t.exchange("fresh", "faulty", FieldTable::default());
    t.queue("q");
    t.bind("fresh", "q", "", FieldTable::default());
    let out = t.publish("fresh", "fine", b"", FieldTable::default());
    assert!(
        matches!(out.faults[0].fault, PluginFault::CircuitOpen(_)),
        "{out:?}"
    );
    t.exchange("good", "topic", FieldTable::default());
    t.bind("good", "q", "#", FieldTable::default());
    assert_eq!(
        t.publish("good", "k", b"", FieldTable::default()).delivered,
        1
    );
    // After the cooldown, one success closes it again.
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(
        t.publish("fresh", "fine", b"", FieldTable::default())
            .delivered,
        1
    );
    assert!(!circuit_open("faulty"));
}
