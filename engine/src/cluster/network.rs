//! Raft's RPCs over the links between nodes, and the registry of those
//! links.
//!
//! openraft asks for a client per target node ([`RaftNetworkFactory`]);
//! each client here is a name and an address, and every call goes through
//! [`Peers`], which keeps one [`Link`] per peer and dials again when it
//! broke. A link carries calls both ways, so a link a peer dialed to this
//! node serves this node's calls to it as well: a pair of nodes shares one
//! connection (two only for a moment, when both dial at once). Dials to
//! different nodes never wait for each other: a paused node's handshake
//! timeout must not hold up the votes of the others.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::Mutex;

use super::link::{Answer, Call, Handler, Link, LinkError, TrafficSlot};
use super::{Member, NodeId, TypeConfig};

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;

/// This node's links: by peer name (dialed or accepted), and the dial
/// slots by address.
pub struct Peers {
    me: String,
    secret: Vec<u8>,
    liveness: super::link::Liveness,
    tls: Option<Arc<crate::tls::Tls>>,
    handler: OnceLock<Handler>,
    traffic: TrafficSlot,
    slots: Mutex<HashMap<String, Slot>>,
    by_name: Mutex<HashMap<String, Arc<Link>>>,
}

impl Peers {
    /// The registry of node `me`, proving `secret` (over TLS with `tls`),
    /// its links telling live peers from silent ones by `liveness`.
    pub fn new(
        me: String,
        secret: Vec<u8>,
        tls: Option<Arc<crate::tls::Tls>>,
        liveness: super::link::Liveness,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            me,
            secret,
            liveness,
            tls,
            handler: OnceLock::new(),
            traffic: TrafficSlot::default(),
            slots: Mutex::default(),
            by_name: Mutex::default(),
        })
    }

    /// Set what answers the calls peers make over links this node dialed.
    pub fn set_handler(&self, handler: Handler) {
        let _ = self.handler.set(handler);
    }

    /// Where every link (dialed or accepted) hands its message traffic.
    pub fn traffic(&self) -> &TrafficSlot {
        &self.traffic
    }

    /// An open link to the node named `name`, if there is one now.
    pub fn open_link(&self, name: &str) -> Option<Arc<Link>> {
        self.by_name
            .lock()
            .get(name)
            .filter(|l| !l.is_closed())
            .cloned()
    }

    /// TLS for links, if configured.
    pub fn tls(&self) -> Option<&crate::tls::Tls> {
        self.tls.as_deref()
    }

    /// How links tell live peers from silent ones.
    pub fn liveness(&self) -> super::link::Liveness {
        self.liveness
    }

    /// The cluster secret.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// This node's name.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Use `link` (one `link.peer` dialed to this node, or one this node
    /// dialed) for everything sent to that peer, unless an open one to
    /// it exists; returns the link that carries it.
    ///
    /// Every sender takes the same link while it is open, because the
    /// peer handles each link's frames on a task of its own: when both
    /// nodes dial at once (after a partition heals, say) and a publish
    /// went out on one link and the next on the other, the peer could
    /// enqueue the second first.
    pub fn adopt(&self, link: &Arc<Link>) -> Arc<Link> {
        let mut by_name = self.by_name.lock();
        match by_name.get(&link.peer) {
            Some(l) if !l.is_closed() => l.clone(),
            _ => {
                by_name.insert(link.peer.clone(), link.clone());
                link.clone()
            }
        }
    }

    /// An open link to the node named `name` (if known) at `addr`,
    /// dialing if there is none.
    pub async fn link_to(&self, name: Option<&str>, addr: &str) -> Result<Arc<Link>, LinkError> {
        if let Some(name) = name
            && let Some(link) = self.by_name.lock().get(name)
            && !link.is_closed()
        {
            return Ok(link.clone());
        }
        // A link the peer dialed meanwhile may have been adopted: that
        // one, then, so that frames to the peer keep to one connection.
        let dialed = self.link(addr).await?;
        Ok(self.adopt(&dialed))
    }

    /// An open link to `addr`, dialing if there is none.
    pub async fn link(&self, addr: &str) -> Result<Arc<Link>, LinkError> {
        let slot = self
            .slots
            .lock()
            .entry(addr.to_owned())
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(link) = slot.as_ref()
            && !link.is_closed()
        {
            return Ok(link.clone());
        }
        // Raft may call out before the node that answers calls exists
        // (it starts with the Raft instance): it retries later.
        let handler = self
            .handler
            .get()
            .cloned()
            .ok_or_else(|| LinkError::Unreachable {
                peer: addr.to_owned(),
                reason: "this node is still starting".into(),
            })?;
        let link = Link::dial(
            addr,
            &self.me,
            &self.secret,
            handler,
            self.traffic.clone(),
            self.tls(),
            self.liveness,
        )
        .await?;
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Make `call` of the node at `addr`.
    pub async fn call(
        &self,
        addr: &str,
        call: Call,
        timeout: Duration,
    ) -> Result<Answer, LinkError> {
        self.call_node(None, addr, call, timeout).await
    }

    /// Make `call` of the node named `name` (if known) at `addr`.
    pub async fn call_node(
        &self,
        name: Option<&str>,
        addr: &str,
        call: Call,
        timeout: Duration,
    ) -> Result<Answer, LinkError> {
        let link = tokio::time::timeout(timeout, self.link_to(name, addr))
            .await
            .map_err(|_| LinkError::Timeout {
                peer: addr.to_owned(),
                after: timeout,
            })??;
        let r = link.call(call, timeout).await;
        if matches!(r, Err(LinkError::Unreachable { .. })) {
            link.close();
        }
        r
    }
}

/// openraft's view of the network.
pub struct Network {
    /// The links.
    pub peers: Arc<Peers>,
}

/// A client of one target node.
pub struct Conn {
    pub(crate) peers: Arc<Peers>,
    pub(crate) target: NodeId,
    pub(crate) member: Member,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Conn {
        Conn {
            peers: self.peers.clone(),
            target,
            member: node.clone(),
        }
    }
}

impl Conn {
    pub(crate) async fn call<E: std::error::Error>(
        &self,
        call: Call,
        option: &RPCOption,
    ) -> Result<Answer, RPCError<NodeId, Member, E>> {
        self.peers
            .call_node(
                Some(&self.member.name),
                &self.member.addr,
                call,
                option.hard_ttl(),
            )
            .await
            .map_err(|e| match e {
                LinkError::Remote { .. } => RPCError::Network(NetworkError::new(&e)),
                _ => RPCError::Unreachable(Unreachable::new(&e)),
            })
    }

    pub(crate) fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Member, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.member.clone(),
            e,
        ))
    }
}

pub(crate) fn unexpected<E: std::error::Error>(a: &Answer) -> RPCError<NodeId, Member, E> {
    let e = std::io::Error::other(format!("unexpected answer {a:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.call(Call::AppendEntries(rpc), &option).await? {
            Answer::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            a => Err(unexpected(&a)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(Call::InstallSnapshot(rpc), &option).await? {
            Answer::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            a => Err(unexpected(&a)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        match self.call(Call::Vote(rpc), &option).await? {
            Answer::Vote(r) => r.map_err(|e| self.remote(e)),
            a => Err(unexpected(&a)),
        }
    }
}
