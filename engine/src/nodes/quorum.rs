//! Quorum queues in the broker: where their replicas are placed, and the
//! live queue their leader serves them from.
//!
//! A quorum queue's messages are kept by its Raft group
//! ([`crate::cluster::quorum`]). The group's leader serves the queue as a
//! [`Queue`] of its vhost (its *live queue*), built from the replicated
//! state when it takes over, fed by each committed enqueue, and reporting
//! every settlement and return to the log. Every other node sees the queue
//! as living on the leader's node, as it sees a classic queue of another
//! node: publishes are forwarded there and consumers made there. When the
//! leader changes, the new one proposes [`Command::QueueLeader`] through
//! the definitions log, every node points the queue at it, and consumers
//! re-subscribe there ([`Dispatch::Moved`]).
//!
//! What a new leader cannot know is whether the old one delivered a
//! message it had not seen settled: it delivers every message it inherits
//! (in the log before it took over) marked redelivered, so a message is
//! delivered twice only with the flag. This holds for a node that restarts
//! and keeps its leadership too (openraft restores a leader's committed
//! vote), which is why the line is drawn at the log index where this live
//! queue began, not at the term.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;

use crate::broker::Replicated;
use crate::broker::{
    Broker, BrokerError, Dispatch, Queue, QueueDecl, QueueLimits, RemoteQueue, VHost,
};
use crate::cluster::quorum::{Held, Holds, Live, Replica, ReplicaStatus, entry_index, group_name};
use crate::cluster::{Applied, Command};
use crate::store::definitions::QueueDefinition;

/// The default number of replicas (`x-quorum-initial-group-size`).
pub const DEFAULT_GROUP_SIZE: usize = 3;

/// A quorum queue this node holds a replica of.
pub(crate) struct QuorumEntry {
    vhost: String,
    definition: QueueDefinition,
    members: Vec<String>,
    /// Whether this node starts the group (the first leader).
    bootstrap: bool,
    replica: Option<Arc<Replica>>,
    live: Option<Arc<Queue>>,
    /// A replicated stream's queue on this node: its consumers read this
    /// replica's log whoever leads; while this node leads it is the live
    /// queue too.
    stream: Option<Arc<Queue>>,
    opening: bool,
}

/// A quorum queue's replica on its leader, the cluster, and its members.
type QuorumLeader = (Arc<Replica>, Arc<crate::cluster::ClusterNode>, Vec<String>);

/// The live queue's side of the state machine's hook.
struct LiveHook {
    queue: Weak<Queue>,
    /// The term this node leads in.
    term: u64,
    /// The first log index proposed by this live queue's leader: an entry
    /// before it was in the log before the live queue existed.
    fresh_from: u64,
}

impl Live for LiveHook {
    fn enqueued(&self, id: u64, held: &Held) -> bool {
        // An entry of a later term was enqueued by another leader: this
        // node stepped down and its live queue is about to go. Serving the
        // message here too would deliver it twice without the flag.
        if held.term != self.term {
            return true;
        }
        let Some(q) = self.queue.upgrade() else {
            return false;
        };
        // An older entry applied only now (a node that restarted and kept
        // its leadership applies its committed tail again): this node may
        // have delivered it before.
        let maybe_delivered = entry_index(id) < self.fresh_from;
        match held.message.message() {
            Some(m) => q.push_replicated(id, Arc::new(m), held.published_ms, maybe_delivered),
            None => false,
        }
    }
}

impl Broker {
    /// Where a new quorum queue `name` of `vhost` declared with
    /// `arguments` goes: its first leader and its members (its policies'
    /// `queue-leader-locator` counting when the arguments name none).
    /// `None` for any other queue (or outside a cluster, where a quorum
    /// queue is refused when declared).
    pub fn place_quorum(
        &self,
        vhost: &str,
        name: &str,
        arguments: &FieldTable,
    ) -> Option<(String, Vec<String>)> {
        let declared = QueueLimits::parse(arguments).ok()?;
        if !declared.quorum && !declared.stream {
            return None;
        }
        let stream = declared.stream;
        let (_, limits) = self.with_policies(vhost, name, arguments, declared);
        let node = self.cluster()?;
        let mut nodes: Vec<String> = node.members().into_iter().map(|m| m.name).collect();
        nodes.sort();
        // A stream is on every node unless `x-initial-cluster-size` says
        // fewer, as RabbitMQ places them: its readers read where they are.
        let default = if stream {
            nodes.len()
        } else {
            DEFAULT_GROUP_SIZE
        };
        let size = limits
            .initial_group_size
            .unwrap_or(default)
            .min(nodes.len())
            .max(1);
        // Spread: the nodes leading (then holding) the fewest quorum
        // queues come first, this node breaking ties; `client-local` puts
        // this node first whatever it holds.
        let (leads, holds) = node.quorum_load();
        let me = node.name().to_owned();
        let load = |n: &String| {
            (
                !(limits.client_local && *n == me),
                leads.get(n.as_str()).copied().unwrap_or(0),
                holds.get(n.as_str()).copied().unwrap_or(0),
                *n != me,
            )
        };
        nodes.sort_by_key(|n| load(n));
        let leader = nodes.first()?.clone();
        let mut members: Vec<String> = nodes.into_iter().take(size).collect();
        members.sort();
        Some((leader, members))
    }

    /// Whether `vhost`'s queue `name` is a quorum queue.
    pub fn is_quorum(&self, vhost: &VHost, name: &str) -> bool {
        if let Ok(q) = vhost.queue(name) {
            return q.quorum;
        }
        vhost
            .remote_queue(name)
            .is_some_and(|r| QueueLimits::parse(&r.definition.arguments).is_ok_and(|l| l.quorum))
    }

    /// Whether `vhost`'s queue `name` on another node is a stream.
    pub fn is_stream(&self, vhost: &VHost, name: &str) -> bool {
        vhost
            .remote_queue(name)
            .is_some_and(|r| QueueLimits::parse(&r.definition.arguments).is_ok_and(|l| l.stream))
    }

    /// The consumer timeout of queue `name` (`x-consumer-timeout` or a
    /// policy's), here or on another node.
    pub fn consumer_timeout_of(&self, vhost: &VHost, name: &str) -> Option<std::time::Duration> {
        if let Ok(q) = vhost.queue(name) {
            return q.limits().consumer_timeout;
        }
        let r = vhost.remote_queue(name)?;
        let declared = QueueLimits::parse(&r.definition.arguments).ok()?;
        let (_, limits) = self.with_policies(&vhost.name, name, &r.definition.arguments, declared);
        limits.consumer_timeout
    }

    /// A committed declaration of a quorum queue on `members`, led first
    /// by `node`.
    pub(crate) fn apply_declare_quorum(
        &self,
        vhost: &VHost,
        queue: &QueueDefinition,
        durable: bool,
        node: &str,
        members: &[String],
        me: &str,
    ) -> Result<Applied, BrokerError> {
        let name = &queue.name;
        let limits = QueueLimits::parse(&queue.arguments).map_err(|e| {
            BrokerError::PreconditionFailed(format!(
                "{e} for queue '{name}' in vhost '{}'",
                vhost.name
            ))
        })?;
        if limits.stream {
            use crate::broker::stream::{StreamArgs, refusal};
            let refuse =
                |what: &str| BrokerError::PreconditionFailed(refusal(what, name, &vhost.name));
            if !durable {
                return Err(refuse("invalid property 'non-durable'"));
            }
            if queue.auto_delete {
                return Err(refuse("invalid property 'auto-delete'"));
            }
            StreamArgs::parse(&queue.arguments).map_err(|e| refuse(&e))?;
        }
        for (property, bad) in [("durable", !durable), ("auto_delete", queue.auto_delete)] {
            if bad {
                return Err(BrokerError::PreconditionFailed(format!(
                    "invalid property '{property}' for queue '{name}' in vhost '{}': quorum queues are durable and not auto-delete",
                    vhost.name
                )));
            }
        }
        if !limits.quorum && !limits.stream {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{name}' in vhost '{}' has members but is not a quorum queue",
                vhost.name
            )));
        }
        if let Some(r) = vhost.remote_queue(name) {
            if r.definition.arguments != queue.arguments || r.durable != durable {
                return Err(BrokerError::PreconditionFailed(format!(
                    "inequivalent arg for queue '{name}' in vhost '{}': declared with other arguments than it has",
                    vhost.name
                )));
            }
            // Declared again (by a client of any node, placed afresh
            // there): where it lives and who holds it stay as they are.
            // A snapshot's restore sets both from the cluster's record.
            return Ok(Applied::Done);
        }
        if vhost.queue(name).is_ok() {
            return Err(BrokerError::PreconditionFailed(format!(
                "inequivalent arg 'x-queue-type' for queue '{name}' in vhost '{}': it is a classic queue",
                vhost.name
            )));
        }
        vhost.set_remote(
            name,
            Some(RemoteQueue {
                node: node.to_owned(),
                durable,
                definition: queue.clone(),
                leader_term: 0,
            }),
        );
        if members.iter().any(|m| m == me) {
            self.quorum.lock().insert(
                group_name(&vhost.name, name),
                QuorumEntry {
                    vhost: vhost.name.clone(),
                    definition: queue.clone(),
                    members: members.to_vec(),
                    bootstrap: node == me,
                    replica: None,
                    live: None,
                    stream: None,
                    opening: false,
                },
            );
            self.open_replicas();
        }
        Ok(Applied::Done)
    }

    /// A committed leader change: the queue lives on `node` now.
    pub(crate) fn apply_queue_leader(
        &self,
        vhost: &VHost,
        name: &str,
        node: &str,
        term: u64,
        me: &str,
    ) {
        let Some(mut r) = vhost.remote_queue(name) else {
            return;
        };
        if term < r.leader_term {
            // A stale announcement (the cluster's record ignores it too).
            return;
        }
        r.node = node.to_owned();
        r.leader_term = term;
        vhost.set_remote(name, Some(r));
        if node != me {
            // The old leader on this node, if it still serves, stops.
            let group = group_name(&vhost.name, name);
            let live = self
                .quorum
                .lock()
                .get(&group)
                .and_then(|e| e.replica.clone())
                .filter(|r| !r.leads());
            if let Some(replica) = live {
                self.stop_serving(&replica);
            }
        }
        self.tell_moved(&vhost.name, name);
    }

    /// A committed change of a quorum queue's members: this node opens or
    /// deletes its replica.
    pub(crate) fn apply_queue_members(
        &self,
        vhost: &VHost,
        name: &str,
        members: &[String],
        me: &str,
    ) {
        let Some(r) = vhost.remote_queue(name) else {
            return;
        };
        let group = group_name(&vhost.name, name);
        let member = members.iter().any(|m| m == me);
        let removed = {
            let mut quorum = self.quorum.lock();
            match (member, quorum.contains_key(&group)) {
                (true, false) => {
                    quorum.insert(
                        group.clone(),
                        QuorumEntry {
                            vhost: vhost.name.clone(),
                            definition: r.definition.clone(),
                            members: members.to_vec(),
                            bootstrap: false,
                            replica: None,
                            live: None,
                            stream: None,
                            opening: false,
                        },
                    );
                    None
                }
                (false, true) => quorum.remove(&group),
                (true, true) => {
                    if let Some(e) = quorum.get_mut(&group) {
                        e.members = members.to_vec();
                    }
                    None
                }
                (false, false) => None,
            }
        };
        if member {
            self.open_replicas();
        }
        if let Some(replica) = removed.and_then(|e| e.replica) {
            if let Some(q) = vhost.queues.write().remove(name) {
                q.cancel_consumers();
            }
            if let Some(q) = vhost.streams.write().remove(name) {
                q.cancel_consumers();
                if let Some(s) = q.stream() {
                    s.destroy();
                }
            }
            replica.machine().clear_live();
            tokio::spawn(async move { replica.destroy().await });
            self.tell_moved(&vhost.name, name);
        }
    }

    /// Add the node `node` to quorum queue `name`'s members (RabbitMQ's
    /// `add_member`): run on the queue's leader. The node opens an empty
    /// replica, catches up as a learner, then votes.
    pub async fn add_quorum_member(
        &self,
        vhost: &str,
        name: &str,
        node: &str,
    ) -> Result<(), BrokerError> {
        let (replica, cluster, mut members) = self.quorum_leader(vhost, name)?;
        if members.iter().any(|m| m == node) {
            return Ok(());
        }
        let member = cluster
            .members()
            .into_iter()
            .find(|m| m.name == node)
            .ok_or_else(|| BrokerError::NotFound {
                kind: "node",
                vhost: vhost.to_owned(),
                name: node.to_owned(),
            })?;
        members.push(node.to_owned());
        members.sort();
        self.propose_members(&cluster, vhost, name, members).await?;
        replica
            .add_member(member)
            .await
            .map_err(BrokerError::PreconditionFailed)
    }

    /// Remove the node `node` from quorum queue `name`'s members
    /// (RabbitMQ's `delete_member`): run on the queue's leader.
    pub async fn remove_quorum_member(
        &self,
        vhost: &str,
        name: &str,
        node: &str,
    ) -> Result<(), BrokerError> {
        let (replica, cluster, mut members) = self.quorum_leader(vhost, name)?;
        if !members.iter().any(|m| m == node) {
            return Ok(());
        }
        replica
            .remove_member(node)
            .await
            .map_err(BrokerError::PreconditionFailed)?;
        members.retain(|m| m != node);
        self.propose_members(&cluster, vhost, name, members).await
    }

    async fn propose_members(
        &self,
        cluster: &Arc<crate::cluster::ClusterNode>,
        vhost: &str,
        name: &str,
        members: Vec<String>,
    ) -> Result<(), BrokerError> {
        let command = Command::QueueMembers {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            members,
        };
        match cluster.propose(command).await {
            Ok(Applied::Refused { text, .. }) => Err(BrokerError::PreconditionFailed(text)),
            Ok(_) => Ok(()),
            Err(e) => Err(BrokerError::PreconditionFailed(e.to_string())),
        }
    }

    /// This node's replica of a quorum queue, if it leads, with the
    /// cluster and the queue's members.
    fn quorum_leader(&self, vhost: &str, name: &str) -> Result<QuorumLeader, BrokerError> {
        let not_here = || {
            BrokerError::PreconditionFailed(format!(
                "no replica of quorum queue '{name}' in vhost '{vhost}' on this node"
            ))
        };
        let cluster = self.cluster().cloned().ok_or_else(not_here)?;
        let (replica, members) = {
            let q = self.quorum.lock();
            let e = q.get(&group_name(vhost, name)).ok_or_else(not_here)?;
            (e.replica.clone().ok_or_else(not_here)?, e.members.clone())
        };
        if !replica.leads() {
            return Err(BrokerError::PreconditionFailed(format!(
                "this node does not lead quorum queue '{name}' (its leader is {}): ask the leader's node",
                replica.leader().as_deref().unwrap_or("not known")
            )));
        }
        Ok((replica, cluster, members))
    }

    /// A committed deletion of a quorum queue: its replica and data go.
    pub(crate) fn apply_delete_quorum(&self, vhost: &VHost, name: &str) -> usize {
        let entry = self.quorum.lock().remove(&group_name(&vhost.name, name));
        let mut n = 0;
        if let Ok(q) = vhost.queue(name) {
            n = q.len();
            vhost.queues.write().remove(name);
            q.cancel_consumers();
        }
        if let Some(q) = vhost.streams.write().remove(name) {
            q.cancel_consumers();
            if let Some(s) = q.stream() {
                s.destroy();
            }
        }
        vhost.set_remote(name, None);
        self.remove_bindings_to(vhost, &crate::broker::Destination::Queue(name.to_owned()));
        if let Some(replica) = entry.and_then(|e| e.replica) {
            replica.machine().clear_live();
            tokio::spawn(async move { replica.destroy().await });
        }
        self.tell_moved(&vhost.name, name);
        n
    }

    /// Tell every local connection that a quorum queue moved (or went):
    /// its consumers of it re-subscribe where it lives now.
    fn tell_moved(&self, vhost: &str, name: &str) {
        if let Some(remote) = self.remote() {
            remote.broadcast(|| Dispatch::Moved {
                vhost: vhost.to_owned(),
                queue: name.to_owned(),
            });
        }
    }

    /// Open the replicas this node should hold and does not yet (the
    /// cluster node may not be set while the log is replayed at start).
    pub(crate) fn open_replicas(&self) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut quorum = self.quorum.lock();
        for (group, e) in quorum.iter_mut() {
            if e.replica.is_some() || e.opening {
                continue;
            }
            e.opening = true;
            let members: Vec<crate::cluster::Member> = node
                .members()
                .into_iter()
                .filter(|m| e.members.contains(&m.name))
                .collect();
            let (vhost, name, bootstrap) =
                (e.vhost.clone(), e.definition.name.clone(), e.bootstrap);
            let dedup = crate::dedup::Settings::of_queue(&e.definition.arguments)
                .ok()
                .flatten();
            let dir = node.data_dir().join("quorum").join(dir_name(group));
            // A replicated stream's log is in its replica's folder.
            let stream = match self.open_replica_stream(&e.definition, &dir) {
                Ok(log) => log,
                Err(err) => {
                    tracing::error!(queue = %crate::untrusted::text(&name), vhost = %crate::untrusted::text(&vhost), "opening a replicated stream's log: {err}");
                    e.opening = false;
                    continue;
                }
            };
            let (node, broker, group) = (node.clone(), self.self_ref.clone(), group.clone());
            rt.spawn(async move {
                let holds = match &stream {
                    Some(log) => Holds::Stream(log.clone()),
                    None => Holds::Messages { dedup },
                };
                let opened =
                    Replica::open(node, &vhost, &name, &members, bootstrap, &dir, holds).await;
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                match opened {
                    Ok(replica) => {
                        let reader = stream.and_then(|log| broker.stream_reader(&replica, log));
                        let kept = match broker.quorum.lock().get_mut(&group) {
                            Some(e) => {
                                e.replica = Some(replica.clone());
                                e.stream = reader;
                                true
                            }
                            None => false,
                        };
                        if kept {
                            tokio::spawn(watch_leadership(broker.self_ref.clone(), replica));
                        } else {
                            // Deleted while it opened.
                            replica.destroy().await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(queue = %crate::untrusted::text(&name), vhost = %crate::untrusted::text(&vhost), "opening a quorum queue's replica: {e}");
                        if let Some(e) = broker.quorum.lock().get_mut(&group) {
                            e.opening = false;
                        }
                    }
                }
            });
        }
    }

    /// Whether this node has caught up since it started: its definitions
    /// applied, and every quorum queue replica it should hold open,
    /// following (or being) a leader, with all it holds applied. The next
    /// node of a rolling restart may go only then (`/ready`). Once caught
    /// up it stays so: under load a replica's log runs ahead of what it
    /// applied all the time, which is no reason to leave a Service.
    pub fn caught_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.caught_up.load(Ordering::Relaxed) {
            return true;
        }
        let definitions = self.cluster().is_none_or(|c| c.applied_all());
        let replicas = self.quorum.lock().values().all(|e| {
            e.replica.as_ref().is_some_and(|r| {
                let st = r.status();
                st.leader.is_some() && st.last_applied >= st.last_log_index
            })
        });
        let now = definitions && replicas;
        if now {
            self.caught_up.store(true, Ordering::Relaxed);
        }
        now
    }

    /// The status of this node's replica of a quorum queue.
    pub fn quorum_status(&self, vhost: &str, name: &str) -> Option<ReplicaStatus> {
        let q = self.quorum.lock();
        q.get(&group_name(vhost, name))?
            .replica
            .as_ref()
            .map(|r| r.status())
    }

    fn serving(&self, replica: &Arc<Replica>) -> bool {
        self.quorum
            .lock()
            .get(&replica.group)
            .is_some_and(|e| e.live.is_some())
    }

    /// This node leads the queue's group: build the live queue from the
    /// replicated state and tell the cluster.
    async fn start_serving(&self, replica: &Arc<Replica>) {
        let Some(vhost) = self.vhost(&replica.vhost) else {
            return;
        };
        let stream = self
            .quorum
            .lock()
            .get(&replica.group)
            .and_then(|e| e.stream.clone());
        if let Some(queue) = stream {
            return self.start_serving_stream(replica, &vhost, queue);
        }
        let Some(definition) = self
            .quorum
            .lock()
            .get(&replica.group)
            .map(|e| e.definition.clone())
        else {
            return;
        };
        let sink = Some(self.dead_letter_sink(&vhost.name));
        let Some(mut queue) = self.replicated_queue(&vhost, &definition, replica, sink) else {
            return;
        };
        if let Some(x) = crate::broker::schedules(&definition.arguments) {
            // A delayed exchange's schedule, kept by its leader.
            queue = queue.with_due_sink(self.due_sink(&vhost.name, x));
        }
        let queue = Arc::new(queue);
        let (term, fresh_from) = {
            let m = replica.raft().metrics().borrow().clone();
            (m.current_term, m.last_log_index.map_or(0, |i| i + 1))
        };
        let mut counts = HashMap::new();
        let hook = Arc::new(LiveHook {
            queue: Arc::downgrade(&queue),
            term,
            fresh_from,
        });
        replica.machine().set_live_with(hook, |held| {
            for (id, h) in held {
                let Some(m) = h.message.message() else {
                    continue;
                };
                let m = if h.returns > 0 {
                    counts.insert(*id, h.returns);
                    crate::broker::with_delivery_count(&m, h.returns)
                } else {
                    m
                };
                // Any message held when a leader takes over may have been
                // delivered: by another leader, or by this node before it
                // restarted (openraft lets a restarted leader keep its term).
                queue.push_replicated(*id, Arc::new(m), h.published_ms, true);
            }
        });
        replica.take_counts(counts);
        {
            let mut quorum = self.quorum.lock();
            let Some(e) = quorum.get_mut(&replica.group) else {
                replica.machine().clear_live();
                return;
            };
            e.live = Some(queue.clone());
        }
        vhost
            .queues
            .write()
            .insert(definition.name.clone(), queue.clone());
        tracing::info!(queue = %crate::untrusted::text(&definition.name), vhost = %crate::untrusted::text(&vhost.name), term, messages = queue.len(), "serving a quorum queue as its leader");
        self.adopt_stored(replica);
        self.announce(replica, &vhost.name, &definition.name, term);
    }

    /// This node leads a replicated stream's group: its replica's queue
    /// takes the stream's publishes (its consumers read on undisturbed).
    fn start_serving_stream(&self, replica: &Arc<Replica>, vhost: &VHost, queue: Arc<Queue>) {
        let term = replica.raft().metrics().borrow().current_term;
        {
            let mut quorum = self.quorum.lock();
            let Some(e) = quorum.get_mut(&replica.group) else {
                return;
            };
            e.live = Some(queue.clone());
        }
        vhost
            .queues
            .write()
            .insert(queue.name.clone(), queue.clone());
        tracing::info!(queue = %crate::untrusted::text(&queue.name), vhost = %crate::untrusted::text(&vhost.name), term, "leading a replicated stream");
        self.announce(replica, &vhost.name, &queue.name, term);
    }

    /// Tell the cluster this node leads `vhost`'s queue `name` in `term`,
    /// unless its record says so already.
    fn announce(&self, replica: &Arc<Replica>, vhost: &str, name: &str, term: u64) {
        let Some(node) = self.cluster().cloned() else {
            return;
        };
        let me = node.name().to_owned();
        // Announced in this very term (a leader that restarted and kept
        // its term), or to be announced: a record naming this node from an
        // earlier term may be about to be overwritten by an announcement
        // of a term between, still on its way.
        let announced = node
            .queue_record(vhost, name)
            .is_some_and(|r| r.served && r.node == me && r.leader_term == term);
        if !announced {
            // Off the leadership watcher: the definitions' own leader may
            // be the node that just went silent, and the announcement must
            // wait for the next one without holding up a stop_serving.
            tokio::spawn(announce_leader(
                node,
                replica.clone(),
                vhost.to_owned(),
                name.to_owned(),
                term,
            ));
        } else {
            self.tell_moved(vhost, name);
        }
    }

    /// The queue a replica serves `definition` from: its policies laid
    /// over it, its changes going to `replica`'s log, its dead letters to
    /// `sink`.
    fn replicated_queue(
        &self,
        vhost: &VHost,
        definition: &QueueDefinition,
        replica: &Arc<Replica>,
        sink: Option<crate::broker::DeadLetterSink>,
    ) -> Option<Queue> {
        let limits = QueueLimits::parse(&definition.arguments).ok()?;
        let flow = self
            .queue_flow_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let (applied, limits) =
            self.with_policies(&vhost.name, &definition.name, &definition.arguments, limits);
        let queue = Queue::new(
            QueueDecl {
                name: definition.name.clone(),
                durable: true,
                owner: None,
                auto_delete: false,
                arguments: definition.arguments.clone(),
            },
            limits,
            flow,
            sink,
            None,
        )
        .with_replica(replica.clone() as Arc<dyn Replicated>)
        .with_policy(applied);
        Some(queue)
    }

    /// A replicated stream's log for the replica in `dir` (`None`: the
    /// queue is not a stream).
    fn open_replica_stream(
        &self,
        definition: &QueueDefinition,
        dir: &std::path::Path,
    ) -> Result<Option<Arc<crate::store::stream::StreamLog>>, String> {
        let limits = QueueLimits::parse(&definition.arguments)?;
        if !limits.stream {
            return Ok(None);
        }
        let args = crate::broker::stream::StreamArgs::parse(&definition.arguments)?;
        let store = self
            .store()
            .ok_or("streams need a data directory, and this broker has no store")?;
        store
            .open_stream_in(dir.join("stream"), args.segment_bytes)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The queue a replicated stream's replica serves its readers from,
    /// known to the vhost.
    fn stream_reader(
        &self,
        replica: &Arc<Replica>,
        log: Arc<crate::store::stream::StreamLog>,
    ) -> Option<Arc<Queue>> {
        let vhost = self.vhost(&replica.vhost)?;
        let definition = self
            .quorum
            .lock()
            .get(&replica.group)
            .map(|e| e.definition.clone())?;
        let stream =
            crate::broker::stream::Stream::replicated(log, replica.clone() as Arc<dyn Replicated>);
        let queue = self
            .replicated_queue(&vhost, &definition, replica, None)?
            .with_stream(stream);
        let queue = Arc::new(queue);
        crate::broker::stream::Stream::start(&queue);
        vhost
            .streams
            .write()
            .insert(definition.name.clone(), queue.clone());
        Some(queue)
    }

    /// Messages this node kept for the queue while it ran alone (a single
    /// node's quorum queue is a one-replica queue in its store): proposed
    /// to the group, in their order and with their publish times, each
    /// acked in the old log once committed, and the old log deleted once
    /// all are. A message not committed (this node stopped leading) stays
    /// there and is proposed when it leads again. A crash between a commit
    /// and its ack being written may enqueue that message twice.
    fn adopt_stored(&self, replica: &Arc<Replica>) {
        use std::sync::atomic::Ordering;
        let Some(store) = self.store() else { return };
        if !store.queue_dir(&replica.vhost, &replica.queue).exists() {
            return;
        }
        let name = crate::untrusted::text(&replica.queue).to_string();
        let (log, recovered) = match store.open_queue(&replica.vhost, &replica.queue) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(queue = %name, "opening what this node kept of the queue alone: {e}");
                return;
            }
        };
        if recovered.is_empty() {
            log.destroy();
            return;
        }
        tracing::info!(queue = %name, messages = recovered.len(), "replicating the messages this node kept of the queue alone");
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(recovered.len()));
        let missed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for r in recovered {
            let message = match log.load(r.stored) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(queue = %name, "reading a message this node kept alone: {e}");
                    missed.store(true, Ordering::Relaxed);
                    left.fetch_sub(1, Ordering::AcqRel);
                    continue;
                }
            };
            let (log, left, missed, stored) = (log.clone(), left.clone(), missed.clone(), r.stored);
            let reply: crate::broker::Reply = Box::new(move |taken| {
                if taken {
                    log.ack([stored]);
                } else {
                    missed.store(true, Ordering::Relaxed);
                }
                if left.fetch_sub(1, Ordering::AcqRel) == 1 && !missed.load(Ordering::Relaxed) {
                    log.destroy();
                }
            });
            replica.enqueue_at(&message, r.meta.published_ms, Some(reply));
        }
    }

    /// This node no longer leads the queue's group: its live queue goes,
    /// and its consumers re-subscribe at the new leader.
    fn stop_serving(&self, replica: &Arc<Replica>) {
        let live = self
            .quorum
            .lock()
            .get_mut(&replica.group)
            .and_then(|e| e.live.take());
        let Some(queue) = live else { return };
        replica.machine().clear_live();
        if let Some(vhost) = self.vhost(&replica.vhost) {
            let mut queues = vhost.queues.write();
            if queues
                .get(&replica.queue)
                .is_some_and(|q| Arc::ptr_eq(q, &queue))
            {
                queues.remove(&replica.queue);
            }
        }
        let what = if queue.stream().is_some() {
            // A stream's readers read on here; only its publishes go to
            // the new leader.
            "no longer leading a replicated stream"
        } else {
            queue.cancel_consumers();
            "no longer leading a quorum queue"
        };
        tracing::info!(queue = %crate::untrusted::text(&replica.queue), vhost = %crate::untrusted::text(&replica.vhost), "{what}");
        self.tell_moved(&replica.vhost, &replica.queue);
    }
}

/// Tell the cluster this node leads quorum queue `name`, trying again
/// (every 100 ms, up to every second) until the announcement commits or
/// this node no longer leads. Until it commits, the other nodes send the
/// queue's publishes and subscriptions to the old leader, and nack them.
/// It carries the group's `term`: a retry that commits after a later
/// leader's announcement is ignored, not taken as the truth.
async fn announce_leader(
    node: Arc<crate::cluster::ClusterNode>,
    replica: Arc<Replica>,
    vhost: String,
    name: String,
    term: u64,
) {
    let me = node.name().to_owned();
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        let command = Command::QueueLeader {
            vhost: vhost.clone(),
            name: name.clone(),
            node: me.clone(),
            term,
        };
        let failed = match node.propose(command).await {
            Ok(_) => return,
            Err(e) => e,
        };
        let done = node
            .queue_record(&vhost, &name)
            .is_some_and(|r| r.leader_term >= term);
        if done || !replica.leads() {
            return;
        }
        tracing::debug!(queue = %crate::untrusted::text(&name), "announcing a quorum queue's new leader failed, trying again: {failed}");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(1));
    }
}

/// Serve the queue while this replica leads its group.
///
/// Woken by the group's server metrics (its vote, role and leader), not
/// its full metrics: those change with every append, commit and apply,
/// and under load would wake this task several times a round for
/// nothing. Whether this replica leads is read from the same watch that
/// woke it: openraft publishes the server metrics before the full ones.
async fn watch_leadership(broker: Weak<Broker>, replica: Arc<Replica>) {
    let mut server = replica.raft().server_metrics();
    loop {
        let leads = {
            let m = server.borrow_and_update();
            m.state == openraft::ServerState::Leader && m.current_leader == Some(m.id)
        };
        let Some(b) = broker.upgrade() else { return };
        let serving = b.serving(&replica);
        if leads && !serving {
            // Everything committed before this term is applied once a
            // read is linearizable: the state is complete.
            if replica.raft().ensure_linearizable().await.is_ok() && replica.leads() {
                b.start_serving(&replica).await;
            }
        } else if !leads && serving {
            b.stop_serving(&replica);
        }
        drop(b);
        // A leader that could not confirm its leadership yet (no majority
        // answered) tries again: quiescent groups change their metrics
        // seldom, so a change may be long in coming.
        let waiting = leads && !serving;
        tokio::select! {
            changed = server.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(std::time::Duration::from_millis(200)), if waiting => {}
        }
    }
}

/// A replica's folder name: the group's name may hold any character.
fn dir_name(group: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(group.as_bytes());
    h[..12].iter().map(|b| format!("{b:02x}")).collect()
}
