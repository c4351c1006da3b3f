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
//! * one task per node looks over its groups every keep-alive interval.
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
//!   stops growing, which carries the commit index to the followers.
//!
//! A leader that cannot reach a majority of its group's nodes nacks what
//! waits for a commit (see [`crate::cluster::quorum::replica`]).

use std::collections::{BTreeSet, HashMap, HashSet};
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
}

/// Nodes this node can reach now, as the links say; nodes without a link
/// are dialed in the background (one dial each at a time).
struct Reach {
    node: Weak<ClusterNode>,
    dialing: Arc<Mutex<HashSet<String>>>,
    known: HashMap<String, bool>,
}

impl Reach {
    fn reachable(&mut self, node: &Arc<ClusterNode>, name: &str) -> bool {
        if let Some(r) = self.known.get(name) {
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
        self.known.insert(name.to_owned(), open);
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
    let mut reachable_before: HashSet<String> = HashSet::new();
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
        let groups = node.quorum_groups();
        let now = Instant::now();
        // Which peers came back since the last round: leaders tell them.
        let mut peers: BTreeSet<String> = BTreeSet::new();
        for (_, raft) in &groups {
            let m = raft.metrics();
            let m = m.borrow();
            for (id, member) in m.membership_config.membership().nodes() {
                if *id != me {
                    peers.insert(member.name.clone());
                }
            }
        }
        let reachable_now: HashSet<String> = peers
            .iter()
            .filter(|p| reach.reachable(&node, p))
            .cloned()
            .collect();
        let returned: HashSet<&String> = reachable_now.difference(&reachable_before).collect();
        watched.retain(|g, _| groups.iter().any(|(name, _)| name == g));
        for (group, raft) in &groups {
            let w = watched.entry(group.clone()).or_default();
            look_after(raft, w, me, now, election, &returned, &mut reach, &node);
        }
        reachable_before = reachable_now;
    }
}

/// One round for one group.
#[allow(clippy::too_many_arguments)]
fn look_after(
    raft: &Raft<QuorumConfig>,
    w: &mut Watched,
    me: NodeId,
    now: Instant,
    election: Duration,
    returned: &HashSet<&String>,
    reach: &mut Reach,
    node: &Arc<ClusterNode>,
) {
    let (state, leader, last_index, voters, names, is_voter) = {
        let m = raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let names: HashMap<NodeId, String> = membership
            .nodes()
            .map(|(id, n)| (*id, n.name.clone()))
            .collect();
        (
            m.state,
            m.current_leader,
            m.last_log_index,
            voters.clone(),
            names,
            voters.contains(&me),
        )
    };
    if state == ServerState::Leader {
        w.leaderless_since = None;
        if !is_voter {
            // Removed from its own group: openraft steps such a leader
            // down on a tick once the change is applied.
            raft.runtime_config().tick(true);
            return;
        }
        let peer_back = names
            .iter()
            .any(|(id, name)| *id != me && returned.contains(name));
        let quiet = w.last_index == last_index;
        if last_index != w.last_index {
            w.last_index = last_index;
            w.settled = false;
        }
        if peer_back || (quiet && !w.settled) {
            w.settled = true;
            let raft = raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().heartbeat().await;
            });
        }
        return;
    }
    w.last_index = None;
    if !is_voter {
        return;
    }
    let leader_name = leader.filter(|l| *l != me).and_then(|l| names.get(&l));
    let known = leader_name.is_some();
    if let Some(name) = leader_name
        && reach.reachable(node, name)
    {
        w.leaderless_since = None;
        w.stood = None;
        return;
    }
    let since = *w.leaderless_since.get_or_insert(now);
    let others: Vec<NodeId> = voters
        .iter()
        .filter(|v| Some(**v) != leader && **v != me)
        .filter(|v| names.get(v).is_some_and(|n| reach.reachable(node, n)))
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
    let wait = if known { Duration::ZERO } else { election } + election * rank;
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
