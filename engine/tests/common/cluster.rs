//! Helpers for the tests that run clusters of real `wasmq` processes on
//! loopback: nodes, a TCP proxy in front of a node's link listener that
//! cuts pairs of nodes (a reset), silences them (a black hole: nothing is
//! forwarded and nothing is closed) and heals them, and waiting for what
//! should happen.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use lapin::{Connection, ConnectionProperties};
use wasmq::admin::client::AdminClient;
use wasmq::cluster::NodeStatus;

use super::Broker;

pub const SECRET: &str = "a shared secret for the cluster tests";

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub broker: Option<Broker>,
    pub amqp: String,
    pub admin: String,
    pub cluster: String,
}

/// A TCP proxy in front of one node's node-to-node listener. It reads the
/// dialer's name from the link's first frame (its hello) and drops the
/// connections of the pairs that are cut, existing ones included: the
/// harness's way to partition nodes without touching them.
pub struct Proxy {
    pub addr: String,
    pub node: String,
    pub target: Mutex<Option<String>>,
    pub cuts: Arc<Mutex<HashSet<(String, String)>>>,
    /// Pairs whose bytes this proxy holds back without closing anything.
    pub silent: Mutex<HashSet<(String, String)>>,
    pub cut_changed: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(node: &str, cuts: Arc<Mutex<HashSet<(String, String)>>>) -> Arc<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(Proxy {
            addr: listener.local_addr().unwrap().to_string(),
            node: node.to_owned(),
            target: Mutex::new(None),
            cuts,
            silent: Mutex::default(),
            cut_changed: tokio::sync::watch::channel(0).0,
        });
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(p.clone().relay(client));
            }
        });
        proxy
    }

    pub fn is_cut(&self, from: &str) -> bool {
        let cuts = self.cuts.lock().unwrap();
        cuts.contains(&(from.to_owned(), self.node.clone()))
            || cuts.contains(&(self.node.clone(), from.to_owned()))
    }

    pub fn is_silent(&self, from: &str) -> bool {
        let silent = self.silent.lock().unwrap();
        silent.contains(&(from.to_owned(), self.node.clone()))
            || silent.contains(&(self.node.clone(), from.to_owned()))
    }

    /// Wait while the pair with `from` is silenced.
    async fn heard(&self, from: &str) {
        let mut changed = self.cut_changed.subscribe();
        while self.is_silent(from) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Forward `r` to `w`, holding the bytes back while the pair with
    /// `from` is silenced (as a network that drops packets would: the
    /// sender's buffers fill, nothing is closed).
    async fn pump(
        &self,
        from: &str,
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.heard(from).await;
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.heard(from).await;
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Something was cut or healed: every relay checks its pair again.
    pub fn changed(&self) {
        self.cut_changed.send_modify(|n| *n += 1);
    }

    pub async fn relay(self: Arc<Self>, mut client: TcpStream) {
        let Some(target) = self.target.lock().unwrap().clone() else {
            return;
        };
        // The hello: a 4-byte length and JSON naming the dialer.
        let mut len = [0u8; 4];
        if client.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut hello = vec![0u8; u32::from_le_bytes(len) as usize];
        if client.read_exact(&mut hello).await.is_err() {
            return;
        }
        let from = serde_json::from_slice::<serde_json::Value>(&hello).unwrap_or_default()["node"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if self.is_cut(&from) {
            return;
        }
        let Ok(mut server) = TcpStream::connect(&target).await else {
            return;
        };
        if server.write_all(&len).await.is_err() || server.write_all(&hello).await.is_err() {
            return;
        }
        let mut changed = self.cut_changed.subscribe();
        let cut = async {
            loop {
                if changed.changed().await.is_err() || self.is_cut(&from) {
                    return;
                }
            }
        };
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::select! {
            () = self.pump(&from, cr, sw) => {}
            () = self.pump(&from, sr, cw) => {}
            () = cut => {}
        }
    }
}

pub fn cut(proxies: &[&Arc<Proxy>], pairs: &[(&str, &str)], on: bool) {
    {
        let mut cuts = proxies[0].cuts.lock().unwrap();
        for (a, b) in pairs {
            let pair = ((*a).to_owned(), (*b).to_owned());
            if on {
                cuts.insert(pair);
            } else {
                cuts.remove(&pair);
            }
        }
    }
    for p in proxies {
        p.changed();
    }
}

/// Silence (`on`) or hear again the `pairs` on every proxy: a black hole,
/// not a cut: connections stay open and say nothing.
pub fn silence(proxies: &[&Arc<Proxy>], pairs: &[(&str, &str)], on: bool) {
    for p in proxies {
        {
            let mut silent = p.silent.lock().unwrap();
            for (a, b) in pairs {
                let pair = ((*a).to_owned(), (*b).to_owned());
                if on {
                    silent.insert(pair);
                } else {
                    silent.remove(&pair);
                }
            }
        }
        p.changed();
    }
}

pub fn write_config(
    dir: &Path,
    name: &str,
    listen: &str,
    advertise: Option<&str>,
    peers: &[String],
    extra: &str,
) -> PathBuf {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    let advertise = advertise.map_or(String::new(), |a| format!("advertise = \"{a}\"\n"));
    // With TLS files, the AMQPS listener too gets a port of its own.
    let top = if extra.contains("[tls]") {
        "listen_tls = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let text = format!(
        r#"{top}data_dir = "{data}"
plugin_dir = "{plugins}"

[cluster]
name = "{name}"
listen = "{listen}"
{advertise}peers = [{peers}]
secret = "{SECRET}"
heartbeat_ms = 100
election_timeout_ms = 600
commit_timeout_ms = 3000
{extra}
"#,
        data = dir.join("data").display(),
        plugins = dir.join("plugins").display(),
        peers = peers.join(", "),
    );
    let path = dir.join("wasmq.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Node {
    pub async fn start(root: &Path, name: &str, peers: &[String]) -> Node {
        Self::start_behind(root, name, peers, None, "").await
    }

    /// Start a node; with a proxy, the others reach it through the proxy.
    /// `extra` is TOML appended to its configuration (inside `[cluster]`
    /// until it opens another table).
    pub async fn start_behind(
        root: &Path,
        name: &str,
        peers: &[String],
        proxy: Option<&Arc<Proxy>>,
        extra: &str,
    ) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        let advertise = proxy.map(|p| p.addr.as_str());
        let config = write_config(&dir, name, "127.0.0.1:0", advertise, peers, extra);
        let mut broker = Broker::spawn_config(&config);
        let (amqp, admin) = broker.ready().await;
        let bound = broker.cluster_addr.clone().expect("cluster address logged");
        if let Some(p) = proxy {
            *p.target.lock().unwrap() = Some(bound.clone());
        }
        // A restart keeps the node-to-node address the others know.
        write_config(&dir, name, &bound, advertise, peers, extra);
        let cluster = advertise.map_or(bound, str::to_owned);
        Node {
            name: name.to_owned(),
            dir,
            config,
            broker: Some(broker),
            amqp,
            admin,
            cluster,
        }
    }

    pub async fn kill(&mut self) {
        if let Some(b) = self.broker.take() {
            b.kill().await;
        }
    }

    /// SIGTERM (a graceful stop, as Kubernetes stops a pod), and wait for
    /// the process to exit.
    pub async fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().await;
        }
    }

    /// `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.api().get_text("/ready").is_ok()
    }

    pub async fn restart(&mut self) {
        assert!(self.broker.is_none());
        let _ = &self.dir;
        let mut broker = Broker::spawn_config(&self.config);
        let (amqp, admin) = broker.ready().await;
        self.amqp = amqp;
        self.admin = admin;
        self.broker = Some(broker);
    }

    pub fn api(&self) -> AdminClient {
        AdminClient::new(&format!("http://{}", self.admin), "guest", "guest")
    }

    pub fn status(&self) -> Option<NodeStatus> {
        self.api().get_as("/api/cluster").ok()
    }

    pub fn queue_node(&self, queue: &str) -> Option<String> {
        let qs = self.api().get("/api/queues/%2F").ok()?;
        qs.as_array()?
            .iter()
            .find(|q| q["name"] == queue)
            .and_then(|q| q["node"].as_str().map(str::to_owned))
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(
            &format!("amqp://guest:guest@{}/%2f", self.amqp),
            ConnectionProperties::default(),
        )
        .await
        .expect("connect")
    }
}

pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?}: {what}");
}

pub fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

pub async fn formed(nodes: &[&Node]) {
    eventually(
        "three voters and one leader seen by every node",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                n.status().is_some_and(|s| {
                    s.leader.is_some()
                        && s.members.iter().filter(|m| m.voter).count() == nodes.len()
                })
            })
        },
    )
    .await;
}

/// a, then b and c joining through it, formed.
pub async fn three_nodes(root: &Path) -> (Node, Node, Node) {
    three_nodes_with(root, |_| String::new()).await
}

/// [`three_nodes`], each node's configuration extended with `extra(name)`.
pub async fn three_nodes_with(root: &Path, extra: impl Fn(&str) -> String) -> (Node, Node, Node) {
    let a = Node::start_behind(root, "a", &[], None, &extra("a")).await;
    let seeds = vec![a.cluster.clone()];
    let b = Node::start_behind(root, "b", &seeds, None, &extra("b")).await;
    let c = Node::start_behind(root, "c", &seeds, None, &extra("c")).await;
    formed(&[&a, &b, &c]).await;
    (a, b, c)
}

/// a, then b and c joining through it, each node's links behind a proxy
/// of its own (so pairs can be cut or silenced), formed.
pub async fn three_nodes_behind_proxies(root: &Path) -> ([Arc<Proxy>; 3], [Node; 3]) {
    three_nodes_behind_proxies_with(root, "").await
}

/// [`three_nodes_behind_proxies`], each node's `[cluster]` section
/// extended with `extra`.
pub async fn three_nodes_behind_proxies_with(
    root: &Path,
    extra: &str,
) -> ([Arc<Proxy>; 3], [Node; 3]) {
    let cuts = Arc::new(Mutex::new(HashSet::new()));
    let proxies = [
        Proxy::start("a", cuts.clone()).await,
        Proxy::start("b", cuts.clone()).await,
        Proxy::start("c", cuts.clone()).await,
    ];
    let a = Node::start_behind(root, "a", &[], Some(&proxies[0]), extra).await;
    let seeds = vec![a.cluster.clone()];
    let b = Node::start_behind(root, "b", &seeds, Some(&proxies[1]), extra).await;
    let c = Node::start_behind(root, "c", &seeds, Some(&proxies[2]), extra).await;
    formed(&[&a, &b, &c]).await;
    (proxies, [a, b, c])
}

/// Wait until each of `nodes` knows the queue `name` lives on `home`.
pub async fn known_on(nodes: &[&Node], name: &str, home: &str) {
    for n in nodes {
        eventually(
            &format!("{} knows queue '{name}' lives on {home}", n.name),
            Duration::from_secs(20),
            || n.queue_node(name).as_deref() == Some(home),
        )
        .await;
    }
}

/// Every node's consumers, printed: what a checker shows when a confirmed
/// message never came.
pub fn print_consumers(nodes: &[Node]) {
    for n in nodes {
        eprintln!("stuck, at {}: {:?}", n.name, n.api().get("/api/consumers"));
    }
}

/// A loopback port nothing listens on now, for a listener the test must
/// know before the node starts (and that stays the same across restarts).
///
/// Taken below the kernel's ephemeral range (32768 and up), where every
/// `127.0.0.1:0` listener of the other nodes and every client's own end
/// lands: a port asked of the kernel and released could be handed to one
/// of those before the node binds it. A counter keeps this process's
/// ports apart; the process id spreads processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 500) * 24;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 12_000) as u16;
        let port = if port >= 32_000 { port - 12_000 } else { port };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `[redis]` on `port`, lists of the queue type given, as a node's extra
/// configuration.
pub fn redis_section(port: u16, queue_type: &str) -> String {
    format!("\n[redis]\nlisten = \"127.0.0.1:{port}\"\nqueue_type = \"{queue_type}\"\n")
}

/// Run the redis-py script `tests/python/redis_cluster.py` with `args`
/// (under `WASMQ_PYTHON`, which `scripts/test.sh` points at a virtualenv
/// with redis-py, or `python3`) within `timeout`; its standard output.
pub async fn redis_py(args: &[String], timeout: Duration) -> String {
    let python = std::env::var("WASMQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/redis_cluster.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("redis_cluster.py {args:?} did not finish in {timeout:?}"))
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stderr.contains("No module named 'redis'"),
        "redis-py is not installed for {python}: run ./scripts/test.sh, or pip install redis"
    );
    assert!(
        out.status.success(),
        "redis_cluster.py {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// The `x-stream-offset` a stream's delivery carries.
pub fn stream_offset(d: &lapin::message::Delivery) -> u64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(lapin::types::AMQPValue::LongLongInt(o)) => o as u64,
        other => panic!("x-stream-offset header: {other:?}"),
    }
}
