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
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::command::{Applied, Command};
use super::log::read_optional;
use super::{Member, NodeId, TypeConfig};
use crate::store::definitions::{BindingDefinition, ExchangeDefinition, QueueDefinition};

/// The live side of the state machine: the broker.
pub trait Applier: Send + Sync + 'static {
    /// Apply one committed command.
    fn apply(&self, command: &Command) -> Applied;
    /// Make the definitions exactly `catalog` (a snapshot was installed).
    fn reset(&self, catalog: &Catalog);
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
    /// The node it lives on.
    pub node: String,
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
            } => {
                self.queues
                    .entry(key(vhost, &queue.name))
                    .or_insert_with(|| QueueRecord {
                        vhost: vhost.clone(),
                        queue: queue.clone(),
                        durable: *durable,
                        node: node.clone(),
                    });
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
        }
    }

    /// The node a queue lives on, if it is replicated.
    pub fn queue_node(&self, vhost: &str, name: &str) -> Option<&str> {
        self.queues.get(&key(vhost, name)).map(|q| q.node.as_str())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
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
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
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
        let snapshot: Option<StoredSnapshot> = match read_optional(&dir.join("snapshot.json"))? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(sm_err)?),
            None => None,
        };
        let mut inner = Inner {
            last_applied: None,
            membership: StoredMembership::default(),
            catalog: Catalog::default(),
            snapshot: None,
            built: 0,
        };
        if let Some(s) = snapshot {
            inner.catalog = serde_json::from_slice(&s.data).map_err(sm_err)?;
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
        })
    }

    /// A copy of the definitions as applied so far.
    pub fn catalog(&self) -> Catalog {
        self.inner.lock().catalog.clone()
    }

    /// The last entry applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.inner.lock().last_applied
    }

    fn save(&self, s: &StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let path = self.dir.join("snapshot.json");
        let tmp = self.dir.join("snapshot.json.tmp");
        let bytes = serde_json::to_vec(s).map_err(sm_err)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            StorageIOError::write_snapshot(Some(s.meta.signature()), AnyError::new(&e)).into()
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let stored = {
            let mut inner = self.inner.lock();
            inner.built += 1;
            let data = serde_json::to_vec(&inner.catalog).map_err(sm_err)?;
            let last = inner.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.built),
                None => format!("--{}", inner.built),
            };
            StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: inner.membership.clone(),
                    snapshot_id,
                },
                data,
            }
        };
        self.save(&stored)?;
        let snapshot = Snapshot {
            meta: stored.meta.clone(),
            snapshot: Box::new(Cursor::new(stored.data.clone())),
        };
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
                EntryPayload::Normal(command) => {
                    let applied = match &self.applier {
                        Some(a) => a.apply(&command),
                        None => Applied::Done,
                    };
                    if !matches!(applied, Applied::Refused { .. }) {
                        inner.catalog.apply(&command);
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
        let data = snapshot.into_inner();
        let catalog: Catalog = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.save(&stored)?;
        if let Some(a) = &self.applier {
            a.reset(&catalog);
        }
        let mut inner = self.inner.lock();
        inner.catalog = catalog;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock();
        Ok(inner.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
