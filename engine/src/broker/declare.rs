//! Declaring and deleting exchanges and queues, binding and unbinding:
//! the definition changes, each checked as RabbitMQ checks it and, when
//! durable, recorded in the store's definitions log before it is answered.

use super::*;

/// RabbitMQ's equivalence for a redeclared exchange: type and flags are
/// part of what it is (406 otherwise). A declare and an import's check
/// share it.
pub(super) fn equivalent_exchange(
    vhost: &str,
    x: &Exchange,
    spec: &ExchangeSpec,
) -> Result<(), BrokerError> {
    if x.kind != spec.kind
        || x.durable != spec.durable
        || x.auto_delete != spec.auto_delete
        || x.internal != spec.internal
    {
        return Err(BrokerError::PreconditionFailed(format!(
            "inequivalent arg 'type' or flags for exchange '{}' in vhost '{vhost}': received type '{}' durable {} auto_delete {} internal {}, but current is type '{}' durable {} auto_delete {} internal {}",
            spec.name,
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
    Ok(())
}

/// RabbitMQ's equivalence for a redeclared queue: its `durable`,
/// `auto_delete` and `exclusive` flags (in that order in `flags`) and its
/// arguments are part of what it is (406 otherwise).
pub(super) fn equivalent_queue(
    vhost: &str,
    q: &Queue,
    flags: [bool; 3],
    arguments: &FieldTable,
) -> Result<(), BrokerError> {
    let name = &q.name;
    let current = [q.durable, q.auto_delete, q.owner.is_some()];
    for ((arg, received), current) in ["durable", "auto_delete", "exclusive"]
        .into_iter()
        .zip(flags)
        .zip(current)
    {
        if received != current {
            return Err(BrokerError::PreconditionFailed(format!(
                "inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}': received '{received}' but current is '{current}'"
            )));
        }
    }
    if q.arguments != *arguments {
        return Err(BrokerError::PreconditionFailed(format!(
            "inequivalent arg for queue '{name}' in vhost '{vhost}': declared with other arguments than it has"
        )));
    }
    Ok(())
}

/// `amq.` names are the broker's (403).
pub(super) fn reserved_exchange(name: &str) -> Result<(), BrokerError> {
    if name.starts_with("amq.") {
        return Err(BrokerError::AccessRefused(format!(
            "exchange name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    Ok(())
}

/// `amq.` names are the broker's, but for the server-named `amq.gen-*`
/// (403).
pub(super) fn reserved_queue(name: &str) -> Result<(), BrokerError> {
    if name.starts_with("amq.") && !name.starts_with("amq.gen-") {
        return Err(BrokerError::AccessRefused(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    Ok(())
}

impl Broker {
    pub(super) fn build_exchange(&self, spec: &ExchangeSpec) -> Result<Arc<Exchange>, BrokerError> {
        let x = self.make_exchange(spec)?;
        // A plugin on trial tries its candidate on new uses too.
        self.stage_on_new_exchange(&x);
        Ok(x)
    }

    /// An exchange as `spec` says, its plugins instantiated (so they have
    /// checked its arguments), not yet in any vhost.
    pub(super) fn make_exchange(&self, spec: &ExchangeSpec) -> Result<Arc<Exchange>, BrokerError> {
        let _swap = self.swap.read();
        // A deduplicating exchange (the community plugin's type) drops
        // duplicates in the broker, then routes as `fanout`, as that
        // plugin's does: its ids are state no plugin instance could share.
        let delayed = match spec.kind == DELAYED_EXCHANGE {
            true => Some(self.delayed_of(spec)?),
            false => None,
        };
        let (routing, dedup) = if spec.kind == DEDUP_EXCHANGE {
            let settings = crate::dedup::Settings::of_exchange(&spec.arguments)
                .map_err(BrokerError::PreconditionFailed)?;
            ("fanout", Some(settings))
        } else if let Some(d) = &delayed {
            (d.routing.as_str(), None)
        } else {
            (spec.kind.as_str(), None)
        };
        let version = if Self::is_predeclared(&spec.name) || dedup.is_some() {
            self.builtins().get(routing).cloned()
        } else {
            self.registry.get(routing)
        };
        let version = version.ok_or_else(|| match &delayed {
            // RabbitMQ's plugin's words, with what was asked for.
            Some(_) => BrokerError::PreconditionFailed(format!(
                "Invalid argument, '{ARG_DELAYED_TYPE}' must be an existing exchange type: no exchange type '{routing}' (plugin folder: {})",
                self.plugin_dir.display()
            )),
            None => BrokerError::UnknownExchangeType {
                kind: spec.kind.clone(),
                plugin_dir: self.plugin_dir.display().to_string(),
            },
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
        let x = Arc::new(Exchange {
            name: spec.name.clone(),
            kind: spec.kind.clone(),
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            // Its vhost's policies are laid over once it is in the vhost.
            alternate_exchange: ArcSwapOption::new(
                arg_str(&spec.arguments, ARG_ALTERNATE_EXCHANGE)?.map(Arc::new),
            ),
            policy: ArcSwap::from_pointee(Default::default()),
            dead_letter_exchange: arg_str(&spec.arguments, ARG_DEAD_LETTER_EXCHANGE)?,
            transform_name: ArcSwapOption::new(transform_name.map(Arc::new)),
            arguments: spec.arguments.clone(),
            stats: ExchangeStats::default(),
            encoded_arguments: encoded,
            control: Mutex::new(()),
            bindings: ArcSwap::from_pointee(BindingTable::default()),
            router: ArcSwap::from_pointee(router),
            memo: ArcSwap::from_pointee(Default::default()),
            transform: ArcSwapOption::new(transform),
            staged: Default::default(),
            candidates: Default::default(),
            capturing: Default::default(),
            dedup: dedup.map(|s| parking_lot::Mutex::new(crate::dedup::Cache::new(s))),
            dedup_log: Default::default(),
            capture: Default::default(),
            delayed,
        });
        Ok(x)
    }

    /// Give durable deduplicating exchange `x` its ids file (in a log of
    /// its own in the store, named `amq.dedup.<exchange>` as no client
    /// queue can be), and take back the ids it holds.
    pub(super) fn open_dedup_log(&self, vhost: &str, x: &Exchange) -> Result<(), BrokerError> {
        let (Some(cache), Some(store), true) = (&x.dedup, self.store.get(), x.durable) else {
            return Ok(());
        };
        if x.dedup_log.get().is_some() {
            return Ok(());
        }
        let (log, _) = store.open_queue(vhost, &format!("amq.dedup.{}", x.name))?;
        let now = crate::message::now_ms();
        let mut c = cache.lock();
        for (k, e) in log.recovered_ids() {
            c.restore(k, e, now);
        }
        let _ = x.dedup_log.set(log);
        Ok(())
    }

    /// Forget deduplicating exchanges' ids past their window, and rewrite
    /// a durable one's ids file when most of it is gone (the periodic
    /// sweep).
    pub(super) fn sweep_exchange_ids(&self) {
        for v in self.vhosts() {
            for x in v.exchanges() {
                let Some(cache) = &x.dedup else { continue };
                let live = {
                    let mut c = cache.lock();
                    c.evict(crate::message::now_ms());
                    match x.dedup_log.get() {
                        Some(log) if log.id_records() > 2 * c.len() as u64 + 10_000 => c.entries(),
                        _ => continue,
                    }
                };
                if let Some(log) = x.dedup_log.get() {
                    log.rewrite_ids(&live);
                }
            }
        }
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
            equivalent_exchange(&vhost.name, &x, &spec)?;
            return Ok(x);
        }
        if passive {
            return Err(vhost.not_found("exchange", &spec.name));
        }
        reserved_exchange(&spec.name)?;
        let partitions = super::stream::partitions_of(&spec).map_err(|e| {
            BrokerError::PreconditionFailed(format!(
                "{e} for exchange '{}' in vhost '{}'",
                spec.name, vhost.name
            ))
        })?;
        let durable = spec.durable;
        let x = self.build_exchange(&spec)?;
        let x = vhost
            .exchanges
            .write()
            .entry(spec.name)
            .or_insert(x)
            .clone();
        self.apply_exchange_policy(&vhost.name, &x);
        if durable {
            self.persist(vec![exchange_change(&vhost.name, &x)])?;
        }
        self.open_dedup_log(&vhost.name, &x)?;
        if x.delayed.is_some() {
            self.declare_schedule(vhost, &x)?;
        }
        // In a cluster the partitions are replicated streams, declared
        // with the exchange through the log (its follow-ups).
        if let Some(n) = partitions
            && self.cluster().is_none()
        {
            self.declare_partitions(vhost, &x, n)?;
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
        if let Some(log) = x.dedup_log.get() {
            log.destroy();
        }
        if let Some(d) = x.delayed.as_ref().filter(|_| !self.schedules_in_cluster()) {
            // Its scheduled messages go with it, as they do in RabbitMQ.
            match self.delete_queue(vhost, &d.queue, false, false) {
                Ok(_) | Err(BrokerError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
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

    /// Declare a queue (idempotent for the same flags). `decl.owner` makes
    /// it exclusive to that connection.
    pub fn declare_queue(&self, vhost: &VHost, decl: QueueDecl) -> Result<Arc<Queue>, BrokerError> {
        let name = decl.name.clone();
        let name = name.as_str();
        let (durable, owner, auto_delete) = (decl.durable, decl.owner, decl.auto_delete);
        check_short("queue name", name)?;
        let schedules = super::delayed::schedules(&decl.arguments).map(str::to_owned);
        if schedules
            .as_deref()
            .is_none_or(|x| schedule_queue(x) != name)
        {
            reserved_queue(name)?;
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
            equivalent_queue(
                &vhost.name,
                q,
                [durable, auto_delete, owner.is_some()],
                &decl.arguments,
            )?;
            return Ok(q.clone());
        }
        self.check_queue_limit(vhost, name, queues.len(), false)?;
        let limits = QueueLimits::parse(&decl.arguments).map_err(|e| {
            BrokerError::PreconditionFailed(format!(
                "{e} for queue '{name}' in vhost '{}'",
                vhost.name
            ))
        })?;
        if limits.quorum {
            // In a cluster, quorum queues are made through the cluster's
            // log (`nodes/quorum.rs`); one that reaches here cannot be
            // one. On a single node a quorum queue is a one-replica queue
            // in the node's store, as RabbitMQ makes it there.
            let why = if owner.is_some() {
                Some("invalid property 'exclusive'")
            } else if !durable {
                Some("invalid property 'non-durable'")
            } else if auto_delete {
                Some("invalid property 'auto-delete'")
            } else if self.cluster().is_some() {
                Some("invalid arg 'x-queue-type'")
            } else if self.store.get().is_none() {
                Some(
                    "invalid arg 'x-queue-type': quorum queues need a data directory, and this broker has no store",
                )
            } else {
                None
            };
            if let Some(why) = why {
                return Err(BrokerError::PreconditionFailed(format!(
                    "{why} for queue '{name}' in vhost '{}'",
                    vhost.name
                )));
            }
        }
        if limits.stream {
            return self.declare_stream(vhost, decl, limits, queues);
        }
        let flow = self
            .queue_flow_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let (applied, limits) = self.with_policies(&vhost.name, name, &decl.arguments, limits);
        let sink = Some(self.dead_letter_sink(&vhost.name));
        // Exclusive queues die with their connection, so never outlive a
        // restart: only durable shared queues get a log.
        let (log, recovered) = match self.store.get() {
            Some(store) if durable && owner.is_none() => {
                let (log, recovered) = store.open_queue(&vhost.name, name)?;
                (Some(log), recovered)
            }
            _ => (None, Vec::new()),
        };
        let mut q = Queue::new(decl, limits, flow, sink, log).with_policy(applied);
        if let Some(x) = &schedules {
            q = q.with_due_sink(self.due_sink(&vhost.name, x));
        }
        let q = Arc::new(q);
        q.restore(recovered);
        queues.insert(name.to_owned(), q.clone());
        drop(queues);
        if q.owner.is_some() {
            self.private_changed();
        }
        if q.log().is_some() {
            self.persist(vec![Change::PutQueue {
                vhost: vhost.name.clone(),
                queue: queue_definition(&q),
            }])?;
        }
        Ok(q)
    }

    /// Make a stream queue: durable, shared, on a node with a store, its
    /// log opened (or recovered) in the store's `streams` folder.
    fn declare_stream(
        &self,
        vhost: &VHost,
        decl: QueueDecl,
        limits: QueueLimits,
        mut queues: parking_lot::RwLockWriteGuard<'_, super::Map<String, Arc<Queue>>>,
    ) -> Result<Arc<Queue>, BrokerError> {
        use super::stream::{Stream, StreamArgs, refusal};
        let name = decl.name.clone();
        let refuse =
            |what: &str| BrokerError::PreconditionFailed(refusal(what, &name, &vhost.name));
        if decl.owner.is_some() {
            return Err(refuse("invalid property 'exclusive'"));
        }
        if !decl.durable {
            return Err(refuse("invalid property 'non-durable'"));
        }
        if decl.auto_delete {
            return Err(refuse("invalid property 'auto-delete'"));
        }
        if self.cluster().is_some() {
            // A cluster declares streams through its log, replicated
            // (`nodes/quorum.rs`): one that reaches here cannot be one.
            return Err(refuse(
                "invalid arg 'x-queue-type': a cluster makes streams only as replicated streams, declared through the cluster",
            ));
        }
        let Some(store) = self.store.get() else {
            return Err(refuse(
                "invalid arg 'x-queue-type': streams need a data directory, and this broker has no store",
            ));
        };
        let args = StreamArgs::parse(&decl.arguments).map_err(|e| refuse(&e))?;
        let log = store.open_stream(&vhost.name, &name, args.segment_bytes)?;
        let flow = self
            .queue_flow_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let (applied, limits) = self.with_policies(&vhost.name, &name, &decl.arguments, limits);
        let q = Queue::new(decl, limits, flow, None, None)
            .with_policy(applied)
            .with_stream(Stream::new(log));
        let q = Arc::new(q);
        Stream::start(&q);
        queues.insert(name.clone(), q.clone());
        drop(queues);
        self.persist(vec![Change::PutQueue {
            vhost: vhost.name.clone(),
            queue: queue_definition(&q),
        }])?;
        Ok(q)
    }

    /// 406 when the vhost's `max-queues` is reached and `name` would be a
    /// new queue, in RabbitMQ's words. `local` of the vhost's queues are on
    /// this node (`exists`: `name` among them); those of other nodes count
    /// too. The caller may hold the vhost's queue lock.
    pub fn check_queue_limit(
        &self,
        vhost: &VHost,
        name: &str,
        local: usize,
        exists: bool,
    ) -> Result<(), BrokerError> {
        let Some(limit) = self.accounts().vhost_limit(&vhost.name, "max-queues") else {
            return Ok(());
        };
        if exists || vhost.remote_queue(name).is_some() {
            return Ok(());
        }
        if (local + vhost.remote_queues().len()) as u64 >= limit {
            return Err(BrokerError::PreconditionFailed(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({limit}) is reached",
                vhost.name
            )));
        }
        Ok(())
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
        if let Some(x) = super::delayed::schedules(&q.arguments)
            && vhost.exchange(x).is_ok()
        {
            return Err(BrokerError::AccessRefused(format!(
                "queue '{name}' in vhost '{}' holds the scheduled messages of delayed exchange '{x}': it goes when the exchange is deleted",
                vhost.name
            )));
        }
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
        if q.owner.is_some() {
            self.private_changed();
        }
        q.cancel_consumers();
        q.destroy_log();
        let n = q.purge();
        if q.log().is_some() || q.stream().is_some() {
            self.persist(vec![Change::DeleteQueue {
                vhost: vhost.name.clone(),
                name: name.to_owned(),
            }])?;
        }
        Ok(n)
    }

    pub(crate) fn remove_bindings_to(&self, vhost: &VHost, destination: &Destination) {
        for x in vhost.exchanges() {
            let ids = x.bindings.load().ids_to(destination);
            if !ids.is_empty() {
                self.remove_bindings(vhost, &x, &ids);
            }
        }
    }

    pub(super) fn remove_bindings(&self, vhost: &VHost, x: &Arc<Exchange>, ids: &[u32]) {
        let _control = x.control.lock();
        let table = x.bindings.load_full();
        x.bindings.store(Arc::new(table.without(ids)));
        let router = x.router.load();
        let mut private = false;
        for id in ids {
            if let Some(b) = table.get(*id) {
                router.unbind(b.id, &b.bind_input);
                self.unbind_candidate(x, b.id, &b.bind_input);
                private |= owned(vhost, &b.destination);
            }
        }
        if private {
            self.private_changed();
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
            // A queue on another node is bound to by name like any other.
            Destination::Queue(q) if vhost.queue_exists(q) => {}
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
        let declared_filter = arg_str(&arguments, ARG_FILTER)?;
        let (filter_name, filter) = match &declared_filter {
            None => {
                // A policy's filter, where the client named none: one that
                // cannot be built leaves the binding unfiltered (the client
                // did not ask for it), and says why.
                let name = x.policy.load().filter(None);
                match name.and_then(|n| self.policy_filter(&n, source, key, &encoded)) {
                    Some((n, f)) => (Some(n), Some(f)),
                    None => (None, None),
                }
            }
            Some(name) => {
                let v = self.registry.get(name).ok_or_else(|| {
                    BrokerError::PreconditionFailed(format!(
                        "unknown filter plugin '{name}' in {ARG_FILTER} (plugin folder: {})",
                        self.plugin_dir.display()
                    ))
                })?;
                (
                    declared_filter.clone(),
                    Some(Arc::new(FilterPlugin::new(
                        &self.host, &v, source, key, &encoded,
                    )?)),
                )
            }
        };
        let id = table.next_id;
        let bind_input = binding_input(
            key,
            matches!(destination, Destination::Exchange(_)),
            destination.name(),
            &encoded,
        );
        let filter_candidate = filter_name
            .as_deref()
            .and_then(|name| self.candidate_filter(&x, name, key, &encoded));
        let binding = Binding {
            id,
            bind_input,
            destination,
            key: key.to_owned(),
            arguments,
            encoded_arguments: encoded,
            filter,
            filter_name,
            filter_candidate,
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
        if let Some(b) = x.bindings.load().get(id) {
            self.bind_candidate(&x, id, &b.bind_input);
        }
        x.reset_memo();
        drop(_control);
        if let Some(b) = x.bindings.load().get(id)
            && owned(vhost, &b.destination)
        {
            self.private_changed();
        }
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

/// Whether `d` is an exclusive queue of this node (its bindings are
/// reported to the other nodes of a cluster).
fn owned(vhost: &VHost, d: &Destination) -> bool {
    matches!(d, Destination::Queue(q) if vhost.queue(q).is_ok_and(|q| q.owner.is_some()))
}

/// A name for a queue the server names (`amq.gen-...`): unique on this
/// node, and across a cluster's nodes (time and a counter), where a
/// node's private queues are known by name on every node.
pub fn server_name(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{prefix}-{:x}{:06x}",
        t ^ (n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        n & 0xff_ffff
    )
}
