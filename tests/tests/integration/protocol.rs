//! Protocol edge cases driven with raw bytes over TCP: what a broken or
//! hostile client gets (the right reply code, and the broker carries on).

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::FieldTable;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmq::alarm::Resource;
use wasmq::amqp::frame::{Frame, PROTOCOL_HEADER, decode, encode_method};
use wasmq_tests::TestServer;

struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn connect(t: &TestServer) -> Raw {
        Raw {
            stream: TcpStream::connect(t.addr()).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    async fn send_method(&mut self, channel: u16, m: AMQPClass) {
        let mut out = Vec::new();
        encode_method(&mut out, channel, m);
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next frame, or None when the server closed the socket.
    async fn frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) = decode(&mut self.buf, 1 << 20).unwrap() {
                    return Some(f);
                }
                if self.stream.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("server answered within 10 s")
    }

    /// Read until connection.close; returns its reply code.
    async fn close_code(&mut self) -> u16 {
        self.close().await.0
    }

    /// The code and text of the broker's connection.close.
    async fn close(&mut self) -> (u16, String) {
        loop {
            match self.frame().await {
                Some(Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                    return (c.reply_code, c.reply_text.to_string());
                }
                Some(_) => continue,
                None => panic!("socket closed without connection.close"),
            }
        }
    }

    /// Handshake as guest with the given heartbeat and frame_max.
    async fn open(
        t: &TestServer,
        heartbeat: u16,
        frame_max: u32,
        password: &str,
        vhost: &str,
    ) -> Raw {
        let stream = TcpStream::connect(t.addr()).await.unwrap();
        Raw::open_on(stream, heartbeat, frame_max, password, vhost).await
    }

    /// [`Raw::open`] on a socket the caller set up.
    async fn open_on(
        stream: TcpStream,
        heartbeat: u16,
        frame_max: u32,
        password: &str,
        vhost: &str,
    ) -> Raw {
        let mut r = Raw {
            stream,
            buf: BytesMut::new(),
        };
        r.stream.write_all(PROTOCOL_HEADER).await.unwrap();
        let Some(Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(start)))) =
            r.frame().await
        else {
            panic!("no connection.start")
        };
        assert!(start.mechanisms.to_string().contains("PLAIN"));
        r.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: format!("\0guest\0{password}").into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        match r.frame().await {
            Some(Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {}
            other => {
                r.buf.clear();
                if let Some(Frame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) = other
                {
                    r.buf.extend_from_slice(&c.reply_code.to_be_bytes());
                }
                return r;
            }
        }
        r.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max,
                heartbeat,
            })),
        )
        .await;
        r.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: vhost.into(),
            })),
        )
        .await;
        r
    }

    /// Logged in as guest, channel 1 open, queue `queue` declared on it.
    async fn with_queue(t: &TestServer, queue: &str) -> Raw {
        let mut r = Raw::open(t, 0, 131_072, "guest", "/").await;
        r.expect_open_ok().await;
        r.open_channel(1).await;
        r.send_method(1, declare(queue)).await;
        r.expect_declare_ok(1).await;
        r
    }

    async fn expect_open_ok(&mut self) {
        match self.frame().await {
            Some(Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))) => {}
            other => panic!("expected open-ok, got {other:?}"),
        }
    }

    async fn expect_declare_ok(&mut self, ch: u16) {
        match self.frame().await {
            Some(Frame::Method(c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))))
                if c == ch => {}
            other => panic!("expected queue.declare-ok on channel {ch}, got {other:?}"),
        }
    }

    async fn open_channel(&mut self, ch: u16) {
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.frame().await {
            Some(Frame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
                if c == ch => {}
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }
}

/// `queue.declare` of a plain queue.
fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// `basic.publish` to the default exchange (content frames follow).
fn publish(routing_key: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
        exchange: "".into(),
        routing_key: routing_key.into(),
        mandatory: false,
        immediate: false,
    }))
}

/// `basic.consume` of `queue` with no-ack, consumer tag `c`.
fn consume_no_ack(queue: &str) -> AMQPClass {
    AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: queue.into(),
        consumer_tag: "c".into(),
        no_local: false,
        no_ack: true,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// The broker still serves a well-behaved client.
async fn still_serving(t: &TestServer) {
    let mut r = Raw::open(t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_ours_and_a_close() {
    let t = TestServer::start().await;
    let mut r = Raw::connect(&t).await;
    r.stream.write_all(b"AMQP\x00\x00\x08\x00").await.unwrap();
    let mut got = [0u8; 8];
    r.stream.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, PROTOCOL_HEADER);
    assert_eq!(
        r.stream.read(&mut got).await.unwrap(),
        0,
        "then the socket closes"
    );
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_unknown_vhost_are_refused() {
    let t = TestServer::start().await;
    let r = Raw::open(&t, 0, 131_072, "wrong", "/").await;
    assert_eq!(&r.buf[..], &403u16.to_be_bytes(), "403 ACCESS_REFUSED");
    let mut r = Raw::open(&t, 0, 131_072, "guest", "no-such-vhost").await;
    assert_eq!(r.close_code().await, 530);
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_a_frame_error() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 0, 4096, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    // Only a header announcing 1 MB: refused before the payload is read.
    r.stream.write_all(&[3, 0, 1, 0, 0x10, 0, 0]).await.unwrap();
    assert_eq!(r.close_code().await, 501);
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_on_an_unopened_channel_is_a_channel_error() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.send_method(5, declare("q")).await;
    assert_eq!(r.close_code().await, 504);
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_before_header_is_an_unexpected_frame() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    r.send_method(1, publish("q")).await;
    r.stream
        .write_all(&[3, 0, 1, 0, 0, 0, 2, b'h', b'i', 0xCE])
        .await
        .unwrap();
    assert_eq!(r.close_code().await, 505);
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_method_arguments_are_a_syntax_error() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    // queue.declare (50, 10) with a truncated argument list.
    r.stream
        .write_all(&[1, 0, 1, 0, 0, 0, 5, 0, 50, 0, 10, 0, 0xCE])
        .await
        .unwrap();
    let code = r.close_code().await;
    assert!(code == 502 || code == 501, "{code}");
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_missed_heartbeats() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 1, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    let started = std::time::Instant::now();
    let mut heartbeats = 0;
    // Read (and never answer) until the server gives up on us.
    loop {
        match r.frame().await {
            Some(Frame::Heartbeat(0)) => heartbeats += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert!(heartbeats >= 1, "the server sent heartbeats");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acking_an_unknown_delivery_tag_closes_only_the_channel_with_406() {
    let t = TestServer::start().await;
    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    r.open_channel(2).await;
    r.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 99,
            multiple: false,
        })),
    )
    .await;
    match r.frame().await {
        Some(Frame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 406);
            assert!(
                c.reply_text.as_str().contains("unknown delivery tag 99"),
                "{}",
                c.reply_text
            );
        }
        other => panic!("expected channel.close on channel 1, got {other:?}"),
    }
    r.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
    .await;
    // Channel 2 on the same connection still works.
    r.send_method(2, declare("still-fine")).await;
    match r.frame().await {
        Some(Frame::Method(2, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
            assert_eq!(ok.queue.as_str(), "still-fine")
        }
        other => panic!("expected queue.declare-ok on channel 2, got {other:?}"),
    }
}

/// lapin stops writing while it is blocked, so only a raw client shows the
/// broker's side: a blocked publisher's frames are not read until the
/// alarm clears, and then they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_alarm_stops_reading_a_publisher_until_it_clears() {
    let t = TestServer::start_with(|c| c.store.disk_free_limit_mib = 0).await;
    let mut r = Raw::with_queue(&t, "q").await;
    r.send_method(1, publish("q")).await;
    let mut out = Vec::new();
    wasmq::amqp::frame::encode_content(
        &mut out,
        1,
        &[0, 0], // no properties (an empty flags word)
        b"before",
        131_072,
    );
    r.stream.write_all(&out).await.unwrap();
    let q = t.broker().vhost("/").unwrap().queue("q").unwrap();
    assert!(wasmq_tests::eventually_async(Duration::from_secs(5), || q.len() == 1).await);

    t.broker()
        .set_alarm(Resource::Disk, Some("test: disk low".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.send_method(1, declare("q")).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), r.frame())
            .await
            .is_err(),
        "a blocked publisher is not read"
    );
    t.broker().set_alarm(Resource::Disk, None);
    r.expect_declare_ok(1).await;
}

/// A client that consumes from a queue it publishes to, and does not read
/// while it writes (a single-threaded client blocked in its own send), is
/// still read by the broker while the broker's deliveries wait for it:
/// otherwise both would wait on each other once the sockets' buffers fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_without_reading_is_still_read() {
    const MESSAGES: usize = 128;
    const SIZE: usize = 512 * 1024;
    let t = TestServer::start_with(|c| c.amqp.queue_flow_bytes = 1 << 30).await;
    // Small client buffers: the kernel may not absorb what the broker does not read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let stream = socket.connect(t.addr()).await.unwrap();
    let mut r = Raw::open_on(stream, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    r.send_method(1, declare("loop")).await;
    r.expect_declare_ok(1).await;
    r.send_method(1, consume_no_ack("loop")).await;
    assert!(matches!(
        r.frame().await,
        Some(Frame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
        ))
    ));

    let body = vec![7u8; SIZE];
    let mut out = Vec::new();
    for _ in 0..MESSAGES {
        encode_method(&mut out, 1, publish("loop"));
        wasmq::amqp::frame::encode_content(&mut out, 1, &[0, 0], &body, 131_072);
    }
    tokio::time::timeout(Duration::from_secs(30), r.stream.write_all(&out))
        .await
        .expect("the broker kept reading while its deliveries waited for us")
        .unwrap();

    let (mut delivered, mut bytes) = (0, 0);
    while delivered < MESSAGES || bytes < MESSAGES * SIZE {
        match r.frame().await {
            Some(Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(_)))) => {
                delivered += 1
            }
            Some(Frame::Body(1, b)) => bytes += b.len(),
            Some(Frame::Header { .. }) => {}
            other => panic!("expected deliveries, got {other:?}"),
        }
    }
    assert_eq!((delivered, bytes), (MESSAGES, MESSAGES * SIZE));
    still_serving(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_holds_deliveries_already_on_their_way() {
    use lapin::options::BasicPublishOptions;
    // 20 MB in all: more than the sockets buffer, so the broker is still
    // sending when the client pauses it.
    const N: usize = 5000;
    let body = |i: usize| format!("{i:08}{}", "x".repeat(4088));
    let t = TestServer::start().await;
    let mut r = Raw::with_queue(&t, "q").await;
    // A backlog first, so deliveries stream as fast as the broker sends.
    let conn = t.connect().await;
    let publisher = wasmq_tests::confirm_channel(&conn).await;
    for i in 0..N {
        publisher
            .basic_publish(
                "".into(),
                "q".into(),
                BasicPublishOptions::default(),
                body(i).as_bytes(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    publisher.wait_for_confirms().await.unwrap();

    let flow = |active| AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active }));
    r.send_method(1, consume_no_ack("q")).await;
    // Pause once deliveries are streaming: the connection then holds
    // dispatched deliveries it has not written yet.
    let mut bodies = Vec::new();
    let mut paused = false;
    let mut flow_ok = None;
    while flow_ok.is_none() {
        match r.frame().await.expect("socket open") {
            Frame::Body(1, b) => {
                bodies.push(b);
                if !paused {
                    r.send_method(1, flow(false)).await;
                    paused = true;
                }
            }
            Frame::Method(1, AMQPClass::Channel(channel::AMQPMethod::FlowOk(ok))) => {
                flow_ok = Some(ok.active)
            }
            Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert!(!d.redelivered)
            }
            _ => {}
        }
    }
    assert_eq!(flow_ok, Some(false));
    let before = bodies.len();
    assert!(before < N, "paused before the backlog was all sent");
    // Nothing follows flow-ok while paused.
    match tokio::time::timeout(Duration::from_millis(300), r.frame()).await {
        Err(_) => {}
        Ok(f) => panic!("a frame after flow-ok(active=false): {f:?}"),
    }
    r.send_method(1, flow(true)).await;
    let mut resumed = false;
    while bodies.len() < N {
        match r.frame().await.expect("socket open") {
            Frame::Body(1, b) => {
                assert!(resumed, "a delivery came before flow-ok(active=true)");
                bodies.push(b);
            }
            Frame::Method(1, AMQPClass::Channel(channel::AMQPMethod::FlowOk(ok))) => {
                assert!(ok.active);
                resumed = true;
            }
            Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => {
                assert!(!d.redelivered, "held back is not redelivered")
            }
            _ => {}
        }
    }
    assert!(
        bodies
            .iter()
            .enumerate()
            .all(|(i, b)| b == body(i).as_bytes()),
        "every message once, in order"
    );
}

/// A field table (its length first) holding one entry whose value is an
/// array nested `levels` deep, built by hand: an encoder that recursed
/// would overflow the test's own stack first.
fn deep_table(levels: usize) -> Vec<u8> {
    let mut v = b"A\0\0\0\0".to_vec();
    for _ in 1..levels {
        let mut outer = b"A".to_vec();
        outer.extend_from_slice(&(v.len() as u32).to_be_bytes());
        outer.extend_from_slice(&v);
        v = outer;
    }
    let mut entries = vec![1, b'x'];
    entries.extend_from_slice(&v);
    let mut t = (entries.len() as u32).to_be_bytes().to_vec();
    t.extend_from_slice(&entries);
    t
}

/// A frame of `kind` on `channel` around `payload`.
fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

/// One 8 KB `connection.start-ok` nested 1,600 deep, sent before logging
/// in, overflowed a worker's stack and aborted the process. Now it is a
/// syntax error (502) for that connection alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_field_table_before_login_is_a_syntax_error() {
    let t = TestServer::start().await;
    for levels in [1_600, 20_000] {
        let mut r = Raw::connect(&t).await;
        r.stream.write_all(PROTOCOL_HEADER).await.unwrap();
        assert!(matches!(
            r.frame().await,
            Some(Frame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(_))
            ))
        ));
        let mut payload = vec![0, 10, 0, 11];
        payload.extend_from_slice(&deep_table(levels));
        payload.extend_from_slice(b"\x05PLAIN\0\0\0\x0c\0guest\0wrong\x05en_US");
        r.stream
            .write_all(&raw_frame(1, 0, &payload))
            .await
            .unwrap();
        // The text names the class of error once.
        assert_eq!(
            r.close().await,
            (
                502,
                format!(
                    "SYNTAX_ERROR - field table nested deeper than {} levels",
                    wasmq::amqp::field_table::MAX_DEPTH
                )
            ),
            "{levels} levels"
        );
    }
    still_serving(&t).await;
}

/// The same bound where tables come after login: declare arguments and a
/// content header's `headers`. Tables within the bound still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_arguments_and_headers_are_syntax_errors() {
    let t = TestServer::start().await;
    let declare_with = |table: &[u8]| {
        let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        p.extend_from_slice(table);
        raw_frame(1, 1, &p)
    };
    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    r.stream
        .write_all(&declare_with(&deep_table(
            wasmq::amqp::field_table::MAX_DEPTH - 1,
        )))
        .await
        .unwrap();
    r.expect_declare_ok(1).await;
    r.stream
        .write_all(&declare_with(&deep_table(5_000)))
        .await
        .unwrap();
    assert_eq!(r.close_code().await, 502);

    let mut r = Raw::open(&t, 0, 131_072, "guest", "/").await;
    r.expect_open_ok().await;
    r.open_channel(1).await;
    r.send_method(1, publish("q")).await;
    // Content header: class 60, weight 0, body size 0, flags with
    // `headers` (bit 13), then the table.
    let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0];
    header.extend_from_slice(&deep_table(5_000));
    r.stream.write_all(&raw_frame(2, 1, &header)).await.unwrap();
    assert_eq!(r.close_code().await, 502);
    still_serving(&t).await;
}

/// Texts the broker cuts to a short string's 255 bytes are cut on a
/// character boundary: a consumer tag of 'a' and 127 'é' made a 530 whose
/// text was cut inside a character, which panicked the connection's task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_texts_are_cut_on_character_boundaries() {
    let t = TestServer::start().await;
    let mut r = Raw::with_queue(&t, "q").await;
    let tag = format!("a{}", "é".repeat(127));
    let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
        queue: "q".into(),
        consumer_tag: tag.as_str().into(),
        no_local: false,
        no_ack: false,
        exclusive: false,
        nowait: false,
        arguments: FieldTable::default(),
    }));
    r.send_method(1, consume.clone()).await;
    assert!(matches!(
        r.frame().await,
        Some(Frame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
        ))
    ));
    r.send_method(1, consume).await;
    let close = loop {
        match r.frame().await {
            Some(Frame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                break c;
            }
            Some(_) => continue,
            None => panic!("socket closed without connection.close"),
        }
    };
    assert_eq!(close.reply_code, 530);
    assert!(
        close.reply_text.as_str().contains("aé"),
        "{}",
        close.reply_text
    );
    assert!(
        t.until_no_connections().await,
        "the connection was cleaned up"
    );
    still_serving(&t).await;
}

/// The handshake's own refusals quote the client's input, which can be
/// 255 bytes on its own: their text is cut too, so the frame decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_fit_a_short_string() {
    let t = TestServer::start().await;
    let vhost = "v".repeat(255);
    let mut r = Raw::open(&t, 0, 131_072, "guest", &vhost).await;
    assert_eq!(r.close_code().await, 530);
    still_serving(&t).await;
}

/// `amqp.max_message_size`: a content header announcing more is refused
/// with 406 on its channel before any body is buffered; the connection and
/// its other channels carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_is_refused_before_its_body() {
    let t = TestServer::start_with(|c| c.amqp.max_message_size = 1000).await;
    let mut r = Raw::with_queue(&t, "q").await;
    let mut out = Vec::new();
    wasmq::amqp::frame::encode_content(&mut out, 1, &[0, 0], &[7u8; 1000], 131_072);
    r.send_method(1, publish("q")).await;
    r.stream.write_all(&out).await.unwrap();
    // One byte over: refused at the header.
    out.clear();
    wasmq::amqp::frame::encode_content(&mut out, 1, &[0, 0], &[7u8; 1001], 131_072);
    r.send_method(1, publish("q")).await;
    r.stream.write_all(&out).await.unwrap();
    match r.frame().await {
        Some(Frame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 406);
            assert!(
                c.reply_text
                    .as_str()
                    .contains("larger than configured max size 1000"),
                "{}",
                c.reply_text
            );
            assert_eq!((c.class_id, c.method_id), (60, 40));
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    r.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
    .await;
    r.open_channel(2).await;
    let q = t.broker().vhost("/").unwrap().queue("q").unwrap();
    assert_eq!(q.len(), 1, "the message within the bound was queued");
}

/// With publishers blocked by an alarm, a connection is not read; it must
/// still notice its client leave, or what it holds (half a message, its
/// place in the registry) stays until restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_connection_notices_its_client_leave() {
    let t = TestServer::start_with(|c| c.store.disk_free_limit_mib = 0).await;
    let mut r = Raw::with_queue(&t, "q").await;
    t.broker()
        .set_alarm(Resource::Disk, Some("test: disk low".into()));
    // Half a large message: the header announces 1 MB, 60 KB follow.
    let mut header = vec![0, 60, 0, 0];
    header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    r.send_method(1, publish("q")).await;
    r.stream.write_all(&raw_frame(2, 1, &header)).await.unwrap();
    r.stream
        .write_all(&raw_frame(3, 1, &[1u8; 60_000]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.broker().connections().len(), 1);
    drop(r);
    assert!(
        t.until_no_connections().await,
        "the blocked connection saw its client go"
    );
    t.broker().set_alarm(Resource::Disk, None);
}

/// Confirms of publishes handled in one batch go out as one `basic.ack`
/// with `multiple` (transient messages too): RabbitMQ's clients' tests wait
/// for such an ack, and it saves frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_ready_together_are_one_multiple_ack() {
    use amq_protocol::protocol::confirm;
    let t = TestServer::start().await;
    let mut r = Raw::with_queue(&t, "q").await;
    r.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await;
    assert!(matches!(
        r.frame().await,
        Some(Frame::Method(
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))
        ))
    ));
    // Ten publishes in one write.
    let mut out = Vec::new();
    for i in 0..10u8 {
        encode_method(&mut out, 1, publish("q"));
        wasmq::amqp::frame::encode_content(&mut out, 1, &[0, 0], &[i], 131_072);
    }
    r.stream.write_all(&out).await.unwrap();
    let (mut frames, mut highest) = (0, 0);
    while highest < 10 {
        match r.frame().await {
            Some(Frame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
                assert!(a.delivery_tag > highest, "in order");
                assert!(a.multiple || a.delivery_tag == highest + 1, "{a:?}");
                highest = a.delivery_tag;
                frames += 1;
            }
            other => panic!("expected basic.ack, got {other:?}"),
        }
    }
    assert!(frames < 10, "{frames} acks for 10 publishes in one write");
    assert_eq!(highest, 10);
}
