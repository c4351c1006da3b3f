//! The built-in `sns-filter` binding filter: SNS subscription filter
//! policies on bindings, checked with lapin against the example message
//! and policies of AWS's documentation, on headers and on a JSON body;
//! a bad policy is refused at bind with its reason; the bindings and their
//! policies survive a restart.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use wasmq_tests::{TestServer, declare_durable, get_all, publish_confirmed, reply_code};

/// The attributes of AWS's example transaction, as AMQP headers.
fn attributes() -> FieldTable {
    let mut h = FieldTable::default();
    h.insert(
        "customer_interests".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongString(LongString::from("soccer")),
            AMQPValue::LongString(LongString::from("rugby")),
            AMQPValue::LongString(LongString::from("hockey")),
        ])),
    );
    h.insert("store".into(), AMQPValue::LongString("example_corp".into()));
    h.insert("event".into(), AMQPValue::LongString("order_placed".into()));
    h.insert("price_usd".into(), AMQPValue::Double(210.75));
    h
}

const BODY: &str = r#"{"customer_interests": ["soccer", "rugby", "hockey"], "store": "example_corp", "event": "order_placed", "price_usd": 210.75}"#;

/// The policies: (queue, policy, scope), and whether AWS's example message
/// passes.
const POLICIES: &[(&str, &str, &str, bool)] = &[
    (
        "accepts",
        r#"{"store": ["example_corp"], "event": [{"anything-but": "order_cancelled"}], "customer_interests": ["rugby", "football", "baseball"], "price_usd": [{"numeric": [">=", 100]}]}"#,
        "MessageAttributes",
        true,
    ),
    (
        "cheap",
        r#"{"price_usd": [{"numeric": [">", 0, "<=", 150]}]}"#,
        "MessageAttributes",
        false,
    ),
    (
        "ball-games",
        r#"{"customer_interests": [{"prefix": "bas"}]}"#,
        "MessageAttributes",
        false,
    ),
    (
        "either",
        r#"{"store": [{"exists": true}], "$or": [{"event": ["order_cancelled"]}, {"price_usd": [{"numeric": [">", 200]}]}]}"#,
        "MessageAttributes",
        true,
    ),
    (
        "body-accepts",
        r#"{"store": [{"equals-ignore-case": "EXAMPLE_CORP"}], "customer_interests": [{"suffix": "ey"}]}"#,
        "MessageBody",
        true,
    ),
    (
        "body-rejects",
        r#"{"encrypted": [{"exists": true}]}"#,
        "MessageBody",
        false,
    ),
];

fn binding(policy: &str, scope: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-wasmq-filter".into(),
        AMQPValue::LongString("sns-filter".into()),
    );
    args.insert(
        "x-filter-policy".into(),
        AMQPValue::LongString(policy.into()),
    );
    args.insert(
        "x-filter-policy-scope".into(),
        AMQPValue::LongString(scope.into()),
    );
    args
}

async fn publish(ch: &Channel, headers: FieldTable, body: &str) {
    let props = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    assert!(publish_confirmed(ch, "transactions", "", body.as_bytes(), props).await);
}

/// Publish the example as headers (to the attribute policies) and as a
/// body (to the body policies), then check who got what.
async fn check(ch: &Channel) {
    publish(ch, attributes(), "message-body-with-transaction-details").await;
    publish(ch, FieldTable::default(), BODY).await;
    for (queue, _, scope, passes) in POLICIES {
        let got = get_all(ch, queue).await;
        let want = usize::from(*passes);
        assert_eq!(got.len(), want, "{queue} ({scope}) got {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_filter_policies_on_bindings_as_aws_documents_them() {
    let server = TestServer::start().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "transactions".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for (queue, policy, scope, _) in POLICIES {
        declare_durable(&ch, queue, FieldTable::default()).await;
        ch.queue_bind(
            (*queue).into(),
            "transactions".into(),
            "".into(),
            QueueBindOptions::default(),
            binding(policy, scope),
        )
        .await
        .unwrap();
    }
    check(&ch).await;

    // A policy that does not parse, or that SNS would refuse, is refused
    // at bind with what is wrong.
    for (policy, says) in [
        (
            r#"{"price_usd": [{"numeric": [">", "a lot"]}]}"#,
            "'price_usd': a numeric bound must be a number",
        ),
        (r#"{"store": "example_corp"}"#, "'store': must be an array"),
        ("{not json", "not JSON"),
    ] {
        let bad = conn.create_channel().await.unwrap();
        let e = bad
            .queue_bind(
                "accepts".into(),
                "transactions".into(),
                "bad".into(),
                QueueBindOptions::default(),
                binding(policy, "MessageAttributes"),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&e), Some(406), "{e}");
        assert!(e.to_string().contains(says), "{policy}: {e}");
    }
    conn.close(200, "bye".into()).await.unwrap();

    // The bindings keep their policies across a restart.
    let server = server.restart().await;
    let conn = server.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    check(&ch).await;
}
