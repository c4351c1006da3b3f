//! Exclusive queues across the cluster (see [`crate::cluster::private`]):
//! this node's, gathered for its peers, and each peer's, served here as
//! queues of that node while the link to it is open.
//!
//! A peer's queue is installed as any queue of another node is known
//! here (a record naming its node, and its bindings in the exchanges'
//! tables), so routing, forwarding and confirms need nothing of their
//! own. What is installed is remembered per peer, so the next report
//! changes only what changed, and the link's closing removes exactly
//! that. A name this node already knows otherwise (a queue of its own, or
//! one the cluster agreed on) is left alone: the first holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::{Broker, Destination, RemoteQueue, VHost};
use crate::cluster::private::{PrivateQueue, PrivateQueues, REFRESH, SETTLE};
use crate::store::definitions::{BindingDefinition, QueueDefinition};

/// Most exclusive queues and bindings (counted together) a node reports:
/// a report is one link frame, which must stay well under the link's
/// 64 MiB bound (a binding takes about 100 bytes).
pub const MAX_REPORTED: usize = 200_000;

/// When a cut report was last logged (once a minute at most).
static CUT_LOGGED: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Both directions' state.
#[derive(Debug, Default)]
pub struct Private {
    /// Bumped whenever this node's exclusive queues or their bindings
    /// change.
    generation: AtomicU64,
    changed: Notify,
    /// Each peer's queues as installed here.
    installed: Mutex<HashMap<String, Vec<PrivateQueue>>>,
}

impl Broker {
    /// This node's exclusive queues or their bindings changed: its peers
    /// hear of it.
    pub(crate) fn private_changed(&self) {
        if self.cluster().is_some() {
            self.private.generation.fetch_add(1, Ordering::AcqRel);
            self.private.changed.notify_one();
        }
    }

    /// This node's exclusive queues and their bindings, at most
    /// [`MAX_REPORTED`] of them (queues and bindings counted together).
    fn own_private_queues(&self, node: &str) -> PrivateQueues {
        let mut queues = Vec::new();
        let mut reported = 0usize;
        for v in self.vhosts() {
            let owned: Vec<String> = v
                .queues()
                .into_iter()
                .filter(|q| q.owner.is_some())
                .map(|q| q.name.clone())
                .collect();
            if owned.is_empty() {
                continue;
            }
            let mut by_queue: HashMap<&str, Vec<BindingDefinition>> =
                owned.iter().map(|n| (n.as_str(), Vec::new())).collect();
            for x in v.exchanges() {
                for b in x.bindings.load().iter() {
                    if let Destination::Queue(q) = &b.destination
                        && let Some(list) = by_queue.get_mut(q.as_str())
                    {
                        list.push(BindingDefinition {
                            source: x.name.clone(),
                            destination: q.clone(),
                            destination_type: "queue".into(),
                            routing_key: b.key.clone(),
                            arguments: b.arguments.clone(),
                        });
                    }
                }
            }
            for name in &owned {
                let bindings = by_queue.remove(name.as_str()).unwrap_or_default();
                reported += 1 + bindings.len();
                if reported > MAX_REPORTED {
                    let mut logged = CUT_LOGGED.lock();
                    if logged.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                        *logged = Some(std::time::Instant::now());
                        tracing::warn!(
                            limit = MAX_REPORTED,
                            "more exclusive queues and bindings than the other nodes are told of: those past the limit are reached only through this node"
                        );
                    }
                    break;
                }
                queues.push(PrivateQueue {
                    vhost: v.name.clone(),
                    name: name.clone(),
                    bindings,
                });
            }
        }
        PrivateQueues {
            node: node.to_owned(),
            queues,
        }
    }

    /// Report this node's exclusive queues to its peers: after a change
    /// (and [`SETTLE`]), to a peer on a new link, and every [`REFRESH`],
    /// until `stop`.
    pub async fn report_private(
        self: std::sync::Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        // How often new links are looked for (a peer that reconnected is
        // sent the set within this).
        const LOOK: std::time::Duration = std::time::Duration::from_millis(500);
        loop {
            tokio::select! {
                () = self.private.changed.notified() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(LOOK.min(REFRESH)) => {}
                () = stop.cancelled() => return,
            }
            let generation = self.private.generation.load(Ordering::Acquire);
            let due = node.private_due(generation);
            if due.is_empty() {
                continue;
            }
            let queues = self.own_private_queues(node.name());
            tokio::select! {
                () = node.report_private(due, &queues, generation) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// A peer reported its exclusive queues: serve them as queues of that
    /// node, changing only what changed since its last report.
    pub(crate) fn apply_private(&self, report: PrivateQueues) {
        let mut installed = self.private.installed.lock();
        let before = installed.remove(&report.node).unwrap_or_default();
        let key = |q: &PrivateQueue| (q.vhost.clone(), q.name.clone());
        let mut old: HashMap<(String, String), PrivateQueue> =
            before.into_iter().map(|q| (key(&q), q)).collect();
        let mut now = Vec::with_capacity(report.queues.len());
        for q in report.queues {
            let Some(v) = self.vhost(&q.vhost) else {
                continue;
            };
            match old.remove(&key(&q)) {
                Some(was) => {
                    for b in was.bindings.iter().filter(|b| !q.bindings.contains(b)) {
                        self.unbind_private(&v, b);
                    }
                    let kept = self.bind_private(&v, &q, |b| !was.bindings.contains(b));
                    let mut q = q;
                    q.bindings
                        .retain(|b| was.bindings.contains(b) || kept.contains(b));
                    now.push(q);
                }
                None => {
                    if !install(&v, &report.node, &q.name) {
                        tracing::debug!(node = %report.node, queue = %crate::untrusted::text(&q.name), "a peer's exclusive queue shares a name known here; not served here");
                        continue;
                    }
                    let kept = self.bind_private(&v, &q, |_| true);
                    let mut q = q;
                    q.bindings = kept;
                    now.push(q);
                }
            }
        }
        for (_, q) in old {
            self.uninstall_private(&report.node, &q);
        }
        installed.insert(report.node, now);
    }

    /// The link to `node` closed: its exclusive queues are no longer
    /// served here.
    pub(crate) fn drop_private(&self, node: &str) {
        let gone = self.private.installed.lock().remove(node);
        for q in gone.unwrap_or_default() {
            self.uninstall_private(node, &q);
        }
    }

    /// Bind the bindings of `q` that `new` picks; those that took.
    fn bind_private(
        &self,
        v: &VHost,
        q: &PrivateQueue,
        new: impl Fn(&BindingDefinition) -> bool,
    ) -> Vec<BindingDefinition> {
        let mut kept = Vec::new();
        for b in q.bindings.iter().filter(|b| new(b)) {
            let bound = self.bind(
                v,
                &b.source,
                Destination::Queue(q.name.clone()),
                &b.routing_key,
                b.arguments.clone(),
            );
            match bound {
                Ok(()) => kept.push(b.clone()),
                Err(e) => {
                    tracing::debug!(queue = %crate::untrusted::text(&q.name), "a peer's exclusive queue's binding not made here: {e}")
                }
            }
        }
        kept
    }

    fn unbind_private(&self, v: &VHost, b: &BindingDefinition) {
        let _ = self.unbind(
            v,
            &b.source,
            &Destination::Queue(b.destination.clone()),
            &b.routing_key,
            &b.arguments,
        );
    }

    fn uninstall_private(&self, node: &str, q: &PrivateQueue) {
        let Some(v) = self.vhost(&q.vhost) else {
            return;
        };
        for b in &q.bindings {
            self.unbind_private(&v, b);
        }
        let ours = v.remote_queue(&q.name).is_some_and(|r| {
            r.node == node && !r.durable && r.definition.arguments.inner().is_empty()
        });
        if ours {
            v.set_remote(&q.name, None);
        }
    }
}

/// Record queue `name` as living on `node`, unless the name is taken here.
fn install(v: &VHost, node: &str, name: &str) -> bool {
    if v.queues.read().contains_key(name) {
        return false;
    }
    match v.remote_queue(name) {
        Some(r) if r.node == node && !r.durable => true,
        Some(_) => false,
        None => {
            v.set_remote(
                name,
                Some(RemoteQueue {
                    node: node.to_owned(),
                    durable: false,
                    definition: QueueDefinition {
                        name: name.to_owned(),
                        auto_delete: false,
                        arguments: Default::default(),
                    },
                    leader_term: 0,
                }),
            );
            true
        }
    }
}
