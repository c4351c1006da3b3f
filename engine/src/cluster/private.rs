//! Each node's private queues, as it reports them to its peers.
//!
//! An exclusive queue (an AMQP client's reply queue or subscription, a
//! Redis client's subscription) lives and dies with its connection, on the
//! connection's node, so it is not a definition the cluster agrees on
//! through Raft: a node that dies takes its connections, and with them
//! their queues. A message published on any node must reach it all the
//! same, as in RabbitMQ, where a client's reply queue hears the server's
//! answer whichever node the server is connected to.
//!
//! So a node tells its peers which exclusive queues it holds and how they
//! are bound: the whole set, after [`SETTLE`] once it changes, at once to a
//! peer on a link that is new, and every [`REFRESH`] in any case (a set
//! lost in a race with a reconnect is mended then). A peer serves the set
//! as queues of that node for as long as the link to it is open: a copy
//! routed to one is forwarded there like a copy for any queue of another
//! node, and when the link closes they are gone at once, so no publish
//! waits for a node that is not there.
//!
//! Eventually consistent, like [`super::presence`]: a binding made on one
//! node is heard by the others within a settle and a link's round trip.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::definitions::BindingDefinition;

/// A node waits this long after a change before it reports, so that a
/// burst of subscriptions is one report, not hundreds.
pub const SETTLE: Duration = Duration::from_millis(10);
/// A node reports its set at least this often, changed or not.
pub const REFRESH: Duration = Duration::from_secs(10);

/// One node's exclusive queues and their bindings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivateQueues {
    /// The reporting node.
    pub node: String,
    /// Its exclusive queues.
    pub queues: Vec<PrivateQueue>,
}

/// One exclusive queue, as its node reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivateQueue {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// Its bindings (the default exchange's is implied).
    pub bindings: Vec<BindingDefinition>,
}

/// What this node last sent each peer: on which link, which version of
/// its set, and when.
#[derive(Debug, Default)]
pub struct Reported {
    by_peer: Mutex<HashMap<String, (u64, u64, Instant)>>,
}

impl Reported {
    /// Whether `peer`, reached over link `link`, is due version
    /// `generation` of the set.
    pub fn due(&self, peer: &str, link: u64, generation: u64) -> bool {
        match self.by_peer.lock().get(peer) {
            Some((l, g, at)) => *l != link || *g != generation || at.elapsed() >= REFRESH,
            None => true,
        }
    }

    /// `peer` took version `generation` over link `link`.
    pub fn sent(&self, peer: &str, link: u64, generation: u64) {
        self.by_peer
            .lock()
            .insert(peer.to_owned(), (link, generation, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_due_the_set_on_a_new_link_or_a_new_version() {
        let r = Reported::default();
        assert!(r.due("b", 1, 0));
        r.sent("b", 1, 0);
        assert!(!r.due("b", 1, 0));
        assert!(r.due("b", 2, 0), "a new link");
        assert!(r.due("b", 1, 1), "a new version");
        assert!(r.due("c", 1, 0), "another peer");
    }
}
