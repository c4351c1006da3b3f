//! This node's part in the cluster: its Raft instance, the listener the
//! other nodes connect to, joining, and proposing definition changes.
//!
//! **Joining.** A node with no cluster state dials its peers (the
//! configured addresses, or what `peer_dns` resolves to) and asks to join.
//! The leader adds it as a learner, waits until it has caught up (by
//! entries or a snapshot), and then makes it a voter, both through
//! openraft's membership changes. A node that is not the leader passes the
//! request on to the one it knows. A node restarted with its data skips
//! this: it is a member already, and Raft brings it up to date.
//!
//! **Proposing.** A change made on any node goes to the leader, which
//! commits it; the proposing node then waits until its own state machine
//! has applied that index before it answers its client. So a client that
//! got `declare-ok` finds the definition on the node it is connected to,
//! and every other node has it or will, in the same order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::command::{Applied, Command};
use super::link::{Answer, Call, Handler, Link, LinkError};
use super::log::RaftLog;
use super::machine::{Applier, Catalog, StateMachine};
use super::network::{Network, Peers};
use super::quorum::QuorumConfig;
use super::settings::ClusterSettings;
use super::{Member, NodeId, TypeConfig, node_id};

/// What can go wrong in the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are not usable.
    #[error("{0}")]
    Settings(String),
    /// The node-to-node listener did not start.
    #[error("cluster listener on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The Raft log or snapshot could not be opened.
    #[error("cluster state in {dir}: {reason}")]
    Storage {
        /// Folder.
        dir: String,
        /// Why.
        reason: String,
    },
    /// A change was not committed in time: this node cannot reach a
    /// majority (a minority partition, or too many nodes down).
    #[error("no quorum: the change was not committed within {after:?} ({reason})")]
    NoQuorum {
        /// How long it waited.
        after: Duration,
        /// What it saw.
        reason: String,
    },
    /// Raft stopped on this node.
    #[error("cluster: {0}")]
    Raft(String),
}

/// One member's line in a status report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node name.
    pub name: String,
    /// Its node-to-node address.
    pub addr: String,
    /// Raft id.
    pub id: NodeId,
    /// A voter (else a learner still catching up).
    pub voter: bool,
    /// The leader.
    pub leader: bool,
    /// The index the leader knows it holds (known on the leader only).
    pub matched_index: Option<u64>,
}

/// What `wasmq cluster status` and `/api/cluster` show.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node's name.
    pub node: String,
    /// This node's Raft state: leader, follower, candidate or learner.
    pub state: String,
    /// Whether it is a member of an initialized cluster.
    pub joined: bool,
    /// The leader's name, if known.
    pub leader: Option<String>,
    /// Raft term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Last applied index.
    pub last_applied: Option<u64>,
    /// Index the last snapshot covers.
    pub snapshot_index: Option<u64>,
    /// The members.
    pub members: Vec<MemberStatus>,
}

/// How long a call for a quorum group this node does not hold waits for
/// it to be opened, at most (and a third of the election timeout, the
/// time a candidate gives a vote: it hears an answer, not a timeout).
const GROUP_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// This node in the cluster.
pub struct ClusterNode {
    settings: ClusterSettings,
    dir: std::path::PathBuf,
    me: Member,
    id: NodeId,
    raft: Raft<TypeConfig>,
    machine: StateMachine,
    peers: Arc<Peers>,
    stop: CancellationToken,
    /// The runtime the node runs on, for work started from other threads
    /// (the plugin folder's watcher).
    runtime: tokio::runtime::Handle,
    /// Calls of quorum groups this node answered (appends, votes,
    /// snapshots): what idle groups should not cost.
    quorum_calls: std::sync::atomic::AtomicU64,
    /// The log every quorum queue replica on this node writes to.
    quorum_log: Arc<super::quorum::wal::Wal>,
    /// Groups added and not yet seen by the leadership watch.
    new_groups: parking_lot::Mutex<Vec<(String, Arc<std::sync::atomic::AtomicBool>)>>,
    /// Told whenever a group is added: a call for a group this node is
    /// about to open waits for it (`group_soon`).
    groups_added: tokio::sync::Notify,
    /// This process started a new cluster (rather than joining one or
    /// being a member already).
    started_new: std::sync::atomic::AtomicBool,
    /// The quorum queue groups this node holds a replica of, by group.
    groups: parking_lot::RwLock<HashMap<String, Raft<QuorumConfig>>>,
    /// The stream logs of the replicated streams among those groups: what
    /// another replica that fell behind reads from.
    stream_logs: parking_lot::RwLock<HashMap<String, Arc<crate::store::stream::StreamLog>>>,
    /// Connections to the cluster port not yet authenticated.
    handshakes: Arc<super::link::Handshakes>,
    /// Peers the message path failed to reach, and when (see
    /// [`ClusterNode::link_to`]); one entry per member at most.
    unanswered: parking_lot::Mutex<HashMap<String, std::time::Instant>>,
    /// The peers' last reports of who is connected to them.
    presences: super::presence::Presences,
    /// What this node last reported of its exclusive queues, per peer.
    private_reported: super::private::Reported,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("name", &self.me.name)
            .finish_non_exhaustive()
    }
}

fn raft_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Raft(e.to_string())
}

impl ClusterNode {
    /// Open this node's cluster state in `dir`, start Raft and the
    /// node-to-node listener, and (in the background) join or start the
    /// cluster. Definitions are applied to `applier`.
    pub async fn start(
        settings: ClusterSettings,
        dir: &Path,
        applier: Arc<dyn Applier>,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Result<Arc<ClusterNode>, ClusterError> {
        settings.check().map_err(ClusterError::Settings)?;
        let tls = match (settings.tls, tls) {
            (false, _) => None,
            (true, Some(t)) if t.cluster().is_some() => Some(t),
            (true, _) => {
                return Err(ClusterError::Settings(
                    "[cluster] tls = true needs a [tls] section with ca_file: nodes verify each other's certificates against it".into(),
                ));
            }
        };
        let secret = settings.load_secret().map_err(ClusterError::Settings)?;
        let storage = |reason: String| ClusterError::Storage {
            dir: dir.display().to_string(),
            reason,
        };
        let log = RaftLog::open(&dir.join("raft.log")).map_err(|e| storage(e.to_string()))?;
        let machine = StateMachine::open(&dir.join("machine"), Some(applier))
            .map_err(|e| storage(e.to_string()))?;
        let quorum_log = super::quorum::wal::Wal::open(&dir.join("quorum").join("wal"))
            .map_err(|e| storage(e.to_string()))?;
        let listener = TcpListener::bind(&settings.listen)
            .await
            .map_err(|source| ClusterError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ClusterError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        // With port 0 (tests), the port the OS chose is the one to advertise.
        let addr = match &settings.advertise {
            Some(a) => a.clone(),
            None if settings.listen.ends_with(":0") => bound.to_string(),
            None => settings.listen.clone(),
        };
        let me = Member {
            name: settings.name.clone(),
            addr,
        };
        let id = node_id(&me.name);
        let (election_min, election_max) = settings.election_range();
        let config = Config {
            cluster_name: "wasmq".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            // A snapshot every 10k changes keeps the log (and a new
            // node's catch-up) bounded.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: 1_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Settings(e.to_string()))?;
        let liveness = super::link::Liveness::new(
            settings.heartbeat(),
            Duration::from_millis(settings.election_timeout_ms),
        );
        let peers = Peers::new(me.name.clone(), secret, tls, liveness);
        let raft = Raft::new(
            id,
            Arc::new(config),
            Network {
                peers: peers.clone(),
            },
            log,
            machine.clone(),
        )
        .await
        .map_err(raft_err)?;
        let node = Arc::new(ClusterNode {
            settings,
            dir: dir.to_owned(),
            me,
            id,
            raft,
            machine,
            peers: peers.clone(),
            stop: CancellationToken::new(),
            runtime: tokio::runtime::Handle::current(),
            quorum_calls: Default::default(),
            quorum_log,
            new_groups: Default::default(),
            groups_added: tokio::sync::Notify::new(),
            started_new: false.into(),
            groups: Default::default(),
            stream_logs: Default::default(),
            handshakes: super::link::handshakes(),
            unanswered: Default::default(),
            presences: Default::default(),
            private_reported: Default::default(),
        });
        peers.set_handler(node.handler());
        tokio::spawn(node.clone().accept_loop(listener));
        tokio::spawn(node.clone().join_loop());
        if node.settings.quiescent_quorum {
            super::quorum::runtime::set_tickless(true);
            tokio::spawn(super::quorum::leadership::watch(Arc::downgrade(&node)));
        }
        tracing::info!(node = %node.me.name, id, addr = %node.me.addr, listen = %bound, "cluster node started");
        Ok(node)
    }

    /// Run `task` on the node's runtime (from any thread).
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(task);
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.me.name
    }

    /// The address other nodes reach this one at.
    pub fn addr(&self) -> &str {
        &self.me.addr
    }

    /// The folder of this node's cluster state.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The `[cluster]` settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// The node's links.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// This node's Raft id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Cancelled when the node stops.
    pub(crate) fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Call `f` with each quorum group this node holds a replica of (under
    /// the registry's read lock: `f` must not wait).
    pub(crate) fn each_quorum_group(&self, mut f: impl FnMut(&str, &Raft<QuorumConfig>)) {
        for (g, r) in self.groups.read().iter() {
            f(g, r);
        }
    }

    /// Whether the node named `name` is in reach: a link to it is open
    /// (links close after the election timeout without a word).
    pub fn reaches(&self, name: &str) -> bool {
        name == self.me.name || self.peers.open_link(name).is_some()
    }

    /// Quorum group calls this node has answered.
    pub fn quorum_calls(&self) -> u64 {
        self.quorum_calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The log this node's quorum queue replicas share.
    pub fn quorum_log(&self) -> &Arc<super::quorum::wal::Wal> {
        &self.quorum_log
    }

    /// Serve the calls of quorum queue group `group` with `raft`.
    /// `wrote` is set whenever the replica proposes an entry.
    pub fn add_group(
        &self,
        group: String,
        raft: Raft<QuorumConfig>,
        wrote: Arc<std::sync::atomic::AtomicBool>,
    ) {
        self.new_groups.lock().push((group.clone(), wrote));
        self.groups.write().insert(group, raft);
        self.groups_added.notify_waiters();
    }

    /// Groups added since the last call (the leadership watch looks at
    /// them at once rather than at its next full round).
    pub(crate) fn take_new_quorum_groups(
        &self,
    ) -> Vec<(String, Arc<std::sync::atomic::AtomicBool>)> {
        std::mem::take(&mut *self.new_groups.lock())
    }

    /// This node's replica of group `group`, if it holds one.
    pub(crate) fn quorum_group(&self, group: &str) -> Option<Raft<QuorumConfig>> {
        self.groups.read().get(group).cloned()
    }

    /// Stop serving group `group`.
    pub fn remove_group(&self, group: &str) {
        self.groups.write().remove(group);
        self.stream_logs.write().remove(group);
    }

    /// Group `group` is a replicated stream whose records are in `log`.
    pub fn add_stream_log(&self, group: String, log: Arc<crate::store::stream::StreamLog>) {
        self.stream_logs.write().insert(group, log);
    }

    /// [`Self::group`], waiting a moment for a group this node does not
    /// hold yet. A new queue's placed leader asks for votes as soon as it
    /// has applied the declaration, which its followers apply a few
    /// milliseconds apart: without the wait, each new queue's first
    /// election failed and logged, on every follower that was behind.
    async fn group_soon(&self, group: &str) -> Result<Raft<QuorumConfig>, String> {
        let wait = GROUP_WAIT.min(std::time::Duration::from_millis(
            self.settings.election_timeout_ms / 3,
        ));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.groups_added.notified();
            let mut added = std::pin::pin!(added);
            added.as_mut().enable();
            if let Some(raft) = self.groups.read().get(group).cloned() {
                return Ok(raft);
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return self.group(group);
            }
        }
    }

    fn group(&self, group: &str) -> Result<Raft<QuorumConfig>, String> {
        self.groups
            .read()
            .get(group)
            .cloned()
            .ok_or_else(|| format!("no replica of quorum queue group {group:?} on this node"))
    }

    /// The members of the cluster (voters), by name.
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .filter(|(id, _)| voters.contains(id))
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Hand the message traffic of every link to `sink`.
    pub fn set_traffic(&self, sink: Arc<dyn super::link::TrafficSink>) {
        let _ = self.peers.traffic().set(sink);
    }

    /// An open link to the member named `name`, if there is one now
    /// (without waiting: for senders that cannot).
    pub fn open_link(&self, name: &str) -> Option<Arc<Link>> {
        self.peers.open_link(name)
    }

    /// A link to the member named `name`, dialed if there is none.
    pub async fn link_to(&self, name: &str) -> Result<Arc<Link>, ClusterError> {
        if let Some(link) = self.peers.open_link(name) {
            return Ok(link);
        }
        // The message path waits on this (a publisher's confirm, a
        // consumer's subscription): a peer that does not answer within the
        // silence bound is as good as silent, and for that long after, it
        // is not dialed again from here, so that every publish to it is
        // refused at once instead of each waiting out a handshake.
        let bound = self.peers.liveness().silence;
        if let Some(at) = self.unanswered.lock().get(name)
            && at.elapsed() < bound
        {
            return Err(ClusterError::Raft(format!(
                "node '{name}' did not answer a moment ago"
            )));
        }
        let addr = {
            let m = self.raft.metrics().borrow().clone();
            m.membership_config
                .membership()
                .nodes()
                .find(|(_, member)| member.name == name)
                .map(|(_, member)| member.addr.clone())
        };
        let addr = addr.ok_or_else(|| ClusterError::Raft(format!("no member named '{name}'")))?;
        let dialed = tokio::time::timeout(bound, self.peers.link_to(Some(name), &addr)).await;
        let failed = match dialed {
            Ok(Ok(link)) => {
                if self.unanswered.lock().remove(name).is_some() {
                    tracing::info!(node = %name, "node answers the message path again");
                }
                return Ok(link);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("node '{name}' did not answer within {bound:?}"),
        };
        // Said once an outage, not once a message: every publish and
        // subscription for the node's queues fails the same way meanwhile.
        let first = self
            .unanswered
            .lock()
            .insert(name.to_owned(), std::time::Instant::now())
            .is_none();
        if first {
            tracing::warn!(node = %name, "node does not answer the message path; traffic for its queues is refused until it does: {failed}");
        }
        Err(ClusterError::Raft(failed))
    }

    /// `what`, summed over the other nodes' last reports (see
    /// [`super::presence`]): the peers this node has no open link to are
    /// not counted.
    pub fn counted_elsewhere(&self, what: super::presence::Count<'_>) -> u64 {
        self.presences
            .sum(what, |node| self.peers.open_link(node).is_some())
    }

    /// Send this node's `presence` to every other member that takes it,
    /// dialing those it has no link to; returns once each has answered or
    /// given up.
    pub async fn report_presence(&self, presence: &super::presence::Presence) {
        use super::link::FEATURE_PRESENCE;
        use super::presence::REFRESH;
        let calls = self
            .members()
            .into_iter()
            .filter(|m| m.name != self.me.name)
            .map(|m| async move {
                let Ok(link) = self.link_to(&m.name).await else {
                    return;
                };
                if link.peer_has(FEATURE_PRESENCE) {
                    let _ = link.call(Call::Presence(presence.clone()), REFRESH).await;
                }
            });
        futures::future::join_all(calls).await;
    }

    /// The peers due version `generation` of this node's exclusive queues
    /// ([`super::private`]), with the link to each.
    pub fn private_due(&self, generation: u64) -> Vec<Arc<super::link::Link>> {
        use super::link::FEATURE_PRIVATE;
        self.members()
            .into_iter()
            .filter(|m| m.name != self.me.name)
            .filter_map(|m| self.peers.open_link(&m.name))
            .filter(|l| {
                l.peer_has(FEATURE_PRIVATE) && self.private_reported.due(&l.peer, l.id, generation)
            })
            .collect()
    }

    /// Send version `generation` of this node's exclusive queues to the
    /// peers on `links`; returns once each has answered or given up.
    pub async fn report_private(
        &self,
        links: Vec<Arc<super::link::Link>>,
        queues: &super::private::PrivateQueues,
        generation: u64,
    ) {
        let calls = links.into_iter().map(|link| async move {
            let call = Call::Private(queues.clone());
            if link.call(call, super::private::REFRESH).await.is_ok() {
                self.private_reported.sent(&link.peer, link.id, generation);
            }
        });
        futures::future::join_all(calls).await;
    }

    /// A replicated queue's record as this node has applied it.
    pub fn queue_record(&self, vhost: &str, name: &str) -> Option<super::machine::QueueRecord> {
        self.machine.queue(vhost, name)
    }

    /// Wait (up to the commit timeout) until quorum queue `name`'s first
    /// leader has announced itself: a `declare-ok` then means the queue
    /// takes messages, as RabbitMQ's does once its group has a leader.
    pub async fn until_served(&self, vhost: &str, name: &str) {
        let deadline = tokio::time::Instant::now() + self.settings.commit_timeout();
        loop {
            // Registered before the check, so an apply between the two is
            // not missed.
            let applied = self.machine.applied().notified();
            let mut applied = std::pin::pin!(applied);
            applied.as_mut().enable();
            if self.machine.queue(vhost, name).is_none_or(|q| q.served) {
                return;
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return;
            }
        }
    }

    /// How many quorum queues each node leads, and holds a replica of.
    pub fn quorum_load(&self) -> (HashMap<String, usize>, HashMap<String, usize>) {
        self.machine.quorum_load()
    }

    /// The definitions as this node has applied them.
    pub fn catalog(&self) -> Catalog {
        self.machine.catalog()
    }

    /// Stop Raft and the listener.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let groups: Vec<Raft<QuorumConfig>> = self.groups.write().drain().map(|(_, r)| r).collect();
        for g in groups {
            let _ = g.shutdown().await;
        }
        let _ = self.raft.shutdown().await;
    }

    fn handler(self: &Arc<Self>) -> Handler {
        let weak = Arc::downgrade(self);
        Arc::new(move |call| {
            let node = weak.upgrade();
            Box::pin(async move {
                match node {
                    Some(node) => node.handle(call).await,
                    None => Err("node shutting down".into()),
                }
            })
        })
    }

    /// Connections to the cluster port still proving they hold the secret.
    pub fn handshakes_in_progress(&self) -> usize {
        self.handshakes.held()
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let handshakes = self.handshakes.clone();
        let refusals = Arc::new(crate::untrusted::Refusals::default());
        loop {
            let (stream, source) = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cluster listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Before a peer has proven anything it gets a bounded place or
            // none: the socket is closed at once.
            let slot = match handshakes.take(source.ip()) {
                Ok(slot) => slot,
                Err(full) => {
                    let why = match full {
                        crate::untrusted::Full::Total(n) => {
                            format!("{n} handshakes already in progress on this node")
                        }
                        crate::untrusted::Full::Key(n) => {
                            format!("{n} handshakes already in progress from this address")
                        }
                    };
                    if let Some(quiet) = refusals.admit(source.ip()) {
                        tracing::warn!(peer = %source, also_refused = quiet, "cluster connection refused: {why}");
                    }
                    drop(stream);
                    continue;
                }
            };
            let (node, refusals) = (self.clone(), refusals.clone());
            tokio::spawn(async move {
                let accepted = Link::accept(
                    stream,
                    &node.me.name,
                    node.peers.secret(),
                    node.handler(),
                    node.peers.traffic().clone(),
                    node.peers.tls(),
                    node.peers.liveness(),
                )
                .await;
                drop(slot);
                match accepted {
                    Ok(link) => {
                        tracing::debug!(peer = %link.peer, "cluster link accepted");
                        let _ = node.peers.adopt(&link);
                    }
                    Err(e) => {
                        if let Some(quiet) = refusals.admit(source.ip()) {
                            tracing::warn!(peer = %source, also_refused = quiet, "cluster connection refused: {e}");
                        }
                    }
                }
            });
        }
    }

    /// Answer a peer's call.
    async fn handle(self: Arc<Self>, call: Call) -> Result<Answer, String> {
        if matches!(
            call,
            Call::QuorumAppend { .. } | Call::QuorumVote { .. } | Call::QuorumSnapshot { .. }
        ) {
            self.quorum_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(match call {
            Call::AppendEntries(rpc) => Answer::AppendEntries(self.raft.append_entries(rpc).await),
            Call::Vote(rpc) => Answer::Vote(self.raft.vote(rpc).await),
            Call::InstallSnapshot(rpc) => {
                Answer::InstallSnapshot(self.raft.install_snapshot(rpc).await)
            }
            Call::Propose(command) => {
                Answer::Proposed(self.propose_here(command).await.map_err(|e| e.to_string()))
            }
            Call::Join(member) => Answer::Membership(self.admit(member).await),
            Call::Leave(name) => Answer::Membership(self.remove(&name).await),
            Call::QuorumAppend { group, rpc } => {
                Answer::AppendEntries(self.group_soon(&group).await?.append_entries(rpc).await)
            }
            Call::QuorumVote { group, rpc } => {
                Answer::Vote(self.group_soon(&group).await?.vote(rpc).await)
            }
            Call::QuorumSnapshot { group, rpc } => {
                Answer::InstallSnapshot(self.group_soon(&group).await?.install_snapshot(rpc).await)
            }
            Call::Private(queues) => {
                if queues.node != self.me.name
                    && let Some(sink) = self.peers.traffic().get()
                {
                    sink.private_queues(queues);
                }
                Answer::Noted
            }
            Call::StreamRead {
                group,
                from,
                max_bytes,
            } => {
                let log = self.stream_logs.read().get(&group).cloned();
                Answer::StreamChunk(match log {
                    Some(log) => {
                        let max = (max_bytes as usize).min(super::quorum::stream::CHUNK_BYTES);
                        // Reads of the stream's files, off the link's task.
                        tokio::task::spawn_blocking(move || {
                            super::quorum::stream::StreamChunk::read(&log, from, max)
                        })
                        .await
                        .unwrap_or_else(|e| Err(e.to_string()))
                    }
                    None => Err(format!("no replica of stream group {group:?} here")),
                })
            }
            Call::StreamOffset {
                group,
                name,
                offset,
            } => {
                // Proposed as its own entry: a consumer's offset is rare
                // beside the messages, and losing one only means a resumed
                // consumer reads a few messages again.
                let raft = self.group(&group)?;
                let op = super::quorum::Op {
                    enqueue: vec![super::quorum::Enqueue::consumer_offset(
                        &name,
                        offset,
                        crate::message::now_ms(),
                    )],
                    ..Default::default()
                };
                // Answered once committed; refused unless this node leads
                // (the caller tries the next leader).
                let rx = raft.client_write_ff(op).await.map_err(|e| e.to_string())?;
                match tokio::time::timeout(self.settings.commit_timeout(), rx).await {
                    Ok(Ok(Ok(_))) => Answer::Noted,
                    Ok(Ok(Err(e))) => return Err(e.to_string()),
                    _ => return Err("a stream consumer's offset was not committed in time".into()),
                }
            }
            Call::Presence(presence) => {
                if presence.node != self.me.name {
                    self.presences.record(presence);
                }
                Answer::Noted
            }
        })
    }

    /// The leader's member record, if this node knows who leads.
    fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let member = m.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, member))
    }

    /// Whether this node, leading, has heard from a majority lately. Raft
    /// lets a leader cut off from the majority go on appending entries it
    /// cannot commit, and such an entry may still be committed after the
    /// partition heals, long after its client was told it failed. Refusing
    /// up front keeps that error definite.
    fn leads_a_majority(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let recent = 2 * self.settings.heartbeat_ms.max(1) + self.settings.election_timeout_ms / 2;
        m.current_leader == Some(self.id)
            && m.millis_since_quorum_ack.is_some_and(|ms| ms <= recent)
    }

    /// Commit `command` on this node (it must lead): the outcome and its
    /// log index.
    async fn propose_here(&self, command: Command) -> Result<(Applied, u64), ClusterError> {
        let timeout = self.settings.commit_timeout();
        if !self.leads_a_majority() {
            return Err(self.no_quorum(timeout));
        }
        match tokio::time::timeout(timeout, self.raft.client_write(command)).await {
            Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ClusterError::NoQuorum {
                    after: timeout,
                    reason: format!(
                        "this node no longer leads (leader: {:?})",
                        f.leader_node.map(|n| n.name)
                    ),
                })
            }
            Ok(Err(e)) => Err(raft_err(e)),
            Err(_) => Err(ClusterError::NoQuorum {
                after: timeout,
                reason: "appended but not acknowledged by a majority in time; it takes effect only if the cluster commits it later".into(),
            }),
        }
    }

    fn no_quorum(&self, after: Duration) -> ClusterError {
        let m = self.raft.metrics().borrow().clone();
        let voters = m.membership_config.membership().voter_ids().count();
        ClusterError::NoQuorum {
            after,
            reason: match m.current_leader {
                Some(l) if l == self.id => format!(
                    "this node leads but has not heard from a majority of the {voters} voters lately"
                ),
                Some(_) => "the leader did not commit it".into(),
                None => format!("no leader is elected among the {voters} voters"),
            },
        }
    }

    /// Commit a definition change and wait until this node has applied it.
    /// Returns what applying it did (the same on every node).
    pub async fn propose(&self, command: Command) -> Result<Applied, ClusterError> {
        let timeout = self.settings.commit_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let (applied, index) = loop {
            let attempt = match self.leader() {
                Some((leader, _)) if leader == self.id => self.propose_here(command.clone()).await,
                Some((_, member)) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self
                        .peers
                        .call_node(
                            Some(&member.name),
                            &member.addr,
                            Call::Propose(command.clone()),
                            left,
                        )
                        .await
                    {
                        Ok(Answer::Proposed(Ok(r))) => Ok(r),
                        Ok(Answer::Proposed(Err(e))) => Err(ClusterError::NoQuorum {
                            after: timeout,
                            reason: format!("leader {}: {e}", member.name),
                        }),
                        Ok(a) => Err(raft_err(format!("unexpected answer {a:?}"))),
                        Err(e) => Err(ClusterError::NoQuorum {
                            after: timeout,
                            reason: e.to_string(),
                        }),
                    }
                }
                None => Err(self.no_quorum(timeout)),
            };
            match attempt {
                Ok(r) => break r,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::debug!("proposal not committed yet, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft
            .wait(Some(left.max(Duration::from_millis(100))))
            .applied_index_at_least(Some(index), "proposal applied here")
            .await
            .map_err(|_| self.no_quorum(timeout))?;
        Ok(applied)
    }

    /// Hand a membership change to the leader `leader`.
    async fn membership_on(&self, leader: &Member, call: Call, secs: u64) -> Result<(), String> {
        match self
            .peers
            .call_node(
                Some(&leader.name),
                &leader.addr,
                call,
                Duration::from_secs(secs),
            )
            .await
        {
            Ok(Answer::Membership(r)) => r,
            Ok(a) => Err(format!("unexpected answer {a:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// As the leader (or on its behalf), add `member`: a learner first,
    /// then a voter once it has caught up.
    async fn admit(&self, member: Member) -> Result<(), String> {
        let id = node_id(&member.name);
        match self.leader() {
            Some((leader, _)) if leader == self.id => {}
            Some((_, l)) => return self.membership_on(&l, Call::Join(member), 60).await,
            None => return Err("no leader yet".into()),
        }
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        if membership.voter_ids().any(|v| v == id) {
            if membership.get_node(&id) == Some(&member) {
                return Ok(());
            }
            return Err(format!(
                "a member named '{}' exists with another address",
                member.name
            ));
        }
        tracing::info!(node = %member.name, addr = %member.addr, "admitting a node: learner first");
        self.raft
            .add_learner(id, member.clone(), true)
            .await
            .map_err(|e| e.to_string())?;
        let mut voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(node = %member.name, "node joined as a voter");
        Ok(())
    }

    /// As the leader (or on its behalf), remove the member named `name`.
    async fn remove(&self, name: &str) -> Result<(), String> {
        let id = node_id(name);
        match self.leader() {
            Some((leader, _)) if leader == self.id => {}
            Some((_, l)) => return self.membership_on(&l, Call::Leave(name.into()), 30).await,
            None => return Err("no leader yet".into()),
        }
        let m = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != id)
            .collect();
        if voters.is_empty() {
            return Err("the last member cannot leave".into());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(node = %name, "node removed from the cluster");
        Ok(())
    }

    /// Join the cluster of the node at `peer` (`wasmq cluster join`): only
    /// a node that is not a member of a cluster yet may.
    pub async fn join_via(&self, peer: &str) -> Result<(), ClusterError> {
        if self.raft.is_initialized().await.map_err(raft_err)? {
            return Err(ClusterError::Settings(format!(
                "node '{}' is a member of a cluster already; `leave` it first",
                self.me.name
            )));
        }
        match self
            .peers
            .call(peer, Call::Join(self.me.clone()), Duration::from_secs(60))
            .await
        {
            Ok(Answer::Membership(Ok(()))) => Ok(()),
            Ok(Answer::Membership(Err(e))) => Err(raft_err(e)),
            Ok(a) => Err(raft_err(format!("unexpected answer {a:?}"))),
            Err(e) => Err(raft_err(e)),
        }
    }

    /// Ask the cluster to remove `name` (this node or another).
    pub async fn leave(&self, name: &str) -> Result<(), ClusterError> {
        self.remove(name).await.map_err(raft_err)
    }

    /// The peers to try: the configured addresses, then what `peer_dns`
    /// resolves to, without this node.
    async fn seeds(&self) -> Vec<String> {
        let mut seeds: Vec<String> = self.settings.peers.clone();
        if let Some(dns) = &self.settings.peer_dns {
            match tokio::net::lookup_host((dns.as_str(), self.settings.peer_port)).await {
                Ok(addrs) => seeds.extend(addrs.map(|a| a.to_string())),
                Err(e) => tracing::debug!(%dns, "peer DNS lookup: {e}"),
            }
        }
        seeds.retain(|s| *s != self.me.addr && *s != self.settings.listen);
        seeds.sort();
        seeds.dedup();
        seeds
    }

    /// Join through a peer, or start a cluster, unless this node is a
    /// member already.
    async fn join_loop(self: Arc<Self>) {
        let mut tries = 0u32;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.raft.is_initialized().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(_) => return,
            }
            for seed in self.seeds().await {
                match self
                    .peers
                    .call(&seed, Call::Join(self.me.clone()), Duration::from_secs(60))
                    .await
                {
                    Ok(Answer::Membership(Ok(()))) => {
                        tracing::info!(via = %seed, "joined the cluster");
                        return;
                    }
                    Ok(Answer::Membership(Err(e))) => {
                        tracing::info!(via = %seed, "join not accepted yet: {e}")
                    }
                    Ok(a) => tracing::warn!(via = %seed, "unexpected answer to a join: {a:?}"),
                    Err(e @ LinkError::Refused { .. }) => {
                        tracing::error!("cannot join through {seed}: {e}")
                    }
                    Err(e) => tracing::debug!("cannot join through {seed} yet: {e}"),
                }
            }
            // Only a node allowed to bootstrap starts a cluster of its own,
            // and only after its peers had a chance to answer.
            if self.settings.may_bootstrap() && (tries >= 3 || self.seeds().await.is_empty()) {
                let members = BTreeMap::from([(self.id, self.me.clone())]);
                match self.raft.initialize(members).await {
                    Ok(()) => {
                        self.started_new
                            .store(true, std::sync::atomic::Ordering::Release);
                        tracing::info!(node = %self.me.name, "started a new cluster")
                    }
                    Err(e) => tracing::debug!("initialize: {e}"),
                }
                return;
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Whether this process started a new cluster (it was allowed to
    /// bootstrap and no peer answered), rather than joining one.
    pub fn started_new_cluster(&self) -> bool {
        self.started_new.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Wait until this node is a voting member with a known leader.
    pub async fn until_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.raft.metrics();
        let id = self.id;
        tokio::time::timeout(
            timeout,
            rx.wait_for(|m| {
                m.current_leader.is_some()
                    && m.membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| v == id)
            }),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Whether this node is a voter and a leader is known.
    pub fn ready(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader.is_some()
            && m.membership_config
                .membership()
                .voter_ids()
                .any(|v| v == self.id)
    }

    /// Whether it has applied every definition change in its log.
    pub fn applied_all(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.last_applied.map(|l| l.index) >= m.last_log_index
    }

    /// What this node sees of the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let name_of = |id: NodeId| membership.get_node(&id).map(|n| n.name.clone());
        let mut members: Vec<MemberStatus> = membership
            .nodes()
            .map(|(id, n)| MemberStatus {
                name: n.name.clone(),
                addr: n.addr.clone(),
                id: *id,
                voter: voters.contains(id),
                leader: m.current_leader == Some(*id),
                matched_index: super::matched_index(&m, *id, self.id),
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        NodeStatus {
            node: self.me.name.clone(),
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            joined: !voters.is_empty(),
            leader: m.current_leader.and_then(name_of),
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            members,
        }
    }
}
