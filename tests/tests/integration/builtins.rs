//! The built-in exchange types, each a Wasm plugin, routing through the
//! real broker core.

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use wasmq::Destination;
use wasmq_tests::{TestBroker, table};

#[test]
fn direct_routes_on_exact_key() {
    let t = TestBroker::new();
    t.exchange("d", "direct", FieldTable::default());
    for q in ["a", "b"] {
        t.queue(q);
    }
    t.bind("d", "a", "red", FieldTable::default());
    t.bind("d", "b", "red", FieldTable::default());
    t.bind("d", "b", "blue", FieldTable::default());
    assert_eq!(
        t.publish("d", "red", b"1", FieldTable::default()).delivered,
        2
    );
    assert_eq!(
        t.publish("d", "blue", b"2", FieldTable::default())
            .delivered,
        1
    );
    assert_eq!(
        t.publish("d", "green", b"3", FieldTable::default())
            .delivered,
        0
    );
    assert_eq!((t.depth("a"), t.depth("b")), (1, 2));
}

#[test]
fn topic_routes_with_rabbitmq_wildcards() {
    let t = TestBroker::new();
    t.exchange("t", "topic", FieldTable::default());
    let bindings = [
        ("star", "orders.*.eu"),
        ("hash", "orders.#"),
        ("all", "#"),
        ("exact", "orders.created.us"),
    ];
    for (q, key) in bindings {
        t.queue(q);
        t.bind("t", q, key, FieldTable::default());
    }
    t.publish("t", "orders.created.eu", b"", FieldTable::default());
    t.publish("t", "orders.created.us", b"", FieldTable::default());
    t.publish("t", "orders", b"", FieldTable::default());
    t.publish("t", "billing.paid", b"", FieldTable::default());
    assert_eq!(t.depth("star"), 1);
    assert_eq!(t.depth("hash"), 3);
    assert_eq!(t.depth("all"), 4);
    assert_eq!(t.depth("exact"), 1);
}

#[test]
fn fanout_ignores_the_key_and_a_queue_gets_one_copy() {
    let t = TestBroker::new();
    t.exchange("f", "fanout", FieldTable::default());
    for q in ["a", "b", "c"] {
        t.queue(q);
        t.bind("f", q, "", FieldTable::default());
    }
    // A second binding of the same queue must not duplicate deliveries.
    t.bind("f", "a", "other", FieldTable::default());
    assert_eq!(
        t.publish("f", "whatever", b"x", FieldTable::default())
            .delivered,
        3
    );
    assert_eq!((t.depth("a"), t.depth("b"), t.depth("c")), (1, 1, 1));
}

#[test]
fn headers_all_and_any() {
    let t = TestBroker::new();
    t.exchange("h", "headers", FieldTable::default());
    t.queue("all");
    t.queue("any");
    t.bind(
        "h",
        "all",
        "",
        table(&[("x-match", "all"), ("format", "pdf"), ("type", "report")]),
    );
    t.bind(
        "h",
        "any",
        "",
        table(&[("x-match", "any"), ("format", "pdf"), ("type", "report")]),
    );
    t.publish(
        "h",
        "",
        b"",
        table(&[("format", "pdf"), ("type", "report")]),
    );
    t.publish("h", "", b"", table(&[("format", "pdf"), ("type", "log")]));
    t.publish("h", "", b"", table(&[("format", "zip")]));
    assert_eq!(t.depth("all"), 1);
    assert_eq!(t.depth("any"), 2);
}

#[test]
fn headers_rejects_a_bad_x_match_at_bind_time() {
    let t = TestBroker::new();
    t.exchange("h", "headers", FieldTable::default());
    t.queue("q");
    let err = t
        .broker
        .bind(
            &t.vhost(),
            "h",
            Destination::Queue("q".into()),
            "",
            table(&[("x-match", "most")]),
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), 406);
    assert!(err.to_string().contains("x-match"), "{err}");
    // Nothing half-bound: a message still routes nowhere.
    assert_eq!(t.publish("h", "", b"", FieldTable::default()).delivered, 0);
}

#[test]
fn unbind_and_exchange_to_exchange_and_alternate_exchange() {
    let t = TestBroker::new();
    let mut ae = FieldTable::default();
    ae.insert(
        ShortString::from("alternate-exchange"),
        AMQPValue::LongString("lost".into()),
    );
    t.exchange("front", "topic", ae);
    t.exchange("eu", "fanout", FieldTable::default());
    t.exchange("lost", "fanout", FieldTable::default());
    for q in ["eu-q", "lost-q"] {
        t.queue(q);
    }
    t.broker
        .bind(
            &t.vhost(),
            "front",
            Destination::Exchange("eu".into()),
            "*.eu",
            FieldTable::default(),
        )
        .unwrap();
    t.bind("eu", "eu-q", "", FieldTable::default());
    t.bind("lost", "lost-q", "", FieldTable::default());
    assert_eq!(
        t.publish("front", "order.eu", b"", FieldTable::default())
            .delivered,
        1
    );
    assert_eq!(
        t.publish("front", "order.us", b"", FieldTable::default())
            .delivered,
        1
    );
    assert_eq!((t.depth("eu-q"), t.depth("lost-q")), (1, 1));
    t.broker
        .unbind(
            &t.vhost(),
            "front",
            &Destination::Exchange("eu".into()),
            "*.eu",
            &FieldTable::default(),
        )
        .unwrap();
    t.publish("front", "order.eu", b"", FieldTable::default());
    assert_eq!((t.depth("eu-q"), t.depth("lost-q")), (1, 2));
}

#[test]
fn memoized_routes_follow_binding_changes() {
    // topic is deterministic, so decisions are memoized per routing key; a
    // binding change must be seen by the very next publish.
    let t = TestBroker::new();
    t.exchange("t", "topic", FieldTable::default());
    t.queue("q1");
    t.queue("q2");
    t.bind("t", "q1", "a.*", FieldTable::default());
    assert_eq!(
        t.publish("t", "a.b", b"", FieldTable::default()).delivered,
        1
    );
    t.bind("t", "q2", "a.b", FieldTable::default());
    assert_eq!(
        t.publish("t", "a.b", b"", FieldTable::default()).delivered,
        2
    );
    t.broker
        .unbind(
            &t.vhost(),
            "t",
            &Destination::Queue("q1".into()),
            "a.*",
            &FieldTable::default(),
        )
        .unwrap();
    assert_eq!(
        t.publish("t", "a.b", b"", FieldTable::default()).delivered,
        1
    );
    assert_eq!((t.depth("q1"), t.depth("q2")), (2, 2));
}

#[test]
fn declare_rules_follow_rabbitmq() {
    let t = TestBroker::new();
    let v = t.vhost();
    let spec = |name: &str, kind: &str| wasmq::ExchangeSpec {
        name: name.into(),
        kind: kind.into(),
        ..Default::default()
    };
    t.broker
        .declare_exchange(&v, spec("x", "direct"), false)
        .unwrap();
    t.broker
        .declare_exchange(&v, spec("x", "direct"), false)
        .unwrap();
    assert_eq!(
        t.broker
            .declare_exchange(&v, spec("x", "topic"), false)
            .unwrap_err()
            .reply_code(),
        406
    );
    assert_eq!(
        t.broker
            .declare_exchange(&v, spec("amq.mine", "direct"), false)
            .unwrap_err()
            .reply_code(),
        403
    );
    assert_eq!(
        t.broker
            .declare_exchange(&v, spec("nope", "direct"), true)
            .unwrap_err()
            .reply_code(),
        404
    );
    let unknown = t
        .broker
        .declare_exchange(&v, spec("y", "x-no-such-plugin"), false)
        .unwrap_err();
    assert_eq!(unknown.reply_code(), 503);
    assert!(
        unknown
            .to_string()
            .contains(&t.plugin_dir().display().to_string()),
        "{unknown}"
    );
    for predeclared in [
        "amq.direct",
        "amq.topic",
        "amq.fanout",
        "amq.headers",
        "amq.match",
    ] {
        v.exchange(predeclared).unwrap();
    }
}
