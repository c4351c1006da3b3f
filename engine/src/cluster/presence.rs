//! Who is connected on the other nodes: what cluster-wide limits count.
//!
//! RabbitMQ counts a vhost's and a user's `max-connections`, and a user's
//! `max-channels`, across the whole cluster: a client refused on one node
//! is refused on every node. Each node knows its own connections exactly
//! (they are counted under its registry's lock) and learns its peers'
//! counts from the peers themselves: a node sends its [`Presence`] to every
//! peer when one of its counts changes and at least every [`REFRESH`].
//!
//! A peer's report counts while the link to it is open and for [`FRESH`]
//! after it arrived. A node that dies takes its connections with it, and
//! its report goes with its link, so clients that move to a survivor are
//! not refused for connections that no longer exist.
//!
//! The count is eventually consistent: two logins on two nodes within one
//! report of each other can both take the last place (RabbitMQ's
//! connection tracking is asynchronous in the same way). The reports are
//! small (one number per vhost and per user with a connection) and only
//! sent on a change or every [`REFRESH`], so an idle cluster pays nothing
//! for them beyond one frame per peer per period.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// A node sends its presence at least this often, changed or not.
pub const REFRESH: Duration = Duration::from_secs(2);
/// A report older than this no longer counts (three missed refreshes).
pub const FRESH: Duration = Duration::from_secs(6);
/// A node waits this long after a change before it reports, so that a
/// burst of logins is one report, not hundreds.
pub const SETTLE: Duration = Duration::from_millis(20);

/// One node's connections and channels, counted by vhost and by user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The reporting node.
    pub node: String,
    /// Open connections per vhost.
    pub connections_by_vhost: BTreeMap<String, u32>,
    /// Open connections per user.
    pub connections_by_user: BTreeMap<String, u32>,
    /// Open channels per user.
    pub channels_by_user: BTreeMap<String, u32>,
}

/// What is counted.
#[derive(Clone, Copy, Debug)]
pub enum Count<'a> {
    /// Connections in a vhost.
    ConnectionsIn(&'a str),
    /// Connections of a user.
    ConnectionsOf(&'a str),
    /// Channels of a user.
    ChannelsOf(&'a str),
}

impl Presence {
    fn count(&self, what: Count<'_>) -> u64 {
        let (map, key) = match what {
            Count::ConnectionsIn(v) => (&self.connections_by_vhost, v),
            Count::ConnectionsOf(u) => (&self.connections_by_user, u),
            Count::ChannelsOf(u) => (&self.channels_by_user, u),
        };
        map.get(key).copied().map_or(0, u64::from)
    }
}

/// The last report of every peer.
#[derive(Debug, Default)]
pub struct Presences {
    by_node: Mutex<HashMap<String, (Presence, Instant)>>,
}

impl Presences {
    /// A peer reported.
    pub fn record(&self, presence: Presence) {
        self.by_node
            .lock()
            .insert(presence.node.clone(), (presence, Instant::now()));
    }

    /// The sum of `what` over the fresh reports of the peers `reachable`
    /// says are still there; stale reports are dropped on the way.
    pub fn sum(&self, what: Count<'_>, reachable: impl Fn(&str) -> bool) -> u64 {
        let mut by_node = self.by_node.lock();
        by_node.retain(|_, (_, at)| at.elapsed() < FRESH);
        by_node
            .iter()
            .filter(|(node, _)| reachable(node))
            .map(|(_, (p, _))| p.count(what))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, vhost: u32, user: u32, channels: u32) -> Presence {
        Presence {
            node: node.into(),
            connections_by_vhost: [("orders".to_owned(), vhost)].into(),
            connections_by_user: [("bob".to_owned(), user)].into(),
            channels_by_user: [("bob".to_owned(), channels)].into(),
        }
    }

    #[test]
    fn the_latest_report_of_each_reachable_peer_counts() {
        let p = Presences::default();
        p.record(report("a", 1, 1, 3));
        p.record(report("b", 2, 0, 0));
        p.record(report("a", 4, 2, 5));
        let all = |_: &str| true;
        assert_eq!(p.sum(Count::ConnectionsIn("orders"), all), 6);
        assert_eq!(p.sum(Count::ConnectionsOf("bob"), all), 2);
        assert_eq!(p.sum(Count::ChannelsOf("bob"), all), 5);
        assert_eq!(p.sum(Count::ConnectionsIn("other"), all), 0);
        assert_eq!(p.sum(Count::ConnectionsIn("orders"), |n| n != "a"), 2);
    }
}
