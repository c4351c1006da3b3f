//! Who leads each quorum group, decided from the node's view of its peers
//! rather than from every group's own timers.
//!
//! Raft as openraft runs it gives every group a ticker, heartbeats from
//! its leader and an election timer on each follower. That is what made
//! a thousand idle quorum queues cost a third of a core on three nodes:
//! five heartbeats a second per group per follower, each a call over the
//! link and an answer, and a timer waking per group. But whether a
//! group's leader is alive is a question about its *node*, and the link
//! to that node already answers it: each side writes a keep-alive when it
//! has nothing else to say and closes a link it has not heard from for the
//! election timeout ([`crate::cluster::link::Liveness`]). So, as
//! CockroachDB coalesces range heartbeats per node pair and lets idle
//! ranges quiesce:
//!
//! * groups run without openraft's ticker: no heartbeats, no election
//!   timers; an idle group sends nothing;
//! * one task per node looks over its groups: every keep-alive interval
//!   those with something pending (and new ones), all of them when a node
//!   comes or goes and every 25th round (a look is a borrow of the
//!   group's metrics).
//!   A follower whose leader's node has no open link (it was reset, or
//!   went silent, or cannot be dialed) stands for election: the first of
//!   the group's reachable voters (by node id) at once, the next one
//!   election timeout later if there is still no leader, and so on, so
//!   that survivors do not split the vote; a candidate that was refused
//!   tries again after half an election timeout or so (openraft's leader
//!   lease makes a follower that heard from the leader within the
//!   election timeout refuse its vote);
//! * a group whose leader is unknown (this node just started) waits an
//!   election timeout first: a leader that is alive makes itself known by
//!   then, because
//! * a leader sends one heartbeat when a peer's node becomes reachable
//!   again (it restarted, or a partition healed: the peer learns who
//!   leads, or the leader learns it was replaced), and one after its log
//!   stops growing, which carries the commit index to the followers; and,
//!   while its log stays quiet, one each time it is looked at while a
//!   follower is behind (one that came back before its replica was open
//!   missed the first).
//!
//! A leader that cannot reach a majority of its group's nodes nacks what
//! waits for a commit (see [`crate::cluster::quorum::replica`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::{Raft, ServerState};
use parking_lot::Mutex;

use super::QuorumConfig;
use crate::cluster::{ClusterNode, NodeId};

/// What the watch remembers of one group between rounds.
#[derive(Default)]
struct Watched {
    /// Since when the group has had no leader this node can reach.
    leaderless_since: Option<Instant>,
    /// When this node last stood for election in it.
    stood: Option<Instant>,
    /// The last log index seen while leading, and whether the heartbeat
    /// that follows a burst of writes went out.
    last_index: Option<u64>,
    settled: bool,
    /// The round that last saw the group (groups gone are forgotten).
    seen: Option<Instant>,
    /// Whether a round looked at it yet.
    looked: bool,
    /// Set by the replica when it proposes (it leads and writes): the
    /// next round looks, and sends the heartbeat once writes stop.
    wrote: Option<Arc<AtomicBool>>,
    /// The last applied index the previous full round saw: unchanged
    /// since, the group is idle and its log may be compacted.
    applied_seen: Option<u64>,
}

/// Every this many rounds, every group is looked at (a leader that
/// wrote since, a leader change seen through a peer): every 5 s at the
/// default heartbeat.
const FULL_EVERY: u64 = 25;

/// An idle group with at least this many entries applied since its last
/// snapshot takes one (openraft's policy waits for 1,000).
const COMPACT_AFTER: u64 = 32;

impl Watched {
    /// Whether the group has something pending that the next round must
    /// look at (a new group has: it was never looked at).
    fn pending(&self) -> bool {
        self.leaderless_since.is_some()
            || (self.last_index.is_some() && !self.settled)
            || !self.looked
            || self
                .wrote
                .as_ref()
                .is_some_and(|w| w.load(Ordering::Relaxed))
    }
}

/// Which nodes this node can reach, as its links say, asked once per
/// round; nodes without a link are dialed in the background (one dial
/// each at a time), so that a link exists to every peer a group needs.
struct Reach {
    node: Weak<ClusterNode>,
    dialing: Arc<Mutex<HashSet<String>>>,
    /// This round's answers, by node id.
    known: HashMap<NodeId, bool>,
}

impl Reach {
    fn reachable(&mut self, node: &Arc<ClusterNode>, id: NodeId, name: &str) -> bool {
        if let Some(r) = self.known.get(&id) {
            return *r;
        }
        let open = node.open_link(name).is_some();
        if !open && self.dialing.lock().insert(name.to_owned()) {
            let (weak, dialing, name) = (self.node.clone(), self.dialing.clone(), name.to_owned());
            tokio::spawn(async move {
                if let Some(node) = weak.upgrade() {
                    let _ = node.link_to(&name).await;
                }
                dialing.lock().remove(&name);
            });
        }
        self.known.insert(id, open);
        open
    }
}

/// Watch the node's quorum groups until it stops.
pub(crate) async fn watch(node: Weak<ClusterNode>) {
    let Some(first) = node.upgrade() else {
        return;
    };
    let liveness = first.peers().liveness();
    let election = Duration::from_millis(first.settings().election_timeout_ms);
    let me = first.id();
    let stop = first.stopping();
    drop(first);
    let mut every = tokio::time::interval(liveness.keepalive);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut reachable_before: HashSet<NodeId> = HashSet::new();
    let mut round = 0u64;
    let dialing = Arc::new(Mutex::new(HashSet::new()));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some(node) = node.upgrade() else {
            return;
        };
        let mut reach = Reach {
            node: Arc::downgrade(&node),
            dialing: dialing.clone(),
            known: HashMap::new(),
        };
        // The cluster's members: which came back since the last round
        // (leaders of groups they belong to tell them who leads).
        let mut reachable_now = HashSet::new();
        for member in node.members() {
            let id = crate::cluster::node_id(&member.name);
            if id != me && reach.reachable(&node, id, &member.name) {
                reachable_now.insert(id);
            }
        }
        let returned: HashSet<NodeId> = reachable_now
            .difference(&reachable_before)
            .copied()
            .collect();
        let lost = reachable_before.difference(&reachable_now).next().is_some();
        reachable_before = reachable_now;
        // Every group is looked at when a node came or went, and once in
        // a while; in between, only those with something pending (an
        // election, the heartbeat after writes, a group not seen yet).
        round += 1;
        let full = lost || !returned.is_empty() || round.is_multiple_of(FULL_EVERY);
        let now = Instant::now();
        for (group, wrote) in node.take_new_quorum_groups() {
            watched.entry(group).or_default().wrote = Some(wrote);
        }
        if full {
            node.each_quorum_group(|group, raft| {
                let w = match watched.get_mut(group) {
                    Some(w) => w,
                    None => watched.entry(group.to_owned()).or_default(),
                };
                w.seen = Some(now);
                compact_if_idle(raft, w);
                look_after(raft, w, me, now, election, &returned, &mut reach, &node);
            });
            watched.retain(|_, w| w.seen == Some(now));
        } else {
            for (group, w) in watched.iter_mut().filter(|(_, w)| w.pending()) {
                if let Some(raft) = node.quorum_group(group) {
                    look_after(&raft, w, me, now, election, &returned, &mut reach, &node);
                }
            }
        }
    }
}

/// Compact the log of a group that has been idle since the previous full
/// round: a snapshot if enough was applied since the last one, then, once
/// the snapshot covers everything applied, the log up to it.
///
/// A replica holds its log entries in memory until a snapshot covers them
/// and the log is purged, and openraft's policy snapshots every 1,000
/// entries and keeps 100 after that: a queue that carried traffic and
/// then went quiet kept up to 1,100 entries (its messages' bodies among
/// them) for as long as it stayed quiet. A drained queue's snapshot is a
/// few bytes, so an idle group gives all of that back. Each replica
/// compacts its own log, as Raft has it; a leader purges only what every
/// member has (else a follower that was behind would need the snapshot).
fn compact_if_idle(raft: &Raft<QuorumConfig>, w: &mut Watched) {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let applied = m.last_applied.map(|l| l.index);
    let idle = applied.is_some() && w.applied_seen == applied;
    w.applied_seen = applied;
    let Some(applied) = applied.filter(|_| idle) else {
        return;
    };
    let snapshot = m.snapshot.map(|l| l.index);
    let purged = m.purged.map(|l| l.index);
    let raft = raft.clone();
    let since_snapshot = snapshot.map_or(applied + 1, |s| applied.saturating_sub(s));
    if since_snapshot >= COMPACT_AFTER {
        drop(m);
        tokio::spawn(async move {
            let _ = raft.trigger().snapshot().await;
        });
        return;
    }
    let Some(snapshot) = snapshot.filter(|s| Some(*s) != purged) else {
        return;
    };
    let everyone_has = m.replication.as_ref().is_none_or(|r| {
        r.values()
            .all(|matched| matched.is_some_and(|l| l.index >= snapshot))
    });
    drop(m);
    if everyone_has {
        tokio::spawn(async move {
            let _ = raft.trigger().purge_log(snapshot).await;
        });
    }
}

/// One round for one group: cheap when nothing is to be done (a borrow of
/// its metrics and a lookup), which is every round of an idle group.
#[allow(clippy::too_many_arguments)]
fn look_after(
    raft: &Raft<QuorumConfig>,
    w: &mut Watched,
    me: NodeId,
    now: Instant,
    election: Duration,
    returned: &HashSet<NodeId>,
    reach: &mut Reach,
    node: &Arc<ClusterNode>,
) {
    w.looked = true;
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let is_voter = |id: &NodeId| {
        m.membership_config
            .membership()
            .get_joint_config()
            .iter()
            .any(|c| c.contains(id))
    };
    if m.state == ServerState::Leader {
        w.leaderless_since = None;
        let membership = m.membership_config.membership();
        let peer_back =
            !returned.is_empty() && membership.nodes().any(|(id, _)| returned.contains(id));
        let wrote = w
            .wrote
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::Relaxed));
        let quiet = !wrote && w.last_index == m.last_log_index;
        if !quiet {
            w.last_index = m.last_log_index;
            w.settled = false;
        }
        // A follower behind while the log is quiet (it came back before
        // its replica was open, and the heartbeat that greeted its node
        // found no group to answer it): nothing else would send it what
        // it lacks until the next write.
        // Only towards nodes that can be reached: a dead one would cost a
        // call per group every full round.
        let lagging = quiet
            && w.settled
            && m.replication.as_ref().is_some_and(|r| {
                r.iter().any(|(id, l)| {
                    *id != me
                        && l.map(|l| l.index) < m.last_log_index
                        && membership
                            .get_node(id)
                            .is_some_and(|n| reach.reachable(node, *id, &n.name))
                })
            });
        if peer_back || (quiet && !w.settled) || lagging {
            w.settled = true;
            let raft = raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().heartbeat().await;
            });
        }
        return;
    }
    w.last_index = None;
    // A leader removed from the group (its replica is gone with it) is
    // no leader, though its node answers.
    let leader = m.current_leader.filter(|l| *l != me && is_voter(l));
    if let Some(l) = leader
        && reach.known.get(&l) == Some(&true)
    {
        w.leaderless_since = None;
        w.stood = None;
        return;
    }
    // No leader in reach: the slow path.
    if !is_voter(&me) {
        return;
    }
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let names: HashMap<NodeId, String> = membership
        .nodes()
        .map(|(id, n)| (*id, n.name.clone()))
        .collect();
    drop(m);
    if let Some(l) = leader
        && names
            .get(&l)
            .is_some_and(|name| reach.reachable(node, l, name))
    {
        w.leaderless_since = None;
        w.stood = None;
        return;
    }
    let since = *w.leaderless_since.get_or_insert(now);
    let others: Vec<NodeId> = voters
        .iter()
        .filter(|v| Some(**v) != leader && **v != me)
        .filter(|v| names.get(v).is_some_and(|n| reach.reachable(node, **v, n)))
        .copied()
        .collect();
    // A node cut off from most of its group cannot win, and each try
    // would raise its term for nothing (and unseat the real leader when it
    // came back): it stands only with a majority in reach.
    if (others.len() + 1) * 2 <= voters.len() {
        return;
    }
    // The survivors stand in turn, by node id.
    let rank = others.iter().filter(|v| **v < me).count() as u32;
    let wait = if leader.is_some() {
        Duration::ZERO
    } else {
        election
    } + election * rank;
    if now.duration_since(since) < wait {
        return;
    }
    let again = election / 2 + jitter(election / 4);
    if w.stood.is_some_and(|at| now.duration_since(at) < again) {
        return;
    }
    w.stood = Some(now);
    let raft = raft.clone();
    tokio::spawn(async move {
        let _ = raft.trigger().elect().await;
    });
}

/// A random duration below `max`, so that candidates refused together do
/// not try again together.
fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis().max(1) as u64;
    let mut n = [0u8; 8];
    let _ = getrandom::fill(&mut n);
    Duration::from_millis(u64::from_le_bytes(n) % ms)
}
