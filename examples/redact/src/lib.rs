//! # Example: redact and enrich a JSON body
//!
//! Shows a transform that runs before routing: on an exchange declared with
//! `x-wasmq-transform: redact`, every message's JSON body has the fields
//! named in `x-redact-fields` (comma-separated dotted paths, e.g.
//! `password,card.number`) replaced by `"[redacted]"`, gets a `_meta`
//! object with the exchange and routing key (enrichment), and its
//! content type set to `application/json`. A body that is not JSON is
//! dead-lettered with the reason (to the exchange's
//! `x-dead-letter-exchange`), rather than passed on unredacted.
//!
//! Build and load (the README's run command does this for you):
//!
//! ```text
//! cargo build --profile plugin --target wasm32-unknown-unknown -p wasmq-example-redact
//! cp target/wasm32-unknown-unknown/plugin/wasmq_example_redact.wasm examples/plugins/redact.wasm.tmp
//! mv examples/plugins/redact.wasm.tmp examples/plugins/redact.wasm
//! ```

use serde_json::Value;
use wasmq_sdk::{Error, Exchange, Message, Outcome, Rewrite, Transform};

/// The transform.
pub struct Redact {
    exchange: String,
    fields: Vec<Vec<String>>,
}

fn redact(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(obj) = v.as_object_mut() else { return };
    if rest.is_empty() {
        if let Some(slot) = obj.get_mut(first) {
            *slot = Value::String("[redacted]".into());
        }
    } else if let Some(child) = obj.get_mut(first) {
        redact(child, rest);
    }
}

impl Transform for Redact {
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error> {
        let fields = exchange
            .arguments
            .get_str("x-redact-fields")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| f.split('.').map(str::to_owned).collect())
            .collect();
        Ok(Redact {
            exchange: exchange.name.to_owned(),
            fields,
        })
    }

    fn transform(&mut self, m: &Message<'_>) -> Outcome {
        let mut body: Value = match serde_json::from_slice(m.body()) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Outcome::DeadLetter("body is JSON but not an object".into()),
            Err(e) => return Outcome::DeadLetter(format!("body is not JSON: {e}")),
        };
        for path in &self.fields {
            redact(&mut body, path);
        }
        body["_meta"] =
            serde_json::json!({ "exchange": self.exchange, "routing_key": m.routing_key() });
        let mut properties = m.properties().clone();
        properties.content_type = Some("application/json".into());
        Outcome::Rewrite(Rewrite {
            routing_key: None,
            properties: Some(properties),
            body: Some(serde_json::to_vec(&body).expect("a Value always serializes")),
        })
    }
}

wasmq_sdk::plugin!(transform = Redact);

// Checked by the broker on the compiled plugin when it loads it.
wasmq_sdk::self_test!(
    r#"{"transform": [{
  "exchange_arguments": {"x-redact-fields": "password,card.number"},
  "messages": [
    {
      "routing_key": "signup",
      "body": "{\"user\": \"ann\", \"password\": \"hunter2\", \"card\": {\"number\": \"4111\"}}",
      "expect": {
        "outcome": "route",
        "routing_key": "signup",
        "content_type": "application/json",
        "body": "{\"_meta\":{\"exchange\":\"wasmq.self-test\",\"routing_key\":\"signup\"},\"card\":{\"number\":\"[redacted]\"},\"password\":\"[redacted]\",\"user\":\"ann\"}"
      }
    },
    {"body": "not json", "expect": {"outcome": "dead_letter"}},
    {"body": "[1, 2]", "expect": {"outcome": "dead_letter", "reason": "body is JSON but not an object"}}
  ]
}]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::FieldTable;

    fn redactor(fields: &str) -> Redact {
        let mut args = FieldTable::new();
        args.insert("x-redact-fields", fields);
        Redact::new(&Exchange {
            name: "payments",
            arguments: &args,
        })
        .unwrap()
    }

    #[test]
    fn redacts_nested_fields_and_enriches() {
        let mut r = redactor("password, card.number");
        let m = Message::new("pay.eu").with_body(
            br#"{"user":"ann","password":"x","card":{"number":"4111","exp":"12/30"}}"#.to_vec(),
        );
        let Outcome::Rewrite(rw) = r.transform(&m) else {
            panic!("expected a rewrite")
        };
        let v: Value = serde_json::from_slice(&rw.body.unwrap()).unwrap();
        assert_eq!(v["password"], "[redacted]");
        assert_eq!(v["card"]["number"], "[redacted]");
        assert_eq!(v["card"]["exp"], "12/30");
        assert_eq!(v["user"], "ann");
        assert_eq!(v["_meta"]["exchange"], "payments");
        assert_eq!(v["_meta"]["routing_key"], "pay.eu");
        assert_eq!(
            rw.properties.unwrap().content_type.as_deref(),
            Some("application/json")
        );
    }

    #[test]
    fn non_json_is_dead_lettered() {
        let mut r = redactor("password");
        match r.transform(&Message::new("k").with_body(b"plain text".to_vec())) {
            Outcome::DeadLetter(reason) => assert!(reason.contains("not JSON")),
            other => panic!("{other:?}"),
        }
    }
}
