//! The broker core: virtual hosts, exchanges, bindings, queues, and the
//! publish path. No protocol here: the AMQP front end calls these methods
//! and turns their errors into reply codes ([`BrokerError::reply_code`]).

mod connections;
mod durable;
mod exchange;
mod plugins;
mod queue;
mod ready;
mod route;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::{Mutex, RwLock};

pub use connections::{ChannelInfo, ConnectionInfo, Connections, Registered, TlsInfo};
pub use durable::{DefinitionsError, Recovery};
use durable::{binding_change, exchange_change, queue_definition};
pub use exchange::{Binding, BindingTable, Destination, Exchange, ExchangeStats};
pub use queue::Pushed;
pub use queue::{CONSUMER_WINDOW, ChannelCredit, ConsumeError, Consumer, Dispatch, Entry, Queue};
pub use queue::{DeadLetterSink, DeathReason, Overflow, QueueDecl, QueueLimits, message_ttl};
pub use route::{FaultReport, PublishOutcome};

use crate::message::{Message, encode_table_body};
use crate::plugin::{
    FilterPlugin, PluginError, PluginHost, PluginRegistry, PluginVersion, RouterPlugin,
    TransformPlugin, binding_input,
};
use crate::store::Change;

/// The hash map of the message path: exchange and queue names, consumer
/// tags, memoized routing keys. foldhash instead of the default SipHash:
/// these look-ups run several times per message, the keys are short, and
/// the per-process random seed still keeps hostile names from colliding
/// on purpose.
pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Exchange argument naming a transform plugin.
pub const ARG_TRANSFORM: &str = "x-wasmq-transform";
/// Binding argument naming a filter plugin.
pub const ARG_FILTER: &str = "x-wasmq-filter";
/// Exchange argument: where unroutable messages go.
pub const ARG_ALTERNATE_EXCHANGE: &str = "alternate-exchange";
/// Exchange argument: where faulted or dead-lettered messages go.
pub const ARG_DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";

/// Why a broker operation failed. Each variant maps to the AMQP reply code a
/// RabbitMQ client expects.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No such exchange or queue (404).
    #[error("NOT_FOUND - no {kind} '{name}' in vhost '{vhost}'")]
    NotFound {
        /// "exchange" or "queue".
        kind: &'static str,
        /// Virtual host.
        vhost: String,
        /// Name.
        name: String,
    },
    /// Redeclared with other properties, bad arguments, in use, ... (406).
    #[error("PRECONDITION_FAILED - {0}")]
    PreconditionFailed(String),
    /// A reserved name or a permission missing (403).
    #[error("ACCESS_REFUSED - {0}")]
    AccessRefused(String),
    /// An exclusive queue of another connection (405).
    #[error("RESOURCE_LOCKED - {0}")]
    ResourceLocked(String),
    /// An exchange type no plugin provides (503, as RabbitMQ does).
    #[error(
        "COMMAND_INVALID - unknown exchange type '{kind}': no plugin of that name is serving (built-ins: direct, topic, fanout, headers; custom types are loaded from {plugin_dir})"
    )]
    UnknownExchangeType {
        /// The type asked for.
        kind: String,
        /// The plugin folder, so the user knows where to put it.
        plugin_dir: String,
    },
    /// A plugin refused or faulted while setting up (406).
    #[error("PRECONDITION_FAILED - {0}")]
    Plugin(#[from] PluginError),
    /// A name or key longer than the AMQP short string (255 bytes) that
    /// carries it to clients (406; the admin API answers 400). Only the
    /// admin API and definitions files can send one: AMQP's decoder cannot.
    #[error("PRECONDITION_FAILED - {what} of {len} bytes: AMQP allows at most 255")]
    TooLong {
        /// What it names: "exchange name", "routing key", ...
        what: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A built-in plugin did not load (only when the broker starts).
    #[error("INTERNAL_ERROR - built-in plugin: {0}")]
    BuiltinPlugin(#[from] crate::plugin::LoadError),
    /// The message store failed (541, a connection error).
    #[error("INTERNAL_ERROR - message store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl BrokerError {
    /// The AMQP 0-9-1 reply code.
    pub fn reply_code(&self) -> u16 {
        match self {
            BrokerError::NotFound { .. } => 404,
            BrokerError::PreconditionFailed(_)
            | BrokerError::Plugin(_)
            | BrokerError::TooLong { .. } => 406,
            BrokerError::AccessRefused(_) => 403,
            BrokerError::ResourceLocked(_) => 405,
            BrokerError::UnknownExchangeType { .. } => 503,
            BrokerError::Store(_) | BrokerError::BuiltinPlugin(_) => 541,
        }
    }
}

/// Refuse `s` if an AMQP short string cannot carry it: every name a client
/// is sent (in a delivery, a return, a declare-ok) must fit one.
pub fn check_short(what: &'static str, s: &str) -> Result<(), BrokerError> {
    match s.len() {
        0..=255 => Ok(()),
        len => Err(BrokerError::TooLong { what, len }),
    }
}

/// What to declare an exchange as.
#[derive(Clone, Debug, Default)]
pub struct ExchangeSpec {
    /// Name.
    pub name: String,
    /// Type (router plugin name).
    pub kind: String,
    /// Durable.
    pub durable: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A virtual host: its own exchanges and queues.
pub struct VHost {
    /// Name.
    pub name: String,
    exchanges: RwLock<Map<String, Arc<Exchange>>>,
    queues: RwLock<Map<String, Arc<Queue>>>,
}

impl std::fmt::Debug for VHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VHost")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl VHost {
    /// An exchange by name (the default exchange `""` is not an object).
    pub fn exchange(&self, name: &str) -> Result<Arc<Exchange>, BrokerError> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found("exchange", name))
    }

    /// A queue by name.
    pub fn queue(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        self.queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found("queue", name))
    }

    /// All exchanges.
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    /// All queues.
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    fn not_found(&self, kind: &'static str, name: &str) -> BrokerError {
        BrokerError::NotFound {
            kind,
            vhost: self.name.clone(),
            name: name.to_owned(),
        }
    }
}

/// The broker: plugin host, plugin registry and virtual hosts.
pub struct Broker {
    /// Itself, weakly: for the dead-letter sinks of queues.
    self_ref: std::sync::Weak<Broker>,
    host: Arc<PluginHost>,
    registry: PluginRegistry,
    plugin_dir: PathBuf,
    vhosts: RwLock<Map<String, Arc<VHost>>>,
    /// Held for writing while a plugin version is swapped in, for reading
    /// while an exchange or filtered binding picks its version: so nothing
    /// declared during a swap is left on the old version.
    swap: RwLock<()>,
    /// Serialises swaps with each other.
    swapping: Mutex<()>,
    /// Flow watermark of new queues, in bytes of ready messages.
    queue_flow_bytes: std::sync::atomic::AtomicUsize,
    /// The message store, once attached ([`Broker::recover`]).
    store: std::sync::OnceLock<Arc<crate::store::Store>>,
    /// Serialises writes of the durable definitions.
    definitions: Mutex<()>,
    /// Set while [`Broker::recover`] runs: definitions are not saved.
    recovering: std::sync::atomic::AtomicBool,
    /// Open AMQP connections.
    connections: Arc<Connections>,
    /// Resource alarms (disk space low, memory high): while one is raised,
    /// connections that publish are blocked (connection.blocked, and not
    /// read).
    alarms: crate::alarm::Alarms,
    /// The built-in plugins as shipped. The predeclared `amq.*` exchanges
    /// always route with these, whatever replaces a built-in type.
    /// Set once in [`Broker::new`].
    builtins: std::sync::OnceLock<Map<String, Arc<PluginVersion>>>,
    /// A plugin file may replace a built-in type (`plugins.override_builtins`).
    override_builtins: std::sync::atomic::AtomicBool,
    /// (name, content hash) of built-in overrides an operator asked for
    /// one by one (an admin upload with `override_builtin=true`).
    overrides_allowed: Mutex<Vec<(String, String)>>,
}

/// A dead-lettered copy of `m`, as RabbitMQ makes it: routed with the
/// queue's `x-dead-letter-routing-key` (or its own key), its `expiration`
/// removed (kept as `original-expiration`), and an `x-death` entry for
/// (queue, reason) added or counted up, newest first, plus the
/// `x-first-death-*` headers on its first death.
pub(crate) fn dead_lettered(queue: &Queue, m: &Message, reason: DeathReason) -> Message {
    use amq_protocol::types::{FieldArray, LongString, ShortString};
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    let mut headers = m.properties.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        t.inner().get("queue") == Some(&s(&queue.name))
            && t.inner().get("reason") == Some(&s(reason.as_str()))
    };
    let mut count = 1i64;
    if let Some(at) = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)))
        && let AMQPValue::FieldTable(t) = deaths.remove(at)
        && let Some(AMQPValue::LongLongInt(n)) = t.inner().get("count")
    {
        count = n + 1;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut death = FieldTable::default();
    death.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
    death.insert(ShortString::from("reason"), s(reason.as_str()));
    death.insert(ShortString::from("queue"), s(&queue.name));
    death.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
    death.insert(ShortString::from("exchange"), s(&m.exchange));
    death.insert(
        ShortString::from("routing-keys"),
        AMQPValue::FieldArray(FieldArray::from(vec![s(&m.routing_key)])),
    );
    if let Some(exp) = m.properties.expiration() {
        death.insert(ShortString::from("original-expiration"), s(exp.as_str()));
    }
    deaths.insert(0, AMQPValue::FieldTable(death));
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.inner().contains_key("x-first-death-reason") {
        headers.insert(
            ShortString::from("x-first-death-reason"),
            s(reason.as_str()),
        );
        headers.insert(ShortString::from("x-first-death-queue"), s(&queue.name));
        headers.insert(ShortString::from("x-first-death-exchange"), s(&m.exchange));
    }
    let mut props = m.properties.clone().with_headers(headers);
    if props.expiration().is_some() {
        // Rebuild without the expiration: a dead letter does not expire again.
        let mut p = amq_protocol::protocol::BasicProperties::default();
        if let Some(v) = props.content_type() {
            p = p.with_content_type(v.clone());
        }
        if let Some(v) = props.content_encoding() {
            p = p.with_content_encoding(v.clone());
        }
        if let Some(v) = props.headers() {
            p = p.with_headers(v.clone());
        }
        if let Some(v) = props.delivery_mode() {
            p = p.with_delivery_mode(*v);
        }
        if let Some(v) = props.priority() {
            p = p.with_priority(*v);
        }
        if let Some(v) = props.correlation_id() {
            p = p.with_correlation_id(v.clone());
        }
        if let Some(v) = props.reply_to() {
            p = p.with_reply_to(v.clone());
        }
        if let Some(v) = props.message_id() {
            p = p.with_message_id(v.clone());
        }
        if let Some(v) = props.timestamp() {
            p = p.with_timestamp(*v);
        }
        if let Some(v) = props.kind() {
            p = p.with_type(v.clone());
        }
        if let Some(v) = props.user_id() {
            p = p.with_user_id(v.clone());
        }
        if let Some(v) = props.app_id() {
            p = p.with_app_id(v.clone());
        }
        if let Some(v) = props.cluster_id() {
            p = p.with_cluster_id(v.clone());
        }
        props = p;
    }
    let key = queue
        .limits
        .dead_letter_routing_key
        .clone()
        .unwrap_or_else(|| m.routing_key.clone());
    let exchange = queue
        .limits
        .dead_letter_exchange
        .clone()
        .unwrap_or_default();
    Message::new(exchange, key, props, m.body.clone())
}

/// Default flow watermark per queue: ready messages above this many bytes
/// hold back the publishers feeding the queue.
pub const DEFAULT_QUEUE_FLOW_BYTES: usize = 64 << 20;

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("plugin_dir", &self.plugin_dir)
            .finish_non_exhaustive()
    }
}

/// The exchanges every vhost starts with, as in RabbitMQ.
const PREDECLARED: &[(&str, &str)] = &[
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
    ("amq.match", "headers"),
];

/// A string-valued declare argument (a plugin or exchange name, a
/// routing key); another type is the client's error, named in the text.
pub(crate) fn string_arg(args: &FieldTable, key: &str) -> Result<Option<String>, String> {
    match args.inner().get(key) {
        None => Ok(None),
        Some(AMQPValue::LongString(s)) => {
            Ok(Some(String::from_utf8_lossy(s.as_bytes()).into_owned()))
        }
        Some(AMQPValue::ShortString(s)) => Ok(Some(s.as_str().to_owned())),
        Some(other) => Err(format!(
            "invalid arg '{key}': expected a string, got {other:?}"
        )),
    }
}

fn arg_str(args: &FieldTable, key: &str) -> Result<Option<String>, BrokerError> {
    string_arg(args, key).map_err(BrokerError::PreconditionFailed)
}

impl Broker {
    /// A broker with the built-in plugins loaded and the default vhost `/`.
    /// Plugins in `plugin_dir` are loaded by [`Broker::load_plugin_dir`].
    pub fn new(host: Arc<PluginHost>, plugin_dir: PathBuf) -> Result<Arc<Self>, BrokerError> {
        let broker = Arc::new_cyclic(|self_ref| Broker {
            self_ref: self_ref.clone(),
            host,
            registry: PluginRegistry::default(),
            plugin_dir,
            vhosts: RwLock::new(Map::default()),
            swap: RwLock::new(()),
            swapping: Mutex::new(()),
            queue_flow_bytes: DEFAULT_QUEUE_FLOW_BYTES.into(),
            store: std::sync::OnceLock::new(),
            definitions: Mutex::new(()),
            recovering: false.into(),
            connections: Arc::default(),
            alarms: crate::alarm::Alarms::default(),
            builtins: std::sync::OnceLock::new(),
            override_builtins: false.into(),
            overrides_allowed: Mutex::new(Vec::new()),
        });
        let mut builtins = Map::default();
        for (name, bytes) in crate::builtins::BUILTINS {
            let v = broker.host.load(name, bytes, true)?;
            broker.registry.serve(v.clone());
            broker.optimize_later(&v, bytes);
            builtins.insert((*name).to_owned(), v);
        }
        let _ = broker.builtins.set(builtins);
        broker.add_vhost("/")?;
        Ok(broker)
    }

    fn builtins(&self) -> &Map<String, Arc<PluginVersion>> {
        self.builtins.get().expect("set in Broker::new")
    }

    /// Let plugin files replace built-in exchange types (off by default:
    /// a file that happens to be called `direct.wasm` must not change what
    /// every direct exchange does).
    pub fn set_override_builtins(&self, allowed: bool) {
        self.override_builtins
            .store(allowed, std::sync::atomic::Ordering::Relaxed);
    }

    /// Let the version of built-in `name` with content hash `hash` replace
    /// it, once, even with overrides off: an operator asked for it by name.
    pub fn allow_override(&self, name: &str, hash: &str) {
        self.overrides_allowed
            .lock()
            .push((name.to_owned(), hash.to_owned()));
    }

    /// Why plugin `name` (content hash `hash`) may not be installed, if it
    /// would replace a built-in type without the operator saying so.
    pub(crate) fn builtin_override_refused(&self, name: &str, hash: &str) -> Option<String> {
        if !self.builtins().contains_key(name)
            || self
                .override_builtins
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        let mut allowed = self.overrides_allowed.lock();
        if let Some(at) = allowed.iter().position(|(n, h)| n == name && h == hash) {
            allowed.remove(at);
            return None;
        }
        Some(format!(
            "'{name}' is a built-in exchange type; replacing it must be deliberate: set plugins.override_builtins = true, or upload with ?override_builtin=true (the predeclared amq.* exchanges keep the built-in either way)"
        ))
    }

    /// Whether `name` is a predeclared exchange (`amq.direct`, ...): these
    /// route with the shipped built-ins, never with an override.
    pub(crate) fn is_predeclared(name: &str) -> bool {
        PREDECLARED.iter().any(|(x, _)| *x == name)
    }

    /// Open AMQP connections.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// The resource alarms: `Some(reasons)` while publishers are blocked.
    pub fn alarm(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.alarms.subscribe()
    }

    /// Whether `resource`'s alarm is raised.
    pub fn alarm_raised(&self, resource: crate::alarm::Resource) -> bool {
        self.alarms.raised(resource)
    }

    /// Raise (`Some`) or clear (`None`) `resource`'s alarm; publishers are
    /// blocked while any is raised.
    pub fn set_alarm(&self, resource: crate::alarm::Resource, reason: Option<String>) {
        self.alarms.set(resource, reason);
    }

    /// Set the flow watermark (bytes of ready messages) of queues declared
    /// from now on.
    pub fn set_queue_flow_bytes(&self, bytes: usize) {
        self.queue_flow_bytes
            .store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The plugin host.
    pub fn host(&self) -> &Arc<PluginHost> {
        &self.host
    }

    /// The plugin registry.
    pub fn plugins(&self) -> &PluginRegistry {
        &self.registry
    }

    /// The plugin folder.
    pub fn plugin_dir(&self) -> &std::path::Path {
        &self.plugin_dir
    }

    /// Create a vhost with the predeclared exchanges (idempotent).
    pub fn add_vhost(&self, name: &str) -> Result<Arc<VHost>, BrokerError> {
        check_short("vhost name", name)?;
        if let Some(v) = self.vhosts.read().get(name) {
            return Ok(v.clone());
        }
        let vhost = Arc::new(VHost {
            name: name.to_owned(),
            exchanges: RwLock::new(Map::default()),
            queues: RwLock::new(Map::default()),
        });
        for (xname, kind) in PREDECLARED {
            let spec = ExchangeSpec {
                name: (*xname).into(),
                kind: (*kind).into(),
                durable: true,
                ..Default::default()
            };
            let x = self.build_exchange(&spec)?;
            vhost.exchanges.write().insert(spec.name, x);
        }
        self.vhosts
            .write()
            .entry(name.to_owned())
            .or_insert(vhost.clone());
        Ok(vhost)
    }

    /// Expire (and dead-letter) messages whose TTL passed at the head of
    /// every queue, and delete queues unused past their `x-expires`. The
    /// server runs this periodically; queue operations also expire their
    /// head as they go.
    pub fn expire_queues(&self) {
        for v in self.vhosts() {
            for q in v.queues() {
                q.expire();
                if let Some(limit) = q.limits.expires
                    && q.unused_for().is_some_and(|idle| idle >= limit)
                    && self.delete_queue(&v, &q.name, false, false).is_ok()
                {
                    tracing::info!(queue = %q.name, vhost = %v.name, "queue deleted after {limit:?} unused (x-expires)");
                }
            }
        }
    }

    /// A vhost by name.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().get(name).cloned()
    }

    /// All vhosts.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.vhosts.read().values().cloned().collect()
    }

    fn build_exchange(&self, spec: &ExchangeSpec) -> Result<Arc<Exchange>, BrokerError> {
        let _swap = self.swap.read();
        let version = if Self::is_predeclared(&spec.name) {
            self.builtins().get(&spec.kind).cloned()
        } else {
            self.registry.get(&spec.kind)
        };
        let version = version.ok_or_else(|| BrokerError::UnknownExchangeType {
            kind: spec.kind.clone(),
            plugin_dir: self.plugin_dir.display().to_string(),
        })?;
        let encoded = encode_table_body(&spec.arguments);
        let router = RouterPlugin::new(&self.host, &version, &spec.name, &encoded, &())?;
        let transform_name = arg_str(&spec.arguments, ARG_TRANSFORM)?;
        let transform = match &transform_name {
            None => None,
            Some(t) => {
                let v = self.registry.get(t).ok_or_else(|| {
                    BrokerError::PreconditionFailed(format!(
                        "unknown transform plugin '{t}' in {ARG_TRANSFORM} (plugin folder: {})",
                        self.plugin_dir.display()
                    ))
                })?;
                Some(Arc::new(TransformPlugin::new(
                    &self.host, &v, &spec.name, &encoded,
                )?))
            }
        };
        Ok(Arc::new(Exchange {
            name: spec.name.clone(),
            kind: spec.kind.clone(),
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            alternate_exchange: arg_str(&spec.arguments, ARG_ALTERNATE_EXCHANGE)?,
            dead_letter_exchange: arg_str(&spec.arguments, ARG_DEAD_LETTER_EXCHANGE)?,
            transform_name,
            arguments: spec.arguments.clone(),
            stats: ExchangeStats::default(),
            encoded_arguments: encoded,
            control: Mutex::new(()),
            bindings: ArcSwap::from_pointee(BindingTable::default()),
            router: ArcSwap::from_pointee(router),
            memo: ArcSwap::from_pointee(Default::default()),
            transform: ArcSwapOption::new(transform),
        }))
    }

    /// Declare an exchange (RabbitMQ semantics: redeclaring with the same
    /// type and flags is a no-op; different ones fail with 406; `amq.`
    /// names are reserved). Returns the exchange.
    pub fn declare_exchange(
        &self,
        vhost: &VHost,
        spec: ExchangeSpec,
        passive: bool,
    ) -> Result<Arc<Exchange>, BrokerError> {
        check_short("exchange name", &spec.name)?;
        check_short("exchange type", &spec.kind)?;
        if spec.name.is_empty() && passive {
            return Err(BrokerError::AccessRefused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        if let Ok(x) = vhost.exchange(&spec.name) {
            if passive {
                return Ok(x);
            }
            if x.kind != spec.kind
                || x.durable != spec.durable
                || x.auto_delete != spec.auto_delete
                || x.internal != spec.internal
            {
                return Err(BrokerError::PreconditionFailed(format!(
                    "inequivalent arg 'type' or flags for exchange '{}' in vhost '{}': received type '{}' durable {} auto_delete {} internal {}, but current is type '{}' durable {} auto_delete {} internal {}",
                    spec.name,
                    vhost.name,
                    spec.kind,
                    spec.durable,
                    spec.auto_delete,
                    spec.internal,
                    x.kind,
                    x.durable,
                    x.auto_delete,
                    x.internal
                )));
            }
            return Ok(x);
        }
        if passive {
            return Err(vhost.not_found("exchange", &spec.name));
        }
        if spec.name.starts_with("amq.") {
            return Err(BrokerError::AccessRefused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        let durable = spec.durable;
        let x = self.build_exchange(&spec)?;
        let x = vhost
            .exchanges
            .write()
            .entry(spec.name)
            .or_insert(x)
            .clone();
        if durable {
            self.persist(vec![exchange_change(&vhost.name, &x)])?;
        }
        Ok(x)
    }

    /// Delete an exchange and every binding to or from it.
    pub fn delete_exchange(
        &self,
        vhost: &VHost,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        if name.starts_with("amq.") || name.is_empty() {
            return Err(BrokerError::AccessRefused(format!(
                "cannot delete predeclared exchange '{name}'"
            )));
        }
        let x = vhost.exchange(name)?;
        if if_unused && !x.bindings.load().is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "exchange '{name}' in vhost '{}' in use",
                vhost.name
            )));
        }
        vhost.exchanges.write().remove(name);
        self.remove_bindings_to(vhost, &Destination::Exchange(name.to_owned()));
        if x.durable {
            // Its own bindings go with it.
            let mut changes: Vec<Change> = x
                .bindings
                .load()
                .iter()
                .map(|b| binding_change(&vhost.name, &x.name, b, false))
                .collect();
            changes.push(Change::DeleteExchange {
                vhost: vhost.name.clone(),
                name: name.to_owned(),
            });
            self.persist(changes)?;
        }
        Ok(())
    }

    /// Declare a queue (idempotent for the same flags). `owner` makes it
    /// exclusive to that connection.
    pub fn declare_queue(
        &self,
        vhost: &VHost,
        name: &str,
        durable: bool,
        owner: Option<u64>,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<Arc<Queue>, BrokerError> {
        check_short("queue name", name)?;
        if name.starts_with("amq.") && !name.starts_with("amq.gen-") {
            return Err(BrokerError::AccessRefused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let mut queues = vhost.queues.write();
        if let Some(q) = queues.get(name) {
            q.touch();
            if q.owner.is_some() && q.owner != owner {
                return Err(BrokerError::ResourceLocked(format!(
                    "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'",
                    vhost.name
                )));
            }
            // RabbitMQ's equivalence: the flags a queue was declared with
            // are part of what it is.
            let exclusive = owner.is_some();
            for (arg, received, current) in [
                ("durable", durable, q.durable),
                ("auto_delete", auto_delete, q.auto_delete),
                ("exclusive", exclusive, q.owner.is_some()),
            ] {
                if received != current {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "inequivalent arg '{arg}' for queue '{name}' in vhost '{}': received '{received}' but current is '{current}'",
                        vhost.name
                    )));
                }
            }
            if q.arguments != arguments {
                return Err(BrokerError::PreconditionFailed(format!(
                    "inequivalent arg for queue '{name}' in vhost '{}': declared with other arguments than it has",
                    vhost.name
                )));
            }
            return Ok(q.clone());
        }
        let limits = QueueLimits::parse(&arguments).map_err(|e| {
            BrokerError::PreconditionFailed(format!(
                "{e} for queue '{name}' in vhost '{}'",
                vhost.name
            ))
        })?;
        let flow = self
            .queue_flow_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let sink = limits
            .dead_letter_exchange
            .is_some()
            .then(|| self.dead_letter_sink(&vhost.name));
        let decl = QueueDecl {
            name: name.to_owned(),
            durable,
            owner,
            auto_delete,
            arguments,
        };
        // Exclusive queues die with their connection, so never outlive a
        // restart: only durable shared queues get a log.
        let (log, recovered) = match self.store.get() {
            Some(store) if durable && owner.is_none() => {
                let (log, recovered) = store.open_queue(&vhost.name, name)?;
                (Some(log), recovered)
            }
            _ => (None, Vec::new()),
        };
        let q = Arc::new(Queue::new(decl, limits, flow, sink, log));
        q.restore(recovered);
        queues.insert(name.to_owned(), q.clone());
        drop(queues);
        if q.log().is_some() {
            self.persist(vec![Change::PutQueue {
                vhost: vhost.name.clone(),
                queue: queue_definition(&q),
            }])?;
        }
        Ok(q)
    }

    /// The sink of a queue with a dead-letter exchange: republish each dead
    /// message there, with RabbitMQ's `x-death` bookkeeping. Holds the
    /// broker weakly (queues live inside it).
    fn dead_letter_sink(&self, vhost: &str) -> DeadLetterSink {
        let broker = self.self_ref.clone();
        let vhost = vhost.to_owned();
        Arc::new(move |queue: &Queue, dead: Vec<(Entry, DeathReason)>| {
            let (Some(broker), Some(dlx)) = (
                broker.upgrade(),
                queue.limits.dead_letter_exchange.as_deref(),
            ) else {
                return;
            };
            let Some(v) = broker.vhost(&vhost) else {
                return;
            };
            for (entry, reason) in dead {
                let original = match queue.message(&entry) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(queue = %queue.name, "reading a dead letter back failed: {e}");
                        continue;
                    }
                };
                let message = dead_lettered(queue, &original, reason);
                match broker.publish(&v, dlx, message) {
                    Ok(out) if out.delivered > 0 => {}
                    Ok(_) => {
                        tracing::debug!(queue = %queue.name, dlx, "dead letter routed nowhere; dropped")
                    }
                    Err(e) => tracing::warn!(queue = %queue.name, "dead-lettering failed: {e}"),
                }
            }
        })
    }

    /// Delete a queue and its bindings; its consumers are cancelled. Returns
    /// the messages it held.
    pub fn delete_queue(
        &self,
        vhost: &VHost,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<usize, BrokerError> {
        let q = vhost.queue(name)?;
        if if_unused && q.consumer_count() > 0 {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{}' in use",
                vhost.name
            )));
        }
        if if_empty && !q.is_empty() {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{}' not empty",
                vhost.name
            )));
        }
        vhost.queues.write().remove(name);
        self.remove_bindings_to(vhost, &Destination::Queue(name.to_owned()));
        q.cancel_consumers();
        q.destroy_log();
        let n = q.purge();
        if q.log().is_some() {
            self.persist(vec![Change::DeleteQueue {
                vhost: vhost.name.clone(),
                name: name.to_owned(),
            }])?;
        }
        Ok(n)
    }

    fn remove_bindings_to(&self, vhost: &VHost, destination: &Destination) {
        for x in vhost.exchanges() {
            let ids = x.bindings.load().ids_to(destination);
            if !ids.is_empty() {
                self.remove_bindings(vhost, &x, &ids);
            }
        }
    }

    fn remove_bindings(&self, vhost: &VHost, x: &Arc<Exchange>, ids: &[u32]) {
        let _control = x.control.lock();
        let table = x.bindings.load_full();
        x.bindings.store(Arc::new(table.without(ids)));
        let router = x.router.load();
        for id in ids {
            if let Some(b) = table.get(*id) {
                router.unbind(b.id, &b.bind_input);
            }
        }
        x.reset_memo();
        let gone = x.auto_delete && x.bindings.load().is_empty();
        if gone {
            vhost.exchanges.write().remove(&x.name);
        }
        if x.durable {
            let mut changes: Vec<Change> = ids
                .iter()
                .filter_map(|id| table.get(*id))
                .map(|b| binding_change(&vhost.name, &x.name, b, false))
                .collect();
            if gone {
                changes.push(Change::DeleteExchange {
                    vhost: vhost.name.clone(),
                    name: x.name.clone(),
                });
            }
            if let Err(e) = self.persist(changes) {
                tracing::error!("saving definitions after unbinding: {e}");
            }
        }
    }

    /// Bind `destination` to exchange `source` with `key` and `arguments`.
    /// Idempotent; a binding argument `x-wasmq-filter` attaches a filter.
    pub fn bind(
        &self,
        vhost: &VHost,
        source: &str,
        destination: Destination,
        key: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        check_short("routing key", key)?;
        if source.is_empty() {
            return Err(BrokerError::AccessRefused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        let x = vhost.exchange(source)?;
        match &destination {
            Destination::Queue(q) => drop(vhost.queue(q)?),
            Destination::Exchange(e) => drop(vhost.exchange(e)?),
        }
        let _swap = self.swap.read();
        let _control = x.control.lock();
        let table = x.bindings.load_full();
        let encoded = encode_table_body(&arguments);
        if table.find(&destination, key, &encoded).is_some() {
            return Ok(());
        }
        let filter_name = arg_str(&arguments, ARG_FILTER)?;
        let filter = match &filter_name {
            None => None,
            Some(name) => {
                let v = self.registry.get(name).ok_or_else(|| {
                    BrokerError::PreconditionFailed(format!(
                        "unknown filter plugin '{name}' in {ARG_FILTER} (plugin folder: {})",
                        self.plugin_dir.display()
                    ))
                })?;
                Some(Arc::new(FilterPlugin::new(
                    &self.host, &v, source, key, &encoded,
                )?))
            }
        };
        let id = table.next_id;
        let bind_input = binding_input(
            key,
            matches!(destination, Destination::Exchange(_)),
            destination.name(),
            &encoded,
        );
        let binding = Binding {
            id,
            bind_input,
            destination,
            key: key.to_owned(),
            arguments,
            encoded_arguments: encoded,
            filter,
            filter_name,
        };
        // Order matters; see the exchange module docs.
        x.bindings.store(Arc::new(table.with(binding)));
        let router = x.router.load();
        let applied = {
            let table = x.bindings.load();
            let b = table.get(id).expect("just added");
            router.bind(id, &b.bind_input)
        };
        if let Err(e) = applied {
            x.bindings.store(table);
            return Err(e.into());
        }
        x.reset_memo();
        drop(_control);
        // RabbitMQ's rule: a binding is durable if both its ends are.
        let durable_destination = |b: &Binding| match &b.destination {
            Destination::Queue(q) => vhost.queue(q).is_ok_and(|q| q.durable && q.owner.is_none()),
            Destination::Exchange(e) => vhost.exchange(e).is_ok_and(|e| e.durable),
        };
        if x.durable {
            let table = x.bindings.load();
            if let Some(b) = table.get(id).filter(|b| durable_destination(b)) {
                self.persist(vec![binding_change(&vhost.name, &x.name, b, true)])?;
            }
        }
        Ok(())
    }

    /// Remove a binding (a missing one is not an error, as in RabbitMQ).
    pub fn unbind(
        &self,
        vhost: &VHost,
        source: &str,
        destination: &Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        let x = vhost.exchange(source)?;
        let encoded = encode_table_body(arguments);
        let id = x
            .bindings
            .load()
            .find(destination, key, &encoded)
            .map(|b| b.id);
        if let Some(id) = id {
            self.remove_bindings(vhost, &x, &[id]);
        }
        Ok(())
    }
}
