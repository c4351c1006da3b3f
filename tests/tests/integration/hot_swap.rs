//! Hot swap: new plugin versions replace old ones on a running broker
//! without losing, duplicating or misrouting a message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;
use wasmq::plugin::PluginState;
use wasmq_tests::{TestBroker, eventually, plugin_bytes};

/// A broker whose plugin calls get a generous deadline. The tests that
/// publish from threads throughout a swap account for every message; the
/// 5 ms call deadline is wall-clock, and a publishing thread preempted on
/// a loaded two-core machine can fault a healthy call.
/// Deadlines have tests of their own (`faults.rs`).
fn unhurried() -> TestBroker {
    TestBroker::with_limits(wasmq::plugin::PluginLimits {
        deadline: Duration::from_millis(500),
        ..Default::default()
    })
}

/// Publish continuously from two threads while the exchange's plugin is
/// swapped back and forth between two different builds (topic and direct
/// agree on these keys), then account for every message.
#[test]
fn swaps_under_continuous_publishing_lose_nothing() {
    let t = unhurried();
    let topic = plugin_bytes("topic");
    let direct = plugin_bytes("direct");
    t.broker.install_plugin("router", &topic).unwrap();
    t.exchange("x", "router", FieldTable::default());
    for q in ["a", "b"] {
        t.queue(q);
        t.bind("x", q, q, FieldTable::default());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let (b, stop, sent) = (t.broker.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let v = b.vhost("/").unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = if n.is_multiple_of(2) { "a" } else { "b" };
                    let body = format!("{p}:{n}");
                    let out = b
                        .publish(
                            &v,
                            "x",
                            wasmq::Message::new("x", key, Default::default(), body),
                        )
                        .unwrap();
                    assert_eq!(
                        out.delivered, 1,
                        "publisher {p} message {n} not delivered exactly once: {out:?}"
                    );
                    assert!(out.faults.is_empty());
                    n += 1;
                }
                sent.fetch_add(n, Ordering::Relaxed);
                n
            })
        })
        .collect();
    let swaps = 8;
    for i in 0..swaps {
        let bytes = if i % 2 == 0 { &direct } else { &topic };
        let v = t.broker.install_plugin("router", bytes).unwrap();
        assert_eq!(
            t.vhost().exchange("x").unwrap().router().version().hash,
            v.hash
        );
        // Let some traffic through on this version.
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let per_publisher: Vec<u64> = publishers.into_iter().map(|h| h.join().unwrap()).collect();
    let total = sent.load(Ordering::Relaxed) as usize;
    assert!(total > 100, "only {total} messages across {swaps} swaps");

    // Every message exactly once, on the right queue, in per-publisher order.
    for (q, parity) in [("a", 0), ("b", 1)] {
        let mut last = [None::<u64>; 2];
        for m in t.drain(q) {
            let body = std::str::from_utf8(&m.body).unwrap();
            let (p, n) = body.split_once(':').unwrap();
            let (p, n): (usize, u64) = (p.parse().unwrap(), n.parse().unwrap());
            assert_eq!(n % 2, parity, "message {body} misrouted to {q}");
            if let Some(prev) = last[p] {
                assert_eq!(n, prev + 2, "gap or duplicate after {p}:{prev} in {q}");
            }
            last[p] = Some(n);
        }
        for (p, sent) in per_publisher.iter().enumerate() {
            let expected_last = (0..*sent).rev().find(|n| n % 2 == parity);
            assert_eq!(last[p], expected_last, "publisher {p} on {q}");
        }
    }
}

#[test]
fn the_watcher_swaps_in_files_rejects_bad_ones_and_survives_deletion() {
    let t = TestBroker::new();
    let _watcher = t.broker.watch_plugins().unwrap();
    let path = t.plugin_dir().join("shard.wasm");

    // New file, written with the recommended atomic rename.
    let tmp = t.plugin_dir().join("shard.wasm.tmp");
    std::fs::write(&tmp, plugin_bytes("consistent-hash")).unwrap();
    let started = Instant::now();
    std::fs::rename(&tmp, &path).unwrap();
    assert!(eventually(Duration::from_secs(5), || t
        .broker
        .plugins()
        .get("shard")
        .is_some()));
    eprintln!("file rename to serving: {:?}", started.elapsed());
    t.exchange("s", "shard", FieldTable::default());
    t.queue("q");
    t.bind("s", "q", "1", FieldTable::default());
    assert_eq!(t.publish("s", "k", b"", FieldTable::default()).delivered, 1);
    let first = t.broker.plugins().get("shard").unwrap().hash.clone();

    // Garbage written in place: rejected, the previous version keeps serving.
    std::fs::write(&path, b"garbage").unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        t.broker
            .plugins()
            .list()
            .iter()
            .any(|p| p.name == "shard" && p.state == PluginState::Rejected)
    }));
    assert_eq!(t.broker.plugins().get("shard").unwrap().hash, first);
    assert_eq!(t.publish("s", "k", b"", FieldTable::default()).delivered, 1);

    // Deleted: orphaned, still serving.
    std::fs::remove_file(&path).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        t.broker
            .plugins()
            .list()
            .iter()
            .any(|p| p.name == "shard" && p.state == PluginState::Orphaned)
    }));
    assert_eq!(t.publish("s", "k", b"", FieldTable::default()).delivered, 1);

    // A file of a built-in's name is refused unless overrides are on: a
    // stray `fanout.wasm` must not change every fanout exchange.
    t.exchange("mine", "fanout", FieldTable::default());
    std::fs::write(t.plugin_dir().join("fanout.wasm"), plugin_bytes("direct")).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        t.broker.plugins().list().iter().any(|p| {
            p.name == "fanout"
                && p.rejection
                    .as_deref()
                    .is_some_and(|r| r.contains("built-in"))
        })
    }));
    assert!(t.broker.plugins().get("fanout").unwrap().builtin);

    // With overrides on, it replaces the type for user-declared exchanges;
    // the predeclared amq.fanout keeps the shipped built-in.
    t.broker.set_override_builtins(true);
    std::fs::write(t.plugin_dir().join("fanout.wasm"), plugin_bytes("topic")).unwrap();
    assert!(eventually(Duration::from_secs(5), || !t
        .broker
        .plugins()
        .get("fanout")
        .unwrap()
        .builtin));
    let router = |x: &str| t.vhost().exchange(x).unwrap().router().version().builtin;
    assert!(
        !router("mine"),
        "a user-declared fanout exchange runs the override"
    );
    assert!(router("amq.fanout"), "amq.fanout keeps the built-in");
    t.queue("everyone");
    t.bind("amq.fanout", "everyone", "", FieldTable::default());
    assert_eq!(
        t.publish("amq.fanout", "any.key", b"", FieldTable::default())
            .delivered,
        1,
        "amq.fanout still fans out"
    );
}

#[test]
fn load_plugin_dir_at_start_skips_bad_files() {
    let t = TestBroker::new();
    std::fs::write(
        t.plugin_dir().join("good.wasm"),
        plugin_bytes("consistent-hash"),
    )
    .unwrap();
    std::fs::write(t.plugin_dir().join("bad.wasm"), b"\0asm garbage").unwrap();
    std::fs::write(t.plugin_dir().join("notes.txt"), b"ignored").unwrap();
    assert_eq!(t.broker.load_plugin_dir(), 1);
    assert!(t.broker.plugins().get("good").is_some());
    assert!(t.broker.plugins().get("bad").is_none());
}

/// A Kubernetes ConfigMap volume, as the kubelet's atomic writer updates
/// it: files are symlinks through `..data`, and an update swaps `..data`
/// to a new hidden folder with one rename. No event names a `.wasm` file,
/// yet the new version must be swapped in.
#[test]
fn a_configmap_style_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let t = TestBroker::new();
    let dir = t.plugin_dir().to_path_buf();
    let v1 = dir.join("..2026_11_25_00_00_00.1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("router.wasm"), plugin_bytes("topic")).unwrap();
    symlink(v1.file_name().unwrap(), dir.join("..data")).unwrap();
    symlink("..data/router.wasm", dir.join("router.wasm")).unwrap();
    assert_eq!(t.broker.load_plugin_dir(), 1);
    let _watcher = t.broker.watch_plugins().unwrap();
    let first = t.broker.plugins().get("router").unwrap().hash.clone();

    // The kubelet's update: new folder, new symlink, rename over ..data.
    let v2 = dir.join("..2026_11_25_00_01_00.2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("router.wasm"), plugin_bytes("direct")).unwrap();
    symlink(v2.file_name().unwrap(), dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || t
            .broker
            .plugins()
            .get("router")
            .is_some_and(|v| v.hash != first)),
        "the new version from the swapped ConfigMap is serving"
    );
    assert_eq!(
        t.broker.plugins().get("router").unwrap().hash,
        wasmq::plugin::content_hash(&plugin_bytes("direct"))
    );
}

/// A new version compiles only the functions it changed: the machine code
/// of the rest comes from the host's function cache. Here the new version
/// differs from the serving one only in a custom section, so most of it
/// is not compiled again; a different plugin built with the same SDK still
/// reuses some functions (the allocator, the SDK's decoding). The
/// swapped-in version must still route.
#[test]
fn a_new_version_reuses_the_compiled_functions_it_shares() {
    let t = TestBroker::new();
    let v1 = plugin_bytes("consistent-hash");
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\0\x04\x03pad"); // custom section "pad": new hash, same code
    // The built-ins are optimized in the background too: let that finish
    // so only these installs move the counters.
    for builtin in ["direct", "topic", "fanout", "headers"] {
        t.wait_optimized(builtin);
    }
    t.broker.install_plugin("ring", &v1).unwrap();
    t.wait_optimized("ring");
    let before = t.broker.host().function_cache_stats();
    t.broker.install_plugin("ring", &v2).unwrap();
    t.wait_optimized("ring");
    let after = t.broker.host().function_cache_stats();
    let (reused, compiled) = (after.hits - before.hits, after.misses - before.misses);
    // Some functions are compiled again every time: trampolines, and
    // functions whose cache key Cranelift does not derive deterministically
    // (6-12% of them in 15 runs here). At least three quarters are reused.
    assert!(
        reused > 0 && reused * 4 >= (reused + compiled) * 3,
        "reused {reused}, compiled {compiled}"
    );
    let other = plugin_bytes("json-filter");
    t.broker.install_plugin("filter", &other).unwrap();
    t.wait_optimized("filter");
    let third = t.broker.host().function_cache_stats();
    eprintln!("v1 {before:?}, v2 {after:?}, another plugin {third:?}");
    assert!(
        third.misses > after.misses,
        "a different plugin has its own code"
    );
    assert!(third.hits > after.hits, "and shares some with the first");

    t.exchange("s", "ring", FieldTable::default());
    t.queue("q");
    t.bind("s", "q", "1", FieldTable::default());
    assert_eq!(t.publish("s", "k", b"", FieldTable::default()).delivered, 1);
}

/// With the tiered compiler a new version serves first on the baseline
/// compiler's code, then its instances are rebuilt on Cranelift's. Messages
/// published throughout are each routed once; the rebuild is not a swap.
#[test]
fn a_version_serves_on_baseline_code_then_on_optimized_code() {
    let t = unhurried();
    #[cfg(target_arch = "x86_64")]
    assert!(t.broker.host().tiered(), "Winch compiles for x86_64");
    if !t.broker.host().tiered() {
        return; // no baseline compiler for this platform
    }
    let v = t
        .broker
        .install_plugin("router", &plugin_bytes("topic"))
        .unwrap();
    assert_eq!(v.code_tier(), "baseline", "served before Cranelift is done");
    t.exchange("x", "router", FieldTable::default());
    t.queue("q");
    t.bind("x", "q", "a.#", FieldTable::default());
    let x = t.vhost().exchange("x").unwrap();
    let baseline_router = x.router();
    // The flag is set before the instances are rebuilt: if it is still
    // clear now, the router just taken runs baseline code.
    let taken_before_optimizing = !v.optimized();

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (b, stop) = (t.broker.clone(), stop.clone());
        std::thread::spawn(move || {
            let v = b.vhost("/").unwrap();
            let mut n = 0u64;
            // Distinct keys: each one misses the route memo and calls the plugin.
            while !stop.load(Ordering::Relaxed) || n < 100 {
                let m = wasmq::Message::new("x", format!("a.{n}"), Default::default(), "");
                let out = b.publish(&v, "x", m).unwrap();
                assert_eq!(out.delivered, 1, "message {n}: {out:?}");
                assert!(out.faults.is_empty());
                n += 1;
            }
            n
        })
    };
    t.wait_optimized("router");
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().unwrap() as usize;
    assert_eq!(t.drain("q").len(), sent, "every message once");

    let now = x.router();
    assert!(Arc::ptr_eq(now.version(), &v), "the same version serves");
    if taken_before_optimizing {
        assert!(
            !Arc::ptr_eq(&now, &baseline_router),
            "its instances were rebuilt on the optimized code"
        );
    }
    let status = t.broker.plugins().list();
    let router = status.iter().find(|s| s.name == "router").unwrap();
    assert_eq!(router.code, Some("optimized"));
    assert_eq!(router.swaps, 0, "optimizing a version is not a swap");
    assert_eq!(
        t.publish("x", "a.b", b"", FieldTable::default()).delivered,
        1
    );
}

/// With the optimizing compiler a version serves on Cranelift's code from
/// the start.
#[test]
fn the_optimizing_compiler_serves_optimized_code_at_once() {
    let t = TestBroker::with(Default::default(), wasmq::plugin::Compiler::Optimizing);
    let v = t
        .broker
        .install_plugin("router", &plugin_bytes("topic"))
        .unwrap();
    assert!(v.optimized());
    assert!(t.broker.plugins().get("topic").unwrap().optimized());
}

/// Each file in the plugin folder loads on its own thread: a small plugin
/// dropped right after a large module does not wait for the large one to
/// compile (with one loader, it waited behind every file before it).
#[test]
fn a_large_module_compiling_does_not_hold_up_another_file() {
    let t = TestBroker::new();
    let _watcher = t.broker.watch_plugins().unwrap();
    // Within the module bounds, and slow to compile: many functions with
    // bodies. It is no plugin, so it is rejected once compiled.
    let body = "(local.get 0) (i32.const 7) (i32.mul) (i32.const 3) (i32.add) ".repeat(40);
    let funcs = format!("(func (param i32) (result i32) {body}) ").repeat(20_000);
    let large = wat::parse_str(format!("(module {funcs})")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let tmp = t.plugin_dir().join(format!("{name}.wasm.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, t.plugin_dir().join(format!("{name}.wasm"))).unwrap();
    };
    let state = |name: &str| {
        t.broker
            .plugins()
            .list()
            .into_iter()
            .find(|p| p.name == name)
            .map(|p| p.state)
    };
    write("large", &large);
    write("small", &plugin_bytes("direct"));
    assert!(eventually(Duration::from_secs(30), || state("small")
        == Some(PluginState::Serving)));
    assert_eq!(state("large"), None, "the large module is still compiling");
    assert!(eventually(Duration::from_secs(120), || state("large")
        == Some(PluginState::Rejected)));
}
