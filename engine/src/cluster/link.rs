//! The connection between two nodes: authenticated, framed, and carrying
//! requests both ways.
//!
//! **Authentication.** Every node holds the cluster's secret (RabbitMQ's
//! Erlang cookie), and proves it without sending it: the dialer sends a
//! random nonce, the listener answers with its own nonce and an HMAC-SHA256
//! of both under the secret, and the dialer answers with an HMAC of both in
//! the other order. A node that cannot prove it is refused before it can
//! send a single request, and the refusal is logged on both sides.
//!
//! **Frames.** `len u32 LE | kind u8 | payload`, at most [`MAX_FRAME`]
//! bytes. Kind 0 is JSON: a request (`id`, call) or the response to one;
//! either side may send requests, so one connection serves a pair of nodes
//! both ways. Kind 2 is the same in postcard, for quorum queues' Raft RPCs
//! and Raft's answers, which carry message bodies. Kind 1 is message traffic (published messages, deliveries,
//! acks), in a binary encoding the link does not read: it hands each such
//! frame, in order, to the node's [`TrafficSink`]. JSON would spend more
//! time on a message body than the rest of the hop together.
//!
//! **Liveness.** A peer that is paused or behind a network that drops its
//! packets sends no reset: its link would stay open, and a publish waiting
//! on it would wait until the peer came back. So each side of a link
//! writes a keep-alive frame (kind 3, empty) whenever it has written
//! nothing for [`Liveness::keepalive`], and closes the link when it has
//! heard nothing for [`Liveness::silence`] (the cluster's election
//! timeout): what was waiting on it learns at once, as from a reset. Both
//! sides announce the `keepalive` feature in their hello; with a peer that
//! does not (an older node), neither is used.
//!
//! **Backpressure.** Calls wait in a bounded queue ([`SEND_QUEUE`]): a node
//! that calls faster than its peer reads waits for room. Traffic is queued
//! without waiting (its senders are connection tasks that cannot block),
//! but the link counts its unwritten bytes: above [`TRAFFIC_HIGH`] it is
//! [congested](Link::congested), and senders stop taking new work (a
//! publisher's connection stops reading, a consumer stops being
//! dispatched to) until [it drains](Link::drained).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};

use super::command::{Applied, Command};
use super::{Member, NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

/// The largest frame (a snapshot chunk, a batch of entries), once the
/// peer has proven it holds the secret.
pub const MAX_FRAME: usize = 64 << 20;
/// The largest handshake frame. A hello, a challenge and a proof are a
/// few hundred bytes; this is what an unauthenticated peer can make a node
/// buffer (Erlang's distribution handshake has a 2-byte length for the
/// same reason).
pub const MAX_HELLO: usize = 4 << 10;
/// The longest node name a peer may announce.
pub const MAX_NODE_NAME: usize = 255;
/// Frames waiting to be written on one link.
pub const SEND_QUEUE: usize = 256;
/// Unwritten traffic bytes above which a link is congested.
pub const TRAFFIC_HIGH: usize = 8 << 20;
/// Time a peer has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const PROTOCOL: &str = "wasmq-cluster/3";
const KIND_JSON: u8 = 0;
const KIND_TRAFFIC: u8 = 1;
const KIND_BINARY: u8 = 2;
const KIND_KEEPALIVE: u8 = 3;
/// The hello's feature that says a node writes keep-alives and closes a
/// silent link.
const FEATURE_KEEPALIVE: &str = "keepalive";
/// The hello's feature that says a node takes [`Call::Presence`] (an older
/// node would close a link on a call it cannot read).
pub const FEATURE_PRESENCE: &str = "presence";
/// The hello's feature that says a node takes [`Call::Private`].
pub const FEATURE_PRIVATE: &str = "private-queues";
/// The hello's feature that says a node answers a `Peek` traffic frame
/// (`nodes::traffic`).
pub const FEATURE_PEEK: &str = "traffic-peek";

/// How a link tells a live peer from a silent one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Write a keep-alive after this long without writing anything.
    pub keepalive: Duration,
    /// Close the link after this long without hearing anything.
    pub silence: Duration,
}

impl Liveness {
    /// Keep-alives every `heartbeat`, silent past `election_timeout` (a
    /// peer silent that long is being replaced as a leader anyway).
    pub fn new(heartbeat: Duration, election_timeout: Duration) -> Self {
        Liveness {
            keepalive: heartbeat,
            silence: election_timeout.max(heartbeat * 3),
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness::new(Duration::from_millis(200), Duration::from_millis(600))
    }
}

/// Milliseconds on a clock that only goes forward, for "when was this link
/// last heard from".
fn clock_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// What receives the message traffic of every link, in the order each
/// link carried it.
pub trait TrafficSink: Send + Sync {
    /// A traffic frame arrived on `link`.
    fn received(&self, link: &Arc<Link>, frame: Bytes);
    /// `link` closed: whatever was in flight on it is lost.
    fn closed(&self, link: &Arc<Link>);
    /// A peer reported its exclusive queues ([`super::private`]).
    fn private_queues(&self, _queues: super::private::PrivateQueues) {}
}

/// Where a node's links deliver traffic, set once the broker is wired up
/// (frames that arrive before are dropped: no traffic is sent before the
/// node has joined).
pub type TrafficSlot = Arc<OnceLock<Arc<dyn TrafficSink>>>;

enum Out {
    Frame(Box<Frame>),
    Traffic(Bytes),
}

static LINK_IDS: AtomicU64 = AtomicU64::new(1);

/// A link's reading side: a TCP stream's, or a TLS session's.
type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// A link's writing side.
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn plain(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (Box::new(r), Box::new(w))
}

fn halves<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    (Box::new(r), Box::new(w))
}

/// A call one node makes of another.
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    /// Raft: replicate entries (also the leader's heartbeat).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft: a candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// Raft: a chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A follower hands the leader a definition change to commit.
    Propose(Command),
    /// A node with no cluster state asks to become a member.
    Join(Member),
    /// A member asks to be removed (`wasmq cluster leave`).
    Leave(String),
    /// A quorum queue's Raft group: replicate entries.
    QuorumAppend {
        /// The group (the queue).
        group: String,
        /// The request.
        rpc: AppendEntriesRequest<super::quorum::QuorumConfig>,
    },
    /// A quorum queue's Raft group: a candidate asks for a vote.
    QuorumVote {
        /// The group.
        group: String,
        /// The request.
        rpc: VoteRequest<NodeId>,
    },
    /// A quorum queue's Raft group: a chunk of a snapshot.
    QuorumSnapshot {
        /// The group.
        group: String,
        /// The request.
        rpc: InstallSnapshotRequest<super::quorum::QuorumConfig>,
    },
    /// Who is connected on the calling node (sent only to peers that
    /// announced [`FEATURE_PRESENCE`]).
    Presence(super::presence::Presence),
    /// The calling node's exclusive queues (sent only to peers that
    /// announced [`FEATURE_PRIVATE`]).
    Private(super::private::PrivateQueues),
    /// A replicated stream's records from an offset, for a replica that
    /// lacks them (sent only to the stream's other replicas).
    StreamRead {
        /// The group (the stream).
        group: String,
        /// The first offset wanted.
        from: u64,
        /// About how many bytes of records to send.
        max_bytes: u64,
    },
    /// A named stream consumer's offset, for the stream's leader to put in
    /// the log (its consumer reads on another replica).
    StreamOffset {
        /// The group (the stream).
        group: String,
        /// The consumer's name.
        name: String,
        /// The last offset it acknowledged.
        offset: u64,
    },
}

/// The answer to a [`Call`].
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    /// To `AppendEntries`.
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `InstallSnapshot`.
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// To `Propose`: the outcome and the index it was committed at.
    Proposed(Result<(Applied, u64), String>),
    /// To `Join` and `Leave`.
    Membership(Result<(), String>),
    /// To `Presence`: noted.
    Noted,
    /// To `StreamRead`.
    StreamChunk(Result<super::quorum::stream::StreamChunk, String>),
}

#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Request {
        id: u64,
        call: Call,
    },
    Response {
        id: u64,
        answer: Result<Answer, String>,
    },
}

impl Frame {
    /// The frame's kind and bytes: a quorum queue's RPCs and the answers
    /// Raft gives (openraft's own types) in postcard, which carries their
    /// message bodies as they are; everything else in JSON (the
    /// definitions log's commands are internally tagged, which postcard
    /// cannot read back).
    fn encode(&self) -> Result<(u8, Bytes), String> {
        let binary = match self {
            Frame::Request { call, .. } => matches!(
                call,
                Call::QuorumAppend { .. } | Call::QuorumVote { .. } | Call::QuorumSnapshot { .. }
            ),
            Frame::Response { answer, .. } => matches!(
                answer,
                Ok(Answer::AppendEntries(_) | Answer::Vote(_) | Answer::InstallSnapshot(_))
            ),
        };
        if binary {
            postcard::to_stdvec(self)
                .map(|b| (KIND_BINARY, Bytes::from(b)))
                .map_err(|e| e.to_string())
        } else {
            serde_json::to_vec(self)
                .map(|b| (KIND_JSON, Bytes::from(b)))
                .map_err(|e| e.to_string())
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Hello {
    protocol: String,
    node: String,
    nonce: [u8; 32],
    /// What this node does beyond the protocol (older nodes send none and
    /// ignore these).
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    protocol: String,
    node: String,
    nonce: [u8; 32],
    proof: Vec<u8>,
    #[serde(default)]
    features: Vec<String>,
}

fn features() -> Vec<String> {
    vec![
        FEATURE_KEEPALIVE.to_owned(),
        FEATURE_PRESENCE.to_owned(),
        FEATURE_PRIVATE.to_owned(),
        FEATURE_PEEK.to_owned(),
    ]
}

fn keeps_alive(features: &[String]) -> bool {
    features.iter().any(|f| f == FEATURE_KEEPALIVE)
}

#[derive(Serialize, Deserialize)]
struct Proof {
    proof: Vec<u8>,
}

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer could not be reached or the connection broke.
    #[error("node {peer} unreachable: {reason}")]
    Unreachable {
        /// The peer's address or name.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// The peer does not hold the cluster secret, or speaks another
    /// protocol.
    #[error("node {peer} refused: {reason}")]
    Refused {
        /// The peer's address or name.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// No answer in time.
    #[error("node {peer} did not answer in {after:?}")]
    Timeout {
        /// The peer.
        peer: String,
        /// The limit.
        after: Duration,
    },
    /// The peer answered with an error.
    #[error("node {peer}: {reason}")]
    Remote {
        /// The peer.
        peer: String,
        /// Its error.
        reason: String,
    },
}

/// Handshakes a node runs at once, from every source together.
pub const MAX_HANDSHAKES: usize = 64;
/// Handshakes a node runs at once from one source address.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 8;

/// The connections to a node's cluster port that have not yet proven they
/// hold the secret, by source address. Each costs at most a [`MAX_HELLO`]
/// buffer (and a TLS session's) for at most the handshake's timeout, and
/// there are at most [`MAX_HANDSHAKES`] of them, [`MAX_HANDSHAKES_PER_SOURCE`]
/// from one address: an unauthenticated peer can take a few hundred KiB of
/// a node, never its memory or its descriptors.
pub type Handshakes = crate::untrusted::Places<std::net::IpAddr>;

/// The bounds of a node's [`Handshakes`].
pub fn handshakes() -> Arc<Handshakes> {
    Handshakes::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE)
}

/// What handles the calls a peer makes of this node.
pub type Handler =
    Arc<dyn Fn(Call) -> Pin<Box<dyn Future<Output = Result<Answer, String>> + Send>> + Send + Sync>;

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Answer, String>>>>;

/// An open, authenticated connection to one peer.
pub struct Link {
    /// The peer's node name.
    pub peer: String,
    /// Unique to this connection (a new connection to the same peer gets
    /// another): state that lives and dies with a connection is keyed by it.
    pub id: u64,
    tx: mpsc::Sender<Out>,
    traffic: mpsc::UnboundedSender<Out>,
    queued: AtomicUsize,
    drained: Notify,
    pending: Arc<Pending>,
    next: AtomicU64,
    closed: Arc<AtomicBool>,
    /// Wakes the writer when the link closes (it holds the link, so its
    /// queues never end by themselves).
    shut: tokio_util::sync::CancellationToken,
    /// When a byte last arrived ([`clock_ms`]).
    heard_ms: Arc<AtomicU64>,
    /// Keep-alives and the silence bound, if both sides keep alive.
    liveness: Option<Liveness>,
    /// What the peer announced it does beyond the protocol (the ones this
    /// node knows).
    features: Vec<String>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn verify(secret: &[u8], parts: &[&[u8]], proof: &[u8]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    // Constant time: the comparison leaks nothing of the expected value.
    m.verify_slice(proof).is_ok()
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).expect("the OS has randomness");
    n
}

async fn write_hello<T: Serialize>(w: &mut Writer, v: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    w.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// One length-prefixed frame of at most `max` bytes (the handshake's are
/// JSON without a kind). The length is checked before anything is
/// allocated.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the {max}-byte limit"
        )));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn read_hello<T: for<'a> Deserialize<'a>>(r: &mut Reader) -> std::io::Result<T> {
    serde_json::from_slice(&read_frame(r, MAX_HELLO).await?).map_err(std::io::Error::other)
}

/// Whether `name` may name a node: what a peer announces becomes a key of
/// the node's links and appears in logs and the admin API.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
}

/// Why a hello (or challenge) is refused, if it is.
fn refuse_hello(protocol: &str, node: &str) -> Option<String> {
    use crate::untrusted::text;
    if protocol != PROTOCOL {
        return Some(format!("speaks {}, not {PROTOCOL}", text(protocol)));
    }
    if !valid_node_name(node) {
        return Some(format!(
            "node name '{}' is not a node name (1 to {MAX_NODE_NAME} of letters, digits, '-', '_', '.', ':', '@')",
            text(node)
        ));
    }
    None
}

impl Link {
    /// Dial `addr` as node `me` and authenticate (over TLS with `tls`:
    /// the peer's certificate verified against the CA, ours presented).
    #[allow(clippy::too_many_arguments)]
    pub async fn dial(
        addr: &str,
        me: &str,
        secret: &[u8],
        handler: Handler,
        traffic: TrafficSlot,
        tls: Option<&crate::tls::Tls>,
        liveness: Liveness,
    ) -> Result<Arc<Link>, LinkError> {
        let unreachable = |reason: String| LinkError::Unreachable {
            peer: addr.to_owned(),
            reason,
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).ok();
        let (mut r, mut w) = match tls.and_then(|t| t.cluster()) {
            None => plain(stream),
            Some((_, connector)) => {
                let host = addr
                    .rsplit_once(':')
                    .map_or(addr, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| unreachable(format!("'{host}' is not a TLS server name: {e}")))?;
                let session =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
                        .await
                        .map_err(|_| unreachable("TLS handshake timed out".into()))?
                        .map_err(|e| LinkError::Refused {
                            peer: addr.to_owned(),
                            reason: format!("TLS: {e}"),
                        })?;
                halves(session)
            }
        };
        let mine = nonce();
        let handshake = async {
            write_hello(
                &mut w,
                &Hello {
                    protocol: PROTOCOL.into(),
                    node: me.into(),
                    nonce: mine,
                    features: features(),
                },
            )
            .await?;
            let c: Challenge = read_hello(&mut r).await?;
            Ok::<_, std::io::Error>(c)
        };
        let c = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        if let Some(reason) = refuse_hello(&c.protocol, &c.node) {
            return Err(LinkError::Refused {
                peer: addr.to_owned(),
                reason,
            });
        }
        if !verify(secret, &[b"listener", &mine, &c.nonce], &c.proof) {
            return Err(LinkError::Refused {
                peer: addr.to_owned(),
                reason: "it does not hold this cluster's secret".into(),
            });
        }
        write_hello(
            &mut w,
            &Proof {
                proof: hmac(secret, &[b"dialer", &c.nonce, &mine]),
            },
        )
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        Ok(Link::start(
            c.node, r, w, handler, traffic, liveness, c.features,
        ))
    }

    /// Authenticate a connection a peer opened to this node's listener
    /// (over TLS with `tls`: the peer must present a certificate the CA
    /// signed). Returns the link, named after the peer.
    #[allow(clippy::too_many_arguments)]
    pub async fn accept(
        stream: TcpStream,
        me: &str,
        secret: &[u8],
        handler: Handler,
        traffic: TrafficSlot,
        tls: Option<&crate::tls::Tls>,
        liveness: Liveness,
    ) -> Result<Arc<Link>, LinkError> {
        let peer_addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        stream.set_nodelay(true).ok();
        let refused = |reason: String| LinkError::Refused {
            peer: peer_addr.clone(),
            reason,
        };
        let (mut r, mut w) = match tls.and_then(|t| t.cluster()) {
            None => plain(stream),
            Some((acceptor, _)) => {
                let session = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                    .await
                    .map_err(|_| refused("TLS handshake timed out".into()))?
                    .map_err(|e| refused(format!("TLS: {e}")))?;
                halves(session)
            }
        };
        let mine = nonce();
        let handshake = async {
            let h: Hello = read_hello(&mut r).await?;
            if let Some(reason) = refuse_hello(&h.protocol, &h.node) {
                return Ok(Err(reason));
            }
            write_hello(
                &mut w,
                &Challenge {
                    protocol: PROTOCOL.into(),
                    node: me.into(),
                    nonce: mine,
                    proof: hmac(secret, &[b"listener", &h.nonce, &mine]),
                    features: features(),
                },
            )
            .await?;
            let p: Proof = read_hello(&mut r).await?;
            if !verify(secret, &[b"dialer", &mine, &h.nonce], &p.proof) {
                return Ok(Err(format!(
                    "node '{}' does not hold this cluster's secret",
                    h.node
                )));
            }
            Ok::<_, std::io::Error>(Ok((h.node, h.features)))
        };
        let (peer, features) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| refused("handshake timed out".into()))?
            .map_err(|e| refused(crate::untrusted::text(&e.to_string()).to_string()))?
            .map_err(refused)?;
        Ok(Link::start(
            peer, r, w, handler, traffic, liveness, features,
        ))
    }

    /// A link to `peer`, which announced `features` in its hello.
    fn start(
        peer: String,
        r: Reader,
        w: Writer,
        handler: Handler,
        traffic: TrafficSlot,
        liveness: Liveness,
        mut features: Vec<String>,
    ) -> Arc<Link> {
        let liveness = keeps_alive(&features).then_some(liveness);
        // Only the features this node knows are kept: a peer's list is
        // bounded by the hello's size, and the rest mean nothing here.
        features.retain(|f| self::features().contains(f));
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let (traffic_tx, traffic_rx) = mpsc::unbounded_channel();
        let heard_ms = Arc::new(AtomicU64::new(clock_ms()));
        let link = Arc::new(Link {
            peer,
            id: LINK_IDS.fetch_add(1, Ordering::Relaxed),
            tx,
            traffic: traffic_tx,
            queued: AtomicUsize::new(0),
            drained: Notify::new(),
            pending: Arc::default(),
            next: AtomicU64::new(1),
            closed: Arc::new(AtomicBool::new(false)),
            shut: Default::default(),
            heard_ms: heard_ms.clone(),
            liveness,
            features,
        });
        let r: Reader = Box::new(Heard {
            inner: r,
            at: heard_ms,
        });
        tokio::spawn(write_loop(w, rx, traffic_rx, link.clone()));
        tokio::spawn(read_loop(r, handler, traffic, link.clone()));
        if let Some(l) = liveness {
            tokio::spawn(watch_silence(Arc::downgrade(&link), l));
        }
        link
    }

    /// Queue a traffic frame (it is never refused while the link is open;
    /// senders look at [`Link::congested`] before taking more work).
    /// Returns false if the link is closed.
    pub fn send_traffic(&self, frame: Bytes) -> bool {
        if self.is_closed() {
            return false;
        }
        self.queued.fetch_add(frame.len(), Ordering::Relaxed);
        self.traffic.send(Out::Traffic(frame)).is_ok()
    }

    /// More traffic waits to be written than [`TRAFFIC_HIGH`].
    pub fn congested(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > TRAFFIC_HIGH
    }

    /// Wait until the link is no longer congested (or has closed).
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if !self.congested() || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the peer announced `feature` (e.g. [`FEATURE_PRESENCE`]).
    pub fn peer_has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Whether the connection is gone (a new one must be dialed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Make a call and wait up to `timeout` for its answer.
    pub async fn call(&self, call: Call, timeout: Duration) -> Result<Answer, LinkError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let gone = |reason: &str| LinkError::Unreachable {
            peer: self.peer.clone(),
            reason: reason.to_owned(),
        };
        let sent = tokio::time::timeout(
            timeout,
            self.tx
                .send(Out::Frame(Box::new(Frame::Request { id, call }))),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                self.pending.lock().remove(&id);
                return Err(gone("connection closed"));
            }
            Err(_) => {
                self.pending.lock().remove(&id);
                return Err(LinkError::Timeout {
                    peer: self.peer.clone(),
                    after: timeout,
                });
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(reason))) => Err(LinkError::Remote {
                peer: self.peer.clone(),
                reason,
            }),
            Ok(Err(_)) => Err(gone("connection closed before the answer")),
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(LinkError::Timeout {
                    peer: self.peer.clone(),
                    after: timeout,
                })
            }
        }
    }

    /// Close the connection.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.pending.lock().clear();
        self.drained.notify_waiters();
        self.shut.cancel();
    }
}

async fn write_loop(
    w: Writer,
    mut calls: mpsc::Receiver<Out>,
    mut traffic: mpsc::UnboundedReceiver<Out>,
    link: Arc<Link>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let mut batch = Vec::new();
    // Without keep-alives the timer never fires.
    let keepalive = link
        .liveness
        .map_or(Duration::from_secs(86_400 * 365), |l| l.keepalive);
    loop {
        let first = tokio::select! {
            biased;
            () = link.shut.cancelled() => None,
            f = calls.recv() => f,
            f = traffic.recv() => f,
            () = tokio::time::sleep(keepalive) => {
                // Nothing to write for a while: tell the peer we live.
                if w.write_all(&1u32.to_le_bytes()).await.is_err()
                    || w.write_u8(KIND_KEEPALIVE).await.is_err()
                    || w.flush().await.is_err()
                {
                    break;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        if link.is_closed() {
            break;
        }
        batch.push(first);
        // Whatever else is queued goes in the same write.
        while batch.len() < 1024 {
            match calls.try_recv().or_else(|_| traffic.try_recv()) {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut failed = false;
        let mut written = 0;
        for out in batch.drain(..) {
            let (kind, bytes) = match out {
                Out::Frame(f) => match f.encode() {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!("cluster frame not serializable: {e}");
                        continue;
                    }
                },
                Out::Traffic(b) => {
                    written += b.len();
                    (KIND_TRAFFIC, b)
                }
            };
            let len = (bytes.len() + 1) as u32;
            if w.write_all(&len.to_le_bytes()).await.is_err()
                || w.write_u8(kind).await.is_err()
                || w.write_all(&bytes).await.is_err()
            {
                failed = true;
                break;
            }
        }
        if failed || w.flush().await.is_err() {
            break;
        }
        if written > 0 {
            let before = link.queued.fetch_sub(written, Ordering::Relaxed);
            if before > TRAFFIC_HIGH && before - written <= TRAFFIC_HIGH {
                link.drained.notify_waiters();
            }
        }
    }
    link.close();
    let _ = w.shutdown().await;
}

async fn read_loop(r: Reader, handler: Handler, traffic: TrafficSlot, link: Arc<Link>) {
    // Frames are small and many under message traffic: read them from a
    // buffer, not with two reads of the socket each.
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    loop {
        let read = tokio::select! {
            // Closed from this side (a silent peer): stop reading now.
            () = link.shut.cancelled() => break,
            read = read_frame(&mut r, MAX_FRAME) => read,
        };
        let buf = match read {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => {
                tracing::warn!(peer = %link.peer, "empty cluster frame; closing the link");
                break;
            }
            Err(e) => {
                if !link.is_closed() {
                    tracing::debug!(peer = %link.peer, "cluster link closed: {e}");
                }
                break;
            }
        };
        if buf[0] == KIND_KEEPALIVE {
            continue;
        }
        if buf[0] == KIND_TRAFFIC {
            let mut frame = Bytes::from(buf);
            let _ = bytes::Buf::get_u8(&mut frame);
            match traffic.get() {
                Some(sink) => sink.received(&link, frame),
                None => {
                    tracing::debug!(peer = %link.peer, "traffic before the broker is ready; dropped")
                }
            }
            continue;
        }
        let decoded = if buf[0] == KIND_BINARY {
            postcard::from_bytes::<Frame>(&buf[1..]).map_err(|e| e.to_string())
        } else {
            serde_json::from_slice::<Frame>(&buf[1..]).map_err(|e| e.to_string())
        };
        let frame: Frame = match decoded {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(peer = %link.peer, "unreadable cluster frame, closing the link: {e}");
                break;
            }
        };
        match frame {
            Frame::Request { id, call } => {
                let (handler, link) = (handler.clone(), link.clone());
                tokio::spawn(async move {
                    let answer = handler(call).await;
                    let _ = link
                        .tx
                        .send(Out::Frame(Box::new(Frame::Response { id, answer })))
                        .await;
                });
            }
            Frame::Response { id, answer } => {
                if let Some(waiter) = link.pending.lock().remove(&id) {
                    let _ = waiter.send(answer);
                }
            }
        }
        if link.is_closed() {
            break;
        }
    }
    // Callers waiting on this link learn it is gone now, not at their
    // timeout.
    link.close();
    if let Some(sink) = traffic.get() {
        sink.closed(&link);
    }
}

/// A link's reading side that notes when bytes last arrived.
struct Heard {
    inner: Reader,
    at: Arc<AtomicU64>,
}

impl AsyncRead for Heard {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.at.store(clock_ms(), Ordering::Relaxed);
        }
        polled
    }
}

/// Close `link` once its peer has been silent for `liveness.silence`: a
/// paused peer, or one behind a network that drops its packets, sends no
/// reset, and what waits on the link must not wait for it to come back.
async fn watch_silence(link: std::sync::Weak<Link>, liveness: Liveness) {
    let every = (liveness.silence / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(link) = link.upgrade() else { return };
        if link.is_closed() {
            return;
        }
        let silent = clock_ms().saturating_sub(link.heard_ms.load(Ordering::Relaxed));
        if silent > liveness.silence.as_millis() as u64 {
            tracing::warn!(
                peer = %link.peer,
                silent_ms = silent,
                "cluster link silent past the election timeout; closing it"
            );
            link.close();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> Handler {
        Arc::new(|call| {
            Box::pin(async move {
                match call {
                    Call::Leave(name) => Ok(Answer::Membership(Err(format!("echo {name}")))),
                    _ => Err("unexpected".into()),
                }
            })
        })
    }

    async fn pair(
        dialer_secret: &'static [u8],
    ) -> (Result<Arc<Link>, LinkError>, Result<Arc<Link>, LinkError>) {
        pair_with(dialer_secret, Liveness::default()).await
    }

    async fn pair_with(
        dialer_secret: &'static [u8],
        liveness: Liveness,
    ) -> (Result<Arc<Link>, LinkError>, Result<Arc<Link>, LinkError>) {
        let (addr, accepting) = accepting(liveness).await;
        let dialed = Link::dial(
            &addr.to_string(),
            "a",
            dialer_secret,
            echo(),
            Arc::default(),
            None,
            liveness,
        )
        .await;
        (dialed, accepting.await.unwrap())
    }

    const QUICK: Liveness = Liveness {
        keepalive: Duration::from_millis(50),
        silence: Duration::from_millis(250),
    };

    /// A node "b" accepting one connection on a port of its own, with the
    /// cluster secret of these tests.
    async fn accepting(
        liveness: Liveness,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<Arc<Link>, LinkError>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let secret = b"the cluster secret, shared";
            Link::accept(s, "b", secret, echo(), Arc::default(), None, liveness).await
        });
        (addr, accepting)
    }

    /// A peer that proves the secret by hand, announcing `features`, and
    /// then does only what the test does with its halves; the accepted
    /// link on the node's side.
    async fn by_hand(node: &str, features: Vec<String>) -> (Reader, Writer, Arc<Link>) {
        let (addr, accepting) = accepting(QUICK).await;
        let (mut r, mut w) = plain(TcpStream::connect(addr).await.unwrap());
        let mine = [3u8; 32];
        let hello = Hello {
            protocol: PROTOCOL.into(),
            node: node.into(),
            nonce: mine,
            features,
        };
        write_hello(&mut w, &hello).await.unwrap();
        let c: Challenge = read_hello(&mut r).await.unwrap();
        let secret = b"the cluster secret, shared";
        let proof = Proof {
            proof: hmac(secret, &[b"dialer", &c.nonce, &mine]),
        };
        write_hello(&mut w, &proof).await.unwrap();
        (r, w, accepting.await.unwrap().unwrap())
    }

    /// Two open links to one peer (both nodes dialed at once): whatever
    /// is sent to it goes over the first adopted while it is open, then
    /// over the other. A publish on one link and the next on the other
    /// could be taken in the wrong order, each link's frames being read
    /// by a task of its own.
    #[tokio::test]
    async fn one_link_carries_a_peers_frames_while_it_is_open() {
        let peers = crate::cluster::network::Peers::new(
            "a".into(),
            b"the cluster secret, shared".to_vec(),
            None,
            QUICK,
        );
        let (_r1, _w1, first) = by_hand("b", features()).await;
        let (_r2, _w2, second) = by_hand("b", features()).await;
        assert!(Arc::ptr_eq(&peers.adopt(&first), &first));
        assert!(
            Arc::ptr_eq(&peers.adopt(&second), &first),
            "a second link to b was used beside the open first one"
        );
        assert!(Arc::ptr_eq(&peers.open_link("b").unwrap(), &first));
        first.close();
        assert!(Arc::ptr_eq(&peers.adopt(&second), &second));
        assert!(Arc::ptr_eq(&peers.open_link("b").unwrap(), &second));
    }

    /// A link knows what its peer announced: the features this node has,
    /// none from an older node, and never one it does not know (whatever
    /// a peer claims).
    #[tokio::test]
    async fn a_link_knows_what_its_peer_takes() {
        let (a, b) = pair_with(b"the cluster secret, shared", QUICK).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(a.peer_has(FEATURE_PRESENCE) && b.peer_has(FEATURE_PRESENCE));
        let (_r, _w, old) = by_hand("old", vec![]).await;
        assert!(!old.peer_has(FEATURE_PRESENCE));
        let (_r, _w, odd) = by_hand("odd", vec!["x".repeat(100), FEATURE_PRESENCE.into()]).await;
        assert!(odd.peer_has(FEATURE_PRESENCE) && !odd.peer_has(&"x".repeat(100)));
    }

    /// An idle link lives on its keep-alives; a peer that proves the
    /// secret and then goes silent without closing (paused, or behind a
    /// network that drops its packets) has its link closed past the
    /// silence bound, and a call waiting on it fails then, not at its own
    /// timeout.
    #[tokio::test]
    async fn idle_links_live_and_silent_ones_close() {
        let (a, b) = pair_with(b"the cluster secret, shared", QUICK).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        tokio::time::sleep(QUICK.silence * 3).await;
        assert!(
            !a.is_closed() && !b.is_closed(),
            "keep-alives hold an idle link"
        );

        // A peer that does the handshake by hand, then says nothing.
        let (r, w, link) = by_hand("quiet", features()).await;
        let started = std::time::Instant::now();
        let call = link
            .call(Call::Leave("x".into()), Duration::from_secs(30))
            .await;
        assert!(call.is_err(), "{call:?}");
        assert!(link.is_closed());
        let waited = started.elapsed();
        assert!(
            waited < QUICK.silence * 4,
            "the call learned after {waited:?}, not at its 30 s timeout"
        );
        drop((r, w));
    }

    /// A peer that does not announce keep-alives (an older node) gets
    /// none and is never closed for silence.
    #[tokio::test]
    async fn a_peer_without_keepalives_is_not_held_to_them() {
        let (mut r, _w, link) = by_hand("old", vec![]).await;
        tokio::time::sleep(QUICK.silence * 3).await;
        assert!(!link.is_closed());
        // And nothing was written to it unasked.
        let mut buf = [0u8; 16];
        let got = tokio::time::timeout(Duration::from_millis(50), r.read(&mut buf)).await;
        assert!(
            got.is_err(),
            "an older peer got bytes it does not know: {got:?}"
        );
    }

    #[tokio::test]
    async fn nodes_with_the_secret_call_each_other_both_ways() {
        let (a, b) = pair(b"the cluster secret, shared").await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.peer.as_str(), b.peer.as_str()), ("b", "a"));
        let t = Duration::from_secs(5);
        for (link, name) in [(&a, "x"), (&b, "y")] {
            match link.call(Call::Leave(name.into()), t).await.unwrap() {
                Answer::Membership(Err(s)) => assert_eq!(s, format!("echo {name}")),
                other => panic!("{other:?}"),
            }
        }
        match a.call(Call::Join(Member::default()), t).await {
            Err(LinkError::Remote { reason, .. }) => assert_eq!(reason, "unexpected"),
            other => panic!("{other:?}"),
        }
    }

    /// A quorum queue's entries cross the link in postcard and come back
    /// as they were (postcard reads fields by position: an attribute that
    /// skips a field when serializing would break this).
    #[test]
    fn quorum_rpcs_and_raft_answers_round_trip_in_binary() {
        use crate::cluster::quorum::{Enqueue, Op, QuorumConfig, StoredMessage};
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
        let op = Op {
            enqueue: vec![Enqueue {
                published_ms: 7,
                message: StoredMessage {
                    exchange: "x".into(),
                    routing_key: "k".into(),
                    properties: vec![1, 2],
                    body: vec![0, 255, 3],
                },
            }],
            settle: vec![],
            returned: vec![9],
        };
        let rpc = AppendEntriesRequest::<QuorumConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 4)),
            entries: vec![Entry {
                log_id: LogId::new(CommittedLeaderId::new(3, 1), 5),
                payload: EntryPayload::Normal(op.clone()),
            }],
            leader_commit: None,
        };
        let frame = Frame::Request {
            id: 11,
            call: Call::QuorumAppend {
                group: "/\0q".into(),
                rpc,
            },
        };
        let (kind, bytes) = frame.encode().unwrap();
        assert_eq!(kind, KIND_BINARY);
        match postcard::from_bytes::<Frame>(&bytes).unwrap() {
            Frame::Request {
                id: 11,
                call: Call::QuorumAppend { group, rpc },
            } => {
                assert_eq!(group, "/\0q");
                assert!(matches!(&rpc.entries[0].payload, EntryPayload::Normal(o) if *o == op));
            }
            other => panic!("{other:?}"),
        }
        let answer = Frame::Response {
            id: 11,
            answer: Ok(Answer::AppendEntries(Ok(AppendEntriesResponse::Success))),
        };
        let (kind, bytes) = answer.encode().unwrap();
        assert_eq!(kind, KIND_BINARY);
        assert!(matches!(
            postcard::from_bytes::<Frame>(&bytes).unwrap(),
            Frame::Response {
                answer: Ok(Answer::AppendEntries(Ok(AppendEntriesResponse::Success))),
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_node_without_the_secret_is_refused_on_both_sides() {
        let (a, b) = pair(b"another secret entirely!").await;
        assert!(matches!(a, Err(LinkError::Refused { .. })), "{:?}", a.err());
        assert!(b.is_err());
    }

    /// What a peer that has not proven anything can make a node do: read
    /// a 4-byte length and refuse it, allocating nothing.
    #[tokio::test]
    async fn an_oversized_hello_is_refused_at_its_length() {
        let (addr, accepting) = accepting(Liveness::default()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let err = accepting.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("over the 4096-byte limit"), "{err}");
        assert!(
            started.elapsed() < HANDSHAKE_TIMEOUT,
            "refused before its timeout"
        );
    }

    #[tokio::test]
    async fn a_hello_that_forges_log_lines_or_floods_them_is_refused_escaped() {
        for (node, protocol) in [
            (
                "n2\n2026-01-01T00:00:00Z  INFO wasmq::admin: FORGED".to_owned(),
                PROTOCOL.to_owned(),
            ),
            ("x".repeat(MAX_NODE_NAME + 1), PROTOCOL.to_owned()),
            ("n2".to_owned(), format!("wasmq\n{}", "p".repeat(3000))),
        ] {
            let (addr, accepting) = accepting(Liveness::default()).await;
            let (_r, mut w) = plain(TcpStream::connect(addr).await.unwrap());
            let hello = Hello {
                protocol,
                node,
                nonce: [7; 32],
                features: vec![],
            };
            write_hello(&mut w, &hello).await.unwrap();
            let err = accepting.await.unwrap().unwrap_err().to_string();
            assert!(!err.contains('\n'), "a raw newline reaches the log: {err}");
            assert!(err.len() < 1024, "{} bytes of refusal", err.len());
        }
    }

    #[test]
    fn node_names_are_plain() {
        for good in ["wasmq-0.wasmq-headless.ns.svc", "rabbit@host", "n_1", "a:1"] {
            assert!(valid_node_name(good), "{good}");
        }
        for bad in ["", "a b", "a\nb", "é", &"x".repeat(256)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
