//! Several nodes as one broker: the broker's side of the cluster.
//!
//! `cluster/` is consensus and transport (openraft, the definitions log,
//! node links, quorum queues' Raft groups); `broker/` is the message's way
//! through one node. This folder joins them, so that neither has to know
//! the other's insides:
//!
//! * `definitions`: the broker as the definitions log's state machine
//!   ([`BrokerApplier`]): every committed declare, delete and bind applied
//!   to this node's vhosts, in the log's order.
//! * `remote`: messages to and from queues that live on other nodes:
//!   forwarded publishes and their confirms, consumers served across a
//!   link, settlements and requeues ([`remote::Remote`]); `traffic` is the
//!   frames they travel in.
//! * `private`: exclusive queues, which live and die with a connection on
//!   its node, made reachable from every node while their node's link is
//!   open (reported to peers, not agreed through the log).
//! * `quorum`: where a quorum queue's replicas are placed, and the live
//!   queue its leader serves from the group's replicated state.
//! * `plugins`: plugin versions and staged rollouts agreed by every node
//!   through the log.

pub mod definitions;
pub(crate) mod plugins;
pub mod private;
pub mod quorum;
pub mod remote;
pub mod traffic;

pub use definitions::{BrokerApplier, definition_commands};
