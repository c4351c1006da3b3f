//! Routing and hot-swap benchmarks. Run: `cargo bench -p wasmq --bench routing`
//!
//! * `topic_1000/native`: the topic plugin's trie compiled natively, called
//!   directly: the floor.
//! * `topic_1000/wasm`: the same code as the built-in Wasm plugin, called
//!   through the plugin host (write key, call, read ids), no memo.
//! * `topic_1000/wasm_memoized`: the exchange's routing step as the publish
//!   path runs it; topic declares itself deterministic, so repeated routing
//!   keys are answered from the per-generation memo.
//! * `hot_swap/install_57k`: validate + compile + swap a 57 KB plugin into a
//!   live exchange with 1,000 bindings, every function compiled (the
//!   function cache is cleared first).
//! * `hot_swap/install_57k_same_code`: the same, but the new version's
//!   code is the serving one's (only a custom section differs), so the
//!   function cache supplies it: the floor of a swap that changed little.
//! * `hot_swap/file_to_serving`: write a plugin file into the watched folder
//!   and wait until the new version serves (watcher, debounce, compile,
//!   validate, swap); every function compiled.
//! * `hot_swap/file_to_serving_same_code`: the same with the function cache.
//! * `hot_swap/install_57k_tiered`, `hot_swap/file_to_serving_tiered`: the
//!   same as the first and third, on a tiered host (the default): the new
//!   version serves on the baseline compiler's code; Cranelift's follows in
//!   the background (waited for, untimed, between samples).
//! * `topic_1000/wasm_baseline`: `topic_1000/wasm` on the baseline code a
//!   version runs until its optimized code is ready.
//! * `publish/topic_1000`: the broker's whole publish path for one message
//!   (no network): route through the memo, look up bindings, enqueue.
//! * `headers_100/native`, `headers_100/wasm`: the `headers` exchange type
//!   with 100 bindings (half `x-match: all` on two headers, half `any`),
//!   messages carrying four headers. Headers routing reads the message's
//!   properties, so it is never memoized: every message takes this path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::types::FieldTable;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use wasmq::broker::VHost;
use wasmq::plugin::{
    BindingSource, BindingVisitor, Compiler, PluginFault, PluginHost, PluginLimits, RouterPlugin,
    binding_input,
};
use wasmq::{Broker, Destination, ExchangeSpec, Message};
use wasmq_sdk::{Binding, BindingId, Destinations, Router, Target};

const BINDINGS: usize = 1000;

fn binding_key(i: usize) -> String {
    match i % 4 {
        0 => format!("region{}.svc{}.created", i % 10, i % 100),
        1 => format!("region{}.*.updated", i % 10),
        2 => format!("region{}.svc{}.#", i % 10, i % 100),
        _ => format!("*.svc{}.deleted", i % 100),
    }
}

fn routing_keys() -> Vec<String> {
    (0..64)
        .map(|i| match i % 4 {
            0 => format!("region{}.svc{}.created", i % 10, (i * 7) % 100),
            1 => format!("region{}.svc{}.updated", i % 10, i % 100),
            2 => format!("region{}.svc{}.deleted", i % 10, (i * 3) % 100),
            _ => format!("other{}.svc{}.x", i, i),
        })
        .collect()
}

struct Table(Vec<(u32, Vec<u8>)>);

impl BindingSource for Table {
    fn for_each_binding(&self, f: &mut BindingVisitor<'_>) -> Result<u32, PluginFault> {
        for (id, input) in &self.0 {
            f(*id, input)?;
        }
        Ok(self.0.len() as u32)
    }
    fn next_id(&self) -> u32 {
        self.0.len() as u32
    }
}

fn builtin(name: &str) -> &'static [u8] {
    wasmq::builtins::BUILTINS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

fn topic_1000(c: &mut Criterion) {
    let keys = routing_keys();
    let mut group = c.benchmark_group("topic_1000");

    let args = wasmq_sdk::FieldTable::new();
    let mut native = <wasmq_plugin_topic::Topic as Router>::new(&wasmq_sdk::Exchange {
        name: "b",
        arguments: &args,
    })
    .unwrap();
    for i in 0..BINDINGS {
        let key = binding_key(i);
        native
            .bind(&Binding {
                id: BindingId(i as u32),
                key: &key,
                target: Target::Queue("q"),
                arguments: &args,
            })
            .unwrap();
    }
    let mut out = Destinations::new();
    let mut n = 0;
    group.bench_function("native", |b| {
        b.iter(|| {
            n = (n + 1) % keys.len();
            out.clear();
            native.route(&wasmq_sdk::Message::new(&keys[n]), &mut out);
            std::hint::black_box(&out);
        })
    });

    let host = PluginHost::new(PluginLimits::default(), None, Compiler::Optimizing).unwrap();
    let version = host.load("topic", builtin("topic"), true).unwrap();
    let table = Table(
        (0..BINDINGS)
            .map(|i| (i as u32, binding_input(&binding_key(i), false, "q", &[])))
            .collect(),
    );
    let router = RouterPlugin::new(&host, &version, "bench", &[], &table).unwrap();
    let messages: Vec<Arc<Message>> = keys
        .iter()
        .map(|k| {
            Arc::new(Message::new(
                "bench",
                k.as_str(),
                Default::default(),
                &b"{}"[..],
            ))
        })
        .collect();
    let mut ids = Vec::new();
    bench_route(&mut group, "wasm", &router, &table, &messages);

    // The same on the baseline compiler's code, which a new version runs
    // until Cranelift's is ready.
    let tiered = PluginHost::new(PluginLimits::default(), None, Compiler::Tiered).unwrap();
    let baseline = tiered.load("topic", builtin("topic"), true).unwrap();
    assert!(
        !baseline.optimized(),
        "a baseline compiler on this platform"
    );
    let baseline = RouterPlugin::new(&tiered, &baseline, "bench", &[], &table).unwrap();
    bench_route(&mut group, "wasm_baseline", &baseline, &table, &messages);

    // Same check the report makes: both routers agree on every key.
    for (k, m) in keys.iter().zip(&messages) {
        out.clear();
        native.route(&wasmq_sdk::Message::new(k), &mut out);
        let mut want: Vec<u32> = out.ids().into_iter().map(|b| b.0).collect();
        ids.clear();
        router.route(m, &table, &mut ids).unwrap();
        want.sort();
        ids.sort();
        assert_eq!(want, ids, "native and wasm disagree on {k}");
    }

    // The fixed cost of a call: the direct plugin with no bindings does one
    // hash-map miss, so this is almost all host<->guest plumbing.
    let direct = host.load("direct", builtin("direct"), true).unwrap();
    let empty = Table(Vec::new());
    let direct = RouterPlugin::new(&host, &direct, "bench", &[], &empty).unwrap();
    bench_route(&mut group, "call_overhead", &direct, &empty, &messages);

    let (broker, vhost) =
        broker_with_topic_exchange(PluginLimits::default(), None, Compiler::Optimizing);
    let x = vhost.exchange("bench").unwrap();
    group.bench_function("wasm_memoized", |b| {
        b.iter(|| {
            n = (n + 1) % messages.len();
            ids.clear();
            x.route_ids(&messages[n], &mut ids).unwrap();
            std::hint::black_box(&ids);
        })
    });
    drop(broker);
    group.finish();
}

fn broker_with_topic_exchange(
    limits: PluginLimits,
    dir: Option<&std::path::Path>,
    compiler: Compiler,
) -> (Arc<Broker>, Arc<VHost>) {
    let host = PluginHost::new(limits, None, compiler).unwrap();
    let dir = dir
        .map(|d| d.to_path_buf())
        .unwrap_or_else(std::env::temp_dir);
    let broker = Broker::new(host, dir).unwrap();
    let vhost = broker.vhost("/").unwrap();
    broker.install_plugin("router", builtin("topic")).unwrap();
    let spec = ExchangeSpec {
        name: "bench".into(),
        kind: "router".into(),
        ..Default::default()
    };
    broker.declare_exchange(&vhost, spec, false).unwrap();
    broker
        .declare_queue(
            &vhost,
            wasmq::broker::QueueDecl {
                name: "q".into(),
                ..Default::default()
            },
        )
        .unwrap();
    for i in 0..BINDINGS {
        broker
            .bind(
                &vhost,
                "bench",
                Destination::Queue("q".into()),
                &binding_key(i),
                FieldTable::default(),
            )
            .unwrap();
    }
    (broker, vhost)
}

/// `iters` swaps of plugin `router`, alternating between `versions` (`i`
/// counts across calls), each timed by `swap`; after each, untimed, wait
/// until the new version runs optimized code: a tiered host compiles it in
/// the background, which the next sample must not share the cores with.
fn timed_swaps(
    broker: &Broker,
    versions: &[Vec<u8>; 2],
    i: &mut usize,
    iters: u64,
    cold: bool,
    mut swap: impl FnMut(&[u8]) -> Duration,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        *i += 1;
        if cold {
            broker.host().clear_function_cache();
        }
        total += swap(&versions[*i % 2]);
        settle(broker);
    }
    total
}

/// Wait until plugin `router` runs optimized code.
fn settle(broker: &Broker) {
    while !broker.plugins().get("router").unwrap().optimized() {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn hot_swap(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_swap");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    // Two files with the same code and different hashes, so every install
    // goes through the compiler: from nothing when the function cache is
    // cleared first, reusing every function it can otherwise.
    let mut other = builtin("topic").to_vec();
    other.extend_from_slice(b"\0\x04\x03pad"); // a custom section: same code, new hash
    let versions = [builtin("topic").to_vec(), other];
    let mut i = 0;

    for compiler in [Compiler::Optimizing, Compiler::Tiered] {
        let (broker, _vhost) = broker_with_topic_exchange(PluginLimits::default(), None, compiler);
        settle(&broker);
        let runs: &[(&str, bool)] = match compiler {
            Compiler::Optimizing => &[("install_57k", true), ("install_57k_same_code", false)],
            Compiler::Tiered => &[("install_57k_tiered", true)],
        };
        for &(id, cold) in runs {
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    timed_swaps(&broker, &versions, &mut i, iters, cold, |bytes| {
                        let started = Instant::now();
                        broker.install_plugin("router", bytes).unwrap();
                        started.elapsed()
                    })
                })
            });
        }
        drop(broker);

        let dir = tempfile::tempdir().unwrap();
        let (broker, _vhost) =
            broker_with_topic_exchange(PluginLimits::default(), Some(dir.path()), compiler);
        settle(&broker);
        let _watcher = broker.watch_plugins().unwrap();
        let path = dir.path().join("router.wasm");
        let runs: &[(&str, bool)] = match compiler {
            Compiler::Optimizing => &[
                ("file_to_serving", true),
                ("file_to_serving_same_code", false),
            ],
            Compiler::Tiered => &[("file_to_serving_tiered", true)],
        };
        for &(id, cold) in runs {
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    timed_swaps(&broker, &versions, &mut i, iters, cold, |bytes| {
                        let want = wasmq::plugin::content_hash(bytes);
                        let tmp = dir.path().join("router.wasm.tmp");
                        std::fs::write(&tmp, bytes).unwrap();
                        let started = Instant::now();
                        std::fs::rename(&tmp, &path).unwrap();
                        while broker.plugins().get("router").unwrap().hash != want {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        started.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

/// The broker's publish path without the network: transform check, route
/// (memoized topic, 1,000 bindings), binding look-up, enqueue; the message
/// is taken off the queue again so the queue stays short.
fn publish(c: &mut Criterion) {
    let (broker, vhost) =
        broker_with_topic_exchange(PluginLimits::default(), None, Compiler::Optimizing);
    let queue = vhost.queue("q").unwrap();
    let keys = routing_keys();
    let mut n = 0;
    c.bench_function("publish/topic_1000", |b| {
        b.iter(|| {
            n = (n + 1) % keys.len();
            let m = Message::new(
                "bench",
                keys[n].as_str(),
                Default::default(),
                &b"0123456789abcdef"[..],
            );
            let out = broker.publish(&vhost, "bench", m).unwrap();
            std::hint::black_box(out.delivered);
            while queue.pop().is_some() {}
        })
    });
}

/// Bench `router` on `messages` in rotation, through the plugin host (no memo).
fn bench_route(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    router: &RouterPlugin,
    bindings: &dyn BindingSource,
    messages: &[Arc<Message>],
) {
    let mut ids = Vec::new();
    let mut n = 0;
    group.bench_function(name, |b| {
        b.iter(|| {
            n = (n + 1) % messages.len();
            ids.clear();
            router.route(&messages[n], bindings, &mut ids).unwrap();
            std::hint::black_box(&ids);
        })
    });
}

/// Binding `i` of the headers bench: its arguments as (name, value) pairs.
fn header_spec(i: usize) -> Vec<(&'static str, String)> {
    if i.is_multiple_of(2) {
        vec![
            ("x-match", "all".into()),
            ("kind", format!("order{}", i % 10)),
            (
                "region",
                if i.is_multiple_of(4) { "eu" } else { "us" }.into(),
            ),
        ]
    } else {
        vec![
            ("x-match", "any".into()),
            ("kind", format!("refund{}", i % 10)),
            ("priority", format!("p{}", i % 3)),
        ]
    }
}

fn header_messages() -> Vec<Vec<(&'static str, String)>> {
    (0..16usize)
        .map(|i| {
            vec![
                (
                    "kind",
                    format!(
                        "{}{}",
                        if i.is_multiple_of(2) {
                            "order"
                        } else {
                            "refund"
                        },
                        i % 10
                    ),
                ),
                (
                    "region",
                    if i.is_multiple_of(3) { "eu" } else { "us" }.into(),
                ),
                ("priority", format!("p{}", i % 5)),
                ("trace-id", format!("4bf92f3577b34da6a3ce929d0e0e{i:04}")),
            ]
        })
        .collect()
}

fn headers_100(c: &mut Criterion) {
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::{AMQPValue, LongString};

    let mut group = c.benchmark_group("headers_100");
    let sdk_table = |pairs: &[(&str, String)]| {
        let mut t = wasmq_sdk::FieldTable::new();
        for (k, v) in pairs {
            t.insert(*k, v.as_str());
        }
        t
    };
    let amqp_table = |pairs: &[(&str, String)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(
                (*k).into(),
                AMQPValue::LongString(LongString::from(v.as_bytes())),
            );
        }
        t
    };

    let empty = wasmq_sdk::FieldTable::new();
    let mut native = <wasmq_plugin_headers::Headers as Router>::new(&wasmq_sdk::Exchange {
        name: "h",
        arguments: &empty,
    })
    .unwrap();
    for i in 0..100 {
        native
            .bind(&Binding {
                id: BindingId(i as u32),
                key: "",
                target: Target::Queue("q"),
                arguments: &sdk_table(&header_spec(i)),
            })
            .unwrap();
    }
    let sdk_headers: Vec<wasmq_sdk::FieldTable> =
        header_messages().iter().map(|h| sdk_table(h)).collect();
    let mut out = Destinations::new();
    let mut n = 0;
    group.bench_function("native", |b| {
        b.iter(|| {
            n = (n + 1) % sdk_headers.len();
            out.clear();
            // The SDK's message owns its headers table: build it per call,
            // as the guest decodes one per call.
            let m = wasmq_sdk::Message::new("").with_headers(sdk_headers[n].clone());
            native.route(&m, &mut out);
            std::hint::black_box(&out);
        })
    });

    let host = PluginHost::new(PluginLimits::default(), None, Compiler::Optimizing).unwrap();
    let version = host.load("headers", builtin("headers"), true).unwrap();
    let table = Table(
        (0..100)
            .map(|i| {
                let args = wasmq::message::encode_table_body(&amqp_table(&header_spec(i)));
                (i as u32, binding_input("", false, "q", &args))
            })
            .collect(),
    );
    let router = RouterPlugin::new(&host, &version, "bench", &[], &table).unwrap();
    let messages: Vec<Arc<Message>> = header_messages()
        .iter()
        .map(|h| {
            Arc::new(Message::new(
                "bench",
                "",
                BasicProperties::default().with_headers(amqp_table(h)),
                &b"{}"[..],
            ))
        })
        .collect();
    let mut ids = Vec::new();
    bench_route(&mut group, "wasm", &router, &table, &messages);
    group.finish();

    // Both agree on every message.
    for (h, m) in sdk_headers.iter().zip(&messages) {
        out.clear();
        native.route(
            &wasmq_sdk::Message::new("").with_headers(h.clone()),
            &mut out,
        );
        let mut want: Vec<u32> = out.ids().into_iter().map(|b| b.0).collect();
        ids.clear();
        router.route(m, &table, &mut ids).unwrap();
        want.sort();
        ids.sort();
        assert!(!want.is_empty(), "every message matches some binding");
        assert_eq!(want, ids, "native and wasm disagree on {h:?}");
    }
}

criterion_group!(benches, topic_1000, hot_swap, publish, headers_100);
criterion_main!(benches);
