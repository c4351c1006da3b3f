//! The Redis front end (`engine/src/resp/`): real Redis clients (redis-py
//! and node-redis, each beside an AMQP client on the same queues and
//! channels), pushed messages across a restart, hostile input, permissions
//! and flow control, against the real broker over TCP.
//!
//! `scripts/test.sh` installs redis-py beside pika (`WASMQ_PYTHON`) and
//! node-redis with amqplib's suites (`WASMQ_AMQPLIB`).

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmq_tests::TestServer;

async fn start() -> TestServer {
    TestServer::start_with(|c| c.redis.listen = Some("127.0.0.1:0".parse().unwrap())).await
}

/// A reply, as the test reads it.
#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
}

/// A bare RESP client: what a hostile peer or a hand-written client sends.
struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    async fn connect(t: &TestServer) -> Resp {
        Resp {
            stream: TcpStream::connect(t.redis_addr()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn logged_in(t: &TestServer) -> Resp {
        let mut r = Resp::connect(t).await;
        assert_eq!(r.call(&["AUTH", "guest", "guest"]).await, ok());
        r
    }

    async fn send(&mut self, args: &[&str]) {
        let mut wire = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            wire.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        self.stream.write_all(&wire).await.unwrap();
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn call(&mut self, args: &[&str]) -> Reply {
        self.send(args).await;
        self.reply().await
    }

    /// The next reply (within 5 s).
    async fn reply(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(5), self.reply_now())
            .await
            .expect("a reply within 5 s")
    }

    async fn reply_now(&mut self) -> Reply {
        loop {
            if let Some((r, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return r;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the broker closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the broker closes the connection within 5 s (what it sent
    /// before is read and dropped).
    async fn closed(&mut self) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(until, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}

fn parse(b: &[u8]) -> Option<(Reply, usize)> {
    let end = b.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&b[1..end]).unwrap();
    let after = end + 2;
    Some(match b[0] {
        b'+' => (Reply::Simple(line.into()), after),
        b'-' => (Reply::Error(line.into()), after),
        b':' => (Reply::Int(line.parse().unwrap()), after),
        b'$' if line == "-1" => (Reply::Null, after),
        b'*' if line == "-1" => (Reply::Null, after),
        b'$' => {
            let n: usize = line.parse().unwrap();
            if b.len() < after + n + 2 {
                return None;
            }
            (Reply::Bulk(b[after..after + n].to_vec()), after + n + 2)
        }
        b'*' => {
            let n: usize = line.parse().unwrap();
            let mut at = after;
            let mut items = Vec::new();
            for _ in 0..n {
                let (r, used) = parse(&b[at..])?;
                items.push(r);
                at += used;
            }
            (Reply::Array(items), at)
        }
        other => panic!("unexpected reply type {}", other as char),
    })
}

fn ok() -> Reply {
    Reply::Simple("OK".into())
}

fn bulk(s: &str) -> Reply {
    Reply::Bulk(s.as_bytes().to_vec())
}

fn error_text(r: Reply) -> String {
    match r {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_works_unchanged_beside_pika() {
    let t = start().await;
    wasmq_tests::run_pika_script(
        "redis_client.py",
        [
            t.redis_addr().port().to_string(),
            t.addr().port().to_string(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_redis_works_unchanged_beside_amqplib() {
    let t = start().await;
    wasmq_tests::run_node_script(
        "redis.mjs",
        [format!("redis://guest:guest@{}", t.redis_addr()), t.url()],
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = wasmq_tests::pki::Ca::new("wasmq test CA");
    let server = ca.server();
    let cert = wasmq_tests::pki::write(dir.path(), "server.pem", &server.cert);
    let key = wasmq_tests::pki::write(dir.path(), "server.key", &server.key);
    let ca_file = wasmq_tests::pki::write(dir.path(), "ca.pem", &ca.pem());
    let t = TestServer::start_with(|c| {
        c.tls = Some(wasmq::tls::TlsSettings {
            cert_file: cert,
            key_file: key,
            ca_file: None,
            fail_if_no_peer_cert: false,
            watch: false,
        });
        c.redis.listen_tls = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let port = t.server.as_ref().unwrap().redis_tls_addr.unwrap().port();
    wasmq_tests::run_pika_script(
        "redis_tls.py",
        [port.to_string(), ca_file.display().to_string()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_messages_survive_a_restart_and_are_popped_in_order() {
    let t = start().await;
    let mut r = Resp::logged_in(&t).await;
    // Pipelined: every reply comes once the messages are on disk.
    for i in 0..50 {
        r.send(&["LPUSH", "durable.list", &format!("m{i}")]).await;
    }
    for i in 0..50 {
        assert_eq!(r.reply().await, Reply::Int(i + 1));
    }
    assert_eq!(r.call(&["RPOP", "durable.list"]).await, bulk("m0"));
    drop(r);
    let t = t.restart().await;
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["LLEN", "durable.list"]).await, Reply::Int(49));
    assert_eq!(r.call(&["RPOP", "durable.list"]).await, bulk("m1"));
    // What was popped stays popped across the next restart too.
    drop(r);
    let t = t.restart().await;
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["RPOP", "durable.list"]).await, bulk("m2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_mean_redis_channels_on_an_exchange_that_ignores_keys() {
    // A headers exchange routes on headers alone: the channel is matched
    // by the binding's filter.
    let t = TestServer::start_with(|c| {
        c.redis.listen = Some("127.0.0.1:0".parse().unwrap());
        c.redis.exchange = "amq.headers".into();
    })
    .await;
    let mut sub = Resp::logged_in(&t).await;
    assert_eq!(
        sub.call(&["SUBSCRIBE", "news"]).await,
        Reply::Array(vec![bulk("subscribe"), bulk("news"), Reply::Int(1)])
    );
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["PUBLISH", "other", "x"]).await, Reply::Int(0));
    assert_eq!(r.call(&["PUBLISH", "news", "y"]).await, Reply::Int(1));
    assert_eq!(
        sub.reply().await,
        Reply::Array(vec![bulk("message"), bulk("news"), bulk("y")])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_a_push_is_answered_at_once() {
    let t = TestServer::start_with(|c| {
        c.redis.listen = Some("127.0.0.1:0".parse().unwrap());
        c.store.enabled = false;
    })
    .await;
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["LPUSH", "mem", "a", "b"]).await, Reply::Int(2));
    assert_eq!(r.call(&["RPOP", "mem"]).await, bulk("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_an_error_and_a_closed_connection_not_memory() {
    let t = TestServer::start_with(|c| {
        c.redis.listen = Some("127.0.0.1:0".parse().unwrap());
        c.amqp.max_message_size = 1024;
    })
    .await;
    let cases: &[(&[u8], &str, bool)] = &[
        // (what is sent, the error's text, logged in first)
        (b"*2147483648\r\n", "invalid multibulk length", false),
        (b"*1\r\n$1000000\r\n", "invalid bulk length", false),
        (
            b"*3\r\n$5\r\nLPUSH\r\n$1\r\nq\r\n$2000\r\n",
            "invalid bulk length",
            true,
        ),
        (b"*-5x\r\n", "invalid multibulk length", false),
        (
            b"*1\r\n*1\r\n$4\r\nPING\r\n",
            "expected '$', got '*'",
            false,
        ),
        (b"*1\r\n$4\r\nPINGxx", "bulk not terminated by CRLF", false),
        (b"PING \"unbalanced\n", "unbalanced quotes", false),
    ];
    for (wire, text, login) in cases {
        let mut r = if *login {
            Resp::logged_in(&t).await
        } else {
            Resp::connect(&t).await
        };
        r.raw(wire).await;
        let e = error_text(r.reply().await);
        assert!(e.contains(text), "{wire:?}: {e}");
        assert!(r.closed().await, "{wire:?} left the connection open");
    }
    // An inline command that never ends is cut at 64 KiB.
    let mut r = Resp::connect(&t).await;
    r.raw(&vec![b'a'; 70 * 1024]).await;
    assert!(error_text(r.reply().await).contains("too big inline request"));
    assert!(r.closed().await);

    // Errors a command can recover from leave the connection usable.
    let mut r = Resp::connect(&t).await;
    assert!(error_text(r.call(&["LPUSH", "q", "x"]).await).starts_with("NOAUTH"));
    assert!(error_text(r.call(&["AUTH", "guest", "wrong"]).await).starts_with("WRONGPASS"));
    assert_eq!(r.call(&["AUTH", "guest"]).await, ok());
    for (args, text) in [
        (&["BRPOP", "q", "soon"][..], "timeout is not a float"),
        (&["BRPOP", "q", "-1"][..], "timeout is negative"),
        (&["RPOP", "q", "-3"][..], "must be positive"),
        (&["NOPE"][..], "unknown command 'NOPE'"),
        (&["LPUSH"][..], "wrong number of arguments for 'lpush'"),
        (&["HELLO", "4"][..], "NOPROTO"),
    ] {
        let e = error_text(r.call(args).await);
        assert!(e.contains(text), "{args:?}: {e}");
    }
    // Inline commands, as typed into telnet.
    r.raw(b"PING\r\n").await;
    assert_eq!(r.reply().await, Reply::Simple("PONG".into()));
    r.raw(b"LPUSH q \"two words\"\n").await;
    assert_eq!(r.reply().await, Reply::Int(1));
    assert_eq!(r.call(&["RPOP", "q"]).await, bulk("two words"));
    assert_eq!(r.call(&["QUIT"]).await, ok());
    assert!(r.closed().await);
    // The broker is still there for everyone.
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["PING"]).await, Reply::Simple("PONG".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_apply_as_for_amqp() {
    let t = start().await;
    let admin = t.admin();
    admin
        .put("/api/users/pusher", &json!({"password": "pw", "tags": ""}))
        .unwrap();
    // May write to (and declare) `in.*` queues, read nothing.
    admin
        .put(
            "/api/permissions/%2f/pusher",
            &json!({"configure": "^in\\.", "write": "^in\\.", "read": "^$"}),
        )
        .unwrap();
    let mut r = Resp::connect(&t).await;
    assert_eq!(r.call(&["AUTH", "pusher", "pw"]).await, ok());
    assert_eq!(r.call(&["LPUSH", "in.box", "x"]).await, Reply::Int(1));
    let e = error_text(r.call(&["RPOP", "in.box"]).await);
    assert!(e.starts_with("NOPERM read access to queue 'in.box'"), "{e}");
    let e = error_text(r.call(&["LPUSH", "other", "x"]).await);
    assert!(e.starts_with("NOPERM write access to queue 'other'"), "{e}");
    let e = error_text(r.call(&["SUBSCRIBE", "news"]).await);
    assert!(
        e.starts_with("NOPERM read access to exchange 'amq.topic'"),
        "{e}"
    );
    let e = error_text(r.call(&["PUBLISH", "news", "x"]).await);
    assert!(
        e.starts_with("NOPERM write access to exchange 'amq.topic'"),
        "{e}"
    );
    // The connection is listed with its user, as an AMQP one is.
    let conns = admin.get("/api/connections").unwrap();
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["user"] == "pusher"),
        "{conns}"
    );
    let mut g = Resp::logged_in(&t).await;
    assert_eq!(g.call(&["RPOP", "in.box"]).await, bulk("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_alarm_stops_reading_a_pushing_client_until_it_clears() {
    // The disk monitor off: the test raises the alarm itself.
    let t = TestServer::start_with(|c| {
        c.redis.listen = Some("127.0.0.1:0".parse().unwrap());
        c.store.disk_free_limit_mib = 0;
    })
    .await;
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["LPUSH", "flow", "before"]).await, Reply::Int(1));
    let mut popper = Resp::logged_in(&t).await;
    t.broker()
        .set_alarm(wasmq::alarm::Resource::Disk, Some("test".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.send(&["LPUSH", "flow", "during"]).await;
    // Not read, so not answered, while the alarm holds.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), r.reply_now())
            .await
            .is_err()
    );
    assert_eq!(
        t.broker().vhost("/").unwrap().queue("flow").unwrap().len(),
        1
    );
    // A client that only pops drains the broker: it is read on.
    assert_eq!(popper.call(&["RPOP", "flow"]).await, bulk("before"));
    t.broker().set_alarm(wasmq::alarm::Resource::Disk, None);
    assert_eq!(r.reply().await, Reply::Int(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_pop_is_woken_by_an_amqp_publish_and_a_timeout_answers_nil() {
    let t = start().await;
    let mut r = Resp::logged_in(&t).await;
    assert_eq!(r.call(&["BRPOP", "amqp.fed", "0.2"]).await, Reply::Null);
    r.send(&["BRPOP", "amqp.fed", "0"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    assert!(
        wasmq_tests::publish_confirmed(&ch, "", "amqp.fed", b"from lapin", Default::default())
            .await
    );
    assert_eq!(
        r.reply().await,
        Reply::Array(vec![bulk("amqp.fed"), bulk("from lapin")])
    );
    // Commands pipelined behind a blocked one wait for it.
    r.send(&["BLPOP", "amqp.fed", "0"]).await;
    r.send(&["PING"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut other = Resp::logged_in(&t).await;
    assert_eq!(
        other.call(&["RPUSH", "amqp.fed", "late"]).await,
        Reply::Int(1)
    );
    assert_eq!(
        r.reply().await,
        Reply::Array(vec![bulk("amqp.fed"), bulk("late")])
    );
    assert_eq!(r.reply().await, Reply::Simple("PONG".into()));
    // A client that leaves while blocked takes nothing with it.
    r.send(&["BRPOP", "amqp.fed", "0"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(r);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        other.call(&["LPUSH", "amqp.fed", "kept"]).await,
        Reply::Int(1)
    );
    assert_eq!(other.call(&["RPOP", "amqp.fed"]).await, bulk("kept"));
    // Another connection's exclusive queue is not for taking, as over AMQP.
    ch.queue_declare(
        "mine.only".into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    for cmd in [
        &["RPOP", "mine.only"][..],
        &["BRPOP", "mine.only", "0"],
        &["DEL", "mine.only"],
    ] {
        let e = error_text(other.call(cmd).await);
        assert!(e.contains("RESOURCE_LOCKED"), "{cmd:?}: {e}");
    }
}
