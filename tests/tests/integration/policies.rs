//! Policies and operator policies set over RabbitMQ's HTTP API paths and
//! checked with a real AMQP client: they apply to queues and exchanges
//! that exist as well as new ones, the highest priority wins, the lowest
//! limit holds, and they survive a restart.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;
use wasmq::admin::client::{AdminClient, ClientError};
use wasmq_tests::{TestServer, eventually_async};

async fn queue(ch: &lapin::Channel, name: &str, args: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (k, v) in args {
        table.insert((*k).into(), v.clone());
    }
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), table)
        .await
        .unwrap();
}

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, n: usize) {
    for i in 0..n {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

fn ready(admin: &AdminClient, q: &str) -> u64 {
    admin.get(&format!("/api/queues/%2F/{q}")).unwrap()["messages_ready"]
        .as_u64()
        .unwrap()
}

async fn until_ready(admin: &AdminClient, q: &str, n: u64) {
    let ok = eventually_async(Duration::from_secs(5), || ready(admin, q) == n).await;
    assert!(ok, "{q} holds {} ready, expected {n}", ready(admin, q));
}

fn reason(r: Result<u16, ClientError>) -> String {
    match r {
        Err(ClientError::Status {
            status: 400,
            reason,
        }) => reason,
        other => panic!("expected a 400, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reaches_existing_and_new_queues_and_the_highest_priority_wins() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    queue(&ch, "orders.eu", &[]).await;
    publish(&ch, "", "orders.eu", 10).await;
    let cap =
        json!({"pattern": "^orders\\.", "definition": {"max-length": 5}, "apply-to": "queues"});
    assert_eq!(admin.put("/api/policies/%2F/cap", &cap).unwrap(), 201);
    // An existing queue: trimmed at once, its head dropped.
    until_ready(&admin, "orders.eu", 5).await;
    let view = admin.get("/api/queues/%2F/orders.eu").unwrap();
    assert_eq!(view["policy"], "cap");
    assert_eq!(
        view["effective_policy_definition"],
        json!({"max-length": 5})
    );
    // A new one.
    queue(&ch, "orders.us", &[]).await;
    publish(&ch, "", "orders.us", 10).await;
    until_ready(&admin, "orders.us", 5).await;
    // A client's lower limit holds; its higher one does not.
    queue(
        &ch,
        "orders.low",
        &[("x-max-length", AMQPValue::LongInt(1))],
    )
    .await;
    queue(
        &ch,
        "orders.high",
        &[("x-max-length", AMQPValue::LongInt(100))],
    )
    .await;
    publish(&ch, "", "orders.low", 3).await;
    publish(&ch, "", "orders.high", 10).await;
    until_ready(&admin, "orders.low", 1).await;
    until_ready(&admin, "orders.high", 5).await;
    // A higher priority takes over where it matches.
    let eu = json!({"pattern": "^orders\\.eu$", "definition": {"max-length": 2}, "priority": 10});
    admin.put("/api/policies/%2F/eu", &eu).unwrap();
    until_ready(&admin, "orders.eu", 2).await;
    assert_eq!(
        admin.get("/api/queues/%2F/orders.eu").unwrap()["policy"],
        "eu"
    );
    assert_eq!(
        admin.get("/api/queues/%2F/orders.us").unwrap()["policy"],
        "cap"
    );
    // Gone, the next one applies again.
    admin.delete("/api/policies/%2F/eu").unwrap();
    let ok = eventually_async(Duration::from_secs(5), || {
        admin.get("/api/queues/%2F/orders.eu").unwrap()["policy"] == "cap"
    })
    .await;
    assert!(ok);
    admin.delete("/api/policies/%2F/cap").unwrap();
    publish(&ch, "", "orders.us", 10).await;
    until_ready(&admin, "orders.us", 15).await;
    assert_eq!(
        admin.get("/api/queues/%2F/orders.us").unwrap()["policy"],
        json!(null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_alternate_exchanges_by_policy_and_operator_caps() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for x in ["dlx", "ae"] {
        ch.exchange_declare(
            x.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.exchange_declare(
        "in".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (q, x) in [("dead", "dlx"), ("unrouted", "ae")] {
        queue(&ch, q, &[]).await;
        ch.queue_bind(
            q.into(),
            x.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    queue(&ch, "work", &[]).await;
    let dl = json!({"pattern": "^work$", "apply-to": "queues",
                    "definition": {"max-length": 1, "dead-letter-exchange": "dlx"}});
    admin.put("/api/policies/%2F/dl", &dl).unwrap();
    publish(&ch, "", "work", 3).await;
    until_ready(&admin, "work", 1).await;
    until_ready(&admin, "dead", 2).await;
    // An exchange's alternate exchange, by policy.
    publish(&ch, "in", "nowhere", 1).await;
    assert_eq!(ready(&admin, "unrouted"), 0);
    let ae = json!({"pattern": "^in$", "apply-to": "exchanges", "definition": {"alternate-exchange": "ae"}});
    admin.put("/api/policies/%2F/ae", &ae).unwrap();
    publish(&ch, "in", "nowhere", 1).await;
    until_ready(&admin, "unrouted", 1).await;
    let x = admin.get("/api/exchanges/%2F/in").unwrap();
    assert_eq!(x["policy"], "ae");
    // An operator policy caps what a client asked for, and a policy.
    let op = json!({"pattern": "^capped", "definition": {"max-length": 3}, "apply-to": "queues"});
    admin.put("/api/operator-policies/%2F/cap", &op).unwrap();
    admin
        .put(
            "/api/policies/%2F/roomy",
            &json!({"pattern": "^capped", "definition": {"max-length": 50}}),
        )
        .unwrap();
    queue(&ch, "capped", &[("x-max-length", AMQPValue::LongInt(100))]).await;
    publish(&ch, "", "capped", 10).await;
    until_ready(&admin, "capped", 3).await;
    let view = admin.get("/api/queues/%2F/capped").unwrap();
    assert_eq!(view["policy"], "roomy");
    assert_eq!(view["operator_policy"], "cap");
    assert_eq!(
        view["effective_policy_definition"],
        json!({"max-length": 3})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_are_400_naming_the_field_and_policies_survive_a_restart() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let r = reason(admin.put(
        "/api/policies/%2F/p",
        &json!({"pattern": "(", "definition": {"max-length": 1}}),
    ));
    assert!(r.starts_with("pattern: bad regular expression"), "{r}");
    let r = reason(admin.put(
        "/api/policies/%2F/p",
        &json!({"pattern": ".*", "definition": {"bogus": 1}}),
    ));
    assert!(r.starts_with("definition.bogus: unknown key"), "{r}");
    let r = reason(admin.put(
        "/api/policies/%2F/p",
        &json!({"pattern": ".*", "definition": {"max-length": "ten"}}),
    ));
    assert!(
        r.starts_with("definition.max-length: must be a non-negative integer"),
        "{r}"
    );
    let r = reason(admin.put(
        "/api/operator-policies/%2F/p",
        &json!({"pattern": ".*", "definition": {"dead-letter-exchange": "x"}}),
    ));
    assert!(r.contains("operator policies cap"), "{r}");
    let r = reason(admin.put(
        "/api/policies/%2F/p",
        &json!({"pattern": ".*", "definition": {"max-length": 1}, "apply-to": "superstreams"}),
    ));
    assert!(r.starts_with("apply-to:"), "{r}");
    assert!(matches!(
        admin.put(
            "/api/policies/nowhere/p",
            &json!({"pattern": ".*", "definition": {"max-length": 1}})
        ),
        Err(ClientError::Status { status: 404, .. })
    ));
    assert_eq!(
        admin.get("/api/policies").unwrap(),
        json!([]),
        "nothing half-applied"
    );

    let p = json!({"pattern": "^q$", "definition": {"max-length": 2}, "priority": 3, "apply-to": "queues"});
    admin.put("/api/policies/%2F/keep", &p).unwrap();
    let server = server.restart().await;
    let admin = server.admin();
    assert_eq!(
        admin.get("/api/policies/%2F/keep").unwrap(),
        json!({"vhost": "/", "name": "keep", "pattern": "^q$", "apply-to": "queues",
               "priority": 3, "definition": {"max-length": 2}})
    );
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    queue(&ch, "q", &[]).await;
    publish(&ch, "", "q", 5).await;
    until_ready(&admin, "q", 2).await;
    // And they travel with the definitions.
    let export = admin.get("/api/definitions").unwrap();
    assert_eq!(export["policies"][0]["name"], "keep");
}

/// wasmq's own policy key: an exchange declared without a transform runs
/// the one a policy names, from the next message on, and stops when the
/// policy goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sets_an_exchanges_transform() {
    let server = TestServer::start().await;
    server.install("redact", "redact");
    let admin = server.admin();
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-redact-fields".into(),
        AMQPValue::LongString("cvv".into()),
    );
    ch.exchange_declare(
        "payments".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    queue(&ch, "ledger", &[]).await;
    ch.queue_bind(
        "ledger".into(),
        "payments".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let pay = |body: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "payments".into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    let take = |ch: lapin::Channel| async move {
        let m = ch
            .basic_get(
                "ledger".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("a message");
        serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()
    };
    pay(r#"{"cvv":"123"}"#).await;
    assert_eq!(take(ch.clone()).await["cvv"], "123");
    let p = json!({"pattern": "^payments$", "apply-to": "exchanges", "definition": {"transform": "redact"}});
    admin.put("/api/policies/%2F/redact", &p).unwrap();
    assert_eq!(
        admin.get("/api/exchanges/%2F/payments").unwrap()["plugin"]["transform"],
        "redact"
    );
    pay(r#"{"cvv":"123"}"#).await;
    assert_eq!(take(ch.clone()).await["cvv"], "[redacted]");
    admin.delete("/api/policies/%2F/redact").unwrap();
    pay(r#"{"cvv":"123"}"#).await;
    assert_eq!(take(ch.clone()).await["cvv"], "123");
    let r = reason(admin.put(
        "/api/policies/%2F/bad",
        &json!({"pattern": ".*", "definition": {"transform": "no/such"}}),
    ));
    assert!(r.starts_with("definition.transform:"), "{r}");
}

/// wasmq's own policy key: the bindings of an exchange that named no
/// filter run the one a policy names (with their own arguments), those
/// bound before and after; a binding the filter refuses stays unfiltered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sets_the_filter_of_an_exchanges_bindings() {
    let server = TestServer::start().await;
    server.install("json-filter", "json-filter");
    let admin = server.admin();
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "orders".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let bind = |q: &'static str, region: Option<&'static str>| {
        let ch = ch.clone();
        async move {
            queue(&ch, q, &[]).await;
            let mut args = FieldTable::default();
            if let Some(r) = region {
                args.insert(
                    "x-filter-field".into(),
                    AMQPValue::LongString("region".into()),
                );
                args.insert("x-filter-equals".into(), AMQPValue::LongString(r.into()));
            }
            ch.queue_bind(
                q.into(),
                "orders".into(),
                "".into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .unwrap();
        }
    };
    bind("eu", Some("eu")).await;
    bind("all", None).await;
    let order = |body: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "orders".into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    order(r#"{"region":"us"}"#).await;
    until_ready(&admin, "eu", 1).await;
    let p = json!({"pattern": "^orders$", "apply-to": "exchanges", "definition": {"filter": "json-filter"}});
    admin.put("/api/policies/%2F/only", &p).unwrap();
    bind("eu-later", Some("eu")).await;
    order(r#"{"region":"us"}"#).await;
    order(r#"{"region":"eu"}"#).await;
    until_ready(&admin, "all", 3).await;
    assert_eq!(ready(&admin, "eu"), 2, "the us order filtered out");
    assert_eq!(
        ready(&admin, "eu-later"),
        1,
        "bound after the policy: filtered too"
    );
    admin.delete("/api/policies/%2F/only").unwrap();
    order(r#"{"region":"us"}"#).await;
    until_ready(&admin, "eu", 3).await;
    until_ready(&admin, "eu-later", 2).await;
}
