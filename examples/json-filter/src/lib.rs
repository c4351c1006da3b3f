//! # Example: content-based filter on a JSON body field
//!
//! Shows a per-binding filter, like an SNS subscription filter policy: a
//! binding with `x-wasmq-filter: json-filter` only passes messages whose
//! JSON body has a field that matches. Parameters are binding arguments:
//!
//! * `x-filter-field`: a dotted path into the body, e.g. `order.region`;
//! * then one of `x-filter-equals` (a string, number or boolean),
//!   `x-filter-in` (an array of strings), `x-filter-min` / `x-filter-max`
//!   (numbers, inclusive), or `x-filter-exists` (true or false).
//!
//! A body that is not JSON, or lacks the field, does not pass.
//!
//! Build and load (the README's run command does this for you):
//!
//! ```text
//! cargo build --profile plugin --target wasm32-unknown-unknown -p wasmq-example-json-filter
//! cp target/wasm32-unknown-unknown/plugin/wasmq_example_json_filter.wasm examples/plugins/json-filter.wasm.tmp
//! mv examples/plugins/json-filter.wasm.tmp examples/plugins/json-filter.wasm
//! ```

use serde_json::Value;
use wasmq_sdk::{Error, FieldValue, Filter, Message, Subscription};

enum Test {
    Equals(Value),
    In(Vec<String>),
    Range(Option<f64>, Option<f64>),
    Exists(bool),
}

/// The filter.
pub struct JsonFilter {
    path: Vec<String>,
    test: Test,
}

fn to_json(v: &FieldValue) -> Option<Value> {
    Some(match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::String(_) => Value::String(v.as_str()?.to_owned()),
        FieldValue::F32(f) => serde_json::json!(f),
        FieldValue::F64(f) => serde_json::json!(f),
        other => Value::from(other.as_i64()?),
    })
}

fn number(v: &FieldValue) -> Option<f64> {
    match v {
        FieldValue::F32(f) => Some(f64::from(*f)),
        FieldValue::F64(f) => Some(*f),
        FieldValue::String(_) => v.as_str()?.parse().ok(),
        other => other.as_i64().map(|i| i as f64),
    }
}

impl Filter for JsonFilter {
    fn new(sub: &Subscription<'_>) -> Result<Self, Error> {
        let args = sub.arguments;
        let field = args
            .get_str("x-filter-field")
            .ok_or("json-filter needs x-filter-field (a dotted path)")?;
        let path = field.split('.').map(str::to_owned).collect();
        let test = if let Some(v) = args.get("x-filter-equals") {
            Test::Equals(to_json(v).ok_or("x-filter-equals must be a string, number or boolean")?)
        } else if let Some(v) = args.get("x-filter-in") {
            let FieldValue::Array(items) = v else {
                return Err("x-filter-in must be an array of strings".into());
            };
            Test::In(
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
            )
        } else if args.get("x-filter-min").is_some() || args.get("x-filter-max").is_some() {
            let bound = |k| match args.get(k) {
                None => Ok(None),
                Some(v) => number(v)
                    .map(Some)
                    .ok_or_else(|| Error::new(format!("{k} must be a number"))),
            };
            Test::Range(bound("x-filter-min")?, bound("x-filter-max")?)
        } else if let Some(v) = args.get("x-filter-exists") {
            Test::Exists(v.as_bool().ok_or("x-filter-exists must be a boolean")?)
        } else {
            return Err("json-filter needs one of x-filter-equals, x-filter-in, x-filter-min/max, x-filter-exists".into());
        };
        Ok(JsonFilter { path, test })
    }

    fn filter(&mut self, m: &Message<'_>) -> bool {
        let Ok(body) = serde_json::from_slice::<Value>(m.body()) else {
            return false;
        };
        let mut at = &body;
        for part in &self.path {
            match at.get(part) {
                Some(v) => at = v,
                None => return matches!(self.test, Test::Exists(false)),
            }
        }
        match &self.test {
            Test::Exists(want) => *want,
            Test::Equals(want) => match (want.as_f64(), at.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => at == want,
            },
            Test::In(set) => at.as_str().is_some_and(|s| set.iter().any(|x| x == s)),
            Test::Range(min, max) => at
                .as_f64()
                .is_some_and(|v| min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m)),
        }
    }
}

wasmq_sdk::plugin!(filter = JsonFilter);

// Checked by the broker on the compiled plugin when it loads it.
wasmq_sdk::self_test!(
    r#"{"filter": [
  {
    "arguments": {"x-filter-field": "order.region", "x-filter-equals": "eu"},
    "messages": [
      {"body": "{\"order\": {\"region\": \"eu\"}}", "expect": "pass"},
      {"body": "{\"order\": {\"region\": \"us\"}}", "expect": "drop"},
      {"body": "{\"order\": {}}", "expect": "drop"},
      {"body": "not json", "expect": "drop"}
    ]
  },
  {
    "arguments": {"x-filter-field": "total", "x-filter-min": 100},
    "messages": [
      {"body": "{\"total\": 250}", "expect": "pass"},
      {"body": "{\"total\": 99.5}", "expect": "drop"}
    ]
  }
]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::FieldTable;

    fn filter(args: FieldTable) -> JsonFilter {
        JsonFilter::new(&Subscription {
            exchange: "x",
            key: "",
            arguments: &args,
        })
        .unwrap()
    }

    fn passes(f: &mut JsonFilter, body: &str) -> bool {
        f.filter(&Message::new("k").with_body(body.as_bytes().to_vec()))
    }

    #[test]
    fn equals_in_range_exists() {
        let mut eq = filter(
            [
                ("x-filter-field", FieldValue::from("order.region")),
                ("x-filter-equals", "eu".into()),
            ]
            .into_iter()
            .collect(),
        );
        assert!(passes(&mut eq, r#"{"order":{"region":"eu"}}"#));
        assert!(!passes(&mut eq, r#"{"order":{"region":"us"}}"#));
        assert!(!passes(&mut eq, r#"{"order":{}}"#));
        assert!(!passes(&mut eq, "not json"));

        let mut inn = filter(
            [
                ("x-filter-field", FieldValue::from("tier")),
                (
                    "x-filter-in",
                    FieldValue::Array(vec!["gold".into(), "silver".into()]),
                ),
            ]
            .into_iter()
            .collect(),
        );
        assert!(passes(&mut inn, r#"{"tier":"gold"}"#));
        assert!(!passes(&mut inn, r#"{"tier":"bronze"}"#));

        let mut range = filter(
            [
                ("x-filter-field", FieldValue::from("total")),
                ("x-filter-min", FieldValue::I32(100)),
            ]
            .into_iter()
            .collect(),
        );
        assert!(passes(&mut range, r#"{"total":150.5}"#));
        assert!(!passes(&mut range, r#"{"total":99}"#));

        let mut exists = filter(
            [
                ("x-filter-field", FieldValue::from("vip")),
                ("x-filter-exists", true.into()),
            ]
            .into_iter()
            .collect(),
        );
        assert!(passes(&mut exists, r#"{"vip":false}"#));
        assert!(!passes(&mut exists, r#"{}"#));
    }

    #[test]
    fn missing_parameters_are_refused() {
        let e = JsonFilter::new(&Subscription {
            exchange: "x",
            key: "",
            arguments: &FieldTable::new(),
        })
        .err()
        .unwrap();
        assert!(e.message().contains("x-filter-field"));
    }
}
