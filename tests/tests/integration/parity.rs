//! RabbitMQ behaviours that clients' own test suites rely on, through
//! lapin against the real broker: who may set `user-id`, refreshing a
//! secret, idempotent deletes, the empty queue name, queue equivalence,
//! and queue types.

use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use wasmq_tests::{TestServer, reply_code};

fn args(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    t
}

/// A `user-id` that is not the connection's user is refused (406), so a
/// consumer can trust it; the publisher's own passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_user_id_is_refused_and_ones_own_passes() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = wasmq_tests::confirm_channel(&conn).await;
    wasmq_tests::declare_queue(&ch, "q").await;
    let publish = |ch: lapin::Channel, uid: &'static str| async move {
        ch.basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default().with_user_id(uid.into()),
        )
        .await?
        .await
    };
    assert!(publish(ch.clone(), "guest").await.unwrap().is_ack());
    let e = match publish(ch.clone(), "admin").await {
        Err(e) => e,
        Ok(c) => {
            // The confirm may race the close; the channel's error is what
            // counts.
            assert!(!c.is_ack(), "{c:?}");
            ch.wait_for_confirms().await.unwrap_err()
        }
    };
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(
        e.to_string().contains("user_id property set to 'admin'"),
        "{e}"
    );
    assert!(conn.status().connected(), "a channel error only");
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(wasmq_tests::get_all(&ch, "q").await.len(), 1);
}

/// `connection.update-secret`, as RabbitMQ answers it for a password user
/// (whose login cannot expire): update-secret-ok, and the connection goes
/// on. amqplib's own suite sends an arbitrary secret and expects this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_secret_keeps_a_password_users_connection() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    conn.update_secret("a refreshed token".into(), "token refresh".into())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "still-works").await;
    assert!(conn.status().connected());
}

/// Deleting an exchange or a queue that does not exist succeeds, as in
/// RabbitMQ (deletes are idempotent); the channel stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_what_does_not_exist_is_ok() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete("no-such-exchange".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let n = ch
        .queue_delete("no-such-queue".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(ch.status().connected());
    wasmq_tests::declare_queue(&ch, "after").await;
}

/// `basic.get` or `basic.consume` with an empty queue name on a channel
/// that declared none is a channel error (404), not a connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_empty_queue_name_without_a_declared_queue_is_404() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .basic_get("".into(), BasicGetOptions::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(404), "{e}");
    let ch = conn.create_channel().await.unwrap();
    let e = ch
        .basic_consume(
            "".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(404), "{e}");
    assert!(conn.status().connected(), "other channels are unaffected");
    let ch = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "q").await;
}

/// Redeclaring a queue with other `durable`, `auto-delete` or `exclusive`
/// flags is 406, as in RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclaring_a_queue_with_other_flags_is_406() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let first = QueueDeclareOptions::default();
    for (flag, other) in [
        (
            "durable",
            QueueDeclareOptions {
                durable: true,
                ..first
            },
        ),
        (
            "auto_delete",
            QueueDeclareOptions {
                auto_delete: true,
                ..first
            },
        ),
        (
            "exclusive",
            QueueDeclareOptions {
                exclusive: true,
                ..first
            },
        ),
    ] {
        let ch = conn.create_channel().await.unwrap();
        let name = format!("q-{flag}");
        ch.queue_declare(name.as_str().into(), first, FieldTable::default())
            .await
            .unwrap();
        let e = ch
            .queue_declare(name.as_str().into(), other, FieldTable::default())
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{flag}: {e}");
        assert!(
            e.to_string()
                .contains(&format!("inequivalent arg '{flag}'")),
            "{e}"
        );
    }
}

/// `x-queue-type`: `classic`, `quorum` and `stream` are made; unknown
/// types (names are case-sensitive, as RabbitMQ's) are refused (406)
/// rather than silently made classic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_types_this_broker_does_not_have_are_refused() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "classic".into(),
        QueueDeclareOptions::default(),
        args(&[("x-queue-type", "classic")]),
    )
    .await
    .unwrap();
    // A single node makes a quorum queue a one-replica queue, as RabbitMQ
    // does (`single_node_quorum.rs`).
    ch.queue_declare(
        "q-quorum".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args(&[("x-queue-type", "quorum")]),
    )
    .await
    .unwrap();
    for kind in ["Stream", "lazy-ish"] {
        let ch = conn.create_channel().await.unwrap();
        let e = ch
            .queue_declare(
                format!("q-{kind}").as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args(&[("x-queue-type", kind)]),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{kind}: {e}");
        assert!(e.to_string().contains("x-queue-type"), "{e}");
    }
}
