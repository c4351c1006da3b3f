//! Quorum queues' replication: every quorum queue is a Raft group of its
//! own, on the nodes that hold a replica of it, run by the same consensus
//! library (openraft) as the cluster's definitions and carried over the
//! same links (each call names its group).
//!
//! Why a group per queue, as RabbitMQ does: each queue has its own leader,
//! so leaders spread over the nodes and a queue's throughput is not bound
//! by one node's; a queue's log holds only its own messages, so it is
//! compacted as soon as its backlog is settled; and a node that holds no
//! replica of a queue does no work for it.
//!
//! * `op`: the log's entries (messages enqueued, settled, returned).
//! * `machine`: the replicated state (what the queue holds) and its
//!   snapshots.
//! * `network`: the group's RPCs over the node's links.
//! * `replica`: this node's replica: proposals and answers.
//! * `wal`: the write-ahead log a node's replicas share.
//! * `runtime`: tokio without openraft's idle ticker.
//! * `leadership`: elections and heartbeats driven by the node's links,
//!   so that an idle group costs nothing.
//! * `stream`: a replicated stream, the same group with a state machine
//!   that appends to each replica's stream log.
//!
//! What a quorum queue does with its messages (consumers, prefetch, TTL,
//! dead-lettering) is the broker's: its leader serves it as a queue whose
//! changes are proposed here (`nodes/quorum.rs`).

pub mod leadership;
pub mod machine;
pub mod network;
pub mod op;
pub mod replica;
pub mod runtime;
pub mod stream;
pub mod wal;

pub use machine::{Held, Live, QueueState};
pub use op::{Enqueue, MAX_BATCH, Op, Outcome, StoredMessage, entry_index, message_id};
pub use replica::{Holds, Replica, ReplicaMember, ReplicaStatus, group_name};

use super::{Member, NodeId};

openraft::declare_raft_types!(
    /// The Raft types of a quorum queue's log.
    pub QuorumConfig:
        D = Op,
        R = Outcome,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = runtime::QuorumRuntime,
);

impl super::log::LogConfig for QuorumConfig {
    const BINARY: bool = true;
}
