//! The example plugins, compiled to Wasm and loaded like a user would.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use wasmq::Destination;
use wasmq_tests::{TestBroker, header, table};

#[test]
fn consistent_hash_shards_every_message_to_one_queue() {
    let t = TestBroker::new();
    t.install("consistent-hash", "consistent-hash");
    t.exchange("shard", "consistent-hash", FieldTable::default());
    for q in ["s1", "s2", "s3"] {
        t.queue(q);
        t.bind("shard", q, "1", FieldTable::default());
    }
    for i in 0..600 {
        let out = t.publish(
            "shard",
            &format!("customer-{i}"),
            b"",
            FieldTable::default(),
        );
        assert_eq!(out.delivered, 1);
    }
    let depths = [t.depth("s1"), t.depth("s2"), t.depth("s3")];
    assert_eq!(depths.iter().sum::<usize>(), 600);
    assert!(depths.iter().all(|d| *d > 100), "unbalanced: {depths:?}");
    // The same key always lands on the same shard.
    t.drain("s1");
    t.drain("s2");
    t.drain("s3");
    for _ in 0..5 {
        t.publish("shard", "customer-42", b"", FieldTable::default());
    }
    let depths = [t.depth("s1"), t.depth("s2"), t.depth("s3")];
    assert!(depths.contains(&5), "{depths:?}");
}

#[test]
fn consistent_hash_refuses_a_non_numeric_weight() {
    let t = TestBroker::new();
    t.install("consistent-hash", "consistent-hash");
    t.exchange("shard", "consistent-hash", FieldTable::default());
    t.queue("q");
    let err = t
        .broker
        .bind(
            &t.vhost(),
            "shard",
            Destination::Queue("q".into()),
            "heavy",
            FieldTable::default(),
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), 406);
    assert!(err.to_string().contains("weight"), "{err}");
}

#[test]
fn json_filter_passes_only_matching_bodies_per_binding() {
    let t = TestBroker::new();
    t.install("json-filter", "json-filter");
    t.exchange("orders", "fanout", FieldTable::default());
    t.queue("eu");
    t.queue("big");
    t.queue("everything");
    t.bind(
        "orders",
        "eu",
        "",
        table(&[
            ("x-wasmq-filter", "json-filter"),
            ("x-filter-field", "region"),
            ("x-filter-equals", "eu"),
        ]),
    );
    let mut big = table(&[
        ("x-wasmq-filter", "json-filter"),
        ("x-filter-field", "total"),
    ]);
    big.insert(ShortString::from("x-filter-min"), AMQPValue::LongInt(100));
    t.bind("orders", "big", "", big);
    t.bind("orders", "everything", "", FieldTable::default());
    t.publish(
        "orders",
        "",
        br#"{"region":"eu","total":50}"#,
        FieldTable::default(),
    );
    t.publish(
        "orders",
        "",
        br#"{"region":"us","total":500}"#,
        FieldTable::default(),
    );
    t.publish(
        "orders",
        "",
        br#"{"region":"eu","total":150}"#,
        FieldTable::default(),
    );
    t.publish("orders", "", b"not json", FieldTable::default());
    assert_eq!(
        (t.depth("eu"), t.depth("big"), t.depth("everything")),
        (2, 2, 4)
    );
}

#[test]
fn json_filter_with_an_array_parameter() {
    let t = TestBroker::new();
    t.install("json-filter", "json-filter");
    t.exchange("x", "direct", FieldTable::default());
    t.queue("vip");
    let mut args = table(&[
        ("x-wasmq-filter", "json-filter"),
        ("x-filter-field", "tier"),
    ]);
    let set = FieldArray::from(vec![
        AMQPValue::LongString(LongString::from("gold")),
        AMQPValue::LongString("platinum".into()),
    ]);
    args.insert(ShortString::from("x-filter-in"), AMQPValue::FieldArray(set));
    t.bind("x", "vip", "k", args);
    t.publish("x", "k", br#"{"tier":"gold"}"#, FieldTable::default());
    t.publish("x", "k", br#"{"tier":"bronze"}"#, FieldTable::default());
    assert_eq!(t.depth("vip"), 1);
}

#[test]
fn a_filter_binding_without_its_parameters_is_refused() {
    let t = TestBroker::new();
    t.install("json-filter", "json-filter");
    t.exchange("x", "fanout", FieldTable::default());
    t.queue("q");
    let err = t
        .broker
        .bind(
            &t.vhost(),
            "x",
            Destination::Queue("q".into()),
            "",
            table(&[("x-wasmq-filter", "json-filter")]),
        )
        .unwrap_err();
    assert_eq!(err.reply_code(), 406);
    assert!(err.to_string().contains("x-filter-field"), "{err}");
}

#[test]
fn redact_transform_rewrites_bodies_and_dead_letters_non_json() {
    let t = TestBroker::new();
    t.install("redact", "redact");
    t.exchange("dlx", "fanout", FieldTable::default());
    t.queue("dead");
    t.bind("dlx", "dead", "", FieldTable::default());
    t.exchange(
        "payments",
        "topic",
        table(&[
            ("x-wasmq-transform", "redact"),
            ("x-redact-fields", "card.number,cvv"),
            ("x-dead-letter-exchange", "dlx"),
        ]),
    );
    t.queue("ledger");
    t.bind("payments", "ledger", "pay.#", FieldTable::default());
    t.publish(
        "payments",
        "pay.eu",
        br#"{"amount":12,"cvv":"123","card":{"number":"4111"}}"#,
        FieldTable::default(),
    );
    let out = t.publish("payments", "pay.eu", b"<xml/>", FieldTable::default());
    assert_eq!(out.dead_lettered, 1);
    let ledger = t.drain("ledger");
    assert_eq!(ledger.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&ledger[0].body).unwrap();
    assert_eq!(v["cvv"], "[redacted]");
    assert_eq!(v["card"]["number"], "[redacted]");
    assert_eq!(v["amount"], 12);
    assert_eq!(v["_meta"]["routing_key"], "pay.eu");
    assert_eq!(
        ledger[0]
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/json"
    );
    let dead = t.drain("dead");
    assert_eq!(dead.len(), 1);
    assert!(
        header(&dead[0], "x-wasmq-dead-letter-reason")
            .unwrap()
            .contains("not JSON")
    );
    assert_eq!(&dead[0].body[..], b"<xml/>");
}
