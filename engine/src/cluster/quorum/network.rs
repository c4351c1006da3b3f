//! A quorum queue group's RPCs: the same links and calls as the
//! definitions log's, each naming its group, so any number of queues share
//! one connection per pair of nodes.

use openraft::error::{InstallSnapshotError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use std::sync::Arc;

use super::QuorumConfig;
use crate::cluster::link::{Answer, Call};
use crate::cluster::network::{Conn, Peers, unexpected};
use crate::cluster::{Member, NodeId};

/// openraft's view of the network, for one group.
pub struct GroupNetwork {
    /// The node's links.
    pub peers: Arc<Peers>,
    /// The group.
    pub group: String,
}

/// A client of one target node, for one group.
pub struct GroupConn {
    conn: Conn,
    group: String,
}

impl RaftNetworkFactory<QuorumConfig> for GroupNetwork {
    type Network = GroupConn;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> GroupConn {
        GroupConn {
            conn: Conn {
                peers: self.peers.clone(),
                target,
                member: node.clone(),
            },
            group: self.group.clone(),
        }
    }
}

impl RaftNetwork<QuorumConfig> for GroupConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<QuorumConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let call = Call::QuorumAppend {
            group: self.group.clone(),
            rpc,
        };
        match self.conn.call(call, &option).await? {
            Answer::AppendEntries(r) => r.map_err(|e| self.conn.remote(e)),
            a => Err(unexpected(&a)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<QuorumConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let call = Call::QuorumSnapshot {
            group: self.group.clone(),
            rpc,
        };
        match self.conn.call(call, &option).await? {
            Answer::InstallSnapshot(r) => r.map_err(|e| self.conn.remote(e)),
            a => Err(unexpected(&a)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let call = Call::QuorumVote {
            group: self.group.clone(),
            rpc,
        };
        match self.conn.call(call, &option).await? {
            Answer::Vote(r) => r.map_err(|e| self.conn.remote(e)),
            a => Err(unexpected(&a)),
        }
    }
}
