//! The broker core: virtual hosts, exchanges, bindings, queues, and the
//! publish path. No protocol here: the AMQP front end calls these methods
//! and turns their errors into reply codes ([`BrokerError::reply_code`]).
//!
//! This file holds the [`Broker`] and its [`VHost`]s; the rest has a file
//! each: `error` (what fails and its reply code), `declare` (definition
//! changes: declare, delete, bind, unbind), `route` (the publish path),
//! `exchange` (bindings and the plugins deciding for an exchange), `queue`
//! (a queue, its arguments, consumers and ready messages),
//! `dead_letter` (RabbitMQ's dead-lettering), `durable` (what is saved and
//! recovered), `plugins` (loading and swapping plugin versions),
//! `connections` (the registry the admin API reads).
//!
//! What makes several nodes one broker is in `crate::nodes`; the plugin
//! author's tools that run beside the publish path (candidates, captures,
//! traces) are in `crate::author`.

mod access;
pub(crate) mod connections;
mod dead_letter;
mod declare;
mod delayed;
pub use delayed::schedules;
mod durable;
mod error;
pub(crate) mod exchange;
pub(crate) mod plugins;
mod policies;
mod queue;
mod route;
pub mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::{Mutex, RwLock};

pub use crate::nodes::quorum::DEFAULT_GROUP_SIZE;
pub use crate::nodes::{BrokerApplier, definition_commands};
pub use access::AccessChangeError;
pub(crate) use access::refused as access_refused;
pub use connections::{ChannelInfo, ConnectionInfo, Connections, Registered, TlsInfo};
pub(crate) use dead_letter::with_delivery_count;
pub use declare::server_name;
pub use durable::{DefinitionsError, Recovery};
use durable::{binding_change, exchange_change, queue_definition};
pub use error::{BrokerError, check_short};
pub use exchange::{
    ARG_DELAYED_TYPE, ARG_SCHEDULES, Binding, BindingTable, DEDUP_EXCHANGE, DELAYED_EXCHANGE,
    Delayed, Destination, Exchange, ExchangeStats, schedule_queue,
};
pub use queue::Pushed;
pub use queue::integer as queue_integer;
pub use queue::redis_range;
pub use queue::{
    CONSUMER_WINDOW, ChannelCredit, ConsumeError, Consumer, Dispatch, Entry, Queue, group_by_queue,
};
pub use queue::{
    DeadLetterSink, DeathReason, Overflow, QueueDecl, QueueLimits, Replicated, Reply, message_ttl,
};
pub use route::{FaultReport, Forward, PublishOutcome};

use crate::message::{Message, encode_table_body};
use crate::plugin::{
    FilterPlugin, PluginHost, PluginRegistry, PluginVersion, RouterPlugin, TransformPlugin,
    binding_input,
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
    pub(crate) queues: RwLock<Map<String, Arc<Queue>>>,
    /// In a cluster: the queues that live on other nodes. Known here so
    /// that bindings to them are the same on every node and a client is
    /// told where a queue is.
    remote: RwLock<Map<String, RemoteQueue>>,
    /// In a cluster: the replicas of replicated streams this node holds,
    /// leading or not. Their consumers read here whoever leads; publishes
    /// go to the leader (in `queues` on its node, a remote queue on the
    /// others).
    pub(crate) streams: RwLock<Map<String, Arc<Queue>>>,
}

/// A queue that lives on another node of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteQueue {
    /// The node it lives on.
    pub node: String,
    /// Durable.
    pub durable: bool,
    /// How it was declared.
    pub definition: crate::store::definitions::QueueDefinition,
    /// A quorum queue's: the Raft term its leader announced itself in (as
    /// the cluster's record of it).
    pub leader_term: u64,
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

    /// A queue of this node by name. A queue that lives on another node
    /// is an error that says which.
    pub fn queue(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        if let Some(q) = self.queues.read().get(name) {
            return Ok(q.clone());
        }
        Err(match self.remote.read().get(name) {
            Some(r) => BrokerError::OnOtherNode {
                vhost: self.name.clone(),
                name: name.to_owned(),
                node: r.node.clone(),
            },
            None => self.not_found("queue", name),
        })
    }

    /// This node's replica of the replicated stream `name`, if it holds
    /// one: read here, whichever node leads it.
    pub fn stream_replica(&self, name: &str) -> Option<Arc<Queue>> {
        self.streams.read().get(name).cloned()
    }

    /// Whether a queue of that name exists here or on another node.
    pub fn queue_exists(&self, name: &str) -> bool {
        self.queues.read().contains_key(name) || self.remote.read().contains_key(name)
    }

    /// The queue of that name on another node, if it is one.
    pub fn remote_queue(&self, name: &str) -> Option<RemoteQueue> {
        self.remote.read().get(name).cloned()
    }

    /// The node a queue on another node lives on (none: it is here, or
    /// nowhere).
    pub fn remote_node(&self, name: &str) -> Option<String> {
        // A quorum queue's leader serves it here while it is also known
        // as living elsewhere until every node has heard.
        if self.queues.read().contains_key(name) {
            return None;
        }
        self.remote.read().get(name).map(|r| r.node.clone())
    }

    /// How many queues live on this node, and whether `name` is one.
    pub fn queue_count_with(&self, name: &str) -> (usize, bool) {
        let queues = self.queues.read();
        (queues.len(), queues.contains_key(name))
    }

    /// The queues on other nodes, by name.
    pub fn remote_queues(&self) -> Vec<(String, RemoteQueue)> {
        self.remote
            .read()
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    pub(crate) fn set_remote(&self, name: &str, queue: Option<RemoteQueue>) {
        match queue {
            Some(q) => self.remote.write().insert(name.to_owned(), q),
            None => self.remote.write().remove(name),
        };
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
    pub(crate) self_ref: std::sync::Weak<Broker>,
    pub(crate) host: Arc<PluginHost>,
    pub(crate) registry: PluginRegistry,
    plugin_dir: PathBuf,
    vhosts: RwLock<Map<String, Arc<VHost>>>,
    /// Held for writing while a plugin version is swapped in, for reading
    /// while an exchange or filtered binding picks its version: so nothing
    /// declared during a swap is left on the old version.
    pub(crate) swap: RwLock<()>,
    /// Serialises swaps with each other.
    pub(crate) swapping: Mutex<()>,
    /// Staged rollouts: candidate versions beside serving ones.
    pub(crate) candidates: crate::author::candidate::Candidates,
    /// Traces of traced publishes.
    pub(crate) traces: crate::author::trace::Traces,
    /// Flow watermark of new queues, in bytes of ready messages.
    pub(crate) queue_flow_bytes: std::sync::atomic::AtomicUsize,
    /// The message store, once attached ([`Broker::recover`]).
    store: std::sync::OnceLock<Arc<crate::store::Store>>,
    /// Serialises writes of the durable definitions.
    definitions: Mutex<()>,
    /// Set while [`Broker::recover`] runs: definitions are not saved.
    recovering: std::sync::atomic::AtomicBool,
    /// Open AMQP connections.
    connections: Arc<Connections>,
    /// Users, vhosts and permissions.
    accounts: crate::access::Accounts,
    /// It caught up after it started (`Broker::caught_up`).
    pub(crate) caught_up: std::sync::atomic::AtomicBool,
    /// In a cluster: message traffic to and from other nodes.
    pub(crate) remote: std::sync::OnceLock<Arc<crate::nodes::remote::Remote>>,
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
    /// The cluster this node belongs to (`[cluster]`).
    pub(crate) cluster: std::sync::OnceLock<Arc<crate::cluster::ClusterNode>>,
    /// Definitions are replicated by the cluster, not saved locally.
    pub(crate) replicated: std::sync::atomic::AtomicBool,
    /// The quorum queues this node holds a replica of, by group.
    pub(crate) quorum: Mutex<std::collections::HashMap<String, crate::nodes::quorum::QuorumEntry>>,
    /// This node's exclusive queues as its peers know them, and theirs as
    /// this node serves them (`nodes::private`).
    pub(crate) private: crate::nodes::private::Private,
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
            candidates: Default::default(),
            traces: Default::default(),
            queue_flow_bytes: DEFAULT_QUEUE_FLOW_BYTES.into(),
            store: std::sync::OnceLock::new(),
            definitions: Mutex::new(()),
            recovering: false.into(),
            connections: Arc::default(),
            accounts: crate::access::Accounts::default(),
            caught_up: false.into(),
            remote: std::sync::OnceLock::new(),
            alarms: crate::alarm::Alarms::default(),
            builtins: std::sync::OnceLock::new(),
            override_builtins: false.into(),
            overrides_allowed: Mutex::new(Vec::new()),
            cluster: std::sync::OnceLock::new(),
            replicated: false.into(),
            quorum: Mutex::default(),
            private: Default::default(),
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

    /// Users, vhosts and permissions.
    pub fn accounts(&self) -> &crate::access::Accounts {
        &self.accounts
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
            remote: RwLock::new(Map::default()),
            streams: RwLock::new(Map::default()),
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
        self.sweep_exchange_ids();
        for v in self.vhosts() {
            // Retention on replicated streams this node follows (the
            // leader's is among its queues).
            let following: Vec<Arc<Queue>> = {
                let queues = v.queues.read();
                v.streams
                    .read()
                    .iter()
                    .filter(|(name, _)| !queues.contains_key(*name))
                    .map(|(_, q)| q.clone())
                    .collect()
            };
            for q in following {
                q.expire();
            }
            for q in v.queues() {
                q.expire();
                if let Some(limit) = q.limits().expires
                    && q.unused_for().is_some_and(|idle| idle >= limit)
                    && self.delete_unused_queue(&v, &q.name)
                {
                    tracing::info!(queue = %crate::untrusted::text(&q.name), vhost = %crate::untrusted::text(&v.name), "queue deleted after {limit:?} unused (x-expires)");
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
}
