//! Durability at the broker level: which definitions are durable, writing
//! them to the store when they change, and rebuilding the broker from the
//! store at startup.
//!
//! RabbitMQ's rules: an exchange or queue is saved if declared durable
//! (exclusive queues never are: they die with their connection), and a
//! binding if both its ends are durable. The predeclared `amq.*` exchanges
//! are recreated by every vhost, so only their bindings are saved.
//!
//! Recovery declares the exchanges first (each through its routing plugin,
//! which must be loaded: a durable exchange whose plugin is missing stops
//! the startup with an error naming both, rather than dropping the
//! exchange and its bindings), then the queues (each recovering its log),
//! then the bindings, which are replayed into the routing plugins exactly
//! as if a client had just made them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Broker, BrokerError, Destination, ExchangeSpec, QueueDecl};
use crate::store::definitions::{
    BindingDefinition, DEFINITIONS_VERSION, Definitions, ExchangeDefinition, QueueDefinition,
    VHostDefinitions,
};
use crate::store::{Change, Store, StoreError};

/// What recovery found.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recovery {
    /// Durable exchanges declared.
    pub exchanges: usize,
    /// Durable queues declared.
    pub queues: usize,
    /// Bindings replayed.
    pub bindings: usize,
    /// Messages recovered into queues.
    pub messages: usize,
}

/// Why durable definitions could not be recovered or imported.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    /// Reading or writing the message store failed: the broker's fault,
    /// not the definitions'.
    #[error("message store: {0}")]
    Store(#[from] StoreError),
    /// [`Broker::recover`] was called with a store already attached.
    #[error("a message store is already attached")]
    AlreadyAttached,
    /// One item was refused; the first refusal stops the whole run and
    /// names the item.
    #[error("{item}: {error}")]
    Item {
        /// The item, as a user would name it ("queue 'q' in vhost '/'").
        item: String,
        /// Why the broker refused it.
        error: BrokerError,
    },
}

impl DefinitionsError {
    /// Whether the broker, not the definitions, is at fault (the store
    /// failed): the admin API answers 500 for these, 400 for the rest.
    pub fn is_internal(&self) -> bool {
        match self {
            DefinitionsError::Store(_) | DefinitionsError::AlreadyAttached => true,
            DefinitionsError::Item { error, .. } => matches!(error, BrokerError::Store(_)),
        }
    }
}

impl Broker {
    /// The message store, if one is attached.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.get()
    }

    /// Attach `store` and rebuild every durable definition and message it
    /// holds. Call once, after the plugins are loaded and before clients
    /// connect.
    pub fn recover(&self, store: Arc<Store>) -> Result<Recovery, DefinitionsError> {
        let defs = store.definitions()?;
        // Saving stays off until everything is back: a partial snapshot
        // must never replace the file.
        self.recovering.store(true, Ordering::SeqCst);
        self.store
            .set(store.clone())
            .map_err(|_| DefinitionsError::AlreadyAttached)?;
        let needed: Vec<String> = defs
            .vhosts
            .iter()
            .flat_map(|v| {
                let kinds = v.exchanges.iter().flat_map(|x| {
                    let transform = super::string_arg(&x.arguments, super::ARG_TRANSFORM)
                        .ok()
                        .flatten();
                    // A delayed exchange routes with its `x-delayed-type`.
                    let router = match x.kind == super::DELAYED_EXCHANGE {
                        true => super::string_arg(&x.arguments, super::ARG_DELAYED_TYPE)
                            .ok()
                            .flatten(),
                        false => Some(x.kind.clone()),
                    };
                    router.into_iter().chain(transform)
                });
                let filters = v.bindings.iter().filter_map(|b| {
                    super::string_arg(&b.arguments, super::ARG_FILTER)
                        .ok()
                        .flatten()
                });
                kinds.chain(filters).collect::<Vec<_>>()
            })
            .collect();
        self.recover_plugins(&needed);
        let result = self.recover_definitions(&defs);
        self.recovering.store(false, Ordering::SeqCst);
        let r = result?;
        store.remove_orphans();
        self.persist_definitions()
            .map_err(|error| DefinitionsError::Item {
                item: "saving the recovered definitions".into(),
                error,
            })?;
        Ok(r)
    }

    /// Attach the message store without recovering definitions from it: in
    /// a cluster the definitions come back from the Raft log, and each
    /// durable queue recovers its messages when it is declared again.
    pub fn attach_store(&self, store: Arc<Store>) -> Result<(), DefinitionsError> {
        self.replicate_definitions();
        self.store
            .set(store)
            .map_err(|_| DefinitionsError::AlreadyAttached)
    }

    /// Declare everything in `defs`, durable, through the same checks as
    /// AMQP declares (so an existing item with other flags is an error, and
    /// an exchange type must name a loaded plugin). Used by the admin API's
    /// import. The whole document is [checked](Broker::check_definitions)
    /// first: one that would fail anywhere changes nothing.
    pub fn import_definitions(&self, defs: &Definitions) -> Result<Recovery, DefinitionsError> {
        self.check_definitions(defs)?;
        self.apply_definitions(defs, false)
    }

    /// Check every item of `defs` as its declare or bind would, changing
    /// nothing: names, flags against what exists, exchange types and
    /// transforms (the plugins instantiated on their arguments, as a
    /// declare does), queue arguments (quorum queues only in a cluster),
    /// binding ends (existing or in `defs`) and filters. The error names
    /// the first item refused.
    pub fn check_definitions(&self, defs: &Definitions) -> Result<(), DefinitionsError> {
        use std::collections::HashSet;
        let at = |item: String| move |error| DefinitionsError::Item { item, error };
        for v in &defs.vhosts {
            let vat = || format!("vhost '{}'", v.name);
            super::check_short("vhost name", &v.name).map_err(at(vat()))?;
            let live = self.vhost(&v.name);
            let new_exchanges: HashSet<&str> =
                v.exchanges.iter().map(|x| x.name.as_str()).collect();
            let new_queues: HashSet<&str> = v.queues.iter().map(|q| q.name.as_str()).collect();
            for x in &v.exchanges {
                let what = format!(
                    "exchange '{}' (type '{}') in vhost '{}'",
                    x.name, x.kind, v.name
                );
                self.check_exchange(live.as_deref(), x).map_err(at(what))?;
            }
            for q in &v.queues {
                let what = format!("queue '{}' in vhost '{}'", q.name, v.name);
                self.check_queue(live.as_deref(), q).map_err(at(what))?;
            }
            for b in &v.bindings {
                let what = format!(
                    "binding '{}' -> '{}' (key '{}') in vhost '{}'",
                    b.source, b.destination, b.routing_key, v.name
                );
                let exchange_exists = |name: &str| {
                    new_exchanges.contains(name)
                        || live.as_ref().is_some_and(|l| l.exchange(name).is_ok())
                        || (live.is_none() && Self::is_predeclared(name))
                };
                let check = || -> Result<(), BrokerError> {
                    super::check_short("routing key", &b.routing_key)?;
                    if b.source.is_empty() {
                        return Err(BrokerError::AccessRefused(
                            "operation not permitted on the default exchange".into(),
                        ));
                    }
                    if !exchange_exists(&b.source) {
                        return Err(BrokerError::NotFound {
                            kind: "exchange",
                            vhost: v.name.clone(),
                            name: b.source.clone(),
                        });
                    }
                    let there = if b.destination_type == "exchange" {
                        exchange_exists(&b.destination)
                    } else {
                        new_queues.contains(b.destination.as_str())
                            || live
                                .as_ref()
                                .is_some_and(|l| l.queue_exists(&b.destination))
                    };
                    if !there {
                        return Err(BrokerError::NotFound {
                            kind: if b.destination_type == "exchange" {
                                "exchange"
                            } else {
                                "queue"
                            },
                            vhost: v.name.clone(),
                            name: b.destination.clone(),
                        });
                    }
                    if let Some(filter) = super::arg_str(&b.arguments, super::ARG_FILTER)?
                        && self.registry.get(&filter).is_none()
                    {
                        return Err(BrokerError::PreconditionFailed(format!(
                            "unknown filter plugin '{filter}' in {} (plugin folder: {})",
                            super::ARG_FILTER,
                            self.plugin_dir.display()
                        )));
                    }
                    Ok(())
                };
                check().map_err(at(what))?;
            }
        }
        Ok(())
    }

    fn check_exchange(
        &self,
        live: Option<&super::VHost>,
        x: &ExchangeDefinition,
    ) -> Result<(), BrokerError> {
        super::check_short("exchange name", &x.name)?;
        super::check_short("exchange type", &x.kind)?;
        let spec = ExchangeSpec {
            name: x.name.clone(),
            kind: x.kind.clone(),
            durable: true,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments.clone(),
        };
        if let Some((vhost, current)) = live.and_then(|l| Some((l, l.exchange(&x.name).ok()?))) {
            return super::declare::equivalent_exchange(&vhost.name, &current, &spec);
        }
        // A new vhost gets the predeclared exchanges first, as the import
        // will make it: naming one is a redeclare of it.
        if let Some((_, kind)) = super::PREDECLARED.iter().find(|(n, _)| *n == x.name)
            && x.kind == *kind
            && !x.auto_delete
            && !x.internal
        {
            return Ok(());
        }
        if x.name.is_empty() {
            return Err(BrokerError::AccessRefused(
                "operation not permitted on the default exchange".into(),
            ));
        }
        super::declare::reserved_exchange(&x.name)?;
        self.make_exchange(&spec).map(drop)
    }

    fn check_queue(
        &self,
        live: Option<&super::VHost>,
        q: &QueueDefinition,
    ) -> Result<(), BrokerError> {
        super::check_short("queue name", &q.name)?;
        if let Some((vhost, current)) = live.and_then(|l| Some((l, l.queue(&q.name).ok()?))) {
            return super::declare::equivalent_queue(
                &vhost.name,
                &current,
                [true, q.auto_delete, false],
                &q.arguments,
            );
        }
        super::declare::reserved_queue(&q.name)?;
        let limits = super::QueueLimits::parse(&q.arguments)
            .map_err(|e| BrokerError::PreconditionFailed(e.to_string()))?;
        if limits.quorum && self.cluster().is_none() && self.store.get().is_none() {
            return Err(BrokerError::PreconditionFailed(
                "invalid arg 'x-queue-type': quorum queues need a data directory".into(),
            ));
        }
        Ok(())
    }

    fn recover_definitions(&self, defs: &Definitions) -> Result<Recovery, DefinitionsError> {
        self.apply_definitions(defs, true)
    }

    /// Declare exchanges, then queues, then bindings (replayed into their
    /// plugins). At recovery, exchanges are rebuilt directly (they were
    /// checked when first declared, and nothing is persisted meanwhile);
    /// an import declares them like a client would.
    fn apply_definitions(
        &self,
        defs: &Definitions,
        recovering: bool,
    ) -> Result<Recovery, DefinitionsError> {
        let at = |item: String| move |error| DefinitionsError::Item { item, error };
        let mut r = Recovery::default();
        for v in &defs.vhosts {
            let vhost = self
                .add_vhost(&v.name)
                .map_err(at(format!("vhost '{}'", v.name)))?;
            for x in &v.exchanges {
                let spec = ExchangeSpec {
                    name: x.name.clone(),
                    kind: x.kind.clone(),
                    durable: true,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments: x.arguments.clone(),
                };
                let what = || {
                    format!(
                        "exchange '{}' (type '{}') in vhost '{}'",
                        x.name, x.kind, v.name
                    )
                };
                if recovering {
                    let built = self
                        .build_exchange(&spec)
                        .map_err(at(format!("recovering durable {}", what())))?;
                    self.open_dedup_log(&vhost.name, &built)
                        .map_err(at(format!("recovering durable {}", what())))?;
                    vhost.exchanges.write().insert(x.name.clone(), built);
                } else {
                    self.declare_exchange(&vhost, spec, false)
                        .map_err(at(what()))?;
                }
                r.exchanges += 1;
            }
            for q in &v.queues {
                let queue = self
                    .declare_queue(
                        &vhost,
                        QueueDecl {
                            name: q.name.to_string(),
                            durable: true,
                            auto_delete: q.auto_delete,
                            arguments: q.arguments.clone(),
                            ..Default::default()
                        },
                    )
                    .map_err(at(format!("queue '{}' in vhost '{}'", q.name, v.name)))?;
                if recovering {
                    r.messages += queue.len();
                }
                r.queues += 1;
            }
            for b in &v.bindings {
                let destination = if b.destination_type == "exchange" {
                    Destination::Exchange(b.destination.clone())
                } else {
                    Destination::Queue(b.destination.clone())
                };
                self.bind(
                    &vhost,
                    &b.source,
                    destination,
                    &b.routing_key,
                    b.arguments.clone(),
                )
                .map_err(at(format!(
                    "binding '{}' -> '{}' (key '{}') in vhost '{}'",
                    b.source, b.destination, b.routing_key, v.name
                )))?;
                r.bindings += 1;
            }
        }
        Ok(r)
    }

    /// Record `changes` to the durable definitions if a store is attached
    /// and recovery is over; returns once they are on disk.
    pub(crate) fn persist(&self, changes: Vec<Change>) -> Result<(), BrokerError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        if self.recovering.load(Ordering::SeqCst) || self.replicated.load(Ordering::SeqCst) {
            return Ok(());
        }
        store.append_definitions(&changes)?;
        Ok(())
    }

    /// Write all durable definitions as the store's snapshot (after
    /// recovery: the change log starts over), if a store is attached.
    pub(crate) fn persist_definitions(&self) -> Result<(), BrokerError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        if self.recovering.load(Ordering::SeqCst) || self.replicated.load(Ordering::SeqCst) {
            return Ok(());
        }
        // One snapshot and write at a time, so the last write is the
        // latest state.
        let _saving = self.definitions.lock();
        store.save_definitions(self.durable_definitions())?;
        Ok(())
    }

    /// Every durable definition, as it is now.
    pub fn durable_definitions(&self) -> Definitions {
        let mut vhosts: Vec<VHostDefinitions> = Vec::new();
        let mut all = self.vhosts();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        for v in all {
            let mut d = VHostDefinitions {
                name: v.name.clone(),
                ..Default::default()
            };
            let mut exchanges = v.exchanges();
            exchanges.sort_by(|a, b| a.name.cmp(&b.name));
            let durable_queue =
                |name: &str| v.queue(name).is_ok_and(|q| q.durable && q.owner.is_none());
            for x in exchanges.iter().filter(|x| x.durable) {
                if !x.name.starts_with("amq.") && !x.name.is_empty() {
                    d.exchanges.push(ExchangeDefinition {
                        name: x.name.clone(),
                        kind: x.kind.clone(),
                        auto_delete: x.auto_delete,
                        internal: x.internal,
                        arguments: x.arguments.clone(),
                    });
                }
                let table = x.bindings.load();
                let mut bindings: Vec<_> = table.iter().collect();
                bindings.sort_by_key(|b| b.id);
                for b in bindings {
                    let (kind, durable) = match &b.destination {
                        Destination::Queue(q) => ("queue", durable_queue(q)),
                        Destination::Exchange(e) => {
                            ("exchange", v.exchange(e).is_ok_and(|e| e.durable))
                        }
                    };
                    if durable {
                        d.bindings.push(BindingDefinition {
                            source: x.name.clone(),
                            destination: b.destination.name().to_owned(),
                            destination_type: kind.into(),
                            routing_key: b.key.clone(),
                            arguments: b.arguments.clone(),
                        });
                    }
                }
            }
            let mut queues = v.queues();
            queues.sort_by(|a, b| a.name.cmp(&b.name));
            for q in queues.iter().filter(|q| q.durable && q.owner.is_none()) {
                d.queues.push(QueueDefinition {
                    name: q.name.clone(),
                    auto_delete: q.auto_delete,
                    arguments: q.arguments.clone(),
                });
            }
            if !(d.exchanges.is_empty() && d.queues.is_empty() && d.bindings.is_empty()) {
                vhosts.push(d);
            }
        }
        Definitions {
            version: DEFINITIONS_VERSION,
            vhosts,
        }
    }
}

/// The change that records exchange `x` as it is (only client-declared
/// exchanges: the predeclared `amq.*` ones are recreated by every vhost).
pub(crate) fn exchange_change(vhost: &str, x: &super::Exchange) -> Change {
    Change::PutExchange {
        vhost: vhost.to_owned(),
        exchange: ExchangeDefinition {
            name: x.name.clone(),
            kind: x.kind.clone(),
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments.clone(),
        },
    }
}

/// Queue `q`'s definition.
pub(crate) fn queue_definition(q: &super::Queue) -> QueueDefinition {
    QueueDefinition {
        name: q.name.clone(),
        auto_delete: q.auto_delete,
        arguments: q.arguments.clone(),
    }
}

/// The change that records binding `b` of exchange `source` as present
/// (`put`) or gone.
pub(crate) fn binding_change(
    vhost: &str,
    source: &str,
    b: &super::exchange::Binding,
    put: bool,
) -> Change {
    let binding = BindingDefinition {
        source: source.to_owned(),
        destination: b.destination.name().to_owned(),
        destination_type: match b.destination {
            Destination::Queue(_) => "queue",
            Destination::Exchange(_) => "exchange",
        }
        .into(),
        routing_key: b.key.clone(),
        arguments: b.arguments.clone(),
    };
    let vhost = vhost.to_owned();
    if put {
        Change::PutBinding { vhost, binding }
    } else {
        Change::DeleteBinding { vhost, binding }
    }
}
