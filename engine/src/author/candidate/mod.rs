//! A candidate version of a plugin, tried on live traffic beside the
//! serving one before it serves everything.
//!
//! Dropping a file into the plugin folder swaps a version in for every
//! message at once. A staged rollout goes slower, in two modes:
//!
//! * **Shadow.** The candidate sees one message in `every` (a sample) after
//!   the serving version decided it; its decision is compared with the
//!   serving one's and counted, never applied. The comparison runs on a
//!   thread of its own behind a bounded queue, so a slow or looping
//!   candidate costs the publish path one `try_send` (a full queue skips
//!   the sample and counts it).
//! * **Canary.** The candidate decides for a share of messages chosen by a
//!   stable hash of the routing key (FNV-1a, the same on every node and
//!   after a restart), so one key keeps one version, and each message is
//!   decided entirely by one version. A candidate fault never reaches the
//!   publisher: that message is decided by the serving version, and the
//!   fault counts against the candidate.
//!
//! A canary is judged as it runs (`Broker::judge_candidates`, every
//! quarter second): rolled back when its fault rate or its p99 passes the
//! [`Policy`]'s bounds, promoted when it has decided enough messages for
//! long enough without passing them. A fault rate is judged at the fault
//! itself: the candidate stops deciding at once, before the judge cleans
//! up. Every transition is logged, counted and kept in a short history.
//!
//! The candidate's role handles sit beside the serving ones: an exchange's
//! router and transform candidates in its `candidates`, a filter's in its
//! binding. The publish path pays one relaxed load of the exchange's
//! `staged` flag per exchange while nothing is staged.
//!
//! This file holds the trial and its history; `decide` is the publish
//! path's side, `shadow` the comparison thread, `lifecycle` how a trial is
//! staged, judged and ended.

mod decide;
mod lifecycle;
mod shadow;

use shadow::Job;
pub(crate) use shadow::{Compared, describe_transform};

pub(crate) use decide::{filter, route, transform};

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::broker::BrokerError;
use crate::latency::Latency;
use crate::message::Message;
use crate::plugin::{PluginFault, PluginVersion, RouterPlugin, TransformPlugin};

/// How a candidate takes part.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Decides beside the serving version for one message in `every`;
    /// compared and counted, never applied.
    Shadow {
        /// Sample one message in this many (1: all).
        every: u32,
    },
    /// Decides for this percentage of routing keys (or of the values of
    /// a header).
    Canary {
        /// 0 to 100; fractions allowed (0.5: one key in 200).
        percent: f64,
        /// Choose by this header's value instead of the routing key (a
        /// message without it hashes as empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_header: Option<String>,
    },
}

/// When a canary is promoted or rolled back on its own.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Promoted after deciding this many messages...
    pub promote_after_messages: u64,
    /// ...and running this long, both without passing a bound.
    pub promote_after_secs: u64,
    /// Rolled back when faults exceed this share of its calls.
    pub max_fault_rate: f64,
    /// Rolled back when its p99 call time passes this (µs; 0: no bound).
    pub max_p99_us: u64,
    /// Calls measured before its p99 is judged.
    pub p99_min_calls: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            promote_after_messages: 10_000,
            promote_after_secs: 600,
            max_fault_rate: 0.001,
            max_p99_us: 1_000,
            p99_min_calls: 100,
        }
    }
}

impl Policy {
    /// Why these bounds cannot judge a canary, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.max_fault_rate) {
            return Err(format!(
                "max_fault_rate {}: a share of calls, from 0 to 1",
                self.max_fault_rate
            ));
        }
        Ok(())
    }
}

/// Which version decided a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    /// The serving version.
    Serving,
    /// The candidate (a canary's share).
    Candidate,
}

/// One message the two versions decided differently (shadow).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Disagreement {
    /// The exchange deciding.
    pub exchange: String,
    /// The message's routing key.
    pub routing_key: String,
    /// `router`, `filter` or `transform`.
    pub role: String,
    /// What the serving version decided.
    pub serving: String,
    /// What the candidate decided.
    pub candidate: String,
}

/// Disagreements kept per candidate, newest last.
const SAMPLES: usize = 20;
/// Shadow comparisons waiting for the shadow thread; past this, skipped.
const SHADOW_QUEUE: usize = 1024;
/// Transitions kept in the history.
const HISTORY: usize = 100;

/// A candidate version of one plugin and how it is doing.
pub struct Trial {
    /// The plugin.
    pub plugin: String,
    /// The candidate version.
    pub version: Arc<PluginVersion>,
    /// The hash of the version serving when it was staged.
    pub serving_hash: String,
    pub(crate) bytes: Arc<[u8]>,
    /// Its mode.
    pub mode: Mode,
    /// Its bounds.
    pub policy: Policy,
    started: Instant,
    /// When it was staged.
    pub started_at: SystemTime,
    /// Set when it passed a bound: it decides nothing from then on.
    stopped: AtomicBool,
    /// In a cluster: this node has proposed its end, which every node
    /// carries out when the log applies it.
    pub(crate) proposed: AtomicBool,
    failure: Mutex<Option<String>>,
    /// Messages it decided (canary) or was compared on (shadow).
    pub calls: AtomicU64,
    /// Its faults.
    pub faults: AtomicU64,
    /// Shadow: comparisons made, agreeing and not.
    pub agreed: AtomicU64,
    /// Shadow: comparisons where the decisions differed.
    pub disagreed: AtomicU64,
    /// Shadow: samples skipped because the shadow thread was behind.
    pub skipped: AtomicU64,
    latency: Latency,
    samples: Mutex<VecDeque<Disagreement>>,
    seq: AtomicU64,
    /// Samples waiting for the shadow thread (`None`: not taking any).
    shadow: Mutex<Option<VecDeque<Job>>>,
}

impl std::fmt::Debug for Trial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trial")
            .field("plugin", &self.plugin)
            .field("version", &self.version.short_hash())
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A header value's bytes for the canary's hash: strings as themselves,
/// anything else as its JSON text.
fn header_bytes(v: &amq_protocol::types::AMQPValue) -> Vec<u8> {
    use amq_protocol::types::AMQPValue as A;
    match v {
        A::LongString(s) => s.as_bytes().to_vec(),
        A::ShortString(s) => s.as_str().as_bytes().to_vec(),
        other => {
            let mut t = amq_protocol::types::FieldTable::default();
            t.insert("v".into(), other.clone());
            crate::json::table_to_json(&t)["v"].to_string().into_bytes()
        }
    }
}

/// FNV-1a, 64 bits: stable across processes, nodes and versions.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Trial {
    fn new(
        version: Arc<PluginVersion>,
        serving_hash: String,
        bytes: Arc<[u8]>,
        mode: Mode,
        policy: Policy,
    ) -> Arc<Trial> {
        Arc::new(Trial {
            plugin: version.name.clone(),
            version,
            serving_hash,
            bytes,
            mode,
            policy,
            started: Instant::now(),
            started_at: SystemTime::now(),
            stopped: AtomicBool::new(false),
            proposed: AtomicBool::new(false),
            failure: Mutex::new(None),
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            disagreed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            latency: Latency::default(),
            samples: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            shadow: Mutex::new(None),
        })
    }

    /// Whether a canary decides for `m`: by a stable hash of its routing
    /// key, or of a header's value.
    pub fn picks(&self, m: &Message) -> bool {
        match &self.mode {
            Mode::Canary { percent, by_header } if !self.stopped.load(Ordering::Relaxed) => {
                let h = match by_header {
                    None => stable_hash(m.routing_key.as_bytes()),
                    Some(name) => {
                        let value = m
                            .properties
                            .headers()
                            .as_ref()
                            .and_then(|h| h.inner().get(name.as_str()))
                            .map(header_bytes)
                            .unwrap_or_default();
                        stable_hash(&value)
                    }
                };
                (h % 10_000) < (percent * 100.0) as u64
            }
            _ => false,
        }
    }

    /// Whether a shadow compares this message.
    fn sampled(&self) -> bool {
        match self.mode {
            Mode::Shadow { every } if !self.stopped.load(Ordering::Relaxed) => self
                .seq
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(u64::from(every.max(1))),
            _ => false,
        }
    }

    /// Count one call of the candidate.
    fn record(&self, took: Duration, fault: Option<&PluginFault>) {
        let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        self.latency.record(took);
        if let Some(f) = fault {
            let faults = self.faults.fetch_add(1, Ordering::Relaxed) + 1;
            if matches!(self.mode, Mode::Canary { .. })
                && faults as f64 > self.policy.max_fault_rate * calls as f64
            {
                self.fail(format!(
                    "fault rate {faults}/{calls} passed {} (last: {f})",
                    self.policy.max_fault_rate
                ));
            }
        }
    }

    /// Stop deciding at once; the judge rolls it back.
    fn fail(&self, reason: String) {
        self.stopped.store(true, Ordering::Relaxed);
        let mut failure = self.failure.lock();
        if failure.is_none() {
            *failure = Some(reason);
        }
    }

    /// Why it failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    fn compared(&self, d: Option<Disagreement>) {
        match d {
            None => {
                self.agreed.fetch_add(1, Ordering::Relaxed);
            }
            Some(d) => {
                self.disagreed.fetch_add(1, Ordering::Relaxed);
                let mut s = self.samples.lock();
                if s.len() == SAMPLES {
                    s.pop_front();
                }
                s.push_back(d);
            }
        }
    }

    /// The latest disagreements, oldest first.
    pub fn disagreements(&self) -> Vec<Disagreement> {
        self.samples.lock().iter().cloned().collect()
    }

    /// Its call times.
    pub fn latency_snapshot(&self) -> crate::latency::LatencySnapshot {
        self.latency.snapshot()
    }

    /// Call-time percentile `q` of the candidate, µs.
    pub fn latency_us(&self, q: f64) -> Option<u64> {
        self.latency.snapshot().quantile_us(q)
    }

    /// How long it has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The candidates staged on one exchange (its router's and its
/// transform's; they may be trials of two different plugins).
#[derive(Clone, Default)]
pub struct ExchangeCandidates {
    pub(crate) router: Option<(Arc<RouterPlugin>, Arc<Trial>)>,
    pub(crate) transform: Option<(Arc<TransformPlugin>, Arc<Trial>)>,
}

impl ExchangeCandidates {
    fn is_empty(&self) -> bool {
        self.router.is_none() && self.transform.is_none()
    }
}

/// How a trial ended, or a version changed by hand.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A shadow started.
    ShadowStarted,
    /// A canary started.
    CanaryStarted,
    /// The candidate now serves everything.
    Promoted,
    /// The candidate passed a bound and was removed.
    RolledBack,
    /// An operator removed the candidate.
    Aborted,
    /// An operator served a kept version again.
    Rollback,
}

impl Event {
    /// Its name in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Event::ShadowStarted => "shadow_started",
            Event::CanaryStarted => "canary_started",
            Event::Promoted => "promoted",
            Event::RolledBack => "rolled_back",
            Event::Aborted => "aborted",
            Event::Rollback => "rollback",
        }
    }
}

/// One transition of a plugin's versions.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    /// The plugin.
    pub plugin: String,
    /// What happened.
    pub event: Event,
    /// The version serving before.
    pub from: String,
    /// The candidate, or the version served now.
    pub to: String,
    /// Why (a bound passed, who asked).
    pub reason: Option<String>,
    /// When (seconds since the epoch).
    pub at: u64,
}

/// The broker's staged rollouts: one trial per plugin, and the history.
#[derive(Default)]
pub struct Candidates {
    trials: Mutex<std::collections::BTreeMap<String, Arc<Trial>>>,
    history: Mutex<VecDeque<Transition>>,
    counts: Mutex<std::collections::BTreeMap<(String, &'static str), u64>>,
}

impl std::fmt::Debug for Candidates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidates")
            .field("trials", &self.trials.lock().len())
            .finish()
    }
}

impl Candidates {
    /// The trial of `plugin`, if one runs.
    pub fn get(&self, plugin: &str) -> Option<Arc<Trial>> {
        self.trials.lock().get(plugin).cloned()
    }

    /// Every running trial.
    pub fn all(&self) -> Vec<Arc<Trial>> {
        self.trials.lock().values().cloned().collect()
    }

    /// The latest transitions, oldest first.
    pub fn history(&self) -> Vec<Transition> {
        self.history.lock().iter().cloned().collect()
    }

    /// Transitions counted per plugin and event.
    pub fn counts(&self) -> Vec<(String, &'static str, u64)> {
        self.counts
            .lock()
            .iter()
            .map(|((p, e), n)| (p.clone(), *e, *n))
            .collect()
    }

    fn record(&self, plugin: &str, event: Event, from: &str, to: &str, reason: Option<String>) {
        use crate::nodes::plugins::short;
        match &reason {
            Some(r) => tracing::warn!(
                plugin, event = event.as_str(), from = %short(from), to = %short(to),
                "plugin rollout: {r}"
            ),
            None => tracing::info!(
                plugin, event = event.as_str(), from = %short(from), to = %short(to),
                "plugin rollout"
            ),
        }
        *self
            .counts
            .lock()
            .entry((plugin.to_owned(), event.as_str()))
            .or_default() += 1;
        let mut h = self.history.lock();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(Transition {
            plugin: plugin.to_owned(),
            event,
            from: from.to_owned(),
            to: to.to_owned(),
            reason,
            at: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
    }
}

/// Why a rollout step was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// No such plugin is serving.
    #[error("no plugin '{0}' is serving")]
    NotServing(String),
    /// Built-ins are replaced by upload with `override_builtin`.
    #[error("'{0}' is a built-in exchange type; replace it with an upload (override_builtin)")]
    Builtin(String),
    /// The candidate is the serving version.
    #[error("that file is the version of '{0}' already serving")]
    SameVersion(String),
    /// No trial runs.
    #[error("no candidate of '{0}' is staged")]
    NoCandidate(String),
    /// In a cluster a rollout step is a log entry: the node-local call was
    /// used where the agreed one is needed.
    #[error("in a cluster this step is agreed through the cluster's log")]
    Clustered,
    /// The cluster could not commit the step.
    #[error("the cluster did not commit it: {0}")]
    NoQuorum(String),
    /// No such kept version.
    #[error("no kept version of '{plugin}' matches '{hash}'")]
    NotKept {
        /// The plugin.
        plugin: String,
        /// The hash asked for.
        hash: String,
    },
    /// The file does not load, or an exchange refused it.
    #[error("{0}")]
    Refused(String),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
}

impl From<BrokerError> for RolloutError {
    fn from(e: BrokerError) -> Self {
        RolloutError::Refused(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::Destination;

    fn host() -> Arc<crate::plugin::PluginHost> {
        crate::plugin::PluginHost::new(
            Default::default(),
            None,
            crate::plugin::Compiler::Optimizing,
        )
        .unwrap()
    }

    /// A trial of a built-in version in `mode`, on no broker.
    fn trial(mode: Mode, policy: Policy) -> Arc<Trial> {
        let (_, bytes) = crate::builtins::BUILTINS[0];
        let v = host().load("p", bytes, false).unwrap();
        Trial::new(v, String::new(), bytes.into(), mode, policy)
    }

    fn canary(percent: f64, by_header: Option<&str>) -> Mode {
        Mode::Canary {
            percent,
            by_header: by_header.map(str::to_owned),
        }
    }

    #[test]
    fn the_canary_share_follows_the_key_and_the_percentage() {
        let keys: Vec<Message> = (0..10_000)
            .map(|i| {
                Message::new(
                    "x",
                    format!("key.{i}").as_str(),
                    Default::default(),
                    Vec::new(),
                )
            })
            .collect();
        let (ten, fifty) = (
            trial(canary(10.0, None), Policy::default()),
            trial(canary(50.0, None), Policy::default()),
        );
        let share = |t: &Trial| keys.iter().filter(|k| t.picks(k)).count();
        let (a, b) = (share(&ten), share(&fifty));
        assert!((800..1200).contains(&a), "10%: {a} of 10k");
        assert!((4600..5400).contains(&b), "50%: {b} of 10k");
        // Stable: a key picked at 10% is picked at 50% and again.
        for k in keys.iter().filter(|k| ten.picks(k)) {
            assert!(fifty.picks(k) && ten.picks(k));
        }
        // By a header: one tenant keeps one version, whatever its keys.
        let by_tenant = trial(canary(50.0, Some("tenant")), Policy::default());
        let of = |tenant: &str, key: &str| {
            let mut h = amq_protocol::types::FieldTable::default();
            h.insert(
                "tenant".into(),
                amq_protocol::types::AMQPValue::LongString(tenant.into()),
            );
            Message::new(
                "x",
                key,
                amq_protocol::protocol::BasicProperties::default().with_headers(h),
                Vec::new(),
            )
        };
        let tenants: Vec<String> = (0..100).map(|i| format!("tenant-{i}")).collect();
        let picked = tenants
            .iter()
            .filter(|t| by_tenant.picks(&of(t, "a")))
            .count();
        assert!((30..70).contains(&picked), "{picked} of 100 tenants");
        for t in &tenants {
            let first = by_tenant.picks(&of(t, "a"));
            assert!((0..20).all(|k| by_tenant.picks(&of(t, &format!("k{k}"))) == first));
        }
        // FNV-1a's published test vectors.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_fault_rate_past_the_bound_stops_the_canary_at_once() {
        let t = trial(
            canary(100.0, None),
            Policy {
                max_fault_rate: 0.1,
                ..Policy::default()
            },
        );
        for _ in 0..19 {
            t.record(Duration::from_micros(5), None);
        }
        t.record(
            Duration::from_micros(5),
            Some(&PluginFault::Trap("x".into())),
        );
        assert!(t.failure().is_none(), "1 fault in 20 is under 10%");
        let any = Message::new("x", "any", Default::default(), Vec::new());
        assert!(t.picks(&any));
        t.record(
            Duration::from_micros(5),
            Some(&PluginFault::Trap("x".into())),
        );
        t.record(
            Duration::from_micros(5),
            Some(&PluginFault::Trap("x".into())),
        );
        assert!(t.failure().unwrap().contains("fault rate 3/22"));
        assert!(!t.picks(&any), "a failed canary decides nothing");
    }

    /// A broker with the built-in topic router serving as plugin "router",
    /// an exchange "x" of that type with queues bound by `keys`.
    fn broker_with(
        keys: &[(&str, &str)],
    ) -> (Arc<crate::broker::Broker>, Arc<crate::broker::VHost>) {
        let b = crate::broker::Broker::new(host(), "/nonexistent".into()).unwrap();
        b.install_plugin("router", builtin("topic")).unwrap();
        let v = b.vhost("/").unwrap();
        b.declare_exchange(&v, spec("x"), false).unwrap();
        for (q, key) in keys {
            b.declare_queue(
                &v,
                crate::broker::QueueDecl {
                    name: (*q).into(),
                    ..Default::default()
                },
            )
            .unwrap();
            b.bind(
                &v,
                "x",
                Destination::Queue((*q).into()),
                key,
                Default::default(),
            )
            .unwrap();
        }
        (b, v)
    }

    fn builtin(kind: &str) -> &'static [u8] {
        crate::builtins::BUILTINS
            .iter()
            .find(|(n, _)| *n == kind)
            .unwrap()
            .1
    }

    fn spec(name: &str) -> crate::broker::ExchangeSpec {
        crate::broker::ExchangeSpec {
            name: name.into(),
            kind: "router".into(),
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: Default::default(),
        }
    }

    fn publish(b: &crate::broker::Broker, v: &crate::broker::VHost, x: &str, key: &str) -> usize {
        b.publish(
            v,
            x,
            Message::new(x, key, Default::default(), b"m".to_vec()),
        )
        .unwrap()
        .delivered
    }

    #[test]
    fn a_shadow_is_compared_never_applied_and_reaches_exchanges_declared_during_it() {
        let (b, v) = broker_with(&[("all", "orders.#")]);
        // The built-in direct router as the candidate: it takes "orders.#"
        // literally, so it disagrees on every real order key.
        let trial = b
            .stage_candidate(
                "router",
                builtin("direct"),
                Mode::Shadow { every: 1 },
                Policy::default(),
            )
            .unwrap();
        assert_eq!(
            publish(&b, &v, "x", "orders.eu"),
            1,
            "the serving version decides"
        );
        // An exchange declared during the trial is shadowed too.
        b.declare_exchange(&v, spec("y"), false).unwrap();
        b.bind(
            &v,
            "y",
            Destination::Queue("all".into()),
            "orders.#",
            Default::default(),
        )
        .unwrap();
        assert_eq!(publish(&b, &v, "y", "orders.us"), 1);
        assert_eq!(
            publish(&b, &v, "x", "orders.#"),
            1,
            "both route the literal key"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while trial.agreed.load(Ordering::Relaxed) + trial.disagreed.load(Ordering::Relaxed) < 3 {
            assert!(
                Instant::now() < deadline,
                "the shadow thread compared nothing"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(trial.disagreed.load(Ordering::Relaxed), 2);
        assert_eq!(trial.agreed.load(Ordering::Relaxed), 1);
        let d = trial.disagreements();
        assert_eq!((d[0].exchange.as_str(), d[1].exchange.as_str()), ("x", "y"));
        assert_eq!(
            (d[0].serving.as_str(), d[0].candidate.as_str()),
            ("queue:all", "(no binding)")
        );
        b.abort_candidate("router").unwrap();
        assert!(b.candidates().get("router").is_none());
        let x = b.vhost("/").unwrap().exchange("y").unwrap();
        assert!(
            !x.staged.load(Ordering::Relaxed),
            "nothing staged is left behind"
        );
        let events: Vec<Event> = b
            .candidates()
            .history()
            .into_iter()
            .map(|t| t.event)
            .collect();
        assert_eq!(events, [Event::ShadowStarted, Event::Aborted]);
    }

    #[test]
    fn a_canary_decides_for_its_keys_and_is_promoted_by_the_judge() {
        let (b, v) = broker_with(&[("all", "orders.#")]);
        let serving = b.plugins().get("router").unwrap().hash.clone();
        b.stage_candidate(
            "router",
            builtin("direct"),
            canary(100.0, None),
            Policy {
                promote_after_messages: 2,
                promote_after_secs: 0,
                ..Policy::default()
            },
        )
        .unwrap();
        assert_eq!(
            publish(&b, &v, "x", "orders.eu"),
            0,
            "the candidate decides (literally)"
        );
        b.judge_candidates();
        assert_eq!(
            b.plugins().get("router").unwrap().hash,
            serving,
            "one message is not enough"
        );
        assert_eq!(publish(&b, &v, "x", "orders.#"), 1);
        b.judge_candidates();
        let now = b.plugins().get("router").unwrap().hash.clone();
        assert_ne!(now, serving, "promoted");
        assert!(b.candidates().get("router").is_none());
        assert_eq!(
            publish(&b, &v, "x", "orders.eu"),
            0,
            "the promoted version serves everything"
        );
        assert!(matches!(
            b.stage_candidate(
                "router",
                builtin("direct"),
                Mode::Shadow { every: 1 },
                Policy::default()
            ),
            Err(RolloutError::SameVersion(_))
        ));
    }

    #[test]
    fn a_canary_past_its_p99_bound_is_rolled_back_by_the_judge() {
        let (b, _v) = broker_with(&[("all", "orders.#")]);
        let serving = b.plugins().get("router").unwrap().hash.clone();
        let trial = b
            .stage_candidate(
                "router",
                builtin("direct"),
                canary(50.0, None),
                Policy {
                    max_p99_us: 1_000,
                    p99_min_calls: 10,
                    ..Policy::default()
                },
            )
            .unwrap();
        for _ in 0..9 {
            trial.record(Duration::from_millis(5), None);
        }
        b.judge_candidates();
        assert!(
            b.candidates().get("router").is_some(),
            "9 calls: not judged yet"
        );
        trial.record(Duration::from_millis(5), None);
        b.judge_candidates();
        assert!(b.candidates().get("router").is_none());
        assert_eq!(b.plugins().get("router").unwrap().hash, serving);
        let last = b.candidates().history().pop().unwrap();
        assert_eq!(last.event, Event::RolledBack);
        assert!(last.reason.unwrap().contains("passed 1000 µs"));
    }
}
