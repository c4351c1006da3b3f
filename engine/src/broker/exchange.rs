//! An exchange: its declaration, its bindings, and the plugins that decide
//! for it (the router of its type, an optional transform, per-binding
//! filters).
//!
//! The publish path reads everything here without locks: the binding table,
//! the router and the memo are `ArcSwap` snapshots. Binding changes and hot
//! swaps take the exchange's `control` mutex and publish new snapshots in an
//! order that keeps this promise: *a binding added before bind-ok is seen by
//! every message published after bind-ok*.
//!
//! 1. store the new binding table (so any instance rebuilt from now on
//!    replays it);
//! 2. apply the binding to every live router instance;
//! 3. replace the memo (so no decision computed before step 2 is reused).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use amq_protocol::types::FieldTable;
use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::{Mutex, RwLock};

use super::Map;
use crate::author::capture::{Capture, CaptureSpec};
use crate::message::Message;
use crate::plugin::{
    BindingSource, BindingVisitor, FilterPlugin, PluginFault, RouterPlugin, TransformPlugin,
};

/// Where a binding delivers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(
    tag = "destination_type",
    content = "destination",
    rename_all = "lowercase"
)]
pub enum Destination {
    /// A queue, by name.
    Queue(String),
    /// Another exchange, by name (exchange-to-exchange binding).
    Exchange(String),
}

impl Destination {
    /// The queue or exchange name.
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(n) | Destination::Exchange(n) => n,
        }
    }
}

/// One binding of an exchange.
#[derive(Clone, Debug)]
pub struct Binding {
    /// The exchange's id for it; routers return these.
    pub id: u32,
    /// Where it delivers.
    pub destination: Destination,
    /// The binding key.
    pub key: String,
    /// The binding arguments.
    pub arguments: FieldTable,
    /// The arguments in the ABI's encoding, made once at bind time.
    pub(crate) encoded_arguments: Vec<u8>,
    /// The router's bind input (key, target, arguments), made once.
    pub(crate) bind_input: Vec<u8>,
    /// The filter named by `x-wasmq-filter`, if any.
    pub(crate) filter: Option<Arc<FilterPlugin>>,
    /// The filter's plugin name.
    pub filter_name: Option<String>,
    /// A candidate version of the filter, staged beside it.
    pub(crate) filter_candidate: Option<(Arc<FilterPlugin>, Arc<crate::author::candidate::Trial>)>,
}

/// A persistent map: a changed copy shares all but one path with the
/// original, so a snapshot costs O(log n) to make, not a copy of the table.
type Persistent<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

/// What makes two bindings the same binding (AMQP: source, destination,
/// key and arguments); arguments by their encoding, which is canonical
/// (a field table is ordered by key).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BindingKey {
    destination: Destination,
    key: String,
    arguments: Vec<u8>,
}

impl BindingKey {
    fn of(b: &Binding) -> Self {
        BindingKey {
            destination: b.destination.clone(),
            key: b.key.clone(),
            arguments: b.encoded_arguments.clone(),
        }
    }
}

/// An immutable snapshot of an exchange's bindings.
///
/// Publishers look bindings up by id in whatever snapshot they loaded; a
/// bind or unbind makes a new snapshot. Both maps are persistent, so a
/// change costs the same with 50,000 bindings as with 100 (a flat map had
/// to be copied whole on every bind).
#[derive(Clone, Debug, Default)]
pub struct BindingTable {
    by_id: Persistent<u32, Arc<Binding>>,
    /// The same bindings by what makes them unique (bind is idempotent).
    by_key: Persistent<BindingKey, u32>,
    /// Their ids by destination (deleting a queue removes its bindings).
    by_destination: Persistent<Destination, Persistent<u32, ()>>,
    /// The next id to assign; ids are never reused.
    pub(crate) next_id: u32,
}

impl BindingTable {
    /// The bindings, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Binding>> {
        self.by_id.values()
    }

    /// How many bindings.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The binding with id `id`.
    pub fn get(&self, id: u32) -> Option<&Arc<Binding>> {
        self.by_id.get(&id)
    }

    /// The ids of the bindings to `destination`.
    pub fn ids_to(&self, destination: &Destination) -> Vec<u32> {
        self.by_destination
            .get(destination)
            .map(|ids| ids.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The binding of `destination` with `key` and (encoded) `arguments`.
    pub(crate) fn find(
        &self,
        destination: &Destination,
        key: &str,
        arguments: &[u8],
    ) -> Option<&Arc<Binding>> {
        let probe = BindingKey {
            destination: destination.clone(),
            key: key.to_owned(),
            arguments: arguments.to_vec(),
        };
        self.by_key.get(&probe).and_then(|id| self.by_id.get(id))
    }

    /// A copy with `binding` added (its id must be `next_id`).
    pub(crate) fn with(&self, binding: Binding) -> BindingTable {
        let next_id = binding.id + 1;
        let to = self
            .by_destination
            .get(&binding.destination)
            .cloned()
            .unwrap_or_default()
            .update(binding.id, ());
        BindingTable {
            by_key: self.by_key.update(BindingKey::of(&binding), binding.id),
            by_destination: self.by_destination.update(binding.destination.clone(), to),
            by_id: self.by_id.update(binding.id, Arc::new(binding)),
            next_id,
        }
    }

    /// A copy with `binding` in place of the one with its id.
    pub(crate) fn replaced(&self, binding: Binding) -> BindingTable {
        BindingTable {
            by_key: self.by_key.clone(),
            by_destination: self.by_destination.clone(),
            by_id: self.by_id.update(binding.id, Arc::new(binding)),
            next_id: self.next_id,
        }
    }

    /// A copy without the bindings `ids`.
    pub(crate) fn without(&self, ids: &[u32]) -> BindingTable {
        let mut next = self.clone();
        for id in ids {
            if let Some(b) = next.by_id.remove(id) {
                next.by_key.remove(&BindingKey::of(&b));
                if let Some(to) = next.by_destination.get(&b.destination) {
                    let to = to.without(id);
                    if to.is_empty() {
                        next.by_destination.remove(&b.destination);
                    } else {
                        next.by_destination.insert(b.destination.clone(), to);
                    }
                }
            }
        }
        next
    }
}

/// Memoized routing decisions of a deterministic router, for one binding
/// generation. Replaced (never cleared in place) when bindings or the router
/// change, so a stale decision can only land in a memo nobody reads.
#[derive(Default)]
pub(crate) struct Memo {
    map: RwLock<Map<Box<str>, Arc<[u32]>>>,
}

/// Routing keys remembered per generation; past this, new keys are routed
/// without being remembered (a bounded cache, no eviction on the hot path).
const MEMO_CAPACITY: usize = 16_384;

impl Memo {
    fn get(&self, key: &str) -> Option<Arc<[u32]>> {
        self.map.read().get(key).cloned()
    }

    fn insert(&self, key: &str, ids: &[u32]) {
        let mut map = self.map.write();
        if map.len() < MEMO_CAPACITY {
            map.insert(key.into(), ids.into());
        }
    }
}

/// Counters of one exchange.
#[derive(Debug, Default)]
pub struct ExchangeStats {
    /// Messages published to it.
    pub published: AtomicU64,
    /// Messages it routed to at least one destination.
    pub routed: AtomicU64,
    /// Messages it could not route anywhere.
    pub unroutable: AtomicU64,
    /// Plugin faults while deciding for it.
    pub faults: AtomicU64,
    /// Messages its transform dropped.
    pub dropped: AtomicU64,
    /// Messages it dead-lettered (transform decision or fault).
    pub dead_lettered: AtomicU64,
}

/// An exchange.
pub struct Exchange {
    /// Name.
    pub name: String,
    /// Type: the name of its router plugin.
    pub kind: String,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    pub internal: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
    /// `alternate-exchange`: where unroutable messages go (the argument's,
    /// else a policy's).
    pub alternate_exchange: ArcSwapOption<String>,
    /// The policy that applies, and what it sets.
    pub(crate) policy: ArcSwap<crate::policy::Applied>,
    /// `x-dead-letter-exchange`: where messages go that a plugin faulted on
    /// or a transform dead-lettered.
    pub dead_letter_exchange: Option<String>,
    /// The transform plugin's name: `x-wasmq-transform`, else a policy's
    /// `transform`.
    pub(crate) transform_name: ArcSwapOption<String>,
    /// Counters.
    pub stats: ExchangeStats,
    pub(crate) encoded_arguments: Vec<u8>,
    /// Serialises binding changes and plugin swaps (never held by publishers).
    pub(crate) control: Mutex<()>,
    pub(crate) bindings: ArcSwap<BindingTable>,
    pub(crate) router: ArcSwap<RouterPlugin>,
    pub(crate) memo: ArcSwap<Memo>,
    pub(crate) transform: ArcSwapOption<TransformPlugin>,
    /// Whether a candidate version is staged on this exchange (its router,
    /// its transform or a binding's filter): the publish path's one check.
    pub(crate) staged: std::sync::atomic::AtomicBool,
    /// The router and transform candidates staged here.
    pub(crate) candidates: ArcSwapOption<crate::author::candidate::ExchangeCandidates>,
    /// Whether a capture wants the messages published here: the publish
    /// path's one check.
    pub(crate) capturing: std::sync::atomic::AtomicBool,
    /// The capture running or last run here.
    pub(crate) capture: ArcSwapOption<crate::author::capture::Capture>,
    /// An `x-message-deduplication` exchange's ids.
    pub(crate) dedup: Option<parking_lot::Mutex<crate::dedup::Cache>>,
    /// A durable deduplicating exchange's ids on disk (the ids file of a
    /// message-less log of its own in the store), so that a retry after a
    /// restart within the window is still caught.
    pub(crate) dedup_log: std::sync::OnceLock<Arc<crate::store::QueueLog>>,
    /// An `x-delayed-message` exchange's routing type and queue.
    pub delayed: Option<Delayed>,
}

/// What makes an exchange a delayed one (`x-delayed-message`).
#[derive(Clone, Debug)]
pub struct Delayed {
    /// `x-delayed-type`: the exchange type (plugin) that routes a message
    /// when it is due.
    pub routing: String,
    /// The queue its scheduled messages wait in.
    pub queue: String,
}

/// The type of a deduplicating exchange (the community
/// `rabbitmq-message-deduplication` plugin's name for it).
pub const DEDUP_EXCHANGE: &str = "x-message-deduplication";

/// The type of a delayed exchange (RabbitMQ's community
/// `rabbitmq_delayed_message_exchange` plugin's name for it).
pub const DELAYED_EXCHANGE: &str = "x-delayed-message";

/// The argument of a delayed exchange naming the type it routes with.
pub const ARG_DELAYED_TYPE: &str = "x-delayed-type";

/// The queue argument naming the delayed exchange a broker-made queue
/// holds the scheduled messages of.
pub const ARG_SCHEDULES: &str = "x-wasmq-delayed-exchange";

/// The name of the queue delayed exchange `exchange`'s messages wait in.
/// `amq.` names cannot be declared by clients, so it is the broker's.
pub fn schedule_queue(exchange: &str) -> String {
    format!("amq.delayed.{exchange}")
}

impl Exchange {
    /// The type its router plugin is: its `kind`, but for a delayed
    /// exchange (`x-delayed-type`) and a deduplicating one (`fanout`).
    pub fn router_kind(&self) -> &str {
        match (&self.delayed, &self.dedup) {
            (Some(d), _) => &d.routing,
            (None, Some(_)) => "fanout",
            (None, None) => &self.kind,
        }
    }

    /// The transform plugin's name, if it has one.
    pub fn transform_name(&self) -> Option<String> {
        self.transform_name.load().as_deref().cloned()
    }

    /// Whether its transform is plugin `name`.
    pub(crate) fn transforms_with(&self, name: &str) -> bool {
        self.transform_name
            .load()
            .as_deref()
            .is_some_and(|t| t == name)
    }
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl BindingSource for Exchange {
    fn for_each_binding(&self, f: &mut BindingVisitor<'_>) -> Result<u32, PluginFault> {
        let table = self.bindings.load();
        for b in table.iter() {
            f(b.id, &b.bind_input)?;
        }
        Ok(table.next_id)
    }

    fn next_id(&self) -> u32 {
        self.bindings.load().next_id
    }
}

impl BindingSource for BindingTable {
    fn for_each_binding(&self, f: &mut BindingVisitor<'_>) -> Result<u32, PluginFault> {
        for b in self.iter() {
            f(b.id, &b.bind_input)?;
        }
        Ok(self.next_id)
    }

    fn next_id(&self) -> u32 {
        self.next_id
    }
}

impl Exchange {
    /// The current bindings.
    pub fn bindings(&self) -> Arc<BindingTable> {
        self.bindings.load_full()
    }

    /// The serving router.
    pub fn router(&self) -> Arc<RouterPlugin> {
        self.router.load_full()
    }

    /// The serving transform, if any.
    pub fn transform(&self) -> Option<Arc<TransformPlugin>> {
        self.transform.load_full()
    }

    /// Ask the router (or the memo) which bindings `message` goes to,
    /// appending their ids to `out`. This is the routing step of the publish
    /// path on its own (benchmarks and diagnostics use it).
    pub fn route_ids(&self, message: &Arc<Message>, out: &mut Vec<u32>) -> Result<(), PluginFault> {
        let router = self.router.load();
        if !router.deterministic() {
            return router.route(message, self, out);
        }
        let memo = self.memo.load();
        if let Some(ids) = memo.get(&message.routing_key) {
            out.extend_from_slice(&ids);
            return Ok(());
        }
        let start = out.len();
        router.route(message, self, out)?;
        memo.insert(&message.routing_key, &out[start..]);
        Ok(())
    }

    /// Forget memoized decisions (bindings or router changed).
    pub(crate) fn reset_memo(&self) {
        self.memo.store(Arc::new(Memo::default()));
    }

    pub(crate) fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Capturing what is published here (`author::capture`).
impl Exchange {
    /// Start capturing what is published here (replacing a capture that
    /// ran before).
    pub fn start_capture(&self, vhost: &str, spec: CaptureSpec) -> Arc<Capture> {
        let c = Capture::new(vhost, spec);
        self.capture.store(Some(c.clone()));
        self.capturing.store(c.spec.count > 0, Ordering::Relaxed);
        c
    }

    /// The capture running or last run here.
    pub fn capture(&self) -> Option<Arc<Capture>> {
        self.capture.load_full()
    }

    /// Stop capturing and forget what was kept.
    pub fn stop_capture(&self) -> Option<Arc<Capture>> {
        self.capturing.store(false, Ordering::Relaxed);
        self.capture.swap(None)
    }

    /// A message was published here: keep it if a capture wants it.
    #[cold]
    pub(crate) fn offer_capture(&self, m: &Message) {
        if let Some(c) = self.capture.load().as_ref()
            && c.offer(m)
        {
            self.capturing.store(false, Ordering::Relaxed);
        }
    }
}

/// A shadow comparison reads an exchange's bindings through this.
impl crate::author::candidate::Compared for Exchange {
    fn exchange_name(&self) -> &str {
        &self.name
    }

    fn describe(&self, ids: &[u32]) -> String {
        describe_ids(&self.bindings.load(), ids)
    }
}

/// Chosen bindings as `queue:orders, exchange:audit`, in id order.
fn describe_ids(table: &BindingTable, ids: &[u32]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return "(no binding)".into();
    }
    ids.iter()
        .map(|id| match table.get(*id).map(|b| &b.destination) {
            Some(Destination::Queue(q)) => format!("queue:{q}"),
            Some(Destination::Exchange(x)) => format!("exchange:{x}"),
            None => format!("binding {id} (gone)"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(id: u32, queue: &str, key: &str) -> Binding {
        Binding {
            id,
            destination: Destination::Queue(queue.into()),
            key: key.into(),
            arguments: FieldTable::default(),
            encoded_arguments: Vec::new(),
            bind_input: Vec::new(),
            filter: None,
            filter_candidate: None,
            filter_name: None,
        }
    }

    #[test]
    fn a_snapshot_is_unchanged_by_later_binds_and_unbinds() {
        let empty = BindingTable::default();
        let one = empty.with(binding(0, "a", "k"));
        let two = one.with(binding(1, "b", "k"));
        let three = two.with(binding(2, "a", "other"));
        assert_eq!(
            (empty.len(), one.len(), two.len(), three.len()),
            (0, 1, 2, 3)
        );
        assert_eq!(three.next_id, 3);
        let a = Destination::Queue("a".into());
        let mut to_a = three.ids_to(&a);
        to_a.sort();
        assert_eq!(to_a, [0, 2]);
        assert_eq!(three.find(&a, "other", &[]).map(|b| b.id), Some(2));
        assert!(three.find(&a, "nope", &[]).is_none());
        let less = three.without(&[0, 2]);
        assert!(less.ids_to(&a).is_empty());
        assert!(less.find(&a, "k", &[]).is_none());
        assert_eq!(less.len(), 1);
        assert_eq!(less.next_id, 3, "ids are never reused");
        // The older snapshots still see what they saw.
        assert_eq!(three.ids_to(&a).len(), 2);
        assert_eq!(one.get(0).map(|b| b.key.as_str()), Some("k"));
    }
}
