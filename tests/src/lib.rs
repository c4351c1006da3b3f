//! Shared helpers for the integration tests: a real broker on a temporary
//! plugin folder, the compiled test plugins, and message builders.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use wasmq::broker::VHost;
use wasmq::plugin::{Compiler, PluginHost, PluginLimits};
use wasmq::{Broker, Destination, ExchangeSpec, Message};

pub mod pki;

// The broker's own allocator, so the tests run what the binary runs (the
// memory alarm's readings depend on it).
#[global_allocator]
static ALLOCATOR: wasmq::Allocator = wasmq::Allocator;

/// The folder the build script compiled the test plugins into.
pub fn compiled_plugins() -> PathBuf {
    PathBuf::from(env!("WASMQ_TEST_PLUGINS"))
}

/// The bytes of a compiled test plugin (`consistent-hash`, `faulty`, ...).
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    let path = compiled_plugins().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `module` with a `wasmq-self-test` custom section holding `json`
/// appended: what `wasmq_sdk::self_test!` puts in a plugin.
pub fn with_self_test(module: &[u8], json: &str) -> Vec<u8> {
    use wasm_encoder::Section;
    let mut out = module.to_vec();
    wasm_encoder::CustomSection {
        name: "wasmq-self-test".into(),
        data: json.as_bytes().into(),
    }
    .append_to(&mut out);
    out
}

/// Log to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A real broker with its own temporary plugin folder.
pub struct TestBroker {
    /// The broker.
    pub broker: Arc<Broker>,
    /// Its plugin folder.
    pub dir: tempfile::TempDir,
}

impl TestBroker {
    /// A broker with default limits.
    pub fn new() -> Self {
        Self::with_limits(PluginLimits::default())
    }

    /// A broker with these limits (and the default, tiered, compiler).
    pub fn with_limits(limits: PluginLimits) -> Self {
        Self::with(limits, Compiler::default())
    }

    /// A broker with these limits and this compiler.
    pub fn with(limits: PluginLimits, compiler: Compiler) -> Self {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let host = PluginHost::new(limits, None, compiler).unwrap();
        let broker = Broker::new(host, dir.path().to_path_buf()).unwrap();
        TestBroker { broker, dir }
    }

    /// The default vhost.
    pub fn vhost(&self) -> Arc<VHost> {
        self.broker.vhost("/").unwrap()
    }

    /// Install a compiled test plugin under `name` (through the same path
    /// as a file dropped into the folder).
    pub fn install(&self, name: &str, plugin: &str) {
        self.broker
            .install_plugin(name, &plugin_bytes(plugin))
            .unwrap();
    }

    /// Wait until plugin `name`'s serving version runs optimized code.
    pub fn wait_optimized(&self, name: &str) {
        assert!(
            eventually(Duration::from_secs(60), || self
                .broker
                .plugins()
                .get(name)
                .is_some_and(|v| v.optimized())),
            "plugin {name} was not optimized within 60 s"
        );
    }

    /// Declare an exchange.
    pub fn exchange(&self, name: &str, kind: &str, args: FieldTable) {
        let spec = ExchangeSpec {
            name: name.into(),
            kind: kind.into(),
            arguments: args,
            ..Default::default()
        };
        self.broker
            .declare_exchange(&self.vhost(), spec, false)
            .unwrap();
    }

    /// Declare a queue.
    pub fn queue(&self, name: &str) {
        self.broker
            .declare_queue(
                &self.vhost(),
                wasmq::broker::QueueDecl {
                    name: name.to_string(),
                    ..Default::default()
                },
            )
            .unwrap();
    }

    /// Bind queue `queue` to `exchange`.
    pub fn bind(&self, exchange: &str, queue: &str, key: &str, args: FieldTable) {
        self.broker
            .bind(
                &self.vhost(),
                exchange,
                Destination::Queue(queue.into()),
                key,
                args,
            )
            .unwrap();
    }

    /// Publish a message with `body` and `headers`.
    pub fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        headers: FieldTable,
    ) -> wasmq::PublishOutcome {
        let props = BasicProperties::default().with_headers(headers);
        self.broker
            .publish(
                &self.vhost(),
                exchange,
                Message::new(exchange, key, props, body.to_vec()),
            )
            .unwrap()
    }

    /// Messages waiting in `queue`.
    pub fn depth(&self, queue: &str) -> usize {
        self.vhost().queue(queue).unwrap().len()
    }

    /// Take every waiting message of `queue`.
    pub fn drain(&self, queue: &str) -> Vec<Arc<Message>> {
        let q = self.vhost().queue(queue).unwrap();
        std::iter::from_fn(|| q.pop().map(|e| q.message(&e).unwrap())).collect()
    }

    /// The plugin folder.
    pub fn plugin_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestBroker {
    fn default() -> Self {
        Self::new()
    }
}

/// A field table from string pairs.
pub fn table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    t
}

/// A header of `m` as text.
pub fn header(m: &Message, key: &str) -> Option<String> {
    match m.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// Poll `f` until it is true or `timeout` passes; returns whether it became true.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    f()
}

/// A real broker started like `wasmq serve`, on `127.0.0.1:0`, with its own
/// plugin and data folders.
pub struct TestServer {
    /// The running server.
    pub server: Option<wasmq::server::Server>,
    /// Plugin folder.
    pub plugins: tempfile::TempDir,
    /// Data folder.
    pub data: tempfile::TempDir,
    /// The config it was started with.
    pub config: wasmq::Config,
}

impl TestServer {
    /// Start with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Start after adjusting the config.
    pub async fn start_with(adjust: impl FnOnce(&mut wasmq::Config)) -> Self {
        init_logging();
        let plugins = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = wasmq::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            plugin_dir: plugins.path().to_path_buf(),
            data_dir: data.path().to_path_buf(),
            ..Default::default()
        };
        config.plugins.compile_cache = false;
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        let server = wasmq::server::Server::start(config.clone()).await.unwrap();
        TestServer {
            server: Some(server),
            plugins,
            data,
            config,
        }
    }

    /// Shut down cleanly and start again on the same folders and config
    /// (a new port).
    pub async fn restart(mut self) -> Self {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await;
        }
        let server = wasmq::server::Server::start(self.config.clone())
            .await
            .unwrap();
        self.server = Some(server);
        self
    }

    /// The broker core.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.server.as_ref().unwrap().broker
    }

    /// The AMQP address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().unwrap().amqp_addr
    }

    /// The RESP (Redis protocol) address (`[redis] listen` was configured).
    pub fn redis_addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .unwrap()
            .redis_addr
            .expect("[redis] listen configured")
    }

    /// The AMQPS address (a `[tls]` section was configured).
    pub fn amqps_addr(&self) -> std::net::SocketAddr {
        self.server
            .as_ref()
            .unwrap()
            .amqps_addr
            .expect("AMQPS configured")
    }

    /// A client of the admin API as guest.
    pub fn admin(&self) -> wasmq::admin::client::AdminClient {
        self.admin_as("guest", "guest")
    }

    /// A client of the admin API as `user`.
    pub fn admin_as(&self, user: &str, password: &str) -> wasmq::admin::client::AdminClient {
        let addr = self
            .server
            .as_ref()
            .unwrap()
            .admin_addr
            .expect("admin API enabled");
        wasmq::admin::client::AdminClient::new(&format!("http://{addr}"), user, password)
    }

    /// Connect with lapin as `user` to `vhost`.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        vhost: &str,
    ) -> Result<lapin::Connection, lapin::Error> {
        let vhost = vhost.replace('%', "%25").replace('/', "%2f");
        let url = format!("amqp://{user}:{password}@{}/{vhost}", self.addr());
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    }

    /// An `amqp://` URL for guest on the default vhost.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr())
    }

    /// Connect with lapin.
    pub async fn connect(&self) -> lapin::Connection {
        lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// Install a compiled test plugin under `name`.
    pub fn install(&self, name: &str, plugin: &str) {
        self.broker()
            .install_plugin(name, &plugin_bytes(plugin))
            .unwrap();
    }

    /// Wait (up to 5 s) until no AMQP connection is registered: every
    /// client's connection was closed and cleaned up.
    pub async fn until_no_connections(&self) -> bool {
        let broker = self.broker().clone();
        eventually_async(Duration::from_secs(5), || broker.connections().is_empty()).await
    }

    /// Stop it (connections get connection.close 320).
    pub async fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown(Duration::from_secs(5)).await;
        }
    }
}

/// Poll `f` until it is true or `timeout` passes, without blocking the
/// runtime (the broker under test may share it).
pub async fn eventually_async(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

/// The AMQP reply code carried by a lapin error, if any.
pub fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Take every message left in `queue` with `basic.get` (no-ack): bodies
/// as text and redelivered flags, in delivery order.
pub async fn get_all(ch: &lapin::Channel, queue: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        out.push((
            String::from_utf8(m.delivery.data.clone()).unwrap(),
            m.delivery.redelivered,
        ));
    }
    out
}

/// A new channel of `conn` in confirm mode.
pub async fn confirm_channel(conn: &lapin::Connection) -> lapin::Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch
}

/// `queue.declare` with `passive`: the queue's message and consumer
/// counts, or the broker's refusal (404 when there is no such queue).
pub async fn declare_passive(
    ch: &lapin::Channel,
    queue: &str,
) -> Result<lapin::Queue, lapin::Error> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
}

/// Declare a durable queue with `args` over AMQP.
pub async fn declare_durable(ch: &lapin::Channel, name: &str, args: FieldTable) {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

/// Publish on a channel in confirm mode and wait for the confirm: whether
/// the broker acked it.
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> bool {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        properties,
    )
    .await
    .unwrap()
    .await
    .unwrap()
    .is_ack()
}

/// Declare a plain queue over AMQP.
pub async fn declare_queue(ch: &lapin::Channel, name: &str) {
    ch.queue_declare(name.into(), Default::default(), Default::default())
        .await
        .unwrap();
}

/// Start a manual-ack consumer over AMQP (empty tag: server-named).
pub async fn consume(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        tag.into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap()
}

/// The reply code of the first close the broker sends `conn` or one of its
/// channels (lapin reports both as error events), once it has (0 while
/// only an error without a reply code was seen; wait with
/// [`until_close_code`]).
pub fn close_code(conn: &lapin::Connection) -> Arc<std::sync::Mutex<Option<u16>>> {
    use futures_lite::StreamExt;
    let code = Arc::new(std::sync::Mutex::new(None));
    let seen = code.clone();
    let mut events = Box::pin(conn.events_listener());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                // The close's reply code wins over a socket error that
                // lapin may report first (the broker shuts the socket
                // right after its connection.close).
                let mut seen = seen.lock().unwrap();
                match reply_code(&e) {
                    Some(code) if seen.is_none_or(|c| c == 0) => *seen = Some(code),
                    _ => {
                        seen.get_or_insert(0);
                    }
                }
            }
        }
    });
    code
}

/// Wait (up to 5 s) until `code`, from [`close_code`], holds a reply code.
pub async fn until_close_code(code: &std::sync::Mutex<Option<u16>>) -> Option<u16> {
    eventually_async(
        Duration::from_secs(5),
        || matches!(*code.lock().unwrap(), Some(c) if c != 0),
    )
    .await;
    *code.lock().unwrap()
}

/// Run the Node.js script `tests/node/NAME` with `args`, with the
/// packages `scripts/test.sh` installs under `WASMQ_AMQPLIB` (amqplib,
/// playwright-core) in `WASMQ_NODE_MODULES`, and assert that it prints
/// "ok" within `timeout`.
pub async fn run_node_script<I, A>(name: &str, args: I, timeout: Duration)
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let modules = std::env::var("WASMQ_AMQPLIB").unwrap_or_else(|_| {
        panic!(
            "the Node.js packages are not installed: run ./scripts/test.sh (it sets WASMQ_AMQPLIB)"
        )
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node")
        .join(name);
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .args(args)
        .env("WASMQ_NODE_MODULES", format!("{modules}/node_modules"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {timeout:?}"))
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run the pika script `tests/python/NAME` with `args` (under
/// `WASMQ_PYTHON`, which `scripts/test.sh` points at a virtualenv with pika,
/// or `python3`) and assert that it ends printing "ok" within 60 s.
pub async fn run_pika_script<I, A>(name: &str, args: I)
where
    I: IntoIterator<Item = A>,
    A: AsRef<std::ffi::OsStr>,
{
    let python = std::env::var("WASMQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name);
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the pika client finishes within 60 s")
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stderr.contains("No module named 'pika'"),
        "pika is not installed for {python}: run ./scripts/test.sh, or pip install pika"
    );
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
