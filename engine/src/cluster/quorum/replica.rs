//! One node's replica of a quorum queue: a Raft group of its own (log,
//! state machine, openraft instance), proposals from the broker's live
//! queue, and the answers publishers wait for.
//!
//! Proposals never block the caller (an AMQP connection's task, a link's
//! reader). What the live queue reports (messages published, settled,
//! returned) is gathered and proposed as one entry per round: at most
//! [`IN_FLIGHT`] entries wait for their commit at a time, and whatever
//! arrives meanwhile goes into the next one, so a busy queue commits many
//! messages per round trip and per sync (Raft's own group commit), and an
//! idle one proposes each message at once. openraft takes a write through
//! an unbounded channel, so handing it over completes at once and keeps
//! the callers' order, which is the queue's order. The commits are awaited
//! by one task per replica, in order, which then answers the publishers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use openraft::{Config, Raft, ServerState, SnapshotPolicy};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::QuorumConfig;
use super::machine::QuorumMachine;
use super::network::GroupNetwork;
use super::op::{Enqueue, MAX_BATCH, Op, Outcome, StoredMessage};
use crate::broker::{Replicated, Reply};
use crate::cluster::log::RaftLog;
use crate::cluster::{ClusterError, ClusterNode, Member, NodeId, node_id};
use crate::message::Message;

/// A proposed entry's outcome, once committed and applied (`None`: it was
/// not, e.g. this node no longer leads).
type Commit = Pin<Box<dyn Future<Output = Option<Outcome>> + Send>>;

/// Entries proposed and not yet committed, at most.
pub const IN_FLIGHT: usize = 2;

/// What the live queue reported since the last proposal.
#[derive(Default)]
struct Gathered {
    op: Op,
    /// One per message in `op.enqueue`.
    replies: Vec<Option<Reply>>,
    in_flight: usize,
}

/// How long this leader may deliver without hearing from a majority
/// again. A follower that acknowledged an entry refuses its vote for the
/// follower lease (openraft's `election_timeout_max`) after it received
/// it, so no other leader can be elected within that time of the entry's
/// sending: a lease counted from when the entry was proposed (before it
/// was sent), three quarters of the follower's, is safe with room to
/// spare for the clocks' rates and the scheduler.
struct Lease {
    /// Milliseconds since [`epoch`]: deliveries may go until then.
    until: std::sync::atomic::AtomicU64,
    /// Its length.
    ms: u64,
    /// A confirmation round is under way.
    confirming: std::sync::atomic::AtomicBool,
}

/// The process's own clock for leases (monotonic; a paused process finds
/// its leases run out).
fn epoch_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

impl Lease {
    fn holds(&self) -> bool {
        epoch_ms() < self.until.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A majority acknowledged what was sent after `since`.
    fn renew(&self, since: u64) {
        self.until
            .fetch_max(since + self.ms, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Gathers a replica's changes into entries and proposes them.
struct Proposer {
    lease: Arc<Lease>,
    raft: Raft<QuorumConfig>,
    /// Told to the leadership watch: this group wrote.
    wrote: Arc<std::sync::atomic::AtomicBool>,
    queue: String,
    gathered: Mutex<Gathered>,
    commits: mpsc::UnboundedSender<(Commit, Vec<Option<Reply>>)>,
}

impl Proposer {
    fn add(&self, f: impl FnOnce(&mut Gathered)) {
        let mut g = self.gathered.lock();
        f(&mut g);
        if g.in_flight < IN_FLIGHT || g.op.enqueue.len() >= MAX_BATCH {
            self.propose(&mut g);
        }
    }

    fn propose(&self, g: &mut Gathered) {
        if g.op.is_empty() {
            return;
        }
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
        let op = std::mem::take(&mut g.op);
        let replies = std::mem::take(&mut g.replies);
        g.in_flight += 1;
        let (since, lease) = (epoch_ms(), self.lease.clone());
        let commit: Commit = match now_or_never(self.raft.client_write_ff(op)) {
            Some(Ok(rx)) => Box::pin(async move {
                match rx.await {
                    Ok(Ok(r)) => {
                        lease.renew(since);
                        Some(r.data)
                    }
                    _ => None,
                }
            }),
            Some(Err(e)) => {
                tracing::debug!(queue = %self.queue, "quorum proposal refused: {e}");
                Box::pin(async { None })
            }
            None => Box::pin(async { None }),
        };
        if let Err(mpsc::error::SendError((_, replies))) = self.commits.send((commit, replies)) {
            for reply in replies.into_iter().flatten() {
                reply(false);
            }
        }
    }

    /// An entry was committed (or failed): propose what gathered meanwhile.
    fn done(&self) {
        let mut g = self.gathered.lock();
        g.in_flight = g.in_flight.saturating_sub(1);
        self.propose(&mut g);
    }
}

/// One member's line in a quorum queue's status.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaMember {
    /// Node name.
    pub node: String,
    /// The last log index the leader knows it holds (on the leader).
    pub matched: Option<u64>,
}

/// What `wasmq queues` and the admin API show of a quorum queue's replica.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The leader's node, if known.
    pub leader: Option<String>,
    /// Raft term.
    pub term: u64,
    /// The members.
    pub members: Vec<ReplicaMember>,
    /// This replica's last log index.
    pub last_log_index: Option<u64>,
    /// This replica's last applied index.
    pub last_applied: Option<u64>,
    /// The index its last snapshot covers (the log before it is gone).
    pub snapshot_index: Option<u64>,
    /// Messages this replica holds (ready or out for delivery).
    pub messages: usize,
}

/// What a group's replicas keep of its log's entries.
pub enum Holds {
    /// A quorum queue's messages until they are settled, deduplicated
    /// with `dedup` if the queue does.
    Messages {
        /// The queue's deduplication settings.
        dedup: Option<crate::dedup::Settings>,
    },
    /// A replicated stream's records, appended to this log.
    Stream(Arc<crate::store::stream::StreamLog>),
}

/// A replica of one quorum queue on this node.
pub struct Replica {
    /// The queue's vhost.
    pub vhost: String,
    /// The queue's name.
    pub queue: String,
    /// The group's name on the wire.
    pub group: String,
    id: NodeId,
    raft: Raft<QuorumConfig>,
    machine: QuorumMachine,
    node: Arc<ClusterNode>,
    dir: PathBuf,
    proposer: Arc<Proposer>,
    /// Delivery counts as the leader's live queue knows them.
    counts: Mutex<HashMap<u64, u32>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The name of the node leading `raft`'s group, if known.
fn leader_name(raft: &Raft<QuorumConfig>) -> Option<String> {
    let m = raft.metrics().borrow().clone();
    let leader = m.current_leader?;
    m.membership_config
        .membership()
        .get_node(&leader)
        .map(|n| n.name.clone())
}

/// The group name of `vhost`'s queue `name`.
pub fn group_name(vhost: &str, name: &str) -> String {
    format!("{vhost}\u{0}{name}")
}

/// Poll a future once: for openraft's write calls, which only queue a
/// message and are ready at once.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

impl Replica {
    /// Open (or create) this node's replica of `vhost`'s queue `name` in
    /// `dir`. With `bootstrap`, a new group is started with `members`
    /// (this node among them), and this node stands for leader first.
    pub async fn open(
        node: Arc<ClusterNode>,
        vhost: &str,
        name: &str,
        members: &[Member],
        bootstrap: bool,
        dir: &Path,
        holds: Holds,
    ) -> Result<Arc<Replica>, ClusterError> {
        let (dedup, stream) = match holds {
            Holds::Messages { dedup } => (dedup, None),
            Holds::Stream(log) => (None, Some(log)),
        };
        let group = group_name(vhost, name);
        let storage = |reason: String| ClusterError::Storage {
            dir: dir.display().to_string(),
            reason,
        };
        let wal = node.quorum_log();
        // A replica an older version kept in a log file of its own moves
        // into the node's shared log (durably) before the file goes.
        let own = dir.join("raft.log");
        if own.exists() {
            let old: RaftLog<QuorumConfig> =
                RaftLog::open(&own).map_err(|e| storage(e.to_string()))?;
            let (vote, committed, purged, entries) = old.state();
            wal.adopt(&group, vote, committed, purged, entries)
                .map_err(|e| storage(e.to_string()))?;
            drop(old);
            std::fs::remove_file(&own).map_err(|e| storage(e.to_string()))?;
        }
        let log = wal.group(&group).map_err(|e| storage(e.to_string()))?;
        let source = stream.clone().map(|log| {
            let source: Arc<dyn super::stream::Source> = Arc::new(super::stream::PeerSource {
                node: Arc::downgrade(&node),
                group: group.clone(),
            });
            (log, source)
        });
        let machine = QuorumMachine::open(&dir.join("machine"), dedup, source)
            .map_err(|e| storage(e.to_string()))?;
        if let Some(log) = stream {
            node.add_stream_log(group.clone(), log);
        }
        let s = node.settings();
        let (heartbeat, election_min, election_max, timers) = if s.quiescent_quorum {
            // Elections and heartbeats come from the node's watch over its
            // links ([`super::leadership`]), not from a ticker per group.
            // What openraft still takes from these: the leader lease (a
            // follower refuses its vote for `election_timeout_max` after
            // it last heard from the leader) and the time a replication
            // call may take (`heartbeat_interval`).
            let lease = s.election_timeout_ms.max(4);
            (lease - 2, lease - 1, lease, false)
        } else {
            let (min, max) = s.election_range();
            (s.heartbeat_ms, min, max, true)
        };
        let config = Config {
            cluster_name: format!("wasmq-quorum-{name}"),
            heartbeat_interval: heartbeat,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            enable_tick: timers,
            enable_heartbeat: timers,
            enable_elect: timers,
            // The snapshot is the backlog; the log before it goes. An
            // entry holds a round of messages, so a thousand of them is
            // already many messages.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1_000),
            max_in_snapshot_log_to_keep: 100,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Settings(e.to_string()))?;
        let id = node_id(node.name());
        let raft = Raft::new(
            id,
            Arc::new(config),
            GroupNetwork {
                peers: node.peers().clone(),
                group: group.clone(),
            },
            log,
            machine.clone(),
        )
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let wrote = Arc::new(std::sync::atomic::AtomicBool::new(false));
        node.add_group(group.clone(), raft.clone(), wrote.clone());
        if bootstrap
            && !raft
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?
        {
            let members: BTreeMap<NodeId, Member> = members
                .iter()
                .map(|m| (node_id(&m.name), m.clone()))
                .collect();
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(queue = %name, "quorum group initialize: {e}");
            }
        }
        let (commits, rx) = mpsc::unbounded_channel();
        let lease = Arc::new(Lease {
            until: 0.into(),
            ms: raft.config().election_timeout_max * 3 / 4,
            confirming: false.into(),
        });
        let proposer = Arc::new(Proposer {
            lease,
            raft: raft.clone(),
            wrote,
            queue: name.to_owned(),
            gathered: Mutex::default(),
            commits,
        });
        tokio::spawn(answer_commits(
            Arc::downgrade(&proposer),
            rx,
            raft.clone(),
            Arc::downgrade(&node),
        ));
        Ok(Arc::new(Replica {
            vhost: vhost.to_owned(),
            queue: name.to_owned(),
            group,
            id,
            raft,
            machine,
            node,
            dir: dir.to_owned(),
            proposer,
            counts: Mutex::default(),
        }))
    }

    /// The Raft instance (leadership is watched through its metrics).
    pub fn raft(&self) -> &Raft<QuorumConfig> {
        &self.raft
    }

    /// The state machine.
    pub fn machine(&self) -> &QuorumMachine {
        &self.machine
    }

    /// Start serving from a live queue: the delivery counts it starts
    /// with.
    pub fn take_counts(&self, counts: HashMap<u64, u32>) {
        *self.counts.lock() = counts;
    }

    /// Whether this replica leads its group now.
    pub fn leads(&self) -> bool {
        // Read in place: the metrics hold the membership, too dear to copy
        // on every check.
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The leader's name, if known.
    pub fn leader(&self) -> Option<String> {
        leader_name(&self.raft)
    }

    /// What this replica knows of its group.
    pub fn status(&self) -> ReplicaStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let mut members: Vec<ReplicaMember> = membership
            .nodes()
            .map(|(id, n)| ReplicaMember {
                node: n.name.clone(),
                matched: crate::cluster::matched_index(&m, *id, self.id),
            })
            .collect();
        members.sort_by(|a, b| a.node.cmp(&b.node));
        let (messages, last_applied) = self.machine.counts();
        ReplicaStatus {
            leader: m
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|n| n.name.clone())),
            term: m.current_term,
            members,
            last_log_index: m.last_log_index,
            last_applied,
            snapshot_index: m.snapshot.map(|l| l.index),
            messages,
        }
    }

    /// Add the node `member` to the group (RabbitMQ's grow): a learner
    /// until it has caught up, then a voter.
    pub async fn add_member(&self, member: Member) -> Result<(), String> {
        let id = node_id(&member.name);
        self.raft
            .add_learner(id, member, true)
            .await
            .map_err(|e| e.to_string())?;
        let m = self.raft.metrics().borrow().clone();
        let mut voters: std::collections::BTreeSet<NodeId> =
            m.membership_config.membership().voter_ids().collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Remove the node named `name` from the group (RabbitMQ's shrink).
    pub async fn remove_member(&self, name: &str) -> Result<(), String> {
        let id = node_id(name);
        let m = self.raft.metrics().borrow().clone();
        let voters: std::collections::BTreeSet<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != id)
            .collect();
        if voters.is_empty() {
            return Err("the last member of a quorum queue cannot be removed".into());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Stop this replica (the node shuts down, or leaves the group).
    pub async fn shutdown(&self) {
        self.node.remove_group(&self.group);
        let _ = self.raft.shutdown().await;
    }

    /// Stop and delete this replica's data (the queue was deleted).
    pub async fn destroy(&self) {
        self.shutdown().await;
        if let Err(e) = self.node.quorum_log().drop_group(&self.group) {
            tracing::warn!(queue = %crate::untrusted::text(&self.queue), "removing a deleted quorum queue's log: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "removing a deleted quorum queue's replica: {e}");
        }
    }
}

/// Answer publishers in commit order, then let the next entry go. A
/// leader that cannot reach a majority of its group's nodes (it is cut
/// off, or its peers are paused: their links closed after the election
/// timeout without a word) answers what waits with a nack instead of
/// holding it until the partition heals: its publishers may publish
/// again, to the leader the majority elects meanwhile. Such an entry may
/// still commit should this node keep its leadership after the heal; the
/// nack promised nothing either way, as AMQP's does not.
async fn answer_commits(
    proposer: std::sync::Weak<Proposer>,
    mut rx: mpsc::UnboundedReceiver<(Commit, Vec<Option<Reply>>)>,
    raft: Raft<QuorumConfig>,
    node: std::sync::Weak<ClusterNode>,
) {
    while let Some((commit, replies)) = rx.recv().await {
        let outcome = tokio::select! {
            outcome = commit => outcome,
            () = majority_lost(&raft, &node) => None,
        };
        for (i, reply) in replies.into_iter().enumerate() {
            if let Some(reply) = reply {
                reply(
                    outcome
                        .as_ref()
                        .is_some_and(|o| o.taken.get(i).copied().unwrap_or(false)),
                );
            }
        }
        if let Some(p) = proposer.upgrade() {
            p.done();
        }
    }
}

/// Resolves once this node leads but no majority of its group has been
/// heard from for the election timeout: acknowledgements of the group's
/// own heartbeats say so, or, when groups are quiescent (they send
/// nothing while idle), the node's links to the voters' nodes.
async fn majority_lost(raft: &Raft<QuorumConfig>, node: &std::sync::Weak<ClusterNode>) {
    let (every, silence, quiescent) = match node.upgrade() {
        Some(n) => {
            let live = n.peers().liveness();
            (
                (live.keepalive / 2).max(std::time::Duration::from_millis(10)),
                live.silence,
                n.settings().quiescent_quorum,
            )
        }
        None => return std::future::pending().await,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(node) = node.upgrade() else {
            return std::future::pending().await;
        };
        let lost = {
            let m = raft.metrics();
            let m = m.borrow();
            if !quiescent {
                if m.state == ServerState::Leader
                    && m.millis_since_quorum_ack
                        .is_some_and(|ms| ms > silence.as_millis() as u64)
                {
                    return;
                }
                continue;
            }
            let membership = m.membership_config.membership();
            let names: HashMap<NodeId, &str> = membership
                .nodes()
                .map(|(id, n)| (*id, n.name.as_str()))
                .collect();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let reached = voters
                .iter()
                .filter(|v| names.get(v).is_some_and(|n| node.reaches(n)))
                .count();
            m.state == ServerState::Leader && reached * 2 <= voters.len()
        };
        if lost {
            return;
        }
    }
}

impl Replica {
    /// Propose `message`, published at `published_ms` (a message this
    /// node kept before the queue was replicated keeps its own time, so
    /// its TTL and delays count from it).
    pub fn enqueue_at(&self, message: &Message, published_ms: u64, reply: Option<Reply>) {
        let e = Enqueue {
            published_ms,
            message: StoredMessage::of(message),
        };
        self.proposer.add(|g| {
            g.op.enqueue.push(e);
            g.replies.push(reply);
        });
    }
}

impl Replicated for Replica {
    fn enqueue(&self, message: Arc<Message>, reply: Option<Reply>) {
        self.enqueue_at(&message, crate::message::now_ms(), reply);
    }

    fn stream_offset(&self, name: &str, offset: u64) {
        let e = Enqueue::consumer_offset(name, offset, crate::message::now_ms());
        if self.leads() {
            self.proposer.add(|g| {
                g.op.enqueue.push(e);
                g.replies.push(None);
            });
            return;
        }
        // A reader on a follower: the leader puts it in the log. Through a
        // failover, the next leader does (a later offset of the name makes
        // this one moot, so a few tries are enough).
        let (raft, node, group, name) = (
            self.raft.clone(),
            self.node.clone(),
            self.group.clone(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            for _ in 0..40 {
                let leader = leader_name(&raft);
                if leader.as_deref() == Some(node.name()) {
                    let op = Op {
                        enqueue: vec![Enqueue::consumer_offset(
                            &name,
                            offset,
                            crate::message::now_ms(),
                        )],
                        ..Default::default()
                    };
                    if let Ok(rx) = raft.client_write_ff(op).await
                        && matches!(rx.await, Ok(Ok(_)))
                    {
                        return;
                    }
                } else if let Some(link) = leader.and_then(|l| node.peers().open_link(&l)) {
                    let call = crate::cluster::link::Call::StreamOffset {
                        group: group.clone(),
                        name: name.clone(),
                        offset,
                    };
                    let sent = link.call(call, std::time::Duration::from_secs(2)).await;
                    if matches!(sent, Ok(crate::cluster::link::Answer::Noted)) {
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
    }

    fn settled(&self, ids: Vec<u64>) {
        {
            let mut counts = self.counts.lock();
            for id in &ids {
                counts.remove(id);
            }
        }
        self.proposer.add(|g| g.op.settle.extend(ids));
    }

    fn returned(&self, ids: &[u64]) -> Vec<u32> {
        let counts: Vec<u32> = {
            let mut c = self.counts.lock();
            ids.iter()
                .map(|id| {
                    let n = c.entry(*id).or_insert(0);
                    *n += 1;
                    *n
                })
                .collect()
        };
        self.proposer.add(|g| g.op.returned.extend_from_slice(ids));
        counts
    }

    fn leads_surely(&self) -> bool {
        self.proposer.lease.holds()
    }

    fn confirm_then_dispatch(&self, queue: std::sync::Weak<crate::broker::Queue>) {
        use std::sync::atomic::Ordering;
        let lease = self.proposer.lease.clone();
        if lease.confirming.swap(true, Ordering::AcqRel) {
            return;
        }
        let raft = self.raft.clone();
        let wait = std::time::Duration::from_millis(lease.ms.max(10));
        tokio::spawn(async move {
            // Until confirmed, or this node no longer leads (its live queue
            // is about to go), or the live queue is gone.
            let mut confirmed = false;
            while queue.strong_count() > 0 {
                let since = epoch_ms();
                match tokio::time::timeout(wait, raft.ensure_linearizable()).await {
                    Ok(Ok(_)) => {
                        lease.renew(since);
                        confirmed = true;
                        break;
                    }
                    Ok(Err(e)) if e.forward_to_leader().is_some() => break,
                    _ => tokio::time::sleep(wait / 4).await,
                }
            }
            lease.confirming.store(false, Ordering::Release);
            if confirmed && let Some(q) = queue.upgrade() {
                q.dispatch();
            }
        });
    }
}
