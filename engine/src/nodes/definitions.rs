//! The broker as the cluster's state machine: committed definition changes
//! applied to this node's vhosts.
//!
//! Every node applies every committed [`Command`] through the same broker
//! methods a single node uses for AMQP declares, so the checks (reserved
//! names, equivalence, unknown exchange types) are the same and give the
//! same verdict everywhere. A queue is created only on the node it lives
//! on; the others record it as a [`RemoteQueue`], which is enough to bind
//! to it and to tell a client where it is. Definitions are not written to
//! the local definitions log in a cluster: the Raft log and its snapshots
//! are their durable record, and a restarted node gets them back from it.

use std::sync::{Arc, Weak};

use crate::broker::{Broker, BrokerError, Destination, ExchangeSpec, QueueDecl, RemoteQueue};
use crate::cluster::{Applied, Applier, Catalog, ClusterNode, Command, PluginEvent};
use crate::store::definitions::{BindingDefinition, Definitions, QueueDefinition};

/// The commands that declare `defs` on a clustered node (`node`, where its
/// queues will live): exchanges, then queues, then bindings, as an import
/// on a single node declares them.
pub fn definition_commands(defs: &Definitions, node: &str) -> Vec<Command> {
    let mut out = Vec::new();
    for v in &defs.vhosts {
        out.extend(v.exchanges.iter().map(|x| Command::DeclareExchange {
            vhost: v.name.clone(),
            exchange: x.clone(),
            durable: true,
        }));
    }
    for v in &defs.vhosts {
        out.extend(v.queues.iter().map(|q| Command::DeclareQueue {
            vhost: v.name.clone(),
            queue: q.clone(),
            durable: true,
            node: node.to_owned(),
            members: Vec::new(),
        }));
    }
    for v in &defs.vhosts {
        out.extend(v.bindings.iter().map(|b| Command::Bind {
            vhost: v.name.clone(),
            binding: b.clone(),
        }));
    }
    out
}

/// Applies committed commands to a broker (held weakly: the broker owns
/// the cluster node, which owns this).
pub struct BrokerApplier {
    broker: Weak<Broker>,
    node: String,
}

impl BrokerApplier {
    /// The applier of `broker`, on the node named `node`.
    pub fn new(broker: &std::sync::Arc<Broker>, node: &str) -> BrokerApplier {
        BrokerApplier {
            broker: std::sync::Arc::downgrade(broker),
            node: node.to_owned(),
        }
    }
}

fn refused(e: BrokerError) -> Applied {
    Applied::Refused {
        code: e.reply_code(),
        text: e.to_string(),
    }
}

fn destination(b: &BindingDefinition) -> Destination {
    if b.destination_type == "exchange" {
        Destination::Exchange(b.destination.clone())
    } else {
        Destination::Queue(b.destination.clone())
    }
}

impl Applier for BrokerApplier {
    fn apply(&self, command: &Command) -> Applied {
        let Some(broker) = self.broker.upgrade() else {
            return Applied::Done;
        };
        broker.apply_command(command, &self.node)
    }

    fn reset(&self, catalog: &Catalog) {
        if let Some(broker) = self.broker.upgrade() {
            // Plugins first: the exchanges need their types.
            broker.serve_cluster_plugins(catalog);
            broker.reset_to(catalog, &self.node);
            broker.sync_cluster_candidates(catalog, &self.node);
            broker.reset_access(&catalog.access);
        }
    }

    fn access(&self, directory: &crate::access::Directory, effects: Vec<crate::access::Effect>) {
        if let Some(broker) = self.broker.upgrade() {
            broker.apply_access(directory, effects);
        }
    }

    fn plugin(&self, event: &PluginEvent) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        match event {
            PluginEvent::Nothing => {}
            PluginEvent::Validate { name, hash, bytes } => {
                broker.validate_staged(name, hash, bytes, &self.node)
            }
            PluginEvent::Activate { name, hash, bytes } => {
                broker.end_replaced_candidate(name, hash);
                broker.activate_plugin(name, hash, bytes)
            }
            PluginEvent::Stage(candidate) => broker.stage_from_log(candidate, &self.node),
            PluginEvent::End {
                name,
                hash,
                event,
                reason,
                promoted,
            } => broker.end_from_log(name, hash, event, reason.clone(), promoted.as_deref()),
        }
    }
}

impl Broker {
    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&std::sync::Arc<ClusterNode>> {
        self.cluster.get()
    }

    /// Join `node`'s cluster: definitions change only through it from now
    /// on.
    pub fn set_cluster(&self, node: std::sync::Arc<ClusterNode>) {
        let _ = self.cluster.set(node);
        // Quorum queues applied while the node started get their replicas.
        self.open_replicas();
    }

    /// Definitions are replicated (set before the cluster starts, so that
    /// what it replays is not written to the local definitions log).
    pub fn replicate_definitions(&self) {
        self.replicated
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Delete a queue of this node that went away by itself (`auto_delete`
    /// after its last consumer, `x-expires`). Alone, at once; in a
    /// cluster a shared queue is deleted through the log like any other
    /// delete, so that every node forgets it in the same order as the
    /// other changes (deleting it here first would let a redeclaration
    /// committed meanwhile be deleted by the late proposal).
    pub(crate) fn delete_unused_queue(&self, vhost: &crate::broker::VHost, name: &str) -> bool {
        let shared = vhost.queue(name).is_ok_and(|q| q.owner.is_none());
        match self.cluster() {
            Some(node) if shared => {
                let (node, command) = (
                    node.clone(),
                    Command::DeleteQueue {
                        vhost: vhost.name.clone(),
                        name: name.to_owned(),
                        if_unused: false,
                        if_empty: false,
                    },
                );
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        if let Err(e) = node.propose(command).await {
                            tracing::warn!("deleting an unused queue through the cluster: {e}");
                        }
                    });
                }
                true
            }
            _ => self.delete_queue(vhost, name, false, false).is_ok(),
        }
    }

    /// Apply one committed command on node `me`.
    pub(crate) fn apply_command(&self, command: &Command, me: &str) -> Applied {
        if command.is_plugin() {
            // Plugin entries reach the broker as `PluginEvent`s.
            return Applied::Done;
        }
        let Ok(vhost) = self.add_vhost(command.vhost()) else {
            return Applied::Refused {
                code: 402,
                text: format!("INVALID_PATH - vhost '{}'", command.vhost()),
            };
        };
        let result = match command {
            Command::DeclareExchange {
                exchange, durable, ..
            } => self
                .declare_exchange(
                    &vhost,
                    ExchangeSpec {
                        name: exchange.name.clone(),
                        kind: exchange.kind.clone(),
                        durable: *durable,
                        auto_delete: exchange.auto_delete,
                        internal: exchange.internal,
                        arguments: exchange.arguments.clone(),
                    },
                    false,
                )
                .map(|_| Applied::Done),
            Command::DeleteExchange {
                name, if_unused, ..
            } => match self.delete_exchange(&vhost, name, *if_unused) {
                Ok(()) | Err(BrokerError::NotFound { .. }) => Ok(Applied::Done),
                Err(e) => Err(e),
            },
            Command::DeclareQueue {
                queue,
                durable,
                node,
                members,
                ..
            } if !members.is_empty() => {
                self.apply_declare_quorum(&vhost, queue, *durable, node, members, me)
            }
            Command::DeclareQueue {
                queue,
                durable,
                node,
                ..
            } => self.apply_declare_queue(&vhost, queue, *durable, node, me),
            Command::QueueMembers { name, members, .. } => {
                self.apply_queue_members(&vhost, name, members, me);
                Ok(Applied::Done)
            }
            Command::QueueLeader {
                name, node, term, ..
            } => {
                self.apply_queue_leader(&vhost, name, node, *term, me);
                Ok(Applied::Done)
            }
            Command::DeleteQueue { name, .. } if self.holds_schedule(&vhost, name) => {
                Err(BrokerError::AccessRefused(format!(
                    "queue '{name}' in vhost '{}' holds a delayed exchange's scheduled messages: it goes when the exchange is deleted",
                    vhost.name
                )))
            }
            Command::DeleteQueue { name, .. } if self.is_quorum(&vhost, name) => Ok(
                Applied::Removed(self.apply_delete_quorum(&vhost, name) as u32),
            ),
            Command::DeleteQueue { name, .. } => {
                if vhost.remote_queue(name).is_some() {
                    vhost.set_remote(name, None);
                    self.remove_bindings_to(&vhost, &Destination::Queue(name.clone()));
                    Ok(Applied::Done)
                } else {
                    // if-unused and if-empty were checked where the client
                    // asked, before proposing: applying must not depend on
                    // one node's consumers.
                    match self.delete_queue(&vhost, name, false, false) {
                        Ok(n) => Ok(Applied::Removed(n as u32)),
                        Err(BrokerError::NotFound { .. }) => Ok(Applied::Removed(0)),
                        Err(e) => Err(e),
                    }
                }
            }
            Command::Bind { binding, .. } => self
                .bind(
                    &vhost,
                    &binding.source,
                    destination(binding),
                    &binding.routing_key,
                    binding.arguments.clone(),
                )
                .map(|()| Applied::Done),
            Command::Unbind { binding, .. } => self
                .unbind(
                    &vhost,
                    &binding.source,
                    &destination(binding),
                    &binding.routing_key,
                    &binding.arguments,
                )
                .map(|()| Applied::Done),
            Command::StagePlugin { .. }
            | Command::PluginVerdict { .. }
            | Command::ActivatePlugin { .. }
            | Command::StageCandidate { .. }
            | Command::EndCandidate { .. }
            | Command::Access { .. } => Ok(Applied::Done),
        };
        result.unwrap_or_else(refused)
    }

    /// Whether `vhost`'s queue `name` is the schedule of a delayed exchange
    /// that still exists (it goes only with the exchange).
    fn holds_schedule(&self, vhost: &crate::broker::VHost, name: &str) -> bool {
        let arguments = match vhost.queue(name) {
            Ok(q) => q.arguments.clone(),
            Err(_) => match vhost.remote_queue(name) {
                Some(r) => r.definition.arguments,
                None => return false,
            },
        };
        crate::broker::schedules(&arguments).is_some_and(|x| vhost.exchange(x).is_ok())
    }

    fn apply_declare_queue(
        &self,
        vhost: &crate::broker::VHost,
        queue: &QueueDefinition,
        durable: bool,
        node: &str,
        me: &str,
    ) -> Result<Applied, BrokerError> {
        let existing = vhost.remote_queue(&queue.name);
        let home = existing.as_ref().map_or(node, |r| r.node.as_str());
        if home == me && existing.is_none() {
            self.declare_queue(
                vhost,
                QueueDecl {
                    name: queue.name.clone(),
                    durable,
                    owner: None,
                    auto_delete: queue.auto_delete,
                    arguments: queue.arguments.clone(),
                },
            )?;
            return Ok(Applied::Done);
        }
        match existing {
            // RabbitMQ's equivalence, judged on the replicated definition
            // (the same on every node).
            Some(r) => {
                for (arg, received, current) in [
                    ("durable", durable, r.durable),
                    ("auto_delete", queue.auto_delete, r.definition.auto_delete),
                ] {
                    if received != current {
                        return Err(BrokerError::PreconditionFailed(format!(
                            "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received '{received}' but current is '{current}'",
                            queue.name, vhost.name
                        )));
                    }
                }
                if r.definition.arguments != queue.arguments {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "inequivalent arg for queue '{}' in vhost '{}': declared with other arguments than it has",
                        queue.name, vhost.name
                    )));
                }
                Ok(Applied::Done)
            }
            None => {
                // Its arguments are checked here too, so that a declare
                // the home node refuses is refused everywhere.
                if let Ok(local) = vhost.queue(&queue.name) {
                    // Declared here before the node lived elsewhere: the
                    // home node's rule (equivalence) applies.
                    let decl = QueueDecl {
                        name: local.name.clone(),
                        durable,
                        owner: None,
                        auto_delete: queue.auto_delete,
                        arguments: queue.arguments.clone(),
                    };
                    self.declare_queue(vhost, decl)?;
                    return Ok(Applied::Done);
                }
                crate::broker::QueueLimits::parse(&queue.arguments).map_err(|e| {
                    BrokerError::PreconditionFailed(format!(
                        "{e} for queue '{}' in vhost '{}'",
                        queue.name, vhost.name
                    ))
                })?;
                vhost.set_remote(
                    &queue.name,
                    Some(RemoteQueue {
                        node: node.to_owned(),
                        durable,
                        definition: queue.clone(),
                        leader_term: 0,
                    }),
                );
                Ok(Applied::Done)
            }
        }
    }

    /// Make this node's replicated definitions exactly `catalog` (a
    /// snapshot was installed or loaded): what it lacks is deleted, what
    /// it has is declared.
    pub(crate) fn reset_to(&self, catalog: &Catalog, me: &str) {
        let wanted_queue = |v: &str, n: &str| {
            catalog
                .queues
                .values()
                .any(|q| q.vhost == v && q.queue.name == n)
        };
        let wanted_exchange = |v: &str, n: &str| {
            catalog
                .exchanges
                .values()
                .any(|x| x.vhost == v && x.exchange.name == n)
        };
        for vhost in self.vhosts() {
            for (name, _) in vhost.remote_queues() {
                if !wanted_queue(&vhost.name, &name) && self.is_quorum(&vhost, &name) {
                    self.apply_delete_quorum(&vhost, &name);
                } else if !wanted_queue(&vhost.name, &name) {
                    vhost.set_remote(&name, None);
                    self.remove_bindings_to(&vhost, &Destination::Queue(name));
                }
            }
            for q in vhost.queues() {
                // A delayed exchange's queue is made by its exchange on
                // each node, not by the cluster's log.
                let scheduled = crate::broker::schedules(&q.arguments)
                    .is_some_and(|x| wanted_exchange(&vhost.name, x));
                if q.owner.is_none() && !scheduled && !wanted_queue(&vhost.name, &q.name) {
                    let _ = self.delete_queue(&vhost, &q.name, false, false);
                }
            }
            for x in vhost.exchanges() {
                if !x.name.is_empty()
                    && !x.name.starts_with("amq.")
                    && !wanted_exchange(&vhost.name, &x.name)
                {
                    let _ = self.delete_exchange(&vhost, &x.name, false);
                }
            }
            // Bindings not in the catalog go; the ones in it are declared
            // again below (binding twice is a no-op).
            for x in vhost.exchanges() {
                let table = x.bindings.load_full();
                for b in table.iter() {
                    let def = BindingDefinition {
                        source: x.name.clone(),
                        destination: b.destination.name().to_owned(),
                        destination_type: match b.destination {
                            Destination::Queue(_) => "queue".into(),
                            Destination::Exchange(_) => "exchange".into(),
                        },
                        routing_key: b.key.clone(),
                        arguments: b.arguments.clone(),
                    };
                    let kept = catalog
                        .bindings
                        .values()
                        .any(|r| r.vhost == vhost.name && r.binding == def);
                    let exclusive = matches!(&b.destination, Destination::Queue(q)
                        if vhost.queue(q).is_ok_and(|q| q.owner.is_some()));
                    if !kept && !exclusive {
                        let _ = self.unbind(&vhost, &x.name, &b.destination, &b.key, &b.arguments);
                    }
                }
            }
        }
        let mut commands: Vec<Command> = Vec::new();
        commands.extend(
            catalog
                .exchanges
                .values()
                .map(|x| Command::DeclareExchange {
                    vhost: x.vhost.clone(),
                    exchange: x.exchange.clone(),
                    durable: x.durable,
                }),
        );
        commands.extend(catalog.queues.values().map(|q| Command::DeclareQueue {
            vhost: q.vhost.clone(),
            queue: q.queue.clone(),
            durable: q.durable,
            node: q.node.clone(),
            members: q.members.clone(),
        }));
        commands.extend(catalog.bindings.values().map(|b| Command::Bind {
            vhost: b.vhost.clone(),
            binding: b.binding.clone(),
        }));
        for c in commands {
            if let Applied::Refused { text, .. } = self.apply_command(&c, me) {
                tracing::error!("restoring the cluster's definitions: {text}");
            }
        }
        // Each quorum queue's (and replicated stream's) leader and members
        // as recorded, with the leader's term: what decides whether a
        // later announcement is stale. A queue this node knew already is
        // declared again above, which leaves both as they were.
        for q in catalog.queues.values().filter(|q| !q.members.is_empty()) {
            if let Some(vhost) = self.vhost(&q.vhost)
                && let Some(mut r) = vhost.remote_queue(&q.queue.name)
            {
                if r.node != q.node {
                    r.leader_term = 0;
                    vhost.set_remote(&q.queue.name, Some(r.clone()));
                    self.apply_queue_leader(&vhost, &q.queue.name, &q.node, q.leader_term, me);
                }
                self.apply_queue_members(&vhost, &q.queue.name, &q.members, me);
                if let Some(mut r) = vhost.remote_queue(&q.queue.name) {
                    r.leader_term = q.leader_term;
                    vhost.set_remote(&q.queue.name, Some(r));
                }
            }
        }
    }
}

/// What a node kept while it ran alone, found when it first starts as a
/// cluster node: its durable definitions and its users, vhosts,
/// permissions and policies.
#[derive(Debug)]
pub struct Standalone {
    /// Exchanges, queues and bindings from its store.
    pub definitions: Definitions,
    /// Its `access.json`, if it had one.
    pub access: Option<crate::access::Directory>,
}

impl Standalone {
    /// What `data_dir` holds from running alone, if this node has never
    /// been a cluster member (no `cluster/` folder yet) and it holds
    /// anything.
    pub fn find(data_dir: &std::path::Path, store: &crate::store::Store) -> Option<Standalone> {
        if data_dir.join("cluster").exists() {
            return None;
        }
        let definitions = store.definitions().ok()?;
        let access =
            crate::access::Directory::read(&data_dir.join("access.json")).unwrap_or_else(|e| {
                tracing::error!("this node's users, kept while it ran alone, are not adopted: {e}");
                None
            });
        let empty = definitions
            .vhosts
            .iter()
            .all(|v| v.exchanges.is_empty() && v.queues.is_empty() && v.bindings.is_empty());
        (!empty).then_some(Standalone {
            definitions,
            access,
        })
    }
}

impl Broker {
    /// This node ran alone before and has just started a new cluster:
    /// what it had becomes the cluster's, through the log, as an import
    /// would make it. Its vhosts, users (not the config file's, which every
    /// node lays down itself), permissions and policies first, then its
    /// exchanges, queues and bindings; each queue lives on this node, a
    /// quorum queue as a group of one replica here, which keeps the
    /// messages it held (`nodes/quorum.rs`) and grows with `wasmq quorum
    /// add-member` as nodes join. A node that joined an existing cluster
    /// instead adopts nothing: two histories are not merged by guess.
    pub async fn adopt_standalone(self: Arc<Self>, found: Standalone) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        while !node.until_ready(std::time::Duration::from_secs(3600)).await {}
        if !node.started_new_cluster() {
            tracing::warn!(
                "this node ran alone before and joined an existing cluster: its definitions are not adopted (export them from a backup of its data folder and import them)"
            );
            return;
        }
        let me = node.name().to_owned();
        let mut commands = Vec::new();
        if let Some(mut directory) = found.access {
            // The config file's users are every node's own.
            let config: Vec<String> = directory
                .users
                .iter()
                .filter(|(_, u)| u.from_config)
                .map(|(n, _)| n.clone())
                .collect();
            for name in &config {
                directory.users.remove(name);
                for users in directory.permissions.values_mut() {
                    users.remove(name);
                }
            }
            commands.push(Command::Access {
                change: crate::access::AccessChange::Import { directory },
            });
        }
        for mut command in definition_commands(&found.definitions, &me) {
            if let Command::DeclareQueue { queue, members, .. } = &mut command
                && crate::broker::QueueLimits::parse(&queue.arguments).is_ok_and(|l| l.quorum)
            {
                *members = vec![me.clone()];
            }
            commands.push(command);
        }
        let mut adopted = 0usize;
        for command in commands {
            let what = format!("{command:?}");
            let mut wait = std::time::Duration::from_millis(100);
            loop {
                match node.propose(command.clone()).await {
                    Ok(Applied::Refused { text, .. }) => {
                        tracing::error!(
                            "adopting what this node had alone: refused {}: {text}",
                            crate::untrusted::text(&what)
                        );
                        break;
                    }
                    Ok(_) => {
                        adopted += 1;
                        break;
                    }
                    Err(e) => {
                        tracing::debug!("adopting what this node had alone, trying again: {e}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        }
        tracing::info!(
            changes = adopted,
            "what this node had alone is now the cluster's"
        );
    }
}
