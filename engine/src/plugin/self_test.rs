//! Self-test vectors: cases a plugin ships in its `wasmq-self-test` custom
//! section (written with `wasmq_sdk::self_test!`), run through the compiled
//! plugin when a version is loaded.
//!
//! The smoke test in `host.rs` only proves that each role runs without
//! faulting. Vectors let a plugin's author say what it must *decide*, so a
//! build that compiles and runs but routes wrongly (a bad merge, a stale
//! dependency, a compiler difference) is rejected before it serves, with
//! the previous version still serving. They go through the same ABI calls
//! and the same code the broker will run, which native unit tests cannot
//! cover. The format is JSON, documented on the SDK macro and in
//! `docs/plugin-abi.md`.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{FieldTable, ShortString};
use serde::Deserialize;
use serde_json::Value;
use wasmq_sdk::abi;

use super::decision::{TransformDecision, parse_decision};
use super::host::{PluginHost, PluginVersion, init_input};
use super::instance::{CallError, Instance};
use super::{PluginFault, binding_input};
use crate::json::{json_to_table, table_to_json};
use crate::message::{Message, encode_table_body};

/// The exchange name the vectors' instances are told.
const EXCHANGE: &str = "wasmq.self-test";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vectors {
    #[serde(default)]
    router: Vec<RouterCase>,
    #[serde(default)]
    filter: Vec<FilterCase>,
    #[serde(default)]
    transform: Vec<TransformCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouterCase {
    #[serde(default)]
    exchange_arguments: Value,
    #[serde(default)]
    bindings: Vec<BindingSpec>,
    messages: Vec<MessageSpec<Vec<u32>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingSpec {
    #[serde(default)]
    key: String,
    #[serde(default)]
    arguments: Value,
    /// The bound queue's name (routers like a hash ring use it); default
    /// `queue0`, `queue1`, ... by position.
    queue: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterCase {
    /// The filtered binding's key.
    #[serde(default)]
    key: String,
    /// The filtered binding's arguments.
    #[serde(default)]
    arguments: Value,
    messages: Vec<MessageSpec<FilterExpect>>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FilterExpect {
    Pass,
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformCase {
    #[serde(default)]
    exchange_arguments: Value,
    messages: Vec<MessageSpec<TransformExpect>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
enum TransformExpect {
    /// Routed on; the fields given are compared with the message as
    /// rewritten (or unchanged).
    Route {
        routing_key: Option<String>,
        headers: Option<Value>,
        content_type: Option<String>,
        body: Option<String>,
    },
    Drop,
    DeadLetter {
        reason: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageSpec<E> {
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    headers: Value,
    content_type: Option<String>,
    #[serde(default)]
    body: String,
    expect: E,
}

impl<E> MessageSpec<E> {
    /// Message `index` of the case at `at`: where it is, for errors, and
    /// the message itself.
    fn message(&self, at: &str, index: usize) -> Result<(String, Arc<Message>), Failure> {
        let at = format!("{at}, message {index} (routing key '{}')", self.routing_key);
        let mut props = BasicProperties::default();
        if !self.headers.is_null() {
            let headers =
                json_to_table(&self.headers).map_err(|e| Failure::Wrong(format!("{at}: {e}")))?;
            props = props.with_headers(headers);
        }
        if let Some(ct) = &self.content_type {
            props = props.with_content_type(ShortString::from(ct.as_str()));
        }
        let message = Message::new(
            EXCHANGE,
            self.routing_key.as_str(),
            props,
            self.body.clone().into_bytes(),
        );
        Ok((at, Arc::new(message)))
    }
}

/// Why a version failed its vectors.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The plugin faulted (a deadline fault is retried once by the caller).
    Fault(String, PluginFault),
    /// It decided wrongly, refused, or the vectors are malformed.
    Wrong(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Fault(at, fault) => write!(f, "{at}: the plugin {fault}"),
            Failure::Wrong(why) => f.write_str(why),
        }
    }
}

/// The vectors a module ships, if any: each `wasmq-self-test` section.
pub(crate) fn sections(bytes: &[u8]) -> Vec<&[u8]> {
    let mut found = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(wasmparser::Payload::CustomSection(s)) if s.name() == abi::SELF_TEST_SECTION => {
                found.push(s.data());
            }
            Ok(_) => {}
            Err(_) => break, // compiled already: cannot happen
        }
    }
    found
}

/// Run every vector in `section` against fresh instances of `version`.
/// Returns how many messages were checked.
pub(crate) fn run(
    host: &PluginHost,
    version: &PluginVersion,
    section: &[u8],
) -> Result<usize, Failure> {
    let vectors: Vectors = serde_json::from_slice(section)
        .map_err(|e| Failure::Wrong(format!("the self-test section is not valid: {e}")))?;
    let roles = version.roles;
    let missing = |role: &str| Failure::Wrong(format!("it has {role} vectors but no {role} role"));
    if !vectors.router.is_empty() && !roles.router {
        return Err(missing("router"));
    }
    if !vectors.filter.is_empty() && !roles.filter {
        return Err(missing("filter"));
    }
    if !vectors.transform.is_empty() && !roles.transform {
        return Err(missing("transform"));
    }
    let mut checked = 0;
    for (c, case) in vectors.router.iter().enumerate() {
        checked += router_case(host, version, case, &format!("router case {c}"))?;
    }
    for (c, case) in vectors.filter.iter().enumerate() {
        checked += filter_case(host, version, case, &format!("filter case {c}"))?;
    }
    for (c, case) in vectors.transform.iter().enumerate() {
        checked += transform_case(host, version, case, &format!("transform case {c}"))?;
    }
    Ok(checked)
}

fn table(v: &Value, at: &str) -> Result<Vec<u8>, Failure> {
    let t = json_to_table(v).map_err(|e| Failure::Wrong(format!("{at}: {e}")))?;
    Ok(encode_table_body(&t))
}

/// A fresh instance, initialised for `role`.
fn instance(
    host: &PluginHost,
    version: &PluginVersion,
    role: i32,
    key: &str,
    args: &[u8],
    at: &str,
) -> Result<Instance, Failure> {
    let mut i = host
        .instantiate(version)
        .map_err(|f| Failure::Fault(format!("{at}: setup"), f))?;
    call(
        i.init(role, &init_input(EXCHANGE, key, args)),
        &format!("{at}: init"),
    )?;
    Ok(i)
}

fn call<T>(r: Result<T, CallError>, at: &str) -> Result<T, Failure> {
    r.map_err(|e| match e {
        CallError::Fault(f) => Failure::Fault(at.to_owned(), f),
        CallError::Refused(why) => Failure::Wrong(format!("{at}: refused: {why}")),
    })
}

fn router_case(
    host: &PluginHost,
    version: &PluginVersion,
    case: &RouterCase,
    at: &str,
) -> Result<usize, Failure> {
    let args = table(&case.exchange_arguments, at)?;
    let mut i = instance(host, version, abi::ROLE_ROUTER, "", &args, at)?;
    for (id, b) in case.bindings.iter().enumerate() {
        let at = format!("{at}, binding {id} ('{}')", b.key);
        let queue = b.queue.clone().unwrap_or_else(|| format!("queue{id}"));
        let input = binding_input(&b.key, false, &queue, &table(&b.arguments, &at)?);
        call(i.bind(id as u32, &input), &at)?;
    }
    for (n, m) in case.messages.iter().enumerate() {
        let (at, message) = m.message(at, n)?;
        let mut got = Vec::new();
        call(i.route(&message, &mut got), &at)?;
        got.sort_unstable();
        got.dedup();
        let mut want = m.expect.clone();
        want.sort_unstable();
        want.dedup();
        if got != want {
            return Err(Failure::Wrong(format!(
                "{at}: expected bindings {want:?}, the plugin chose {got:?}"
            )));
        }
    }
    Ok(case.messages.len())
}

fn filter_case(
    host: &PluginHost,
    version: &PluginVersion,
    case: &FilterCase,
    at: &str,
) -> Result<usize, Failure> {
    let args = table(&case.arguments, at)?;
    let mut i = instance(host, version, abi::ROLE_FILTER, &case.key, &args, at)?;
    for (n, m) in case.messages.iter().enumerate() {
        let (at, message) = m.message(at, n)?;
        let got = match i.filter(&message) {
            Ok(true) => FilterExpect::Pass,
            Ok(false) => FilterExpect::Drop,
            Err(f) => return Err(Failure::Fault(at, f)),
        };
        if got != m.expect {
            return Err(Failure::Wrong(format!(
                "{at}: expected {:?}, the plugin said {got:?}",
                m.expect
            )));
        }
    }
    Ok(case.messages.len())
}

fn transform_case(
    host: &PluginHost,
    version: &PluginVersion,
    case: &TransformCase,
    at: &str,
) -> Result<usize, Failure> {
    let args = table(&case.exchange_arguments, at)?;
    let mut i = instance(host, version, abi::ROLE_TRANSFORM, "", &args, at)?;
    for (n, m) in case.messages.iter().enumerate() {
        let (at, message) = m.message(at, n)?;
        let decision = call(i.transform(&message, parse_decision), &at)?;
        check_transform(&message, decision, &m.expect)
            .map_err(|why| Failure::Wrong(format!("{at}: {why}")))?;
    }
    Ok(case.messages.len())
}

fn check_transform(
    message: &Message,
    decision: TransformDecision,
    expect: &TransformExpect,
) -> Result<(), String> {
    match (expect, decision) {
        (
            TransformExpect::Route {
                routing_key,
                headers,
                content_type,
                body,
            },
            decision @ (TransformDecision::Keep | TransformDecision::Rewrite { .. }),
        ) => {
            let (key, props, new_body) = match decision {
                TransformDecision::Rewrite {
                    routing_key,
                    properties,
                    body,
                } => (routing_key, properties, body),
                _ => (None, None, None),
            };
            let key = key.unwrap_or_else(|| message.routing_key.to_string());
            let props = props.unwrap_or_else(|| message.properties.clone());
            let new_body = new_body.unwrap_or_else(|| message.body.clone());
            if let Some(want) = routing_key
                && *want != key
            {
                return Err(format!("expected routing key '{want}', got '{key}'"));
            }
            if let Some(want) = body
                && want.as_bytes() != new_body.as_ref()
            {
                return Err(format!(
                    "expected body {want:?}, got {:?}",
                    String::from_utf8_lossy(&new_body)
                ));
            }
            if let Some(want) = content_type {
                let got = props.content_type().as_ref().map(|c| c.to_string());
                if got.as_deref() != Some(want.as_str()) {
                    return Err(format!("expected content type '{want}', got {got:?}"));
                }
            }
            if let Some(want) = headers {
                let got = table_to_json(props.headers().as_ref().unwrap_or(&FieldTable::default()));
                let want = if want.is_null() {
                    Value::Object(Default::default())
                } else {
                    want.clone()
                };
                if got != want {
                    return Err(format!("expected headers {want}, got {got}"));
                }
            }
            Ok(())
        }
        (TransformExpect::Drop, TransformDecision::Drop) => Ok(()),
        (TransformExpect::DeadLetter { reason }, TransformDecision::DeadLetter(got)) => {
            match reason {
                Some(want) if *want != got => Err(format!(
                    "expected dead-lettering with reason '{want}', got '{got}'"
                )),
                _ => Ok(()),
            }
        }
        (expect, decision) => {
            let want = match expect {
                TransformExpect::Route { .. } => "route",
                TransformExpect::Drop => "drop",
                TransformExpect::DeadLetter { .. } => "dead_letter",
            };
            let chose = match decision {
                TransformDecision::Keep | TransformDecision::Rewrite { .. } => "route",
                TransformDecision::Drop => "drop",
                TransformDecision::DeadLetter(_) => "dead_letter",
            };
            Err(format!(
                "expected outcome '{want}', the plugin chose '{chose}'"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_parses_and_refuses_unknown_fields() {
        let v: Vectors = serde_json::from_str(
            r#"{"router": [{"bindings": [{"key": "a"}], "messages": [{"routing_key": "a", "expect": [0]}]}],
                "filter": [{"key": "k", "messages": [{"body": "x", "expect": "drop"}]}],
                "transform": [{"messages": [
                    {"expect": {"outcome": "route", "routing_key": "b"}},
                    {"expect": {"outcome": "dead_letter"}},
                    {"expect": {"outcome": "drop"}}]}]}"#,
        )
        .unwrap();
        assert_eq!(v.router[0].messages[0].expect, vec![0]);
        assert_eq!(v.filter[0].messages[0].expect, FilterExpect::Drop);
        assert!(matches!(
            v.transform[0].messages[1].expect,
            TransformExpect::DeadLetter { reason: None }
        ));
        for bad in [
            r#"{"routers": []}"#,
            r#"{"router": [{"messages": [{"expect": [0], "routing": "a"}]}]}"#,
            r#"{"transform": [{"messages": [{"expect": {"outcome": "keep"}}]}]}"#,
            r#"{"filter": [{"messages": [{"expect": "maybe"}]}]}"#,
        ] {
            assert!(serde_json::from_str::<Vectors>(bad).is_err(), "{bad}");
        }
    }

    /// The examples of the format in the ABI doc and on the SDK macro parse.
    #[test]
    fn the_documented_examples_parse() {
        let abi_doc = include_str!("../../../docs/plugin-abi.md");
        let (_, rest) = abi_doc.split_once("```json\n").unwrap();
        let (json, _) = rest.split_once("```").unwrap();
        serde_json::from_str::<Vectors>(json).unwrap();

        let sdk = include_str!("../../../guest-sdk/src/lib.rs");
        let (_, rest) = sdk.split_once("/// wasmq_sdk::self_test!(r#\"").unwrap();
        let (doc, _) = rest.split_once("\"#);").unwrap();
        let json: String = doc.lines().map(|l| l.trim_start_matches("///")).collect();
        let v = serde_json::from_str::<Vectors>(&json).unwrap();
        assert_eq!(
            (v.router.len(), v.filter.len(), v.transform.len()),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_transform_decision_is_compared_with_what_was_expected() {
        let m = Message::new("x", "a", BasicProperties::default(), &b"body"[..]);
        let route = |key: Option<&str>, body: Option<&str>| TransformExpect::Route {
            routing_key: key.map(Into::into),
            headers: None,
            content_type: None,
            body: body.map(Into::into),
        };
        assert!(
            check_transform(&m, TransformDecision::Keep, &route(Some("a"), Some("body"))).is_ok()
        );
        let rewrite = || TransformDecision::Rewrite {
            routing_key: Some("b".into()),
            properties: None,
            body: None,
        };
        assert!(check_transform(&m, rewrite(), &route(Some("b"), Some("body"))).is_ok());
        let e = check_transform(&m, rewrite(), &route(Some("a"), None)).unwrap_err();
        assert!(e.contains("expected routing key 'a', got 'b'"), "{e}");
        let e = check_transform(&m, TransformDecision::Drop, &route(None, None)).unwrap_err();
        assert!(
            e.contains("expected outcome 'route', the plugin chose 'drop'"),
            "{e}"
        );
        let dl = TransformExpect::DeadLetter {
            reason: Some("bad".into()),
        };
        assert!(check_transform(&m, TransformDecision::DeadLetter("bad".into()), &dl).is_ok());
        assert!(check_transform(&m, TransformDecision::DeadLetter("other".into()), &dl).is_err());
    }
}
