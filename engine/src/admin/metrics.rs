//! `/metrics` in the Prometheus text exposition format (version 0.0.4).
//!
//! The values are the broker's own counters, read at scrape time; nothing is
//! kept twice. Counters end in `_total`, histograms are cumulative
//! `_bucket{le=...}` series with `_sum` and `_count`, as Prometheus expects.

use crate::alarm::Resource;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AdminState;
use crate::latency::{BOUNDS_US, LatencySnapshot};

/// Writes metric families, each with its HELP and TYPE lines once.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &LatencySnapshot) {
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = BOUNDS_US
                .get(i)
                .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_nanos as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, h.count() as f64);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn n(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

pub(super) async fn render(State(s): State<AdminState>) -> impl IntoResponse {
    let mut e = Exposition { out: String::new() };
    let mut vhosts = s.broker.vhosts();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));

    type ExchangeCounter = fn(&crate::broker::ExchangeStats) -> &AtomicU64;
    let exchange_counters: [(&str, &str, ExchangeCounter); 6] = [
        (
            "wasmq_exchange_published_total",
            "Messages published to the exchange.",
            |s| &s.published,
        ),
        (
            "wasmq_exchange_routed_total",
            "Messages routed to at least one destination.",
            |s| &s.routed,
        ),
        (
            "wasmq_exchange_unroutable_total",
            "Messages that matched no binding.",
            |s| &s.unroutable,
        ),
        (
            "wasmq_exchange_dropped_total",
            "Messages dropped by the exchange's transform.",
            |s| &s.dropped,
        ),
        (
            "wasmq_exchange_dead_lettered_total",
            "Messages dead-lettered by a plugin fault or transform.",
            |s| &s.dead_lettered,
        ),
        (
            "wasmq_exchange_plugin_faults_total",
            "Plugin faults while routing messages of the exchange.",
            |s| &s.faults,
        ),
    ];
    for (name, help, counter) in exchange_counters {
        e.family(name, "counter", help);
        for v in &vhosts {
            let mut xs = v.exchanges();
            xs.sort_by(|a, b| a.name.cmp(&b.name));
            for x in xs {
                e.sample(
                    name,
                    &[("vhost", &v.name), ("exchange", &x.name), ("type", &x.kind)],
                    n(counter(&x.stats)),
                );
            }
        }
    }

    type QueueValue = fn(&crate::broker::Queue) -> f64;
    let queue_values: [(&str, &str, &str, QueueValue); 10] = [
        (
            "wasmq_queue_published_total",
            "counter",
            "Messages enqueued.",
            |q| n(&q.enqueued),
        ),
        (
            "wasmq_queue_delivered_total",
            "counter",
            "Messages delivered to consumers or basic.get.",
            |q| n(&q.delivered),
        ),
        (
            "wasmq_queue_redelivered_total",
            "counter",
            "Deliveries marked redelivered.",
            |q| n(&q.redelivered),
        ),
        (
            "wasmq_queue_acked_total",
            "counter",
            "Deliveries acked.",
            |q| n(&q.acked),
        ),
        (
            "wasmq_queue_dead_lettered_total",
            "counter",
            "Messages dead-lettered from the queue.",
            |q| n(&q.dead_lettered),
        ),
        (
            "wasmq_queue_messages_ready",
            "gauge",
            "Messages waiting for delivery.",
            |q| q.len() as f64,
        ),
        (
            "wasmq_queue_messages_unacked",
            "gauge",
            "Deliveries waiting for an ack.",
            |q| q.unacked() as f64,
        ),
        (
            "wasmq_queue_messages_delayed",
            "gauge",
            "Messages waiting for their time (x-delivery-delay, or a delayed exchange's schedule).",
            |q| q.delayed() as f64,
        ),
        (
            "wasmq_queue_messages_ready_bytes",
            "gauge",
            "Bytes of ready messages held in memory (paged-out bodies excluded).",
            |q| q.ready_bytes() as f64,
        ),
        (
            "wasmq_queue_consumers",
            "gauge",
            "Consumers attached.",
            |q| q.consumer_count() as f64,
        ),
    ];
    for (name, kind, help, value) in queue_values {
        e.family(name, kind, help);
        for v in &vhosts {
            let mut qs = v.queues();
            qs.sort_by(|a, b| a.name.cmp(&b.name));
            for q in qs {
                e.sample(name, &[("vhost", &v.name), ("queue", &q.name)], value(&q));
            }
        }
    }
    // Streams only: their log's size on disk and its offsets.
    type StreamValue = fn(&crate::store::stream::StreamStats) -> f64;
    let stream_values: [(&str, &str, StreamValue); 4] = [
        (
            "wasmq_stream_bytes",
            "Bytes of the stream's segment files.",
            |s| s.bytes as f64,
        ),
        (
            "wasmq_stream_segments",
            "Segment files of the stream.",
            |s| s.segments as f64,
        ),
        (
            "wasmq_stream_first_offset",
            "The oldest offset the stream keeps.",
            |s| s.first as f64,
        ),
        (
            "wasmq_stream_committed_offset",
            "One past the newest offset readers may read.",
            |s| s.committed as f64,
        ),
    ];
    let mut streams = Vec::new();
    for v in &vhosts {
        let mut qs = v.queues();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            if let Some(st) = q.stream() {
                streams.push((v.name.clone(), q.name.clone(), st.stats()));
            }
        }
    }
    for (name, help, value) in stream_values {
        e.family(name, "gauge", help);
        for (vhost, queue, st) in &streams {
            e.sample(name, &[("vhost", vhost), ("queue", queue)], value(st));
        }
    }

    e.family(
        "wasmq_resource_alarm",
        "gauge",
        "1 while the resource's alarm blocks publishers.",
    );
    for r in [Resource::Disk, Resource::Memory] {
        let raised = s.broker.alarm_raised(r);
        e.sample(
            "wasmq_resource_alarm",
            &[("resource", r.as_str())],
            f64::from(u8::from(raised)),
        );
    }
    if let Ok(used) = crate::alarm::memory_used() {
        e.family(
            "wasmq_resident_memory_bytes",
            "gauge",
            "The broker's resident set size.",
        );
        e.sample("wasmq_resident_memory_bytes", &[], used as f64);
    }

    let conns = s.broker.connections().list();
    e.family("wasmq_connections", "gauge", "Open AMQP connections.");
    e.sample("wasmq_connections", &[], conns.len() as f64);
    e.family("wasmq_channels", "gauge", "Open AMQP channels.");
    e.sample(
        "wasmq_channels",
        &[],
        conns.iter().map(|c| c.channels().len()).sum::<usize>() as f64,
    );

    // The bounds of the surfaces a client may hold open (docs/limits.md).
    e.family(
        "wasmq_admin_connections",
        "gauge",
        "Open connections to the admin port.",
    );
    e.sample("wasmq_admin_connections", &[], s.connections.open() as f64);
    e.family(
        "wasmq_admin_connections_refused_total",
        "counter",
        "Admin connections closed at once for being past admin.max_connections (or per source).",
    );
    e.sample(
        "wasmq_admin_connections_refused_total",
        &[],
        n(&s.connections.refused),
    );
    e.family(
        "wasmq_plugin_log_followers",
        "gauge",
        "Clients following a plugin's log.",
    );
    e.sample("wasmq_plugin_log_followers", &[], s.followers.held() as f64);
    e.family(
        "wasmq_traces_kept_bytes",
        "gauge",
        "Bytes of kept traces (x-wasmq-trace), as their JSON measures them.",
    );
    e.sample(
        "wasmq_traces_kept_bytes",
        &[],
        s.broker.traces().bytes() as f64,
    );
    if let Some(node) = s.broker.cluster() {
        e.family(
            "wasmq_cluster_handshakes",
            "gauge",
            "Connections to the cluster port not yet authenticated.",
        );
        e.sample(
            "wasmq_cluster_handshakes",
            &[],
            node.handshakes_in_progress() as f64,
        );
        e.family(
            "wasmq_cluster_quorum_calls_received_total",
            "counter",
            "Calls of quorum queue groups this node answered (appends, votes, snapshots); idle groups make none.",
        );
        e.sample(
            "wasmq_cluster_quorum_calls_received_total",
            &[],
            node.quorum_calls() as f64,
        );
        let wal = node.quorum_log().stats();
        e.family(
            "wasmq_quorum_log_bytes",
            "gauge",
            "Bytes in the write-ahead log this node's quorum replicas share.",
        );
        e.sample("wasmq_quorum_log_bytes", &[], wal.bytes as f64);
        e.family(
            "wasmq_quorum_log_live_bytes",
            "gauge",
            "Bytes of that log still needed (entries not yet covered by a snapshot).",
        );
        e.sample("wasmq_quorum_log_live_bytes", &[], wal.live as f64);
        e.family(
            "wasmq_quorum_log_segments",
            "gauge",
            "Segment files of that log.",
        );
        e.sample("wasmq_quorum_log_segments", &[], wal.segments as f64);
    }

    let plugins = s.broker.plugins().list();
    let versions: Vec<_> = plugins
        .iter()
        .filter_map(|p| s.broker.plugins().get(&p.name).map(|v| (p, v)))
        .collect();
    e.family(
        "wasmq_plugin_calls_total",
        "counter",
        "Calls into the plugin for messages (route, filter, transform).",
    );
    for (p, v) in &versions {
        e.sample(
            "wasmq_plugin_calls_total",
            &[("plugin", &p.name)],
            n(&v.calls),
        );
    }
    e.family(
        "wasmq_plugin_faults_total",
        "counter",
        "Plugin faults (trap, deadline, memory, malformed reply).",
    );
    for (p, v) in &versions {
        e.sample(
            "wasmq_plugin_faults_total",
            &[("plugin", &p.name)],
            n(&v.faults),
        );
    }
    e.family(
        "wasmq_plugin_swaps_total",
        "counter",
        "Times a new version of the plugin replaced a serving one.",
    );
    for p in &plugins {
        e.sample(
            "wasmq_plugin_swaps_total",
            &[("plugin", &p.name)],
            p.swaps as f64,
        );
    }
    e.family(
        "wasmq_plugin_serving",
        "gauge",
        "1 when the plugin's latest file is serving, 0 when it was rejected or deleted.",
    );
    for p in &plugins {
        let serving = matches!(p.state, crate::plugin::PluginState::Serving);
        e.sample(
            "wasmq_plugin_serving",
            &[("plugin", &p.name)],
            f64::from(u8::from(serving)),
        );
    }
    e.family(
        "wasmq_plugin_call_duration_seconds",
        "histogram",
        "Time of one call into the plugin (one call in eight is timed).",
    );
    for (p, v) in &versions {
        e.histogram(
            "wasmq_plugin_call_duration_seconds",
            &[("plugin", &p.name)],
            &v.latency.snapshot(),
        );
    }
    e.family(
        "wasmq_plugin_log_lines_dropped_total",
        "counter",
        "Log lines a plugin wrote past its budget (lines and bytes per second), dropped.",
    );
    for (plugin, dropped) in s.broker.host().log_lines_dropped() {
        e.sample(
            "wasmq_plugin_log_lines_dropped_total",
            &[("plugin", &plugin)],
            dropped as f64,
        );
    }
    e.family(
        "wasmq_plugin_log_lines_total",
        "counter",
        "Lines a plugin logged through wasmq::log (within its budget), per level.",
    );
    for (plugin, counts) in s.broker.host().log_lines() {
        for (level, n) in counts {
            e.sample(
                "wasmq_plugin_log_lines_total",
                &[("plugin", &plugin), ("level", level)],
                n as f64,
            );
        }
    }
    candidate_metrics(&mut e, &s);
    let functions = s.broker.host().function_cache_stats();
    e.family(
        "wasmq_plugin_functions_compiled_total",
        "counter",
        "Functions Cranelift compiled for plugin versions.",
    );
    e.sample(
        "wasmq_plugin_functions_compiled_total",
        &[],
        functions.misses as f64,
    );
    e.family(
        "wasmq_plugin_functions_reused_total",
        "counter",
        "Functions of plugin versions whose machine code came from an earlier compile.",
    );
    e.sample(
        "wasmq_plugin_functions_reused_total",
        &[],
        functions.hits as f64,
    );

    if let Some(store) = s.broker.store() {
        let st = store.stats();
        e.family(
            "wasmq_store_bytes_written_total",
            "counter",
            "Bytes written to the message store (records and acks).",
        );
        e.sample("wasmq_store_bytes_written_total", &[], n(&st.bytes_written));
        e.family(
            "wasmq_store_syncs_total",
            "counter",
            "Group-commit rounds (fdatasync of every file written since the last).",
        );
        e.sample("wasmq_store_syncs_total", &[], n(&st.syncs));
        e.family(
            "wasmq_store_sync_duration_seconds",
            "histogram",
            "Time of one group-commit round.",
        );
        e.histogram(
            "wasmq_store_sync_duration_seconds",
            &[],
            &st.sync_latency.snapshot(),
        );
    }

    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        e.out,
    )
}

/// One of a trial's counters.
type TrialCounter = fn(&crate::author::candidate::Trial) -> &AtomicU64;

/// Staged rollouts: each candidate's comparisons, calls and faults, and
/// the transitions of every plugin's versions.
fn candidate_metrics(e: &mut Exposition, s: &AdminState) {
    let rollouts = s.broker.candidates();
    let trials = rollouts.all();
    let counters: [(&str, &str, TrialCounter); 5] = [
        (
            "wasmq_plugin_candidate_calls_total",
            "Messages a staged candidate decided (canary) or was compared on (shadow).",
            |t| &t.calls,
        ),
        (
            "wasmq_plugin_candidate_faults_total",
            "Faults of a staged candidate.",
            |t| &t.faults,
        ),
        (
            "wasmq_plugin_candidate_agreements_total",
            "Shadow comparisons where the candidate decided as the serving version.",
            |t| &t.agreed,
        ),
        (
            "wasmq_plugin_candidate_disagreements_total",
            "Shadow comparisons where the candidate decided otherwise.",
            |t| &t.disagreed,
        ),
        (
            "wasmq_plugin_candidate_skipped_total",
            "Shadow samples skipped because the comparison thread was behind.",
            |t| &t.skipped,
        ),
    ];
    for (name, help, counter) in counters {
        e.family(name, "counter", help);
        for t in &trials {
            e.sample(
                name,
                &[("plugin", &t.plugin), ("version", t.version.short_hash())],
                counter(t).load(Ordering::Relaxed) as f64,
            );
        }
    }
    e.family(
        "wasmq_plugin_candidate_call_duration_seconds",
        "histogram",
        "Time of one call into a staged candidate (every call is timed).",
    );
    for t in &trials {
        e.histogram(
            "wasmq_plugin_candidate_call_duration_seconds",
            &[("plugin", &t.plugin), ("version", t.version.short_hash())],
            &t.latency_snapshot(),
        );
    }
    e.family(
        "wasmq_plugin_rollout_transitions_total",
        "counter",
        "Transitions of a plugin's versions: shadow_started, canary_started, promoted, rolled_back, aborted, rollback.",
    );
    for (plugin, event, n) in rollouts.counts() {
        e.sample(
            "wasmq_plugin_rollout_transitions_total",
            &[("plugin", &plugin), ("event", event)],
            n as f64,
        );
    }
}
