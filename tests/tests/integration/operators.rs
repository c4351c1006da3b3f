//! Users, vhosts and permissions changed at run time over RabbitMQ's HTTP
//! API paths, checked with a real AMQP client: a login works the moment
//! its user and permissions exist, stops working (and its connections
//! close) when they go, survives a restart, and a RabbitMQ export brings
//! its users in with their old passwords.

use std::time::Duration;

use serde_json::json;
use wasmq::admin::client::{AdminClient, ClientError};
use wasmq_tests::{TestServer, close_code, reply_code, until_close_code};

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Status { status, .. }) => status,
        Err(e) => panic!("{e}"),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn reason(r: Result<impl std::fmt::Debug, ClientError>) -> String {
    match r {
        Err(ClientError::Status { reason, .. }) => reason,
        other => panic!("expected an error status, got {other:?}"),
    }
}

async fn declare(conn: &lapin::Connection, name: &str) -> Result<(), lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .map(|_| ())
}

fn add_app(admin: &AdminClient) {
    assert_eq!(admin.put("/api/vhosts/orders", &json!({})).unwrap(), 201);
    assert_eq!(
        admin
            .put("/api/vhosts/orders", &json!({"description": "orders"}))
            .unwrap(),
        204,
        "a second PUT replaces"
    );
    assert_eq!(
        admin
            .put("/api/users/app", &json!({"password": "app-pw", "tags": ""}))
            .unwrap(),
        201
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_vhosts_and_permissions_change_at_run_time_and_survive_a_restart() {
    let server = TestServer::start().await;
    let admin = server.admin();
    add_app(&admin);
    // A user without permissions in the vhost may not open it.
    let e = server
        .connect_as("app", "app-pw", "orders")
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(530), "{e}");
    let p = json!({"configure": "^orders\\.", "write": ".*", "read": ".*"});
    assert_eq!(admin.put("/api/permissions/orders/app", &p).unwrap(), 201);
    let conn = server.connect_as("app", "app-pw", "orders").await.unwrap();
    declare(&conn, "orders.eu").await.unwrap();
    let e = declare(&conn, "billing").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "{e}");
    // Shown as RabbitMQ shows them: a hash, never the password.
    let user = admin.get("/api/users/app").unwrap();
    assert_eq!(user["hashing_algorithm"], "rabbit_password_hashing_sha256");
    assert!(!user.to_string().contains("app-pw"));
    assert_eq!(
        admin.get("/api/users/app/permissions").unwrap(),
        json!([{"user": "app", "vhost": "orders", "configure": "^orders\\.", "write": ".*", "read": ".*"}])
    );
    assert_eq!(
        admin.get("/api/whoami").unwrap(),
        json!({"name": "guest", "tags": ["administrator"]})
    );
    assert_eq!(
        admin.get("/api/vhosts/orders").unwrap()["description"],
        "orders"
    );
    // An AMQP-only user gets nothing of the admin API.
    assert_eq!(
        status(server.admin_as("app", "app-pw").get("/api/whoami")),
        403
    );
    conn.close(200, "bye".into()).await.unwrap();

    let server = server.restart().await;
    let conn = server.connect_as("app", "app-pw", "orders").await.unwrap();
    declare(&conn, "orders.us").await.unwrap();
    let e = declare(&conn, "billing").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "permissions kept: {e}");
    assert!(server.connect_as("app", "wrong", "orders").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_permissions_or_deleting_a_user_closes_its_connections() {
    let server = TestServer::start().await;
    let admin = server.admin();
    add_app(&admin);
    let full = json!({"configure": ".*", "write": ".*", "read": ".*"});
    admin.put("/api/permissions/orders/app", &full).unwrap();
    admin.put("/api/permissions/%2F/app", &full).unwrap();
    let in_orders = server.connect_as("app", "app-pw", "orders").await.unwrap();
    let in_root = server.connect_as("app", "app-pw", "/").await.unwrap();
    let (orders_code, root_code) = (close_code(&in_orders), close_code(&in_root));

    admin.delete("/api/permissions/orders/app").unwrap();
    assert_eq!(until_close_code(&orders_code).await, Some(320));
    let e = server
        .connect_as("app", "app-pw", "orders")
        .await
        .unwrap_err();
    assert_eq!(reply_code(&e), Some(530), "{e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *root_code.lock().unwrap(),
        None,
        "its other vhost's stays open"
    );
    declare(&in_root, "still-here").await.unwrap();

    admin.delete("/api/users/app").unwrap();
    assert_eq!(until_close_code(&root_code).await, Some(320));
    let e = server.connect_as("app", "app-pw", "/").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(403), "{e}");
    assert_eq!(status(admin.get("/api/users/app")), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_vhost_takes_its_queues_and_connections() {
    let server = TestServer::start().await;
    let admin = server.admin();
    admin.put("/api/vhosts/tmp", &json!({})).unwrap();
    let full = json!({"configure": ".*", "write": ".*", "read": ".*"});
    admin.put("/api/permissions/tmp/guest", &full).unwrap();
    let conn = server.connect_as("guest", "guest", "tmp").await.unwrap();
    let code = close_code(&conn);
    declare(&conn, "q").await.unwrap();
    assert_eq!(
        admin
            .get("/api/queues/tmp")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    admin.delete("/api/vhosts/tmp").unwrap();
    assert_eq!(until_close_code(&code).await, Some(320));
    assert_eq!(status(admin.get("/api/vhosts/tmp")), 404);
    assert!(server.broker().vhost("tmp").is_none());
    assert!(
        admin
            .get("/api/permissions")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["vhost"] != "tmp")
    );
    // Made again, it is empty.
    admin.put("/api/vhosts/tmp", &json!({})).unwrap();
    admin.put("/api/permissions/tmp/guest", &full).unwrap();
    let server = server.restart().await;
    let admin = server.admin();
    assert_eq!(admin.get("/api/queues/tmp").unwrap(), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_the_last_administrator_stays() {
    let server = TestServer::start().await;
    let admin = server.admin();
    add_app(&admin);
    let before = admin.get("/api/definitions").unwrap();
    let bad = json!({"configure": ".*", "write": "(", "read": ".*"});
    let r = reason(admin.put("/api/permissions/orders/app", &bad));
    assert!(r.starts_with("write: bad regular expression '('"), "{r}");
    let r = reason(admin.put(
        "/api/users/x",
        &json!({"password_hash": "AAAA", "hashing_algorithm": "rabbit_password_hashing_md5"}),
    ));
    assert!(r.contains("password_hash") && r.contains("MD5"), "{r}");
    let r = reason(admin.put(
        "/api/users/x",
        &json!({"password_hash": "AAAA", "hashing_algorithm": "bcrypt"}),
    ));
    assert!(r.contains("unknown hashing_algorithm 'bcrypt'"), "{r}");
    assert_eq!(
        status(admin.put(
            "/api/users/x",
            &json!({"password": "a", "password_hash": ""})
        )),
        400
    );
    assert_eq!(
        status(admin.put(
            "/api/permissions/nowhere/app",
            &json!({"configure": "", "write": "", "read": ""})
        )),
        404
    );
    // guest is the only administrator.
    let r = reason(admin.delete("/api/users/guest"));
    assert!(r.contains("administrator"), "{r}");
    assert_eq!(
        status(admin.put("/api/users/guest", &json!({"tags": "monitoring"}))),
        409
    );
    assert_eq!(
        admin.get("/api/definitions").unwrap(),
        before,
        "nothing changed"
    );
    // A second administrator lets the first go; without a password given,
    // a PUT keeps the user's.
    admin
        .put("/api/users/app", &json!({"tags": ["administrator"]}))
        .unwrap();
    server
        .admin_as("app", "app-pw")
        .delete("/api/users/guest")
        .unwrap();
    assert_eq!(status(admin.get("/api/whoami")), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_export_imports_and_its_users_log_in_with_their_old_passwords() {
    let server = TestServer::start().await;
    let doc: serde_json::Value = serde_json::from_str(include_str!(
        "../../fixtures/rabbitmq-3.10.8-definitions.json"
    ))
    .unwrap();
    server.admin().post("/api/definitions", &doc).unwrap();
    // bob's password, permissions and limits from RabbitMQ 3.10.8.
    let conn = server.connect_as("bob", "b0b!", "orders").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "orders.eu".into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    assert_eq!(
        reply_code(&declare(&conn, "other").await.unwrap_err()),
        Some(403)
    );
    // The vhost's max-queues of 1 is reached.
    let e = declare(&conn, "orders.new").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(
        e.to_string()
            .contains("queue limit in vhost 'orders' (1) is reached"),
        "{e}"
    );
    // bob's max-connections of 1 is too.
    let e = server.connect_as("bob", "b0b!", "/").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(530), "{e}");
    // alice is an administrator there, and here.
    let alice = server.admin_as("alice", "wonder land");
    assert_eq!(
        alice.get("/api/whoami").unwrap()["tags"],
        json!(["administrator"])
    );
    // Exported again, bob keeps RabbitMQ's hash.
    let export = alice.get("/api/definitions").unwrap();
    let bob = export["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "bob")
        .unwrap();
    assert_eq!(
        bob["password_hash"],
        "s+K2XQXV3Pbm/tcp7XGQAKnjRLF9fPtOjzPfgqA2wm0Ur9pY"
    );
    // A document with one bad permission changes nothing.
    let mut bad = doc.clone();
    bad["users"] = json!([{"name": "eve", "password_hash": "", "tags": []}]);
    bad["permissions"] =
        json!([{"user": "eve", "vhost": "orders", "configure": "[", "write": "", "read": ""}]);
    let r = reason(alice.post("/api/definitions", &bad));
    assert!(r.contains("configure") && r.contains("eve"), "{r}");
    assert_eq!(status(alice.get("/api/users/eve")), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforced_config_users_are_changed_only_in_the_config_file() {
    let server = TestServer::start_with(|c| {
        c.access.config_users = wasmq::config::ConfigUsers::Enforce;
    })
    .await;
    let admin = server.admin();
    let r = reason(admin.put(
        "/api/users/guest",
        &json!({"password": "x", "tags": "administrator"}),
    ));
    assert!(r.contains("config file"), "{r}");
    // Others are the operator's.
    admin
        .put(
            "/api/users/ops",
            &json!({"password": "pw", "tags": "administrator"}),
        )
        .unwrap();
    let server = server.restart().await;
    assert!(server.admin_as("ops", "pw").get("/api/whoami").is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_connections_channels_and_queues_in_rabbitmqs_words() {
    let server = TestServer::start().await;
    let admin = server.admin();
    admin
        .put(
            "/api/vhost-limits/%2F/max-connections",
            &json!({"value": 1}),
        )
        .unwrap();
    assert_eq!(
        admin.get("/api/vhost-limits").unwrap(),
        json!([{"vhost": "/", "value": {"max-connections": 1}}])
    );
    let first = server.connect().await;
    let e = server.connect_as("guest", "guest", "/").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(530), "{e}");
    assert!(
        e.to_string().contains(
            "access to vhost '/' refused for user 'guest': connection limit (1) is reached"
        ),
        "{e}"
    );
    admin
        .delete("/api/vhost-limits/%2F/max-connections")
        .unwrap();
    let second = server.connect().await;

    admin
        .put("/api/user-limits/guest/max-channels", &json!({"value": 2}))
        .unwrap();
    // Held: lapin closes a channel it drops.
    let _one = first.create_channel().await.unwrap();
    let _two = second.create_channel().await.unwrap();
    let code = close_code(&second);
    let e = second.create_channel().await.unwrap_err();
    assert_eq!(until_close_code(&code).await, Some(530), "{e}");
    admin
        .put(
            "/api/user-limits/guest/max-channels",
            &json!({"value": 100}),
        )
        .unwrap();

    admin
        .put("/api/vhost-limits/%2F/max-queues", &json!({"value": 1}))
        .unwrap();
    declare(&first, "q1").await.unwrap();
    declare(&first, "q1").await.unwrap();
    let e = declare(&first, "q2").await.unwrap_err();
    assert_eq!(reply_code(&e), Some(406), "{e}");
    assert!(
        e.to_string()
            .contains("cannot declare queue 'q2': queue limit in vhost '/' (1) is reached"),
        "{e}"
    );

    let r = reason(admin.put("/api/vhost-limits/%2F/max-bogus", &json!({"value": 1})));
    assert!(r.contains("unknown limit 'max-bogus'"), "{r}");
    let r = reason(admin.put(
        "/api/user-limits/guest/max-channels",
        &json!({"value": "x"}),
    ));
    assert!(r.starts_with("value: must be an integer"), "{r}");
    drop((first, second));
    let server = server.restart().await;
    assert_eq!(
        server.admin().get("/api/user-limits/guest").unwrap(),
        json!([{"user": "guest", "value": {"max-channels": 100}}])
    );
}
