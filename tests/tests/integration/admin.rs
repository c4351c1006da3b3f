//! The admin HTTP API and `/metrics` over real HTTP, against a real broker
//! that lapin clients are using at the same time.

use std::time::Duration;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{Value, json};
use wasmq::admin::client::{AdminClient, ClientError};
use wasmq_tests::TestServer;

/// Run a blocking admin call off the async workers.
async fn api<T: Send + 'static>(
    client: AdminClient,
    f: impl FnOnce(AdminClient) -> T + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || f(client))
        .await
        .unwrap()
}

fn status(e: ClientError) -> u16 {
    match e {
        ClientError::Status { status, .. } => status,
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

async fn declare_world(ch: &lapin::Channel) {
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
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(1000));
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        "orders".into(),
        "events".into(),
        "orders.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

/// Publish `n` messages to `events` with keys `orders.{i}`, each confirmed.
async fn publish_orders(ch: &lapin::Channel, n: usize, props: BasicProperties) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        ch.basic_publish(
            "events".into(),
            format!("orders.{i}").as_str().into(),
            BasicPublishOptions::default(),
            b"m",
            props.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_what_amqp_clients_do() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_world(&ch).await;
    publish_orders(&ch, 3, BasicProperties::default()).await;
    wasmq_tests::declare_queue(&ch, "work").await;
    let _consumer = wasmq_tests::consume(&ch, "work", "worker-1").await;

    let admin = t.admin();
    let (overview, exchange, queue, bindings, conns, channels, consumers) =
        api(admin.clone(), |a| {
            (
                a.get("/api/overview").unwrap(),
                a.get("/api/exchanges/%2F/events").unwrap(),
                a.get("/api/queues/%2F/orders").unwrap(),
                a.get("/api/bindings/%2F").unwrap(),
                a.get("/api/connections").unwrap(),
                a.get("/api/channels").unwrap(),
                a.get("/api/consumers").unwrap(),
            )
        })
        .await;
    assert_eq!(overview["object_totals"]["connections"], 1);
    assert_eq!(overview["object_totals"]["consumers"], 1);
    assert_eq!(overview["queue_totals"]["messages_ready"], 3);
    assert_eq!(overview["message_stats"]["confirm"], 3);
    assert_eq!(exchange["type"], "topic");
    assert_eq!(exchange["durable"], true);
    assert_eq!(exchange["plugin"]["router"], "topic");
    assert_eq!(exchange["message_stats"]["publish_in"], 3);
    assert_eq!(exchange["message_stats"]["routed"], 3);
    assert_eq!(queue["messages_ready"], 3);
    assert_eq!(queue["arguments"]["x-max-length"], 1000);
    assert!(
        bindings
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == "events"
                && b["destination"] == "orders"
                && b["routing_key"] == "orders.#"),
        "{bindings}"
    );
    assert_eq!(conns[0]["user"], "guest");
    assert_eq!(channels[0]["confirm"], true);
    assert_eq!(consumers[0]["consumer_tag"], "worker-1");
    assert_eq!(consumers[0]["queue"]["name"], "work");

    // An operator closes the connection: the client sees 320.
    let code = wasmq_tests::close_code(&conn);
    let id = conns[0]["id"].as_u64().unwrap();
    api(admin.clone(), move |a| {
        a.delete(&format!("/api/connections/{id}"))
    })
    .await
    .unwrap();
    assert_eq!(
        wasmq_tests::until_close_code(&code).await,
        Some(320),
        "CONNECTION_FORCED"
    );
    assert!(!conn.status().connected());
    assert!(t.until_no_connections().await);
    // Its confirms still count once it is gone (the rate never goes back).
    let overview = api(admin.clone(), |a| a.get("/api/overview").unwrap()).await;
    assert_eq!(overview["message_stats"]["confirm"], 3);

    // Unknown objects are 404 with a reason.
    let e = api(admin, |a| a.get("/api/queues/%2F/nope").unwrap_err()).await;
    assert_eq!(status(e), 404);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_requires_an_amqp_user() {
    let t = TestServer::start().await;
    let addr = t.server.as_ref().unwrap().admin_addr.unwrap();
    let wrong = AdminClient::new(&format!("http://{addr}"), "guest", "wrong");
    let nobody = AdminClient::new(&format!("http://{addr}"), "nobody", "guest");
    let (a, b, metrics) = api(wrong.clone(), move |w| {
        (
            w.get("/api/overview").unwrap_err(),
            nobody.get("/api/queues").unwrap_err(),
            // /metrics is open to scrapers by default.
            w.get_text("/metrics"),
        )
    })
    .await;
    assert_eq!(status(a), 401);
    assert_eq!(status(b), 401);
    assert!(metrics.unwrap().contains("wasmq_connections"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_export_from_one_broker_and_import_into_another() {
    let a = TestServer::start().await;
    let conn = a.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_world(&ch).await;
    let exported = api(a.admin(), |c| c.get("/api/definitions").unwrap()).await;
    assert_eq!(exported["exchanges"][0]["name"], "events");
    assert_eq!(exported["queues"][0]["name"], "orders");
    assert_eq!(exported["bindings"][0]["routing_key"], "orders.#");

    let b = TestServer::start().await;
    let doc = exported.clone();
    api(b.admin(), move |c| {
        c.post("/api/definitions", &doc).unwrap()
    })
    .await;
    let again = api(b.admin(), |c| c.get("/api/definitions").unwrap()).await;
    for k in ["exchanges", "queues", "bindings"] {
        assert_eq!(again[k], exported[k], "{k} round-trip");
    }
    // The imported binding routes in broker B.
    let conn_b = b.connect().await;
    let ch_b = conn_b.create_channel().await.unwrap();
    ch_b.basic_publish(
        "events".into(),
        "orders.42".into(),
        BasicPublishOptions::default(),
        b"routed",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let got = ch_b
        .basic_get("orders".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"routed");

    // A bad document is refused with a reason naming the item.
    let bad = json!({"exchanges": [{"name": "x", "vhost": "/", "type": "no-such-plugin"}]});
    let e = api(b.admin(), move |c| {
        c.post("/api/definitions", &bad).unwrap_err()
    })
    .await;
    match e {
        ClientError::Status { status, reason } => {
            assert_eq!(status, 400);
            assert!(reason.contains("exchange 'x'"), "{reason}");
        }
        other => panic!("{other}"),
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_get_through_the_api() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_world(&ch).await;
    let (routed, unrouted, peek, took, empty) = api(t.admin(), |a| {
        let body = json!({"routing_key": "orders.1", "payload": "hello",
            "properties": {"headers": {"k": "v"}, "delivery_mode": 2}});
        let routed = a.post("/api/exchanges/%2F/events/publish", &body).unwrap();
        let unrouted = a
            .post(
                "/api/exchanges/%2F/events/publish",
                &json!({"routing_key": "other", "payload": "x"}),
            )
            .unwrap();
        let peek = a
            .post(
                "/api/queues/%2F/orders/get",
                &json!({"count": 5, "ackmode": "ack_requeue_true"}),
            )
            .unwrap();
        let took = a
            .post("/api/queues/%2F/orders/get", &json!({"count": 5}))
            .unwrap();
        let empty = a
            .post("/api/queues/%2F/orders/get", &json!({"count": 5}))
            .unwrap();
        (routed, unrouted, peek, took, empty)
    })
    .await;
    assert_eq!(routed["routed"], true);
    assert_eq!(unrouted["routed"], false);
    assert_eq!(peek[0]["payload"], "hello");
    assert_eq!(took[0]["payload"], "hello");
    assert_eq!(took[0]["redelivered"], true, "the peek requeued it");
    assert_eq!(took[0]["properties"]["headers"]["k"], "v");
    assert_eq!(empty, Value::Array(vec![]));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_plugin_is_validated_then_hot_swapped_in() {
    let t = TestServer::start().await;
    let admin = t.admin();
    // Garbage is refused with the reason and nothing reaches the folder.
    let e = api(admin.clone(), |a| {
        a.put_bytes("/api/plugins/shard", b"not wasm at all")
            .unwrap_err()
    })
    .await;
    match e {
        ClientError::Status { status, reason } => {
            assert_eq!(status, 400);
            assert!(reason.contains("rejected"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert!(!t.plugins.path().join("shard.wasm").exists());

    let bytes = wasmq_tests::plugin_bytes("consistent-hash");
    let r = api(admin.clone(), move |a| {
        a.put_bytes("/api/plugins/shard", &bytes).unwrap()
    })
    .await;
    assert!(r["roles"].as_str().unwrap().contains("router"), "{r}");
    assert!(t.plugins.path().join("shard.wasm").exists());
    // The watcher loads it from the folder like a copied file.
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = api(admin.clone(), |a| a.get("/api/plugins/shard"))
            .await
            .unwrap_or(Value::Null);
        if listed["state"] == "serving" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(listed["state"], "serving", "{listed}");
    assert_eq!(listed["hash"], r["hash"]);
    assert!(
        listed["code"] == "baseline" || listed["code"] == "optimized",
        "{listed}"
    );
    // And AMQP clients can use it as an exchange type.
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "sharded".into(),
        ExchangeKind::Custom("shard".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let builtins = api(admin, |a| a.get("/api/plugins").unwrap()).await;
    let topic = builtins
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "topic")
        .unwrap();
    assert_eq!(topic["builtin"], true);
    assert_eq!(topic["abi_version"], 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text() {
    let t = TestServer::start().await;
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_world(&ch).await;
    // Distinct keys defeat the topic router's memo, so the plugin is called.
    publish_orders(&ch, 20, BasicProperties::default().with_delivery_mode(2)).await;
    let text = api(t.admin(), |a| a.get_text("/metrics").unwrap()).await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
    let value = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name}{label:?} missing"))
    };
    assert_eq!(
        value("wasmq_queue_messages_ready", ("queue", "orders")),
        20.0
    );
    assert_eq!(
        value("wasmq_queue_published_total", ("queue", "orders")),
        20.0
    );
    assert_eq!(
        value("wasmq_exchange_published_total", ("exchange", "events")),
        20.0
    );
    assert!(value("wasmq_plugin_calls_total", ("plugin", "topic")) >= 1.0);
    let histogram = |name: &str| {
        scrape
            .samples
            .iter()
            .any(|s| s.metric == name && matches!(s.value, prometheus_parse::Value::Histogram(_)))
    };
    assert!(histogram("wasmq_plugin_call_duration_seconds"), "{text}");
    assert!(histogram("wasmq_store_sync_duration_seconds"), "{text}");
    let positive = |name: &str| {
        scrape.samples.iter().any(|s| {
            s.metric == name && matches!(s.value, prometheus_parse::Value::Counter(v) if v > 0.0)
        })
    };
    assert!(positive("wasmq_store_bytes_written_total"));
    // The built-ins were compiled at start, sharing some functions.
    assert!(positive("wasmq_plugin_functions_compiled_total"), "{text}");
    assert!(positive("wasmq_plugin_functions_reused_total"), "{text}");
    t.stop().await;
}

/// Names and fields AMQP carries as short strings are refused over 255
/// bytes wherever they enter through the API: a definitions import made a
/// queue that panicked `basic.get`, a publish with a long `message_id`
/// panicked its handler. Each is a 400 with a reason, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_fields_over_255_bytes_are_refused_with_400() {
    let t = TestServer::start().await;
    let long = "n".repeat(256);
    let docs = [
        json!({"vhosts": [{"name": long}]}),
        json!({"exchanges": [{"name": long, "vhost": "/", "type": "topic"}]}),
        json!({"queues": [{"name": long, "vhost": "/"}]}),
        json!({"queues": [{"name": "q", "vhost": "/", "arguments": {long.clone(): 1}}]}),
        json!({
            "queues": [{"name": "q", "vhost": "/"}],
            "bindings": [{"source": "amq.topic", "vhost": "/", "destination": "q",
                          "destination_type": "queue", "routing_key": long}],
        }),
    ];
    for doc in docs {
        let shown = doc.to_string();
        let e = api(t.admin(), move |c| {
            c.post("/api/definitions", &doc).unwrap_err()
        })
        .await;
        match e {
            ClientError::Status { status, reason } => {
                assert_eq!(status, 400, "{shown}: {reason}");
                assert!(reason.contains("255"), "{shown}: {reason}");
            }
            other => panic!("{shown}: {other}"),
        }
    }
    for props in [json!({"message_id": long}), json!({"content_type": long})] {
        let body = json!({"routing_key": "q", "payload": "x", "properties": props});
        let e = api(t.admin(), move |c| {
            c.post("/api/exchanges/%2F/amq.default/publish", &body)
                .unwrap_err()
        })
        .await;
        assert_eq!(status(e), 400);
    }
    let body = json!({"routing_key": long, "payload": "x"});
    let e = api(t.admin(), move |c| {
        c.post("/api/exchanges/%2F/amq.default/publish", &body)
            .unwrap_err()
    })
    .await;
    assert_eq!(status(e), 400);
    // Nothing long was made (the import stops at the item at fault), and
    // the API still answers.
    let defs = api(t.admin(), |c| c.get("/api/definitions").unwrap()).await;
    for kind in ["vhosts", "exchanges", "queues", "bindings"] {
        for item in defs[kind].as_array().unwrap() {
            assert!(!item.to_string().contains(&long), "{kind}: {item}");
        }
    }
    t.stop().await;
}

/// A `management` user sees only the vhosts it has permissions in, and
/// only its own connections (RabbitMQ's rule); `monitoring` sees all; only
/// those who see all may export the definitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_user_sees_only_its_own_vhosts_and_connections() {
    let user = |name: &str, vhosts: &[&str], tag: &str| wasmq::access::User {
        name: name.into(),
        password: "pw".into(),
        vhosts: vhosts.iter().map(|v| v.to_string()).collect(),
        permissions: Vec::new(),
        loopback_only: false,
        tags: vec![tag.into()],
    };
    let t = TestServer::start_with(|c| {
        c.users.push(user("team", &["team"], "management"));
        c.users.push(user("watcher", &[], "monitoring"));
    })
    .await;
    t.broker().add_vhost("team").unwrap();
    let guest = t.connect().await;
    let ch = guest.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&ch, "secret").await;
    let team = t.connect_as("team", "pw", "team").await.unwrap();
    let tch = team.create_channel().await.unwrap();
    wasmq_tests::declare_queue(&tch, "mine").await;

    let names = |v: &Value, key: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i[key].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let seen = api(t.admin_as("team", "pw"), |a| {
        (
            a.get("/api/vhosts").unwrap(),
            a.get("/api/queues").unwrap(),
            a.get("/api/exchanges").unwrap(),
            a.get("/api/connections").unwrap(),
            a.get("/api/queues/%2F").unwrap_err(),
            a.get("/api/queues/%2F/secret").unwrap_err(),
            a.get("/api/definitions").unwrap_err(),
            a.get("/api/queues/team/mine").unwrap(),
        )
    })
    .await;
    assert_eq!(names(&seen.0, "name"), ["team"]);
    assert_eq!(names(&seen.1, "name"), ["mine"]);
    assert!(
        names(&seen.2, "vhost").iter().all(|v| v == "team"),
        "{}",
        seen.2
    );
    assert_eq!(names(&seen.3, "user"), ["team"], "only its own connection");
    assert_eq!(status(seen.4), 403);
    assert_eq!(status(seen.5), 403);
    assert_eq!(status(seen.6), 403);
    assert_eq!(seen.7["name"], "mine");

    let all = api(t.admin_as("watcher", "pw"), |a| {
        (
            a.get("/api/queues").unwrap(),
            a.get("/api/connections").unwrap(),
        )
    })
    .await;
    assert_eq!(names(&all.0, "name"), ["secret", "mine"]);
    assert_eq!(all.1.as_array().unwrap().len(), 2);
    t.stop().await;
}

/// Uploading a file under a built-in's name replaces that type only when
/// asked for (`?override_builtin=true`); amq.direct keeps the built-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_built_in_type_through_the_api_is_deliberate() {
    let t = TestServer::start().await;
    let topic = wasmq_tests::plugin_bytes("topic");
    let bytes = topic.clone();
    let e = api(t.admin(), move |a| {
        a.put_bytes("/api/plugins/direct", &bytes).unwrap_err()
    })
    .await;
    match e {
        ClientError::Status { status, reason } => {
            assert_eq!(status, 400);
            assert!(reason.contains("built-in exchange type"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert!(!t.plugins.path().join("direct.wasm").exists());
    api(t.admin(), move |a| {
        a.put_bytes("/api/plugins/direct?override_builtin=true", &topic)
            .unwrap()
    })
    .await;
    let broker = t.broker().clone();
    assert!(
        wasmq_tests::eventually_async(Duration::from_secs(10), || {
            !broker.plugins().get("direct").unwrap().builtin
        })
        .await,
        "the override serves"
    );
    let amq_direct = t
        .broker()
        .vhost("/")
        .unwrap()
        .exchange("amq.direct")
        .unwrap();
    assert!(amq_direct.router().version().builtin);
    t.stop().await;
}

/// A definitions import that fails because the store cannot write is the
/// broker's fault: 500, not the 400 of a bad document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_the_store_cannot_save_is_a_500() {
    let t = TestServer::start().await;
    // As on a full disk: every definitions change fails to save.
    t.broker()
        .store()
        .unwrap()
        .fail_definition_writes()
        .unwrap();
    let doc = json!({"exchanges": [{"name": "x", "vhost": "/", "type": "topic"}]});
    let e = api(t.admin(), move |c| {
        c.post("/api/definitions", &doc).unwrap_err()
    })
    .await;
    match e {
        ClientError::Status { status, reason } => {
            assert_eq!(status, 500, "{reason}");
            assert!(
                reason.contains("exchange 'x'") && reason.contains("message store"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
    // A bad document is still the client's fault.
    let bad = json!({"exchanges": [{"name": "y", "vhost": "/", "type": "no-such-plugin"}]});
    let e = api(t.admin(), move |c| {
        c.post("/api/definitions", &bad).unwrap_err()
    })
    .await;
    assert_eq!(status(e), 400);
}

/// RabbitMQ's paged queue listing (`GET /api/queues?page=...`): 10,000
/// queues, one page of them built at a time, filtered by name (a
/// substring, or a regular expression), sorted by any field, and bad
/// pages refused with 400. Without `page` the listing is the plain array
/// it always was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_are_listed_a_page_at_a_time_filtered_and_sorted() {
    let server = TestServer::start().await;
    let broker = server.broker().clone();
    let vhost = broker.vhost("/").unwrap();
    for i in 0..10_000 {
        broker
            .declare_queue(
                &vhost,
                wasmq::broker::QueueDecl {
                    name: format!("q{i:05}"),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    // A few with messages, to sort by.
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for (queue, n) in [("q00042", 3), ("q07777", 5), ("q09999", 1)] {
        for _ in 0..n {
            ch.basic_publish(
                "".into(),
                queue.into(),
                Default::default(),
                b"x",
                Default::default(),
            )
            .await
            .unwrap();
        }
    }
    let admin = server.admin();
    let (page, all, filtered, regex, by_messages, too_far, too_big) =
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let page = admin.get("/api/queues?page=3&page_size=100").unwrap();
            eprintln!("one page of 10,000 queues in {:?}", started.elapsed());
            (
                page,
                admin.get("/api/queues/%2F").unwrap(),
                admin
                    .get("/api/queues?page=1&page_size=500&name=Q0999")
                    .unwrap(),
                admin
                    .get("/api/queues?page=1&name=%5Eq0000%5B12%5D%24&use_regex=true")
                    .unwrap(),
                admin
                    .get("/api/queues?page=1&page_size=3&sort=messages&sort_reverse=true")
                    .unwrap(),
                admin.get("/api/queues?page=101&page_size=100").unwrap_err(),
                admin.get("/api/queues?page=1&page_size=501").unwrap_err(),
            )
        })
        .await
        .unwrap();
    assert_eq!(page["page"], 3);
    assert_eq!(page["page_count"], 100);
    assert_eq!(page["total_count"], 10_000);
    assert_eq!(page["filtered_count"], 10_000);
    assert_eq!(page["item_count"], 100);
    assert_eq!(page["items"][0]["name"], "q00200");
    assert_eq!(page["items"][99]["name"], "q00299");
    assert_eq!(
        all.as_array().unwrap().len(),
        10_000,
        "unpaged: every queue"
    );
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(filtered["filtered_count"], 10, "case-insensitive substring");
    assert_eq!(names(&filtered)[0], "q09990");
    assert_eq!(names(&regex), ["q00001", "q00002"]);
    assert_eq!(names(&by_messages), ["q07777", "q00042", "q09999"]);
    for e in [too_far, too_big] {
        assert!(e.to_string().contains("400"), "{e}");
    }
}
