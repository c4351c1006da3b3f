//! Users, per-vhost configure/write/read permissions and admin API tags,
//! through a real client: what a refused operation costs (its channel,
//! with 403 ACCESS_REFUSED naming what was refused) and what it does not
//! (the connection and its other channels).

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ExchangeKind};
use wasmq::admin::client::ClientError;
use wasmq_tests::TestServer;

/// guest (administrator) plus:
/// * `app`: in `/`, may configure, write and read only `app.*` (and write
///   to the default exchange); no admin tag;
/// * `watcher`: full permissions in `/`, `monitoring` tag;
/// * `other`: only vhost `other`.
const USERS: &str = r#"
[[users]]
name = "guest"
password = "guest"
tags = ["administrator"]

[[users]]
name = "app"
password = "app-pw"
vhosts = []
[[users.permissions]]
vhost = "/"
configure = "^app\\."
write = "^app\\.|^amq\\.default$"
read = "^app\\."

[[users]]
name = "watcher"
password = "watch-pw"
tags = ["monitoring"]

[[users]]
name = "other"
password = "other-pw"
vhosts = ["other"]
"#;

async fn server() -> TestServer {
    let users = wasmq::Config::parse(USERS, "test users").unwrap().users;
    TestServer::start_with(|c| c.users = users).await
}

fn refused(err: &lapin::Error, what: &str) {
    assert_eq!(wasmq_tests::reply_code(err), Some(403), "{err}");
    assert!(err.to_string().contains(what), "{err} should name {what}");
}

async fn declare_exchange(ch: &lapin::Channel, name: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_user_works_inside_its_patterns_and_is_refused_outside() {
    let t = server().await;
    // guest sets up resources outside app's patterns.
    let admin = t.connect().await;
    let ach = admin.create_channel().await.unwrap();
    declare_exchange(&ach, "billing").await.unwrap();
    wasmq_tests::declare_queue(&ach, "billing.q").await;

    let app: Connection = t.connect_as("app", "app-pw", "/").await.unwrap();
    let ch = app.create_channel().await.unwrap();
    declare_exchange(&ch, "app.events").await.unwrap();
    wasmq_tests::declare_queue(&ch, "app.inbox").await;
    ch.queue_bind(
        "app.inbox".into(),
        "app.events".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "app.events".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"via app.events",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    // The default exchange is matched as amq.default.
    ch.basic_publish(
        "".into(),
        "app.inbox".into(),
        BasicPublishOptions::default(),
        b"via default",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(m) = ch
            .basic_get("app.inbox".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        }
    }
    assert_eq!(got, ["via app.events", "via default"]);

    // configure: declaring outside the pattern.
    let ch = app.create_channel().await.unwrap();
    refused(
        &declare_exchange(&ch, "billing.x").await.unwrap_err(),
        "configure access to exchange 'billing.x' in vhost '/' refused for user 'app'",
    );
    // read: consuming from guest's queue.
    let ch = app.create_channel().await.unwrap();
    let err = ch
        .basic_consume(
            "billing.q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    refused(&err, "read access to queue 'billing.q'");
    // read on the source exchange of a binding.
    let ch = app.create_channel().await.unwrap();
    let err = ch
        .queue_bind(
            "app.inbox".into(),
            "billing".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    refused(&err, "read access to exchange 'billing'");
    // write on a dead-letter exchange named by a queue it declares.
    let mut dead_letter_to_billing = FieldTable::default();
    dead_letter_to_billing.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("billing")),
    );
    let ch = app.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "app.dl".into(),
            QueueDeclareOptions::default(),
            dead_letter_to_billing.clone(),
        )
        .await
        .unwrap_err();
    refused(&err, "write access to exchange 'billing'");
    // ...and by an exchange it declares (where its faulted messages go).
    let ch = app.create_channel().await.unwrap();
    let err = ch
        .exchange_declare(
            "app.faulty".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            dead_letter_to_billing,
        )
        .await
        .unwrap_err();
    refused(&err, "write access to exchange 'billing'");
    // write: publishing to an exchange outside the pattern closes the
    // channel (the error arrives asynchronously, as channel.close).
    let ch = app.create_channel().await.unwrap();
    ch.basic_publish(
        "billing".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"no",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    assert!(
        wasmq_tests::eventually_async(std::time::Duration::from_secs(5), || !ch
            .status()
            .connected())
        .await,
        "the publishing channel is closed"
    );
    // None of it reached billing.q, and the connection still works.
    assert!(app.status().connected());
    let ch = app.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "app.still-fine").await;
    let q = t.broker().vhost("/").unwrap().queue("billing.q").unwrap();
    assert_eq!(q.len(), 0);
    // Passive declares need no permission.
    wasmq_tests::declare_passive(&ch, "billing.q")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_without_permissions_is_refused_at_open() {
    let t = server().await;
    let err = t.connect_as("other", "other-pw", "/").await.unwrap_err();
    assert_eq!(wasmq_tests::reply_code(&err), Some(530), "{err}");
    let ok = t.connect_as("other", "other-pw", "other").await.unwrap();
    let ch = ok.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "anything").await;
    assert!(t.broker().vhost("other").unwrap().queue("anything").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqplain_logs_in_like_plain() {
    let t = server().await;
    let url = |user: &str, password: &str| {
        format!(
            "amqp://{user}:{password}@{}/%2f?auth_mechanism=amqplain",
            t.addr()
        )
    };
    let conn = Connection::connect(&url("app", "app-pw"), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "app.amqplain").await;
    // The user's permissions apply as with PLAIN.
    refused(
        &declare_exchange(&ch, "billing.x").await.unwrap_err(),
        "configure access to exchange 'billing.x' in vhost '/' refused for user 'app'",
    );
    let err = Connection::connect(&url("app", "wrong"), Default::default())
        .await
        .unwrap_err();
    assert_eq!(wasmq_tests::reply_code(&err), Some(403), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_access_follows_the_users_tags() {
    let t = server().await;
    let status = |r: Result<serde_json::Value, ClientError>| match r {
        Ok(_) => 200,
        Err(ClientError::Status { status, .. }) => status,
        Err(e) => panic!("{e}"),
    };
    let (app, watcher, guest) = (
        t.admin_as("app", "app-pw"),
        t.admin_as("watcher", "watch-pw"),
        t.admin(),
    );
    let doc = |name: &str| {
        serde_json::json!({"queues": [{"name": name, "vhost": "/", "durable": false,
            "auto_delete": false, "arguments": {}}]})
    };
    let (by_watcher, by_guest) = (doc("by-watcher"), doc("by-guest"));
    let codes = tokio::task::spawn_blocking(move || {
        [
            status(app.get("/api/overview")),
            status(watcher.get("/api/overview")),
            status(watcher.post("/api/definitions", &by_watcher)),
            status(guest.post("/api/definitions", &by_guest)),
        ]
    })
    .await
    .unwrap();
    assert_eq!(
        codes,
        [403, 200, 403, 200],
        "untagged: no API; monitoring: read-only; administrator: all"
    );
    let v = t.broker().vhost("/").unwrap();
    assert!(v.queue("by-guest").is_ok() && v.queue("by-watcher").is_err());
}
