//! The replicated state machine: the cluster's definitions, changed only
//! by committed log entries, in log order, on every node.
//!
//! Two things are kept in step. The [`Catalog`] is the definitions as
//! data (what a snapshot holds and a new node starts from); the
//! [`Applier`] is the live broker, which applies each entry to its vhosts
//! and says whether it was refused. An entry the broker refuses changes
//! neither. Because every node holds the same definitions at the same log
//! index, every node refuses the same entries, so one answer (the
//! proposer's) stands for all.
//!
//! The machine itself is not written to disk entry by entry: the Raft log
//! is. A snapshot (the catalog as JSON) is written to a file when Raft
//! builds or installs one; after a restart the machine starts from it and
//! Raft applies the committed entries after it again.

// openraft's storage traits return its (large) `StorageError` by value;
// the helpers here return the same so that `?` carries it unchanged.
#![allow(clippy::result_large_err)]
use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::command::{Applied, Command};
use super::snapshot::{Encoding, StoredSnapshot, sm_err};
use super::{Member, NodeId, TypeConfig};
use crate::store::definitions::{BindingDefinition, ExchangeDefinition, QueueDefinition};

/// The live side of the state machine: the broker.
pub trait Applier: Send + Sync + 'static {
    /// Apply one committed command.
    fn apply(&self, command: &Command) -> Applied;
    /// Make the definitions exactly `catalog` (a snapshot was installed).
    fn reset(&self, catalog: &Catalog);
    /// A plugin version to validate (and report on) or to serve.
    fn plugin(&self, _event: &PluginEvent) {}
    /// The users, vhosts and permissions are now `directory`; `effects`
    /// is what the change that made them asks of the broker.
    fn access(&self, _directory: &crate::access::Directory, _effects: Vec<crate::access::Effect>) {}
}

/// What a plugin entry asks of this node.
#[derive(Clone, Debug, PartialEq)]
pub enum PluginEvent {
    /// Nothing (a verdict recorded, a version seen before).
    Nothing,
    /// Compile and validate this new version, and report the verdict.
    Validate {
        /// Plugin name.
        name: String,
        /// Version.
        hash: String,
        /// The module.
        bytes: Vec<u8>,
    },
    /// Serve this version now (every node does, at this log index).
    Activate {
        /// Plugin name.
        name: String,
        /// Version.
        hash: String,
        /// The module.
        bytes: Vec<u8>,
    },
    /// Stage this candidate beside the serving version (every node does,
    /// at this log index).
    Stage(CandidateRecord),
    /// End the candidate `hash` here; `promoted` carries its module when
    /// it now serves (every node swaps it in at this log index).
    End {
        /// Plugin name.
        name: String,
        /// The candidate.
        hash: String,
        /// Promoted, rolled back or aborted.
        event: crate::author::candidate::Event,
        /// Why.
        reason: Option<String>,
        /// The module, when promoted.
        promoted: Option<Vec<u8>>,
    },
}

/// A candidate version staged on every node (`author/candidate/`): tried
/// beside the serving version until one node's judge or an operator ends
/// it through the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// Plugin name.
    pub name: String,
    /// Content hash.
    pub hash: String,
    /// The module.
    #[serde(with = "super::command::base64_bytes")]
    pub bytes: Vec<u8>,
    /// Shadow or canary.
    pub mode: crate::author::candidate::Mode,
    /// Its bounds.
    pub policy: crate::author::candidate::Policy,
    /// The node that asked for it.
    pub from: String,
    /// The version serving when it was staged.
    pub serving: String,
}

/// Versions kept per plugin (the active one is never dropped).
pub const KEPT_VERSIONS: usize = 5;

/// One version of a plugin, as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginVersionRecord {
    /// Content hash.
    pub hash: String,
    /// The module.
    #[serde(with = "super::command::base64_bytes")]
    pub bytes: Vec<u8>,
    /// The node whose folder it came from.
    pub from: String,
    /// Nodes that compiled and validated it.
    pub ready: std::collections::BTreeSet<String>,
    /// Nodes that refused it, and why.
    pub refused: BTreeMap<String, String>,
}

/// A plugin's versions in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginRecord {
    /// The version every node serves.
    pub active: Option<String>,
    /// Kept versions, oldest first.
    pub versions: Vec<PluginVersionRecord>,
    /// A candidate on trial beside the active version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<CandidateRecord>,
}

impl PluginRecord {
    /// Drop the oldest versions past [`KEPT_VERSIONS`], never the active.
    fn keep_bounded(&mut self) {
        while self.versions.len() > KEPT_VERSIONS {
            let active = self.active.as_deref();
            let Some(at) = self
                .versions
                .iter()
                .position(|v| active != Some(v.hash.as_str()))
            else {
                break;
            };
            self.versions.remove(at);
        }
    }
}

/// A replicated exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRecord {
    /// Its vhost.
    pub vhost: String,
    /// The exchange.
    pub exchange: ExchangeDefinition,
    /// Durable.
    pub durable: bool,
}

/// A replicated queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    /// Its vhost.
    pub vhost: String,
    /// The queue.
    pub queue: QueueDefinition,
    /// Durable.
    pub durable: bool,
    /// The node it lives on (a quorum queue's: its leader).
    pub node: String,
    /// A quorum queue's members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// A quorum queue's leader has announced itself at least once: the
    /// queue takes messages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub served: bool,
    /// The Raft term of the quorum queue's group its leader announced
    /// itself in.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leader_term: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A replicated binding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingRecord {
    /// Its vhost.
    pub vhost: String,
    /// The binding.
    pub binding: BindingDefinition,
}

/// The cluster's definitions as data, keyed by identity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// By `vhost \0 name`.
    pub exchanges: BTreeMap<String, ExchangeRecord>,
    /// By `vhost \0 name`.
    pub queues: BTreeMap<String, QueueRecord>,
    /// By vhost, source, destination, key and arguments.
    pub bindings: BTreeMap<String, BindingRecord>,
    /// By plugin name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginRecord>,
    /// Users, vhosts and permissions.
    #[serde(default)]
    pub access: crate::access::Directory,
}

fn key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

fn binding_key(vhost: &str, b: &BindingDefinition) -> String {
    let args: String = crate::message::encode_table_body(&b.arguments)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{vhost}\0{}\0{}\0{}\0{}\0{args}",
        b.source, b.destination_type, b.destination, b.routing_key
    )
}

impl Catalog {
    /// A super stream's partitions not declared yet: each a replicated
    /// stream on every voter, their first leaders spread over the voters
    /// from one picked by the exchange's name, and bound to the exchange.
    fn partitions(
        &self,
        vhost: &str,
        exchange: &crate::store::definitions::ExchangeDefinition,
        durable: bool,
        voters: &[String],
    ) -> Vec<Command> {
        let spec = crate::broker::ExchangeSpec {
            name: exchange.name.clone(),
            kind: exchange.kind.clone(),
            durable,
            auto_delete: exchange.auto_delete,
            internal: exchange.internal,
            arguments: exchange.arguments.clone(),
        };
        let Ok(Some(n)) = crate::broker::stream::partitions_of(&spec) else {
            return Vec::new();
        };
        if voters.is_empty() {
            return Vec::new();
        }
        let mut nodes = voters.to_vec();
        nodes.sort();
        let start = exchange
            .name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        let mut out = Vec::new();
        for i in 0..n {
            let (name, arguments, order) =
                crate::broker::stream::partition(&exchange.name, &exchange.arguments, i);
            if self.queues.contains_key(&key(vhost, &name)) {
                continue;
            }
            out.push(Command::DeclareQueue {
                vhost: vhost.to_owned(),
                queue: QueueDefinition {
                    name: name.clone(),
                    auto_delete: false,
                    arguments,
                },
                durable: true,
                node: nodes[(start + i as usize) % nodes.len()].clone(),
                members: nodes.clone(),
            });
            out.push(Command::Bind {
                vhost: vhost.to_owned(),
                binding: crate::store::definitions::BindingDefinition {
                    source: exchange.name.clone(),
                    destination: name,
                    destination_type: "queue".into(),
                    routing_key: i.to_string(),
                    arguments: order,
                },
            });
        }
        out
    }
}

/// The voting members' names in `membership`.
fn voter_names(membership: &StoredMembership<NodeId, Member>) -> Vec<String> {
    let m = membership.membership();
    let ids: Vec<NodeId> = m.voter_ids().collect();
    m.nodes()
        .filter(|(id, _)| ids.contains(id))
        .map(|(_, member)| member.name.clone())
        .collect()
}

impl Catalog {
    /// What an applied command brings with it, decided from the log alone
    /// (so every node decides the same): a delayed exchange's scheduled
    /// messages wait in a quorum queue of its own, declared with the
    /// exchange on members picked from `voters`, and deleted with it.
    pub fn follow_ups(&self, command: &Command, voters: &[String]) -> Vec<Command> {
        use crate::broker::{ARG_SCHEDULES, DELAYED_EXCHANGE, schedule_queue};
        use amq_protocol::types::{AMQPValue, FieldTable};
        match command {
            Command::DeclareExchange {
                vhost, exchange, ..
            } if exchange.kind == DELAYED_EXCHANGE => {
                let name = schedule_queue(&exchange.name);
                if self.queues.contains_key(&key(vhost, &name)) || voters.is_empty() {
                    return Vec::new();
                }
                let mut nodes = voters.to_vec();
                nodes.sort();
                // Spread over the nodes by the exchange's name.
                let start = name
                    .bytes()
                    .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
                    % nodes.len();
                let size = crate::broker::DEFAULT_GROUP_SIZE.min(nodes.len());
                let mut members: Vec<String> = (0..size)
                    .map(|i| nodes[(start + i) % nodes.len()].clone())
                    .collect();
                let node = members[0].clone();
                members.sort();
                let mut arguments = FieldTable::default();
                arguments.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                arguments.insert(
                    ARG_SCHEDULES.into(),
                    AMQPValue::LongString(exchange.name.as_str().into()),
                );
                vec![Command::DeclareQueue {
                    vhost: vhost.clone(),
                    queue: QueueDefinition {
                        name,
                        auto_delete: false,
                        arguments,
                    },
                    durable: true,
                    node,
                    members,
                }]
            }
            Command::DeclareExchange {
                vhost,
                exchange,
                durable,
            } if exchange.kind == crate::broker::stream::SUPER_STREAM => {
                self.partitions(vhost, exchange, *durable, voters)
            }
            Command::DeleteExchange { vhost, name, .. } => {
                let queue = schedule_queue(name);
                match self.queues.get(&key(vhost, &queue)) {
                    Some(q)
                        if crate::broker::schedules(&q.queue.arguments) == Some(name.as_str()) =>
                    {
                        vec![Command::DeleteQueue {
                            vhost: vhost.clone(),
                            name: queue,
                            if_unused: false,
                            if_empty: false,
                        }]
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }

    /// Record a command the broker accepted.
    pub fn apply(&mut self, command: &Command) {
        match command {
            Command::DeclareExchange {
                vhost,
                exchange,
                durable,
            } => {
                self.exchanges
                    .entry(key(vhost, &exchange.name))
                    .or_insert_with(|| ExchangeRecord {
                        vhost: vhost.clone(),
                        exchange: exchange.clone(),
                        durable: *durable,
                    });
            }
            Command::DeleteExchange { vhost, name, .. } => {
                self.exchanges.remove(&key(vhost, name));
                self.bindings.retain(|_, b| {
                    b.vhost != *vhost
                        || (b.binding.source != *name
                            && !(b.binding.destination_type == "exchange"
                                && b.binding.destination == *name))
                });
            }
            Command::DeclareQueue {
                vhost,
                queue,
                durable,
                node,
                members,
            } => {
                self.queues
                    .entry(key(vhost, &queue.name))
                    .or_insert_with(|| QueueRecord {
                        vhost: vhost.clone(),
                        queue: queue.clone(),
                        durable: *durable,
                        node: node.clone(),
                        members: members.clone(),
                        served: false,
                        leader_term: 0,
                    });
            }
            Command::QueueMembers {
                vhost,
                name,
                members,
            } => {
                if let Some(q) = self.queues.get_mut(&key(vhost, name))
                    && !q.members.is_empty()
                {
                    q.members = members.clone();
                }
            }
            Command::QueueLeader {
                vhost,
                name,
                node,
                term,
            } => {
                if let Some(q) = self.queues.get_mut(&key(vhost, name))
                    && !q.members.is_empty()
                    && *term >= q.leader_term
                {
                    q.node = node.clone();
                    q.served = true;
                    q.leader_term = *term;
                }
            }
            Command::DeleteQueue { vhost, name, .. } => {
                self.queues.remove(&key(vhost, name));
                self.bindings.retain(|_, b| {
                    b.vhost != *vhost
                        || !(b.binding.destination_type == "queue"
                            && b.binding.destination == *name)
                });
            }
            Command::Bind { vhost, binding } => {
                self.bindings
                    .entry(binding_key(vhost, binding))
                    .or_insert_with(|| BindingRecord {
                        vhost: vhost.clone(),
                        binding: binding.clone(),
                    });
            }
            Command::Unbind { vhost, binding } => {
                self.bindings.remove(&binding_key(vhost, binding));
            }
            // Recorded by `apply_plugin` and `apply_access`.
            Command::StagePlugin { .. }
            | Command::PluginVerdict { .. }
            | Command::ActivatePlugin { .. }
            | Command::StageCandidate { .. }
            | Command::EndCandidate { .. }
            | Command::Access { .. } => {}
        }
    }

    /// Record a plugin entry, and say what it asks of every node. `voters`
    /// are the voting members' names at this log index: a new version is
    /// activated when all of them are ready, and never once one refused.
    pub fn apply_plugin(&mut self, command: &Command, voters: &[String]) -> (Applied, PluginEvent) {
        let activate = |name: &str, v: &PluginVersionRecord| PluginEvent::Activate {
            name: name.to_owned(),
            hash: v.hash.clone(),
            bytes: v.bytes.clone(),
        };
        let everyone_ready = |v: &PluginVersionRecord| voters.iter().all(|n| v.ready.contains(n));
        match command {
            Command::StagePlugin {
                name,
                hash,
                bytes,
                from,
            } => {
                let record = self.plugins.entry(name.clone()).or_default();
                if let Some(v) = record.versions.iter().find(|v| v.hash == *hash) {
                    // A kept version dropped in again: serve it again if
                    // every node took it before.
                    let again = record.active.as_deref() != Some(hash.as_str())
                        && v.refused.is_empty()
                        && everyone_ready(v);
                    if again {
                        let event = activate(name, v);
                        record.active = Some(hash.clone());
                        record.candidate = None;
                        return (Applied::Done, event);
                    }
                    return (Applied::Done, PluginEvent::Nothing);
                }
                record.versions.push(PluginVersionRecord {
                    hash: hash.clone(),
                    bytes: bytes.clone(),
                    from: from.clone(),
                    ready: Default::default(),
                    refused: Default::default(),
                });
                record.keep_bounded();
                (
                    Applied::Done,
                    PluginEvent::Validate {
                        name: name.clone(),
                        hash: hash.clone(),
                        bytes: bytes.clone(),
                    },
                )
            }
            Command::PluginVerdict {
                name,
                hash,
                node,
                refused,
            } => {
                let Some(record) = self.plugins.get_mut(name) else {
                    return (Applied::Done, PluginEvent::Nothing);
                };
                let newest = record.versions.last().map(|v| v.hash.clone());
                let active = record.active.clone();
                let Some(v) = record.versions.iter_mut().find(|v| v.hash == *hash) else {
                    return (Applied::Done, PluginEvent::Nothing);
                };
                match refused {
                    Some(reason) => {
                        v.refused.insert(node.clone(), reason.clone());
                    }
                    None => {
                        v.ready.insert(node.clone());
                    }
                }
                // Only the newest version activates by itself: a late
                // verdict on an older one must not undo a newer rollout.
                let go = v.refused.is_empty()
                    && everyone_ready(v)
                    && newest.as_deref() == Some(hash.as_str())
                    && active.as_deref() != Some(hash.as_str());
                if go {
                    let event = activate(name, v);
                    record.active = Some(hash.clone());
                    record.candidate = None;
                    return (Applied::Done, event);
                }
                (Applied::Done, PluginEvent::Nothing)
            }
            Command::ActivatePlugin { name, hash } => {
                let found = self.plugins.get_mut(name).and_then(|r| {
                    let at = r.versions.iter().position(|v| v.hash == *hash)?;
                    Some((r, at))
                });
                let Some((record, at)) = found else {
                    return (
                        Applied::Refused {
                            code: 404,
                            text: format!("NOT_FOUND - no kept version {hash} of plugin '{name}'"),
                        },
                        PluginEvent::Nothing,
                    );
                };
                let v = &record.versions[at];
                if let Some((node, why)) = v.refused.iter().next() {
                    return (
                        Applied::Refused {
                            code: 406,
                            text: format!(
                                "PRECONDITION_FAILED - node '{node}' refused version {hash} of plugin '{name}': {why}"
                            ),
                        },
                        PluginEvent::Nothing,
                    );
                }
                let event = activate(name, v);
                record.active = Some(hash.clone());
                record.candidate = None;
                (Applied::Done, event)
            }
            Command::StageCandidate {
                name,
                hash,
                bytes,
                mode,
                policy,
                from,
            } => {
                let serving = self.plugins.get(name).and_then(|r| r.active.clone());
                let Some(serving) = serving else {
                    return (
                        Applied::Refused {
                            code: 404,
                            text: format!(
                                "NOT_FOUND - the cluster serves no version of plugin '{name}' to try a candidate beside"
                            ),
                        },
                        PluginEvent::Nothing,
                    );
                };
                if serving == *hash {
                    return (
                        Applied::Refused {
                            code: 406,
                            text: format!(
                                "PRECONDITION_FAILED - that file is the version of '{name}' already serving"
                            ),
                        },
                        PluginEvent::Nothing,
                    );
                }
                let candidate = CandidateRecord {
                    name: name.clone(),
                    hash: hash.clone(),
                    bytes: bytes.clone(),
                    mode: mode.clone(),
                    policy: policy.clone(),
                    from: from.clone(),
                    serving,
                };
                if let Some(record) = self.plugins.get_mut(name) {
                    record.candidate = Some(candidate.clone());
                }
                (Applied::Done, PluginEvent::Stage(candidate))
            }
            Command::EndCandidate {
                name,
                hash,
                event,
                reason,
                node: _,
            } => {
                let record = self.plugins.get_mut(name);
                let Some(record) =
                    record.filter(|r| r.candidate.as_ref().is_some_and(|c| c.hash == *hash))
                else {
                    return (
                        Applied::Refused {
                            code: 404,
                            text: format!(
                                "NOT_FOUND - no candidate {hash} of plugin '{name}' is staged"
                            ),
                        },
                        PluginEvent::Nothing,
                    );
                };
                let candidate = record.candidate.take().expect("matched above");
                let promoted = (*event == crate::author::candidate::Event::Promoted).then(|| {
                    // Every node ran it beside the serving version: it is
                    // a kept version every voter took.
                    if !record.versions.iter().any(|v| v.hash == *hash) {
                        record.versions.push(PluginVersionRecord {
                            hash: hash.clone(),
                            bytes: candidate.bytes.clone(),
                            from: candidate.from.clone(),
                            ready: voters.iter().cloned().collect(),
                            refused: Default::default(),
                        });
                    }
                    record.active = Some(hash.clone());
                    record.keep_bounded();
                    candidate.bytes
                });
                (
                    Applied::Done,
                    PluginEvent::End {
                        name: name.clone(),
                        hash: hash.clone(),
                        event: event.clone(),
                        reason: reason.clone(),
                        promoted,
                    },
                )
            }
            _ => (Applied::Done, PluginEvent::Nothing),
        }
    }
}

struct Inner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    catalog: Catalog,
    snapshot: Option<StoredSnapshot>,
    built: u64,
}

/// This node's copy of the state machine. Clones share it (one is the
/// snapshot builder).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
    dir: PathBuf,
    applier: Option<Arc<dyn Applier>>,
    /// Woken after every batch of entries is applied, for those waiting
    /// on what the catalog says.
    applied: Arc<tokio::sync::Notify>,
}

impl StateMachine {
    /// The machine whose snapshot lives in `dir`, applying to `applier`
    /// (none: the catalog alone, for the storage tests). A snapshot found
    /// there is loaded and handed to the applier.
    pub fn open(
        dir: &Path,
        applier: Option<Arc<dyn Applier>>,
    ) -> Result<StateMachine, StorageError<NodeId>> {
        std::fs::create_dir_all(dir).map_err(sm_err)?;
        let snapshot = StoredSnapshot::load(dir)?;
        let mut inner = Inner {
            last_applied: None,
            membership: StoredMembership::default(),
            catalog: Catalog::default(),
            snapshot: None,
            built: 0,
        };
        if let Some(s) = snapshot {
            inner.catalog = s.state()?;
            inner.last_applied = s.meta.last_log_id;
            inner.membership = s.meta.last_membership.clone();
            if let Some(a) = &applier {
                a.reset(&inner.catalog);
            }
            inner.snapshot = Some(s);
        }
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(inner)),
            dir: dir.to_owned(),
            applier,
            applied: Arc::default(),
        })
    }

    /// Woken (`notify_waiters`) after each batch of entries is applied.
    pub fn applied(&self) -> &tokio::sync::Notify {
        &self.applied
    }

    /// A replicated queue's record, as applied so far.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<QueueRecord> {
        self.inner
            .lock()
            .catalog
            .queues
            .get(&key(vhost, name))
            .cloned()
    }

    /// A copy of the definitions as applied so far.
    pub fn catalog(&self) -> Catalog {
        self.inner.lock().catalog.clone()
    }

    /// How many quorum queues each node leads and holds a replica of
    /// (without copying the catalog: a declare asks this, and a catalog
    /// of ten thousand queues is not copied per declare).
    pub fn quorum_load(&self) -> (HashMap<String, usize>, HashMap<String, usize>) {
        let inner = self.inner.lock();
        let mut leads: HashMap<String, usize> = HashMap::new();
        let mut holds: HashMap<String, usize> = HashMap::new();
        for q in inner
            .catalog
            .queues
            .values()
            .filter(|q| !q.members.is_empty())
        {
            *leads.entry(q.node.clone()).or_default() += 1;
            for m in &q.members {
                *holds.entry(m.clone()).or_default() += 1;
            }
        }
        (leads, holds)
    }

    /// The last entry applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.inner.lock().last_applied
    }
}

impl StateMachine {
    /// Apply a committed access change to the catalog's directory. A vhost
    /// deleted takes its exchanges and queues with it: they are deleted
    /// first, as committed deletes of their own would be.
    fn apply_access(&self, catalog: &mut Catalog, change: &crate::access::AccessChange) -> Applied {
        let mut directory = catalog.access.clone();
        let effects = match directory.apply(change) {
            Ok(effects) => effects,
            Err(e) => return crate::broker::access_refused(&e),
        };
        for effect in &effects {
            if let crate::access::Effect::DeleteVHost(vhost) = effect {
                for command in catalog.vhost_deletions(vhost) {
                    if let Some(a) = &self.applier {
                        a.apply(&command);
                    }
                    catalog.apply(&command);
                }
            }
        }
        catalog.access = directory;
        if let Some(a) = &self.applier {
            a.access(&catalog.access, effects);
        }
        Applied::Done
    }
}

impl Catalog {
    /// Deletes of every queue and exchange of `vhost`.
    fn vhost_deletions(&self, vhost: &str) -> Vec<Command> {
        let queues =
            self.queues
                .values()
                .filter(|q| q.vhost == vhost)
                .map(|q| Command::DeleteQueue {
                    vhost: vhost.to_owned(),
                    name: q.queue.name.clone(),
                    if_unused: false,
                    if_empty: false,
                });
        let exchanges = self
            .exchanges
            .values()
            .filter(|x| x.vhost == vhost)
            .map(|x| Command::DeleteExchange {
                vhost: vhost.to_owned(),
                name: x.exchange.name.clone(),
                if_unused: false,
            });
        queues.chain(exchanges).collect()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let stored = {
            let mut inner = self.inner.lock();
            inner.built += 1;
            StoredSnapshot::build(
                &inner.catalog,
                inner.last_applied,
                inner.membership.clone(),
                inner.built,
                Encoding::Json,
            )?
        };
        stored.save(&self.dir)?;
        let snapshot = stored.snapshot();
        self.inner.lock().snapshot = Some(stored);
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError<NodeId>>
    {
        let inner = self.inner.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut inner = self.inner.lock();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            let applied = match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Normal(command) if command.is_plugin() => {
                    let voters: Vec<String> = {
                        let m = inner.membership.membership();
                        let ids: Vec<NodeId> = m.voter_ids().collect();
                        m.nodes()
                            .filter(|(id, _)| ids.contains(id))
                            .map(|(_, member)| member.name.clone())
                            .collect()
                    };
                    let (applied, event) = inner.catalog.apply_plugin(&command, &voters);
                    if let Some(a) = &self.applier
                        && event != PluginEvent::Nothing
                    {
                        a.plugin(&event);
                    }
                    applied
                }
                EntryPayload::Normal(Command::Access { change }) => {
                    self.apply_access(&mut inner.catalog, &change)
                }
                EntryPayload::Normal(command) => {
                    let applied = match &self.applier {
                        Some(a) => a.apply(&command),
                        None => Applied::Done,
                    };
                    if !matches!(applied, Applied::Refused { .. }) {
                        inner.catalog.apply(&command);
                        let voters = voter_names(&inner.membership);
                        for then in inner.catalog.follow_ups(&command, &voters) {
                            if let Some(a) = &self.applier
                                && let Applied::Refused { text, .. } = a.apply(&then)
                            {
                                tracing::error!(
                                    "applying what a definition brings with it: {text}"
                                );
                                continue;
                            }
                            inner.catalog.apply(&then);
                        }
                    }
                    applied
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    Applied::Done
                }
            };
            out.push(applied);
        }
        drop(inner);
        self.applied.notify_waiters();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        let catalog: Catalog = stored.state()?;
        stored.save(&self.dir)?;
        if let Some(a) = &self.applier {
            a.reset(&catalog);
        }
        let mut inner = self.inner.lock();
        inner.catalog = catalog;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(stored);
        drop(inner);
        self.applied.notify_waiters();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.inner.lock().snapshot.as_ref().map(|s| s.snapshot()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(hash: &str, from: &str) -> Command {
        Command::StagePlugin {
            name: "p".into(),
            hash: hash.into(),
            bytes: hash.as_bytes().to_vec(),
            from: from.into(),
        }
    }

    fn verdict(hash: &str, node: &str, refused: Option<&str>) -> Command {
        Command::PluginVerdict {
            name: "p".into(),
            hash: hash.into(),
            node: node.into(),
            refused: refused.map(str::to_owned),
        }
    }

    fn activated(event: &PluginEvent) -> Option<&str> {
        match event {
            PluginEvent::Activate { hash, .. } => Some(hash),
            _ => None,
        }
    }

    #[test]
    fn a_version_activates_when_the_last_voter_is_ready_and_never_after_a_refusal() {
        let voters: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut c = Catalog::default();
        // Staged once, whoever proposes it again (every pod of a
        // StatefulSet mounts the same file).
        assert!(matches!(
            c.apply_plugin(&stage("v1", "a"), &voters).1,
            PluginEvent::Validate { .. }
        ));
        assert_eq!(
            c.apply_plugin(&stage("v1", "b"), &voters).1,
            PluginEvent::Nothing
        );
        assert_eq!(
            activated(&c.apply_plugin(&verdict("v1", "a", None), &voters).1),
            None
        );
        assert_eq!(
            activated(&c.apply_plugin(&verdict("v1", "b", None), &voters).1),
            None
        );
        assert_eq!(
            activated(&c.apply_plugin(&verdict("v1", "c", None), &voters).1),
            Some("v1")
        );
        assert_eq!(c.plugins["p"].active.as_deref(), Some("v1"));

        // v2 is refused by b: it never activates, even once all others are
        // ready, and an operator cannot activate it either.
        c.apply_plugin(&stage("v2", "c"), &voters);
        c.apply_plugin(&verdict("v2", "b", Some("no")), &voters);
        c.apply_plugin(&verdict("v2", "a", None), &voters);
        assert_eq!(
            activated(&c.apply_plugin(&verdict("v2", "c", None), &voters).1),
            None
        );
        let (applied, _) = c.apply_plugin(
            &Command::ActivatePlugin {
                name: "p".into(),
                hash: "v2".into(),
            },
            &voters,
        );
        assert!(
            matches!(applied, Applied::Refused { code: 406, .. }),
            "{applied:?}"
        );
        assert_eq!(c.plugins["p"].active.as_deref(), Some("v1"));

        // v3 rolls out; a late verdict on v1 does not bring it back, but
        // an operator can (rollback).
        c.apply_plugin(&stage("v3", "a"), &voters);
        for n in ["a", "b", "c"] {
            c.apply_plugin(&verdict("v3", n, None), &voters);
        }
        assert_eq!(c.plugins["p"].active.as_deref(), Some("v3"));
        assert_eq!(
            activated(&c.apply_plugin(&verdict("v1", "a", None), &voters).1),
            None
        );
        let (_, event) = c.apply_plugin(
            &Command::ActivatePlugin {
                name: "p".into(),
                hash: "v1".into(),
            },
            &voters,
        );
        assert_eq!(activated(&event), Some("v1"));
    }

    #[test]
    fn a_quorum_queue_leader_announced_late_does_not_undo_a_later_one() {
        let mut c = Catalog::default();
        c.apply(&Command::DeclareQueue {
            vhost: "/".into(),
            queue: QueueDefinition {
                name: "q".into(),
                ..Default::default()
            },
            durable: true,
            node: "a".into(),
            members: ["a", "b", "c"].map(String::from).to_vec(),
        });
        let leader = |node: &str, term: u64| Command::QueueLeader {
            vhost: "/".into(),
            name: "q".into(),
            node: node.into(),
            term,
        };
        c.apply(&leader("a", 3));
        c.apply(&leader("b", 7));
        // a's announcement of term 5, retried while it still led and
        // committed only now.
        c.apply(&leader("a", 5));
        let q = &c.queues[&key("/", "q")];
        assert_eq!((q.node.as_str(), q.leader_term, q.served), ("b", 7, true));
        // An entry written before announcements carried their term reads
        // as term 0.
        let old: Command =
            serde_json::from_str(r#"{"op":"queue_leader","vhost":"/","name":"q","node":"c"}"#)
                .unwrap();
        assert!(
            matches!(old, Command::QueueLeader { term: 0, .. }),
            "{old:?}"
        );
    }

    fn stage_candidate(hash: &str) -> Command {
        Command::StageCandidate {
            name: "p".into(),
            hash: hash.into(),
            bytes: hash.as_bytes().to_vec(),
            mode: crate::author::candidate::Mode::Canary {
                percent: 10.0,
                by_header: None,
            },
            policy: Default::default(),
            from: "b".into(),
        }
    }

    fn end_candidate(hash: &str, event: crate::author::candidate::Event) -> Command {
        Command::EndCandidate {
            name: "p".into(),
            hash: hash.into(),
            event,
            reason: None,
            node: "c".into(),
        }
    }

    #[test]
    fn a_candidate_is_staged_beside_the_active_version_and_ended_once() {
        use crate::author::candidate::Event;
        let voters: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut c = Catalog::default();
        // Nothing serves yet: nothing to try a candidate beside.
        let (applied, _) = c.apply_plugin(&stage_candidate("v2"), &voters);
        assert!(matches!(applied, Applied::Refused { code: 404, .. }));
        c.apply_plugin(&stage("v1", "a"), &voters);
        for n in ["a", "b", "c"] {
            c.apply_plugin(&verdict("v1", n, None), &voters);
        }
        // The serving version is no candidate of itself.
        let (applied, _) = c.apply_plugin(&stage_candidate("v1"), &voters);
        assert!(matches!(applied, Applied::Refused { code: 406, .. }));

        // Staged on every node; aborted by one; a second end finds none.
        let (_, event) = c.apply_plugin(&stage_candidate("v2"), &voters);
        assert!(matches!(&event, PluginEvent::Stage(r) if r.hash == "v2" && r.serving == "v1"));
        let (_, event) = c.apply_plugin(&end_candidate("v2", Event::Aborted), &voters);
        assert!(matches!(&event, PluginEvent::End { promoted: None, .. }));
        let (applied, _) = c.apply_plugin(&end_candidate("v2", Event::Promoted), &voters);
        assert!(matches!(applied, Applied::Refused { code: 404, .. }));
        assert_eq!(c.plugins["p"].active.as_deref(), Some("v1"));

        // A newer candidate replaces an older one: a late end of the
        // older one does nothing.
        c.apply_plugin(&stage_candidate("v2"), &voters);
        c.apply_plugin(&stage_candidate("v3"), &voters);
        let (applied, _) = c.apply_plugin(&end_candidate("v2", Event::RolledBack), &voters);
        assert!(matches!(applied, Applied::Refused { .. }));

        // Promoted: a kept version every voter took, serving from here.
        let (_, event) = c.apply_plugin(&end_candidate("v3", Event::Promoted), &voters);
        assert!(
            matches!(&event, PluginEvent::End { promoted: Some(b), .. } if b == b"v3"),
            "{event:?}"
        );
        let record = &c.plugins["p"];
        assert_eq!(record.active.as_deref(), Some("v3"));
        assert!(record.candidate.is_none());
        let v3 = record.versions.iter().find(|v| v.hash == "v3").unwrap();
        assert_eq!(v3.ready.len(), 3);

        // An activation by hand drops a staged candidate.
        c.apply_plugin(&stage_candidate("v4"), &voters);
        c.apply_plugin(
            &Command::ActivatePlugin {
                name: "p".into(),
                hash: "v1".into(),
            },
            &voters,
        );
        assert!(c.plugins["p"].candidate.is_none());
        // And the catalog, candidate and all, is what a snapshot carries.
        c.apply_plugin(&stage_candidate("v5"), &voters);
        let json = serde_json::to_string(&c).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn old_versions_are_dropped_but_never_the_active_one() {
        let voters = vec!["a".to_owned()];
        let mut c = Catalog::default();
        c.apply_plugin(&stage("v0", "a"), &voters);
        c.apply_plugin(&verdict("v0", "a", None), &voters);
        for i in 1..=KEPT_VERSIONS + 2 {
            c.apply_plugin(&stage(&format!("v{i}"), "a"), &voters);
        }
        let kept: Vec<&str> = c.plugins["p"]
            .versions
            .iter()
            .map(|v| v.hash.as_str())
            .collect();
        assert_eq!(kept.len(), KEPT_VERSIONS);
        assert_eq!(kept[0], "v0", "the active version stays");
        assert_eq!(kept.last(), Some(&"v7"));
    }
}
