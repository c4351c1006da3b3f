//! The cluster: several wasmq nodes that clients see as one broker.
//!
//! The cluster's definitions (exchanges, queues and the node each lives
//! on, bindings) are a Raft state machine, replicated by openraft: a change
//! is proposed to the leader, committed once a majority of nodes has it on
//! disk, and applied by every node in log order. A client's `declare-ok`
//! is sent only after its own node applied the change, so what it declared
//! is what every node routes with; a minority cannot commit, so its
//! clients get an error instead of a half-made change. `docs/cluster.md`
//! explains the design and why openraft.
//!
//! * `command`: the log's entries (definition requests) and their outcome.
//! * `log`: the Raft log on disk.
//! * `machine`: the state machine: the definitions as data, and the
//!   broker they are applied to.
//! * `link`: the authenticated, framed TCP connection between two nodes.
//! * `network`: Raft's RPCs over the links.
//! * `node`: this node's Raft instance, joining and leaving, proposals.
//! * `settings`: the `[cluster]` section.
//! * `snapshot`: a state machine's snapshot file.
//! * `quorum`: quorum queues' Raft groups.
//! * `presence`: who is connected on the other nodes, for cluster-wide
//!   connection and channel limits.
//!
//! With no `[cluster]` section none of this runs, and a broker's message
//! path is what it is alone.

pub mod command;
mod group_commit;
pub mod link;
pub mod log;
pub mod machine;
pub mod network;
pub mod node;
pub mod presence;
pub mod private;
pub mod quorum;
pub mod settings;
mod snapshot;

use serde::{Deserialize, Serialize};

pub use command::{Applied, Command};
pub use machine::{
    Applier, CandidateRecord, Catalog, PluginEvent, PluginRecord, PluginVersionRecord,
};
pub use node::{ClusterError, ClusterNode, NodeStatus};
pub use settings::ClusterSettings;

/// A node's Raft id: derived from its name, so that it is the same after a
/// restart and on every node without a registry of ids.
pub type NodeId = u64;

/// What the cluster knows of a member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (`[cluster] name`).
    pub name: String,
    /// Where the other nodes reach it (`[cluster] listen`, or the
    /// advertised address).
    pub addr: String,
}

openraft::declare_raft_types!(
    /// The Raft types of the cluster's definitions log.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The last log index `id` is known to hold, as node `me` sees it: from
/// the leader's replication progress, or this node's own log.
pub(crate) fn matched_index<N: openraft::Node>(
    m: &openraft::RaftMetrics<NodeId, N>,
    id: NodeId,
    me: NodeId,
) -> Option<u64> {
    m.replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map(|l| l.index)
        .or_else(|| (id == me).then_some(m.last_log_index).flatten())
}

/// The Raft id of the node named `name`: the first 8 bytes of its SHA-256,
/// read big-endian (never 0, which openraft's tests treat specially).
pub fn node_id(name: &str) -> NodeId {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes")).max(1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::log::RaftLog;
    use super::machine::StateMachine;
    use super::*;

    struct OnDisk;

    impl StoreBuilder<TypeConfig, RaftLog, StateMachine, tempfile::TempDir> for OnDisk {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, RaftLog, StateMachine), StorageError<NodeId>> {
            let dir = tempfile::tempdir().unwrap();
            let log = RaftLog::open(&dir.path().join("raft.log")).unwrap();
            let sm = StateMachine::open(&dir.path().join("machine"), None)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own storage test suite, against the log and state
    /// machine on disk.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(OnDisk).unwrap();
    }

    struct Recorder(parking_lot::Mutex<Vec<Command>>);

    impl Applier for Recorder {
        fn apply(&self, command: &Command) -> Applied {
            self.0.lock().push(command.clone());
            match command {
                Command::DeleteQueue { name, .. } if name == "refused" => Applied::Refused {
                    code: 406,
                    text: "PRECONDITION_FAILED - refused".into(),
                },
                _ => Applied::Done,
            }
        }
        fn reset(&self, _catalog: &Catalog) {}
    }

    fn settings(name: &str, peers: Vec<String>) -> ClusterSettings {
        toml::from_str::<ClusterSettings>(&format!(
            "name = '{name}'\nlisten = '127.0.0.1:0'\nsecret = 'a test secret of some length'\nheartbeat_ms = 50\nelection_timeout_ms = 300\ncommit_timeout_ms = 3000"
        ))
        .map(|mut s| {
            s.peers = peers;
            s
        })
        .unwrap()
    }

    fn queue(name: &str) -> Command {
        Command::DeclareQueue {
            vhost: "/".into(),
            queue: crate::store::definitions::QueueDefinition {
                name: name.into(),
                ..Default::default()
            },
            durable: true,
            node: "a".into(),
            members: Vec::new(),
        }
    }

    /// Three nodes in one process (the integration tests run real
    /// processes): they form a cluster by joining through the first, a
    /// change proposed on a follower is applied everywhere in the same
    /// order, and a refusal is the same refusal everywhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_form_a_cluster_and_apply_the_same_changes() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let recorders: Vec<_> = (0..3)
            .map(|_| Arc::new(Recorder(Default::default())))
            .collect();
        let a = ClusterNode::start(
            settings("a", vec![]),
            dirs[0].path(),
            recorders[0].clone(),
            None,
        )
        .await
        .unwrap();
        let t = std::time::Duration::from_secs(20);
        assert!(a.until_ready(t).await, "a bootstraps");
        let mut nodes = vec![a.clone()];
        for (i, name) in ["b", "c"].into_iter().enumerate() {
            let n = ClusterNode::start(
                settings(name, vec![a.addr().to_owned()]),
                dirs[i + 1].path(),
                recorders[i + 1].clone(),
                None,
            )
            .await
            .unwrap();
            assert!(n.until_ready(t).await, "{name} joins");
            nodes.push(n);
        }
        let status = nodes[2].status();
        assert_eq!(status.members.len(), 3, "{status:?}");
        assert_eq!(status.leader.as_deref(), Some("a"));

        assert_eq!(nodes[2].propose(queue("q1")).await.unwrap(), Applied::Done);
        assert_eq!(nodes[1].propose(queue("q2")).await.unwrap(), Applied::Done);
        let refused = Command::DeleteQueue {
            vhost: "/".into(),
            name: "refused".into(),
            if_unused: false,
            if_empty: false,
        };
        assert!(matches!(
            nodes[2].propose(refused).await.unwrap(),
            Applied::Refused { code: 406, .. }
        ));
        // Every node applies all three, in the same order.
        for _ in 0..100 {
            if recorders.iter().all(|r| r.0.lock().len() == 3) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let seen: Vec<Vec<Command>> = recorders.iter().map(|r| r.0.lock().clone()).collect();
        assert_eq!(seen[0].len(), 3);
        assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
        for n in &nodes {
            assert_eq!(
                n.catalog().queues.len(),
                2,
                "the refused change is in no catalog"
            );
        }
        for n in &nodes {
            n.shutdown().await;
        }
    }
}
