//! Durability through a real client: durable definitions and persistent
//! messages survive a restart of the server on the same data folder;
//! transient ones do not; acked messages never come back; backlogs larger
//! than memory's share are paged to disk and read back; drained segments
//! are reclaimed. (Crash tests with `kill -9` are in the engine package,
//! next to the binary they kill.)

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use wasmq::alarm::Resource;
use wasmq_tests::TestServer;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    let c = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(c, Confirmation::Ack(None), "confirm for {key}");
}

async fn channel(t: &TestServer) -> (lapin::Connection, Channel) {
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    (conn, ch)
}

async fn count(ch: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    wasmq_tests::declare_passive(ch, queue)
        .await
        .map(|q| q.message_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_definitions_and_persistent_messages_survive_a_restart() {
    let t = TestServer::start().await;
    let (conn, ch) = channel(&t).await;
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(100));
    ch.exchange_declare(
        "events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("orders".into(), durable(), args.clone())
        .await
        .unwrap();
    wasmq_tests::declare_queue(&ch, "scratch").await; // transient
    for q in ["orders", "scratch"] {
        ch.queue_bind(
            q.into(),
            "events".into(),
            "orders.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    // A binding from a predeclared exchange is saved too.
    ch.queue_bind(
        "orders".into(),
        "amq.direct".into(),
        "direct-key".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "events", "orders.1", b"p1", persistent()).await;
    publish(&ch, "events", "orders.2", b"t2", BasicProperties::default()).await;
    publish(&ch, "events", "orders.3", b"p3", persistent()).await;
    conn.close(200, "bye".into()).await.unwrap();

    let t = t.restart().await;
    let (conn, ch) = channel(&t).await;
    // The transient queue and the transient message are gone.
    assert_eq!(
        wasmq_tests::reply_code(&count(&ch, "scratch").await.unwrap_err()),
        Some(404)
    );
    let ch = wasmq_tests::confirm_channel(&conn).await;
    assert_eq!(
        wasmq_tests::get_all(&ch, "orders").await,
        vec![("p1".into(), true), ("p3".into(), true)],
        "persistent messages come back in order, marked redelivered"
    );
    // Arguments came back (redeclaring with them is accepted, without 406).
    ch.queue_declare("orders".into(), durable(), args)
        .await
        .unwrap();
    // The exchange and both bindings were replayed into their plugins.
    publish(&ch, "events", "orders.4", b"p4", persistent()).await;
    publish(&ch, "amq.direct", "direct-key", b"p5", persistent()).await;
    assert_eq!(
        wasmq_tests::get_all(&ch, "orders").await,
        vec![("p4".into(), false), ("p5".into(), false)]
    );
    conn.close(200, "bye".into()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_stay_gone_and_unacked_ones_come_back() {
    let t = TestServer::start().await;
    let (conn, ch) = channel(&t).await;
    ch.queue_declare("work".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    for i in 0..10 {
        publish(&ch, "", "work", format!("m{i}").as_bytes(), persistent()).await;
    }
    let mut c = wasmq_tests::consume(&ch, "work", "").await;
    for i in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        // Ack the even ones, reject m1 without requeue, leave the rest.
        if i % 2 == 0 {
            d.ack(BasicAckOptions::default()).await.unwrap();
        } else if i == 1 {
            d.reject(BasicRejectOptions { requeue: false })
                .await
                .unwrap();
        }
    }
    // A round trip on the same channel: the acks before it were processed.
    count(&ch, "work").await.unwrap();
    drop(c);
    // A restart without closing the connection first: the unacked
    // deliveries are requeued by the shutdown, and must be on disk anyway.
    let t = t.restart().await;
    drop(conn);
    let (conn, ch) = channel(&t).await;
    let got: Vec<String> = wasmq_tests::get_all(&ch, "work")
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, vec!["m3", "m5", "m7", "m9"]);
    conn.close(200, "bye".into()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_paged_to_disk_and_segments_are_reclaimed() {
    // A 128 KiB flow watermark pages persistent messages out after 32 KiB
    // (768 paged entries take ~48 KiB of index, under the watermark);
    // 1 MiB segments make the 3 MiB backlog span several.
    let t = TestServer::start_with(|c| {
        c.amqp.queue_flow_bytes = 128 << 10;
        c.store.segment_mib = 1;
    })
    .await;
    let (conn, ch) = channel(&t).await;
    ch.queue_declare("backlog".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let body = |i: usize| {
        let mut b = format!("{i:08}").into_bytes();
        b.resize(4096, b'x');
        b
    };
    let n = 768;
    for i in 0..n {
        publish(&ch, "", "backlog", &body(i), persistent()).await;
    }
    let q = t.broker().vhost("/").unwrap().queue("backlog").unwrap();
    assert_eq!(q.len(), n);
    assert!(
        q.ready_bytes() < 128 << 10,
        "paged-out messages are not held in memory: {} bytes ready",
        q.ready_bytes()
    );
    let log = q.log().unwrap().clone();
    assert!(log.segment_count() >= 3, "{} segments", log.segment_count());
    let files = |dir: &std::path::Path| std::fs::read_dir(dir).unwrap().count();
    let dir = log.dir().to_owned();
    assert!(files(&dir) >= 3);

    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut c = wasmq_tests::consume(&ch, "backlog", "").await;
    for i in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, body(i), "message {i} read back from disk intact");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    count(&ch, "backlog").await.unwrap();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || log.segment_count() == 1).await,
        "drained segments are deleted, {} left",
        log.segment_count()
    );
    // The files go in the sync thread's next round.
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || files(&dir) <= 2).await,
        "only the active segment (and its acks) remain"
    );
    conn.close(200, "bye".into()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_corrupt_record_names_the_file_and_offset() {
    let t = TestServer::start_with(|c| c.store.segment_mib = 1).await;
    let (conn, ch) = channel(&t).await;
    ch.queue_declare("q".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    // Two segments: corruption in the first one is not a torn tail.
    for i in 0..600 {
        let mut body = format!("{i}").into_bytes();
        body.resize(4096, b'.');
        publish(&ch, "", "q", &body, persistent()).await;
    }
    let dir = t
        .broker()
        .vhost("/")
        .unwrap()
        .queue("q")
        .unwrap()
        .log()
        .unwrap()
        .dir()
        .to_owned();
    conn.close(200, "bye".into()).await.unwrap();
    let mut t = t;
    t.server
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(5))
        .await;
    let first = dir.join("0000000001.seg");
    let mut bytes = std::fs::read(&first).unwrap();
    let at = 16 + 8 + 100; // inside the first record's payload
    bytes[at] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    let err = wasmq::server::Server::start(t.config.clone())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("0000000001.seg") && text.contains("offset 16") && text.contains("checksum"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_returns_after_the_messages_are_synced() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("txq".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.tx_select().await.unwrap();
    let store = t.broker().store().unwrap().clone();
    for round in 0..5 {
        for i in 0..20 {
            ch.basic_publish(
                "".into(),
                "txq".into(),
                BasicPublishOptions::default(),
                format!("{round}.{i}").as_bytes(),
                persistent(),
            )
            .await
            .unwrap();
        }
        ch.tx_commit().await.unwrap();
        // Nothing else writes: commit-ok means the sync reached every write.
        let synced = store.synced().borrow().upto;
        assert!(
            synced >= store.issued(),
            "commit-ok before the sync: synced {synced}, issued {}",
            store.issued()
        );
    }
    assert_eq!(count(&ch, "txq").await.unwrap(), 100);
    conn.close(200, "bye".into()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_disk_space_blocks_publishers_but_not_consumers() {
    // A limit no disk meets: the monitor raises the alarm at once.
    let t = TestServer::start_with(|c| c.store.disk_free_limit_mib = u64::MAX >> 21).await;
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || t
            .broker()
            .alarm()
            .borrow()
            .is_some())
        .await
    );
    let consumer = t.connect().await;
    let cch = consumer.create_channel().await.unwrap();
    cch.queue_declare("q".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let publisher = t.connect().await;
    let pch = wasmq_tests::confirm_channel(&publisher).await;
    pch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"m",
        persistent(),
    )
    .await
    .unwrap();
    // Its first publish marks it a publisher: blocked, and not read.
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || publisher.status().blocked())
            .await,
        "the publisher got connection.blocked"
    );
    // A connection that only consumes is still served.
    assert!(!consumer.status().blocked());
    count(&cch, "q").await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_the_alarm_unblocks_publishers_and_their_publishes_go_through() {
    let t = TestServer::start_with(|c| c.store.disk_free_limit_mib = 0).await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    ch.queue_declare("q".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    publish(&ch, "", "q", b"before", persistent()).await;
    t.broker()
        .set_alarm(Resource::Disk, Some("test: disk low".into()));
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || conn.status().blocked()).await
    );
    // lapin holds publishes while its connection is blocked; either way
    // nothing reaches the queue until the alarm clears.
    let during = {
        let ch = ch.clone();
        tokio::spawn(async move {
            ch.basic_publish(
                "".into(),
                "q".into(),
                BasicPublishOptions::default(),
                b"during",
                persistent(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!during.is_finished(), "no confirm while blocked");
    assert_eq!(t.broker().vhost("/").unwrap().queue("q").unwrap().len(), 1);
    t.broker().set_alarm(Resource::Disk, None);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), during)
            .await
            .expect("published once unblocked")
            .unwrap(),
        Confirmation::Ack(None)
    );
    assert!(!conn.status().blocked());
    assert_eq!(
        wasmq_tests::get_all(&ch, "q").await,
        vec![("before".into(), false), ("during".into(), false)]
    );
    conn.close(200, "bye".into()).await.unwrap();
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_priority_queue_keeps_its_order_across_a_restart() {
    let t = TestServer::start().await;
    let (_conn, ch) = channel(&t).await;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-max-priority"),
        AMQPValue::ShortShortUInt(10),
    );
    ch.queue_declare("prio".into(), durable(), args)
        .await
        .unwrap();
    for (body, p) in [("p1", 1u8), ("p0", 0), ("p7", 7), ("p3", 3)] {
        let props = if p == 0 {
            persistent()
        } else {
            persistent().with_priority(p)
        };
        publish(&ch, "", "prio", body.as_bytes(), props).await;
    }
    drop(_conn);
    let t = t.restart().await;
    let (_conn, ch) = channel(&t).await;
    let got: Vec<String> = wasmq_tests::get_all(&ch, "prio")
        .await
        .into_iter()
        .map(|(b, redelivered)| {
            assert!(redelivered, "recovered messages are marked redelivered");
            b
        })
        .collect();
    assert_eq!(got, ["p7", "p3", "p1", "p0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_memory_use_blocks_publishers_and_shows_in_the_admin_api() {
    // A watermark no broker stays under: the monitor raises the alarm.
    let t = TestServer::start_with(|c| c.memory.high_watermark_mib = 1).await;
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || t
            .broker()
            .alarm_raised(Resource::Memory))
        .await
    );
    let reason = t.broker().alarm().borrow().clone().unwrap();
    assert!(reason.contains("memory use"), "{reason}");
    let consumer = t.connect().await;
    let cch = consumer.create_channel().await.unwrap();
    cch.queue_declare("q".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    let publisher = t.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    pch.basic_publish(
        "".into(),
        "q".into(),
        BasicPublishOptions::default(),
        b"m",
        persistent(),
    )
    .await
    .unwrap();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(5), || publisher.status().blocked())
            .await,
        "the publisher got connection.blocked"
    );
    assert!(!consumer.status().blocked());
    assert_eq!(
        count(&cch, "q").await.unwrap(),
        0,
        "the publish was not read"
    );

    let admin = t.admin();
    let (overview, metrics) = tokio::task::spawn_blocking(move || {
        (
            admin.get("/api/overview").unwrap(),
            admin.get_text("/metrics").unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!(overview["alarms"]["memory"], true);
    assert_eq!(overview["alarms"]["disk"], false);
    assert!(
        metrics.contains("wasmq_resource_alarm{resource=\"memory\"} 1"),
        "{metrics}"
    );
    t.stop().await;
}

/// A durable exchange whose plugin file was deleted keeps serving while
/// the broker runs; it must after a restart too. The broker keeps the last
/// good version of each plugin in its data folder and recovers from it
/// (before, it refused to start: `unknown exchange type`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_exchange_recovers_after_its_plugin_file_was_deleted() {
    let t = TestServer::start().await;
    let file = t.plugins.path().join("shard.wasm");
    std::fs::write(&file, wasmq_tests::plugin_bytes("consistent-hash")).unwrap();
    let broker = t.broker().clone();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(10), || broker
            .plugins()
            .get("shard")
            .is_some())
        .await
    );
    let (conn, ch) = channel(&t).await;
    ch.exchange_declare(
        "ring".into(),
        ExchangeKind::Custom("shard".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("s0".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        "s0".into(),
        "ring".into(),
        "1".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "ring", "k1", b"before", persistent()).await;
    conn.close(200, "bye".into()).await.unwrap();
    std::fs::remove_file(&file).unwrap();

    let t = t.restart().await;
    let status = t
        .broker()
        .plugins()
        .list()
        .into_iter()
        .find(|p| p.name == "shard")
        .expect("the kept version was loaded");
    assert_eq!(status.state, wasmq::plugin::PluginState::Orphaned);
    let (_conn, ch) = channel(&t).await;
    publish(&ch, "ring", "k2", b"after", persistent()).await;
    assert_eq!(
        wasmq_tests::get_all(&ch, "s0").await,
        [("before".to_string(), true), ("after".to_string(), false)],
        "the one shard gets every key, before and after the restart (recovered messages are marked redelivered)"
    );
}

/// The admin API's get takes messages one by one; when reading one back
/// from disk fails, the ones it took go back to the queue instead of being
/// lost with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_get_that_fails_to_read_puts_back_what_it_took() {
    // A 2 KiB paging threshold: all but the first messages live on disk.
    let t = TestServer::start_with(|c| c.amqp.queue_flow_bytes = 8 << 10).await;
    let (_conn, ch) = channel(&t).await;
    ch.queue_declare("q".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    for i in 0..5u8 {
        publish(&ch, "", "q", &[b'0' + i; 1024], persistent()).await;
    }
    let q = t.broker().vhost("/").unwrap().queue("q").unwrap();
    assert_eq!(q.len(), 5);
    // Corrupt the last records on disk: the first two messages are still
    // in memory, the later ones are read back from the segment.
    let seg = q.log().unwrap().dir().join("0000000001.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len - 1500..] {
        *b ^= 0xff;
    }
    std::fs::write(&seg, bytes).unwrap();
    let e = tokio::task::spawn_blocking({
        let admin = t.admin();
        move || {
            admin
                .post("/api/queues/%2F/q/get", &serde_json::json!({"count": 5}))
                .unwrap_err()
        }
    })
    .await
    .unwrap();
    match e {
        wasmq::admin::client::ClientError::Status { status, reason } => {
            assert_eq!(status, 500, "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(q.len(), 5, "the messages taken before the failure are back");
}
