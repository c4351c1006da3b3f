//! # Built-in binding filter `sns-filter`: Amazon SNS filter policies
//!
//! A binding with `x-wasmq-filter: sns-filter` passes only the messages its
//! SNS subscription filter policy accepts, so a team moving from SNS keeps
//! its policies as they are. Binding arguments:
//!
//! * `x-filter-policy`: the policy, as JSON text (the `FilterPolicy`
//!   attribute of an SNS subscription);
//! * `x-filter-policy-scope`: `MessageAttributes` (the default: the
//!   message's headers play SNS's message attributes) or `MessageBody`
//!   (the body, a JSON object; nested keys allowed).
//!
//! A policy that does not parse, or that SNS would refuse (a number out of
//! range, more than 150 combinations), refuses the binding with a message
//! naming what is wrong and where. The semantics are in [`policy`].

pub mod policy;

use policy::{Policy, Scope};
use wasmq_sdk::{Error, Filter, Message, Subscription};

/// The filter of one binding.
pub struct SnsFilter {
    policy: Policy,
}

impl Filter for SnsFilter {
    fn new(sub: &Subscription<'_>) -> Result<Self, Error> {
        let args = sub.arguments;
        let text = match args.get("x-filter-policy") {
            None => {
                return Err(
                    "sns-filter needs x-filter-policy (an SNS filter policy, as JSON text)".into(),
                );
            }
            Some(v) => v
                .as_str()
                .ok_or("x-filter-policy must be a string holding the policy's JSON")?,
        };
        let scope = match args.get("x-filter-policy-scope") {
            None => Scope::MessageAttributes,
            Some(v) => match v.as_str() {
                Some("MessageAttributes") => Scope::MessageAttributes,
                Some("MessageBody") => Scope::MessageBody,
                _ => {
                    return Err(
                        "x-filter-policy-scope must be MessageAttributes or MessageBody".into(),
                    );
                }
            },
        };
        let policy = Policy::parse(text, scope).map_err(|e| Error::new(e.0))?;
        Ok(SnsFilter { policy })
    }

    fn filter(&mut self, m: &Message<'_>) -> bool {
        match self.policy.scope() {
            Scope::MessageAttributes => self.policy.matches_headers(m.headers()),
            Scope::MessageBody => self.policy.matches_body(m.body()),
        }
    }
}

wasmq_sdk::plugin!(filter = SnsFilter);

// Checked by the broker on the compiled plugin when it loads it.
wasmq_sdk::self_test!(
    r#"{"filter": [
  {
    "arguments": {
      "x-filter-policy": "{\"store\": [\"example_corp\"], \"price_usd\": [{\"numeric\": [\">=\", 100]}]}",
      "x-filter-policy-scope": "MessageBody"
    },
    "messages": [
      {"body": "{\"store\": \"example_corp\", \"price_usd\": 210.75}", "expect": "pass"},
      {"body": "{\"store\": \"example_corp\", \"price_usd\": 99}", "expect": "drop"},
      {"body": "{\"store\": \"other\", \"price_usd\": 210.75}", "expect": "drop"},
      {"body": "not json", "expect": "drop"}
    ]
  }
]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::{FieldTable, FieldValue};

    fn new(args: &[(&str, FieldValue)]) -> Result<SnsFilter, Error> {
        let args: FieldTable = args.iter().cloned().collect();
        SnsFilter::new(&Subscription {
            exchange: "x",
            key: "",
            arguments: &args,
        })
    }

    #[test]
    fn headers_by_default_and_the_body_when_asked() {
        let policy = FieldValue::from(r#"{"store": ["example_corp"]}"#);
        let mut by_headers = new(&[("x-filter-policy", policy.clone())]).unwrap();
        let headers: FieldTable = [("store", FieldValue::from("example_corp"))]
            .into_iter()
            .collect();
        assert!(by_headers.filter(&Message::new("k").with_headers(headers)));
        assert!(
            !by_headers.filter(&Message::new("k").with_body(&br#"{"store": "example_corp"}"#[..]))
        );

        let mut by_body = new(&[
            ("x-filter-policy", policy),
            ("x-filter-policy-scope", "MessageBody".into()),
        ])
        .unwrap();
        assert!(by_body.filter(&Message::new("k").with_body(&br#"{"store": "example_corp"}"#[..])));
    }

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        let message = |r: Result<SnsFilter, Error>| r.err().unwrap().message().to_owned();
        assert!(message(new(&[])).contains("needs x-filter-policy"));
        assert!(
            message(new(&[("x-filter-policy", FieldValue::I32(1))])).contains("must be a string")
        );
        assert!(
            message(new(&[
                ("x-filter-policy", r#"{"a": ["b"]}"#.into()),
                ("x-filter-policy-scope", "Headers".into()),
            ]))
            .contains("MessageAttributes or MessageBody")
        );
        let e = message(new(&[(
            "x-filter-policy",
            r#"{"price": [{"numeric": [">", "cheap"]}]}"#.into(),
        )]));
        assert!(
            e.contains("'price'") && e.contains("must be a number"),
            "{e}"
        );
    }
}
