//! The role handles the broker uses: a [`RouterPlugin`] per exchange, a
//! [`TransformPlugin`] per transformed exchange, a [`FilterPlugin`] per
//! filtered binding. Each is a small pool of instances of one version.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::{Mutex, MutexGuard};
use wasmq_sdk::abi;

use super::circuit::Circuit;
use super::decision::{TransformDecision, parse_decision};
use super::host::{PluginHost, PluginVersion, init_input};
use super::instance::{CallError, Instance};
use super::{PluginError, PluginFault};
use crate::message::Message;

/// One call in this many is timed for the latency histogram.
const LATENCY_SAMPLE: u64 = 8;

/// What [`BindingSource::for_each_binding`] calls per binding: (id, bind input).
pub type BindingVisitor<'a> = dyn FnMut(u32, &[u8]) -> Result<(), PluginFault> + 'a;

/// Where a router's instances get the exchange's bindings when one is
/// (re)built: the exchange's current binding table.
pub trait BindingSource {
    /// Call `f(id, bind input)` for every current binding and
    /// return the next id the exchange will assign (every id below it that
    /// is still bound was passed to `f`).
    fn for_each_binding(&self, f: &mut BindingVisitor<'_>) -> Result<u32, PluginFault>;

    /// The next id the exchange will assign: a router returning an id at or
    /// above it is lying.
    fn next_id(&self) -> u32;
}

/// An empty binding set (new exchanges, validation).
impl BindingSource for () {
    fn for_each_binding(&self, _f: &mut BindingVisitor<'_>) -> Result<u32, PluginFault> {
        Ok(0)
    }

    fn next_id(&self) -> u32 {
        0
    }
}

/// Instances of one version serving one use, with lazy (re)building.
struct Pool {
    host: Arc<PluginHost>,
    version: Arc<PluginVersion>,
    role: i32,
    init: Vec<u8>,
    slots: Box<[Mutex<Option<Instance>>]>,
    circuit: Circuit,
    /// Where this pool serves, for log lines: "exchange 'orders'".
    place: String,
}

impl Pool {
    /// Build the pool and its first instance now, so a refusal (bad
    /// arguments) reaches the declaring client instead of the first message.
    fn new(
        host: &Arc<PluginHost>,
        version: &Arc<PluginVersion>,
        role: i32,
        init: Vec<u8>,
        place: String,
        prepare: &dyn Fn(&mut Instance) -> Result<(), CallError>,
    ) -> Result<Self, PluginError> {
        let limits = host.limits();
        let n = limits.instances.max(1);
        let pool = Pool {
            host: host.clone(),
            version: version.clone(),
            role,
            init,
            slots: (0..n).map(|_| Mutex::new(None)).collect(),
            circuit: Circuit::new(limits.circuit_threshold, limits.circuit_cooldown),
            place,
        };
        let first = pool.spawn(prepare).map_err(|e| match e {
            CallError::Refused(message) => PluginError::Refused {
                plugin: version.name.clone(),
                message,
            },
            CallError::Fault(fault) => PluginError::Fault {
                plugin: version.name.clone(),
                fault,
            },
        })?;
        *pool.slots[0].lock() = Some(first);
        Ok(pool)
    }

    fn spawn(
        &self,
        prepare: &dyn Fn(&mut Instance) -> Result<(), CallError>,
    ) -> Result<Instance, CallError> {
        self.host.setup(|| {
            let mut i = self.host.instantiate(&self.version)?;
            i.init(self.role, &self.init)?;
            prepare(&mut i)?;
            Ok(i)
        })
    }

    /// A free instance slot: the first one not in use, so an uncontended
    /// exchange keeps using one warm instance; if all are busy, wait on one.
    fn acquire(&self) -> MutexGuard<'_, Option<Instance>> {
        for slot in self.slots.iter() {
            if let Some(g) = slot.try_lock() {
                return g;
            }
        }
        let i = thread_index() % self.slots.len();
        self.slots[i].lock()
    }

    /// Run `f` on an instance. A fault discards the instance (it is rebuilt,
    /// bindings replayed, on next use) and is counted by the circuit.
    fn with<R>(
        &self,
        prepare: &dyn Fn(&mut Instance) -> Result<(), CallError>,
        f: impl FnOnce(&mut Instance) -> Result<R, CallError>,
    ) -> Result<R, PluginFault> {
        self.circuit.check()?;
        self.version.circuit.check()?;
        let n = self.version.calls.fetch_add(1, Ordering::Relaxed);
        let started = n
            .is_multiple_of(LATENCY_SAMPLE)
            .then(std::time::Instant::now);
        let mut slot = self.acquire();
        let r = match &mut *slot {
            Some(i) => f(i),
            None => match self.spawn(prepare) {
                Ok(i) => f(slot.insert(i)),
                Err(e) => Err(e),
            },
        };
        if let Some(t) = started {
            self.version.latency.record(t.elapsed());
        }
        match r {
            Ok(v) => {
                self.circuit.success();
                self.version.circuit.success();
                Ok(v)
            }
            Err(e) => {
                let fault = e.into_fault();
                *slot = None;
                drop(slot);
                self.version.faults.fetch_add(1, Ordering::Relaxed);
                let opened = self.circuit.fault();
                tracing::warn!(
                    plugin = %self.version.name, version = %self.version.short_hash(), kind = fault.kind(),
                    "plugin fault in {}: {fault}; instance discarded", self.place
                );
                if opened {
                    tracing::error!(plugin = %self.version.name, "circuit opened for {} after repeated faults", self.place);
                }
                if self.version.circuit.fault() {
                    tracing::error!(
                        plugin = %self.version.name, version = %self.version.short_hash(),
                        "circuit opened for every use of the plugin: faults in a row across its exchanges and bindings"
                    );
                }
                Err(fault)
            }
        }
    }

    /// Apply `f` to every live instance (binding changes). The first live
    /// instance decides: if it refuses, nothing changed and the refusal is
    /// returned. An instance that faults is discarded (it will be rebuilt from
    /// the binding table, which the caller has already updated).
    fn for_each_live(
        &self,
        f: &dyn Fn(&mut Instance) -> Result<(), CallError>,
    ) -> Result<(), PluginError> {
        self.host.setup(|| self.for_each_live_here(f))
    }

    fn for_each_live_here(
        &self,
        f: &dyn Fn(&mut Instance) -> Result<(), CallError>,
    ) -> Result<(), PluginError> {
        let mut first = true;
        for slot in self.slots.iter() {
            let mut g = slot.lock();
            let Some(i) = g.as_mut() else { continue };
            match f(i) {
                Ok(()) => first = false,
                Err(CallError::Refused(message)) if first => {
                    return Err(PluginError::Refused {
                        plugin: self.version.name.clone(),
                        message,
                    });
                }
                Err(e) => {
                    let fault = e.into_fault();
                    tracing::warn!(plugin = %self.version.name, "plugin fault applying a binding change in {}: {fault}", self.place);
                    *g = None;
                    if first {
                        return Err(PluginError::Fault {
                            plugin: self.version.name.clone(),
                            fault,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

fn thread_index() -> usize {
    thread_local! {
        static INDEX: usize = {
            use std::sync::atomic::AtomicUsize;
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            NEXT.fetch_add(1, Ordering::Relaxed)
        };
    }
    INDEX.with(|i| *i)
}

fn wrong_role(version: &PluginVersion, role: &'static str) -> PluginError {
    PluginError::WrongRole {
        plugin: version.name.clone(),
        role,
        has: version.roles.to_string(),
    }
}

/// An exchange's router: the exchange type's instances for one exchange.
pub struct RouterPlugin {
    pool: Pool,
}

impl std::fmt::Debug for RouterPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterPlugin")
            .field("version", &self.pool.version)
            .finish()
    }
}

fn replay(i: &mut Instance, bindings: &dyn BindingSource) -> Result<(), CallError> {
    let mut err = None;
    let r = bindings.for_each_binding(&mut |id, input| match i.bind(id, input) {
        Ok(()) => Ok(()),
        Err(CallError::Fault(f)) => Err(f),
        // A binding the plugin accepted before but refuses now (another
        // version): the instance is unusable for this exchange.
        Err(CallError::Refused(m)) => {
            err = Some(m.clone());
            Err(PluginFault::Reported(format!(
                "refused binding {id} on replay: {m}"
            )))
        }
    });
    match (r, err) {
        (Ok(next), _) => {
            i.bound_from = next;
            Ok(())
        }
        (Err(_), Some(m)) => Err(CallError::Refused(m)),
        (Err(f), None) => Err(CallError::Fault(f)),
    }
}

impl RouterPlugin {
    /// Instantiate `version` for exchange `exchange` (declare arguments
    /// `args`, an encoded table body) and replay `bindings` into it.
    pub fn new(
        host: &Arc<PluginHost>,
        version: &Arc<PluginVersion>,
        exchange: &str,
        args: &[u8],
        bindings: &dyn BindingSource,
    ) -> Result<Self, PluginError> {
        if !version.roles.router {
            return Err(wrong_role(version, "router (exchange type)"));
        }
        let pool = Pool::new(
            host,
            version,
            abi::ROLE_ROUTER,
            init_input(exchange, "", args),
            format!("exchange '{exchange}'"),
            &|i| replay(i, bindings),
        )?;
        Ok(RouterPlugin { pool })
    }

    /// The version serving.
    pub fn version(&self) -> &Arc<PluginVersion> {
        &self.pool.version
    }

    /// Whether decisions may be memoized per routing key.
    pub fn deterministic(&self) -> bool {
        self.pool.version.roles.deterministic
    }

    /// Whether repeated faults have opened the circuit.
    pub fn circuit_open(&self) -> bool {
        self.pool.circuit.is_open()
    }

    /// Tell every live instance about a new binding (`input`: see
    /// [`super::binding_input`]).
    pub fn bind(&self, id: u32, input: &[u8]) -> Result<(), PluginError> {
        // An instance rebuilt after the exchange stored the new binding table
        // already has this binding from the replay: don't bind it twice.
        self.pool.for_each_live(&|i| {
            if id < i.bound_from {
                Ok(())
            } else {
                i.bind(id, input)
            }
        })
    }

    /// Tell every live instance a binding is gone. Never refused.
    pub fn unbind(&self, id: u32, input: &[u8]) {
        let _ = self.pool.for_each_live(&|i| i.unbind(id, input));
    }

    /// Route `message`: append the chosen binding ids to `out`.
    pub fn route(
        &self,
        message: &Arc<Message>,
        bindings: &dyn BindingSource,
        out: &mut Vec<u32>,
    ) -> Result<(), PluginFault> {
        self.pool.with(&|i| replay(i, bindings), |i| {
            let start = out.len();
            i.route(message, out)?;
            // Loaded after the call: at least as new as what the instance knew.
            let next = bindings.next_id();
            if let Some(bad) = out[start..].iter().find(|id| **id >= next) {
                let bad = *bad;
                out.truncate(start);
                return Err(PluginFault::Malformed(format!(
                    "routed to binding {bad}, which was never bound"
                ))
                .into());
            }
            Ok(())
        })
    }
}

/// A binding's filter.
pub struct FilterPlugin {
    pool: Pool,
}

impl std::fmt::Debug for FilterPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterPlugin")
            .field("version", &self.pool.version)
            .finish()
    }
}

impl FilterPlugin {
    /// Instantiate `version` as the filter of a binding of `exchange` with
    /// binding key `key` and arguments `args` (encoded table body).
    pub fn new(
        host: &Arc<PluginHost>,
        version: &Arc<PluginVersion>,
        exchange: &str,
        key: &str,
        args: &[u8],
    ) -> Result<Self, PluginError> {
        if !version.roles.filter {
            return Err(wrong_role(version, "filter"));
        }
        let place = format!("a filter on exchange '{exchange}' (binding key '{key}')");
        let pool = Pool::new(
            host,
            version,
            abi::ROLE_FILTER,
            init_input(exchange, key, args),
            place,
            &|_| Ok(()),
        )?;
        Ok(FilterPlugin { pool })
    }

    /// The version serving.
    pub fn version(&self) -> &Arc<PluginVersion> {
        &self.pool.version
    }

    /// Whether `message` passes.
    pub fn filter(&self, message: &Arc<Message>) -> Result<bool, PluginFault> {
        self.pool
            .with(&|_| Ok(()), |i| i.filter(message).map_err(CallError::Fault))
    }
}

/// An exchange's transform.
pub struct TransformPlugin {
    pool: Pool,
}

impl std::fmt::Debug for TransformPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformPlugin")
            .field("version", &self.pool.version)
            .finish()
    }
}

impl TransformPlugin {
    /// Instantiate `version` as the transform of `exchange` (declare
    /// arguments `args`, encoded table body).
    pub fn new(
        host: &Arc<PluginHost>,
        version: &Arc<PluginVersion>,
        exchange: &str,
        args: &[u8],
    ) -> Result<Self, PluginError> {
        if !version.roles.transform {
            return Err(wrong_role(version, "transform"));
        }
        let place = format!("the transform of exchange '{exchange}'");
        let pool = Pool::new(
            host,
            version,
            abi::ROLE_TRANSFORM,
            init_input(exchange, "", args),
            place,
            &|_| Ok(()),
        )?;
        Ok(TransformPlugin { pool })
    }

    /// The version serving.
    pub fn version(&self) -> &Arc<PluginVersion> {
        &self.pool.version
    }

    /// Decide what happens to `message`.
    pub fn transform(&self, message: &Arc<Message>) -> Result<TransformDecision, PluginFault> {
        self.pool
            .with(&|_| Ok(()), |i| i.transform(message, parse_decision))
    }
}
