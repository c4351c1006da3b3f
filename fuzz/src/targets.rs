//! The fuzz targets, each a function of one input in the style of a
//! libFuzzer target: it returns normally for any input the broker handles
//! as it should, and panics (or fails) otherwise.
//!
//! * [`frames`]: the frame decoder over a byte stream.
//! * [`codecs`]: the field-table nesting walk, amq-protocol's table,
//!   method and properties parsers behind it, and their round trips.
//! * [`traffic`]: the decoder of the message traffic between cluster
//!   nodes, and its round trip.
//! * [`Broker::connection`]: a whole connection to the real broker over
//!   TCP, fed the input before or after a valid login. What the input may
//!   get: the right close code or a closed socket; never a panic in the
//!   broker (it would close with 541 and log), an abort (the process
//!   dies), a hang (the connection outlives the client's EOF), or a
//!   connection the broker never lets go of.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use amq_protocol::protocol::{AMQPClass, connection};
use wasmq::amqp::field_table::{check_method, check_table};
use wasmq::amqp::frame::{Frame, PROTOCOL_HEADER, decode};
use wasmq::message::{decode_properties, encode_properties};

/// Decode every frame of `data` under several `frame_max` values.
pub fn frames(data: &[u8]) {
    for frame_max in [4096, 131_072, u32::MAX] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(_)) = decode(&mut buf, frame_max) {}
    }
}

/// `data` as RESP requests, parsed whole and again in two parts split
/// where its first byte says: never a panic, and the same commands (or the
/// same error) either way, whatever the split.
pub fn resp_parser(data: &[u8]) {
    use wasmq::resp::request::Parser;
    let run = |parts: &[&[u8]]| {
        let mut p = Parser::new(4096);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for part in parts {
            buf.extend_from_slice(part);
            loop {
                match p.next(&mut buf) {
                    Ok(Some(c)) => got.push(Ok(c)),
                    Ok(None) => break,
                    Err(e) => {
                        got.push(Err(e));
                        return got;
                    }
                }
            }
        }
        got
    };
    let whole = run(&[data]);
    let at = data.first().map_or(0, |b| *b as usize * data.len() / 256);
    let split = run(&[&data[..at], &data[at..]]);
    assert_eq!(whole, split, "split at {at}");
}

/// `data` as a frame of cluster message traffic: refused or read, never a
/// panic; what reads must encode back to the same bytes.
pub fn traffic(data: &[u8]) {
    use wasmq::nodes::remote::Traffic;
    if let Ok(t) = Traffic::decode(bytes::Bytes::copy_from_slice(data)) {
        let again = t.encode();
        assert_eq!(&again[..], data, "traffic frame round trip");
        assert_eq!(Traffic::decode(again).ok(), Some(t));
    }
}

fn encoded_table(t: &amq_protocol::types::FieldTable) -> Vec<u8> {
    let g = amq_protocol::types::generation::gen_field_table(t);
    cookie_factory::gen_simple(g, Vec::new()).expect("writing to a Vec")
}

fn encoded_class(c: &amq_protocol::protocol::AMQPClass) -> Vec<u8> {
    let g = amq_protocol::protocol::gen_class(c);
    cookie_factory::gen_simple(g, Vec::new()).expect("writing to a Vec")
}

/// `data` as a field table, as encoded properties and as a method payload.
/// The nesting walk must agree with the parser on what is malformed, and
/// whatever decodes must re-encode to bytes that decode the same.
pub fn codecs(data: &[u8]) {
    // A table too deep for the walk is never given to the parser.
    if let Ok(walked) = check_table(data) {
        let parsed = amq_protocol::types::parsing::parse_field_table(data);
        match (walked, parsed) {
            (Some(len), Ok((rest, table))) => {
                assert_eq!(
                    data.len() - rest.len(),
                    len,
                    "walk and parser disagree on length"
                );
                let again = encoded_table(&table);
                let (_, reparsed) = amq_protocol::types::parsing::parse_field_table(&again[..])
                    .expect("a re-encoded table parses");
                assert_eq!(encoded_table(&reparsed), again, "table round trip");
            }
            // Keys that are not UTF-8 pass the walk, not the parser.
            (Some(_), Err(_)) => {}
            (None, Ok(_)) => panic!("the walk refused a table the parser reads"),
            (None, Err(_)) => {}
        }
    }
    if let Ok(p) = decode_properties(data) {
        let again = encode_properties(&p);
        let reparsed = decode_properties(&again).expect("re-encoded properties decode");
        assert_eq!(encode_properties(&reparsed), again, "properties round trip");
    }
    if check_method(data).is_ok()
        && let Ok(([], class)) = amq_protocol::protocol::parse_class(data)
    {
        let again = encoded_class(&class);
        let (_, reparsed) =
            amq_protocol::protocol::parse_class(&again[..]).expect("re-encoded method parses");
        assert_eq!(encoded_class(&reparsed), again, "method round trip");
    }
}

/// How long a connection may stay open after its client's EOF.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// The real broker, started once for many cases.
#[derive(Debug)]
pub struct Broker {
    rt: tokio::runtime::Runtime,
    server: Option<wasmq::server::Server>,
    _data: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

/// Which of the broker's ports a target feeds besides AMQP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// AMQP only.
    Amqp,
    /// The admin API too.
    Admin,
    /// A one-node cluster's node-to-node port too.
    Cluster,
    /// The RESP (Redis protocol) listener too.
    Redis,
}

impl Broker {
    /// Start a broker on 127.0.0.1:0 with its own folders.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Ports::Amqp)
    }

    /// Start a broker with `ports` open, each on 127.0.0.1:0.
    pub fn start_with(ports: Ports) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let data = tempfile::tempdir()?;
        let plugins = tempfile::tempdir()?;
        let mut config = wasmq::Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data.path().to_path_buf(),
            plugin_dir: plugins.path().to_path_buf(),
            ..Default::default()
        };
        config.admin.enabled = ports == Ports::Admin;
        config.admin.listen = "127.0.0.1:0".parse()?;
        if ports == Ports::Cluster {
            config.cluster = Some(toml::from_str(
                "name = 'fuzz'\nlisten = '127.0.0.1:0'\nsecret = 'a secret the fuzzer never learns'\n",
            )?);
        }
        if ports == Ports::Redis {
            config.redis.listen = Some("127.0.0.1:0".parse()?);
        }
        config.plugins.compile_cache = false;
        config.store.disk_free_limit_mib = 0;
        let server = rt.block_on(wasmq::server::Server::start(config))?;
        Ok(Broker {
            rt,
            server: Some(server),
            _data: data,
            _plugins: plugins,
        })
    }

    fn server(&self) -> &wasmq::server::Server {
        self.server.as_ref().expect("running")
    }

    /// Connect, log in if `login`, send `input`, close the sending side,
    /// and read until the broker closes the connection. Returns the reply
    /// code of the broker's `connection.close`, if it sent one (a client
    /// that leaves mid-frame just has its socket closed).
    pub fn connection(&self, input: &[u8], login: bool) -> Result<Option<u16>, String> {
        let addr = self.server().amqp_addr;
        self.rt.block_on(async move {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            if login {
                log_in(&mut s).await?;
            }
            let (mut r, mut w) = s.into_split();
            let input = input.to_vec();
            let writer = tokio::spawn(async move {
                // The broker may close first: a failed write is fine.
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
                w
            });
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let read = tokio::time::timeout(CLOSE_WITHIN, async {
                let mut code = None;
                loop {
                    // Frames are decoded as they come (deliveries can be
                    // many); only the connection.close is kept.
                    while let Ok(Some(f)) = decode(&mut buf, u32::MAX) {
                        if let Frame::Method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                        ) = f
                        {
                            code = Some(c.reply_code);
                        }
                    }
                    match r.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return code,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            let _w = writer.await;
            read.map_err(|_| {
                format!("hang: the connection was still open {CLOSE_WITHIN:?} after the client's EOF")
            })
        })
        .and_then(|code| self.wait_for_no_connections().map(|()| code))
    }

    /// Send `input` to the RESP listener, close the sending side, and read
    /// until the broker closes the connection: it must within
    /// [`CLOSE_WITHIN`] of the client's EOF, and leave the registry.
    pub fn resp(&self, input: &[u8]) -> Result<(), String> {
        let addr = self.server().redis_addr.expect("the RESP listener is on");
        let closed = self
            .rt
            .block_on(send_until_closed(addr, input, CLOSE_WITHIN))?;
        if closed.is_none() {
            return Err(format!(
                "hang: the RESP connection was still open {CLOSE_WITHIN:?} after the client's EOF"
            ));
        }
        self.wait_for_no_connections()
    }

    /// Send `input` to the cluster port as an unauthenticated peer, close
    /// the sending side, and read until the node closes the connection.
    /// It must close within its handshake's timeout, give its place back,
    /// and never admit the peer.
    pub fn cluster_peer(&self, input: &[u8]) -> Result<(), String> {
        let node = self
            .server()
            .broker
            .cluster()
            .expect("a cluster node")
            .clone();
        let addr = node.addr().to_owned();
        self.rt.block_on(async move {
            send_until_closed(&addr, input, CLOSE_WITHIN)
                .await?
                .ok_or_else(|| {
                    format!("hang: the cluster port held the peer {CLOSE_WITHIN:?} after its EOF")
                })?;
            for _ in 0..500 {
                if node.handshakes_in_progress() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if node.handshakes_in_progress() != 0 {
                return Err("a handshake kept its place 5 s after its peer left".into());
            }
            let members = node.members();
            if members.iter().any(|m| m.name != "fuzz") {
                return Err(format!(
                    "an unauthenticated peer became a member: {members:?}"
                ));
            }
            Ok(())
        })
    }

    /// Send `input` to the admin port before any login, close the sending
    /// side, and read every answer until the broker closes. Returns the
    /// status codes; a 500 (the broker's own failure) is a failure, and so
    /// is a connection held past the header deadline after the EOF.
    pub fn admin_request(&self, input: &[u8]) -> Result<Vec<u16>, String> {
        let addr = self.server().admin_addr.expect("the admin API");
        self.rt.block_on(async move {
            let within = wasmq::admin::http::HEADER_TIMEOUT + Duration::from_secs(2);
            let got = send_until_closed(addr, input, within)
                .await?
                .ok_or_else(|| {
                    format!("hang: the admin port held the connection {within:?} after its EOF")
                })?;
            let text = String::from_utf8_lossy(&got);
            let codes: Vec<u16> = text
                .match_indices("HTTP/1.1 ")
                .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
                .collect();
            if codes.contains(&500) {
                return Err(format!(
                    "the admin API answered 500: {}",
                    text.chars().take(400).collect::<String>()
                ));
            }
            Ok(codes)
        })
    }

    /// The admin port still answers, and no connection outlived its case.
    pub fn check_admin(&self) -> Result<(), String> {
        let addr = self.server().admin_addr.expect("the admin API");
        for _ in 0..100 {
            let metrics = ureq::get(&format!("http://{addr}/metrics"))
                .call()
                .map_err(|e| format!("/metrics: {e}"))?
                .into_body()
                .read_to_string()
                .map_err(|e| format!("/metrics: {e}"))?;
            // The scrape itself is the one open connection.
            if metrics.lines().any(|l| l == "wasmq_admin_connections 1") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("admin connections stayed open after their clients left".into())
    }

    fn wait_for_no_connections(&self) -> Result<(), String> {
        let broker = self.server().broker.clone();
        for _ in 0..500 {
            if broker.connections().is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "{} connection(s) still registered 5 s after their client left",
            broker.connections().len()
        ))
    }

    /// A well-behaved client still gets in.
    pub fn check_serving(&self) -> Result<(), String> {
        let addr = self.server().amqp_addr;
        self.rt.block_on(async move {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            tokio::time::timeout(Duration::from_secs(10), log_in(&mut s))
                .await
                .map_err(|_| "a clean login timed out".to_string())?
        })
    }

    /// Delete every queue and every exchange the cases declared, so a long
    /// run's broker does not fill up with their messages.
    pub fn reset(&self) {
        let broker = &self.server().broker;
        for v in broker.vhosts() {
            for q in v.queues() {
                let _ = broker.delete_queue(&v, &q.name, false, false);
            }
            for x in v.exchanges() {
                if !x.name.is_empty() && !x.name.starts_with("amq.") {
                    let _ = broker.delete_exchange(&v, &x.name, false);
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown(Duration::from_secs(2)));
        }
    }
}

/// Connect to `addr`, send `input`, close the sending side, and read what
/// comes back (its first MiB) until the other side closes: `None` if it
/// has not closed within `within`.
async fn send_until_closed(
    addr: impl tokio::net::ToSocketAddrs,
    input: &[u8],
    within: Duration,
) -> Result<Option<Vec<u8>>, String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        // The other side may close first: a failed write is fine.
        let _ = w.write_all(&input).await;
        let _ = w.shutdown().await;
        w
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) if got.len() < 1 << 20 => got.extend_from_slice(&buf[..n]),
                Ok(_) => {}
            }
        }
    })
    .await;
    let _w = writer.await;
    Ok(read.ok().map(|()| got))
}

/// Append a frame.
fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    crate::input::frame(out, kind, 0, payload);
}

/// Log in as guest to `/` with heartbeats off, by hand.
async fn log_in(s: &mut TcpStream) -> Result<(), String> {
    let io = |e: std::io::Error| format!("login: {e}");
    s.write_all(PROTOCOL_HEADER).await.map_err(io)?;
    let mut buf = BytesMut::new();
    let next = async |s: &mut TcpStream, buf: &mut BytesMut| loop {
        if let Some(f) = decode(buf, 1 << 20).map_err(|e| format!("login: {e}"))? {
            return Ok::<_, String>(f);
        }
        if s.read_buf(buf).await.map_err(io)? == 0 {
            return Err("login: the broker closed the socket".to_string());
        }
    };
    next(s, &mut buf).await?; // connection.start
    let mut out = Vec::new();
    let mut p = vec![0, 10, 0, 11, 0, 0, 0, 0];
    p.extend_from_slice(b"\x05PLAIN\0\0\0\x0c\0guest\0guest\x05en_US");
    frame(&mut out, 1, &p);
    s.write_all(&out).await.map_err(io)?;
    next(s, &mut buf).await?; // connection.tune
    out.clear();
    frame(&mut out, 1, &[0, 10, 0, 31, 0, 16, 0, 2, 0, 0, 0, 0]);
    frame(&mut out, 1, &[0, 10, 0, 40, 1, b'/', 0, 0]);
    s.write_all(&out).await.map_err(io)?;
    match next(s, &mut buf).await? {
        Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => Ok(()),
        other => Err(format!("login: expected open-ok, got {other:?}")),
    }
}

/// Resident memory of this process, bytes (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
