//! What a client that holds connections open, or a user with a read-only
//! tag, can take of the admin port: each test is one way it used to take
//! more than its share, driven over real TCP against a real broker.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wasmq::admin::client::{AdminClient, ClientError};
use wasmq_tests::TestServer;

async fn api<T: Send + 'static>(
    client: AdminClient,
    f: impl FnOnce(AdminClient) -> T + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || f(client))
        .await
        .unwrap()
}

fn status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    match r {
        Err(ClientError::Status { status, .. }) => status,
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

fn user(name: &str, vhosts: &[&str], tag: &str) -> wasmq::access::User {
    wasmq::access::User {
        name: name.into(),
        password: "pw".into(),
        vhosts: vhosts.iter().map(|v| v.to_string()).collect(),
        permissions: Vec::new(),
        loopback_only: false,
        tags: vec![tag.into()],
    }
}

fn admin_addr(t: &TestServer) -> SocketAddr {
    t.server.as_ref().unwrap().admin_addr.unwrap()
}

/// A connection from `source` to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Whether the broker closed `s` within `within` (EOF or a reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Clients that never finish their request headers hold a bounded number
/// of the admin port's connections (per source and in total), each for at
/// most the header deadline; AMQP clients keep connecting meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_requests_take_bounded_connections_for_bounded_time() {
    let t = TestServer::start_with(|c| {
        c.admin.max_connections = 30;
        c.admin.max_connections_per_source = 20;
    })
    .await;
    let addr = admin_addr(&t);
    let partial = b"GET /api/overview HTTP/1.1\r\nHost: wasmq\r\nX-Slow: ";
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(partial).await.unwrap();
        held.push(s);
    }
    // The 21st from the same source is closed at once.
    let mut over = connect_from("127.0.0.1", addr).await;
    let _ = over.write_all(partial).await;
    assert!(closed_within(&mut over, Duration::from_secs(2)).await);
    // Another source still gets in, up to the total.
    let mut others = Vec::new();
    for _ in 0..10 {
        let mut s = connect_from("127.0.0.2", addr).await;
        s.write_all(partial).await.unwrap();
        others.push(s);
    }
    let mut past_total = connect_from("127.0.0.3", addr).await;
    assert!(closed_within(&mut past_total, Duration::from_secs(2)).await);
    // AMQP is not starved.
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "still-serving").await;
    // The held ones are closed at the header deadline, not later.
    let started = Instant::now();
    for s in held.iter_mut().chain(others.iter_mut()) {
        assert!(
            closed_within(
                s,
                wasmq::admin::http::HEADER_TIMEOUT + Duration::from_secs(5)
            )
            .await,
            "an incomplete request was held past the deadline"
        );
    }
    assert!(started.elapsed() <= wasmq::admin::http::HEADER_TIMEOUT + Duration::from_secs(5));
    // The places are given back: a request is answered again.
    let metrics = api(t.admin(), |a| a.get_text("/metrics").unwrap()).await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasmq_admin_connections_refused_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(refused >= 2.0, "{refused}");
    conn.close(0, "done".into()).await.unwrap();
    t.stop().await;
}

/// RabbitMQ's rule for read-only tags: `management` sees only its vhosts'
/// objects (traces and captures included) and nothing of the plugins'
/// files, logs, versions or rollouts; `monitoring` reads those, and only
/// an administrator downloads a plugin's bytes. Asking for the log of a
/// plugin that does not exist creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_users_reach_only_what_their_tags_allow() {
    let t = TestServer::start_with(|c| {
        c.users.push(user("team", &["/"], "management"));
        c.users.push(user("watcher", &[], "monitoring"));
        c.users
            .push(user("boss", &["/", "secret"], "administrator"));
    })
    .await;
    t.broker().add_vhost("secret").unwrap();
    // A traced publish in each vhost.
    for vhost in ["/", "secret"] {
        let conn = t.connect_as("boss", "pw", vhost).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            "sx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let mut headers = FieldTable::default();
        headers.insert("x-wasmq-trace".into(), AMQPValue::Boolean(true));
        ch.basic_publish(
            "sx".into(),
            format!("key-in-{vhost}").as_str().into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
        conn.close(0, "done".into()).await.unwrap();
    }
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || t.broker().traces().list().len()
            == 2)
        .await
    );
    let team = api(t.admin_as("team", "pw"), |a| {
        (
            a.get("/api/traces").unwrap(),
            status(a.get("/api/exchanges/secret/sx/capture")),
            status(a.get_bytes("/api/plugins/direct/wasm")),
            status(a.get("/api/plugins/direct/logs")),
            status(a.get("/api/plugins/direct/versions")),
            status(a.get("/api/rollouts")),
        )
    })
    .await;
    let vhosts: Vec<&str> = team
        .0
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["vhost"].as_str().unwrap())
        .collect();
    assert_eq!(vhosts, ["/"], "another vhost's traces are not shown");
    assert_eq!(
        (team.1, team.2, team.3, team.4, team.5),
        (403, 403, 403, 403, 403)
    );

    let watcher = api(t.admin_as("watcher", "pw"), |a| {
        let unknown: Vec<u16> = (0..200)
            .map(|i| status(a.get(&format!("/api/plugins/no-such-{i}/logs"))))
            .collect();
        (
            unknown,
            a.get("/api/plugins/direct/logs").is_ok(),
            a.get("/api/rollouts").is_ok(),
            status(a.get_bytes("/api/plugins/direct/wasm")),
            a.get("/api/traces").unwrap(),
            a.get_text("/metrics").unwrap(),
        )
    })
    .await;
    assert!(watcher.0.iter().all(|s| *s == 404));
    assert!(watcher.1 && watcher.2);
    assert_eq!(watcher.3, 403, "plugin bytes are for administrators");
    assert_eq!(watcher.4.as_array().unwrap().len(), 2);
    assert!(
        !watcher.5.contains("no-such-"),
        "an unknown name made a series"
    );
    assert!(!t.broker().host().has_plugin_log("no-such-0"));
    t.stop().await;
}

/// A plugin's log has a bounded number of followers per user; one past it
/// gets 429, and a place comes back when its follower leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_followers_are_bounded_per_user() {
    use base64::Engine as _;
    let t = TestServer::start_with(|c| c.users.push(user("watcher", &[], "monitoring"))).await;
    let addr = admin_addr(&t);
    let auth = base64::engine::general_purpose::STANDARD.encode("watcher:pw");
    let follow = || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /api/plugins/direct/logs?follow=true HTTP/1.1\r\nHost: wasmq\r\nAuthorization: Basic {auth}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        (String::from_utf8_lossy(&head[9..12]).into_owned(), s)
    };
    let mut held = Vec::new();
    for _ in 0..wasmq::admin::follow::MAX_FOLLOWERS_PER_USER {
        let (code, s) = follow().await;
        assert_eq!(code, "200");
        held.push(s);
    }
    let (code, _) = follow().await;
    assert_eq!(code, "429", "one follower too many");
    drop(held.pop());
    let mut again = "".to_owned();
    for _ in 0..50 {
        let (code, s) = follow().await;
        again = code;
        if again == "200" {
            held.push(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, "200", "a place comes back when a follower leaves");
    t.stop().await;
}

/// Captures: a body that is not an object is refused; what is held is
/// bounded by `max_bytes` as the messages arrived (large headers
/// included); the take is one JSON array.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_count_what_they_hold_and_refuse_malformed_specs() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "cx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let refused = api(t.admin(), |a| {
        (
            status(a.post("/api/exchanges/%2F/cx/capture", &json!([]))),
            status(a.post("/api/exchanges/%2F/cx/capture", &json!({"count": 0}))),
            a.post(
                "/api/exchanges/%2F/cx/capture",
                &json!({"count": 100000, "max_bytes": 256 << 10}),
            )
            .unwrap(),
        )
    })
    .await;
    assert_eq!((refused.0, refused.1), (400, 400));
    // Headers cheap on the wire and large decoded.
    let mut headers = FieldTable::default();
    for i in 0..200 {
        headers.insert(format!("h{i}").into(), AMQPValue::LongString("v".into()));
    }
    for _ in 0..1000 {
        ch.basic_publish(
            "cx".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_headers(headers.clone()),
        )
        .await
        .unwrap();
    }
    // The publishes are not confirmed: the broker may still be routing
    // them when the last is sent. Wait (a bounded while) for the capture
    // to be done.
    let status_view = api(t.admin(), |a| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = a.get("/api/exchanges/%2F/cx/capture").unwrap();
            if v["done"] == true || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await;
    assert_eq!(status_view["done"], true, "{status_view}");
    let kept = status_view["kept"].as_u64().unwrap();
    assert!(kept > 0 && kept < 1000, "bounded by bytes: kept {kept}");
    let taken: Value = api(t.admin(), |a| {
        a.post("/api/exchanges/%2F/cx/capture/take", &json!({}))
            .unwrap()
    })
    .await;
    let taken = taken.as_array().unwrap();
    assert_eq!(taken.len() as u64, kept);
    assert_eq!(taken[0]["properties"]["headers"]["h7"], "v");
    conn.close(0, "done".into()).await.unwrap();
    t.stop().await;
}

/// An import is checked whole before any of it is applied; names and
/// bounds that used to reach the file system or be taken as they came
/// are refused with 400; a single node answers the cluster's member
/// endpoints as it answers the others (404); a dry trace through a wide
/// fanout lists a bounded number of bindings and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_whole_and_in_words() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "wide".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let n = wasmq::author::trace::TRACED_BINDINGS + 44;
    for i in 0..n {
        let q = format!("w{i}");
        wasmq_tests::declare_queue(&ch, &q).await;
        ch.queue_bind(
            q.as_str().into(),
            "wide".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let doc = json!({
        "exchanges": [{"name": "imp-x", "vhost": "/", "type": "direct"}],
        "queues": [{"name": "imp-q", "vhost": "/", "arguments": {"x-queue-type": "lazy-ish"}}],
    });
    let long = "p".repeat(300);
    let r = api(t.admin(), move |a| {
        (
            status(a.post("/api/definitions", &doc)),
            status(a.get("/api/exchanges/%2F/imp-x")),
            status(a.put_bytes(&format!("/api/plugins/{long}"), b"\0asm")),
            status(a.get(&format!("/api/plugins/{long}/versions"))),
            status(a.post("/api/queues/%2F/q/members/x", &json!({}))),
            status(a.put_bytes(
                "/api/plugins/some-plugin/candidate?mode=canary&percent=10&max_fault_rate=-1",
                b"\0asm",
            )),
            a.post(
                "/api/exchanges/%2F/wide/trace",
                &json!({"routing_key": "k", "payload": "x"}),
            )
            .unwrap(),
        )
    })
    .await;
    assert_eq!(r.0, 400, "the queue of an unknown type is refused");
    assert_eq!(r.1, 404, "and nothing of the import was applied");
    assert_eq!((r.2, r.3), (400, 400));
    assert_eq!(r.4, 404);
    assert_eq!(r.5, 400, "a fault rate below 0 judges nothing");
    let route = r.6["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "route")
        .unwrap()
        .clone();
    assert_eq!(
        route["bindings"].as_array().unwrap().len(),
        wasmq::author::trace::TRACED_BINDINGS
    );
    assert_eq!(route["omitted"], 44);
    conn.close(0, "done".into()).await.unwrap();
    t.stop().await;
}
