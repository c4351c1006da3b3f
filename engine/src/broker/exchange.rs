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
}

/// An immutable snapshot of an exchange's bindings.
#[derive(Debug, Default)]
pub struct BindingTable {
    pub(crate) by_id: Map<u32, Arc<Binding>>,
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

    pub(crate) fn find(
        &self,
        destination: &Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> Option<&Arc<Binding>> {
        self.by_id
            .values()
            .find(|b| b.destination == *destination && b.key == key && b.arguments == *arguments)
    }

    pub(crate) fn with(&self, binding: Binding) -> BindingTable {
        let mut by_id = self.by_id.clone();
        let next_id = binding.id + 1;
        by_id.insert(binding.id, Arc::new(binding));
        BindingTable { by_id, next_id }
    }

    pub(crate) fn without(&self, ids: &[u32]) -> BindingTable {
        let mut by_id = self.by_id.clone();
        for id in ids {
            by_id.remove(id);
        }
        BindingTable {
            by_id,
            next_id: self.next_id,
        }
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
    /// `alternate-exchange`: where unroutable messages go.
    pub alternate_exchange: Option<String>,
    /// `x-dead-letter-exchange`: where messages go that a plugin faulted on
    /// or a transform dead-lettered.
    pub dead_letter_exchange: Option<String>,
    /// `x-wasmq-transform`: the transform plugin's name.
    pub transform_name: Option<String>,
    /// Counters.
    pub stats: ExchangeStats,
    pub(crate) encoded_arguments: Vec<u8>,
    /// Serialises binding changes and plugin swaps (never held by publishers).
    pub(crate) control: Mutex<()>,
    pub(crate) bindings: ArcSwap<BindingTable>,
    pub(crate) router: ArcSwap<RouterPlugin>,
    pub(crate) memo: ArcSwap<Memo>,
    pub(crate) transform: ArcSwapOption<TransformPlugin>,
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
        for b in table.by_id.values() {
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
        for b in self.by_id.values() {
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
