//! Policies: a queue's or an exchange's behaviour set by the operator at
//! run time, without touching the applications that declared it.
//!
//! RabbitMQ's model, which its operators know: a policy names a vhost's
//! queues and exchanges by a regular expression (`pattern`) and a kind
//! (`apply-to`), has a `priority`, and a `definition` of keys. Of the
//! policies matching an object the one with the highest priority applies
//! (ties: the name that sorts first), and only that one. An **operator
//! policy** caps what applications may set: of its numeric keys and the
//! same keys from the policy or the declare arguments, the lowest wins.
//!
//! What the client gave wins over a policy where RabbitMQ says so: for the
//! numeric limits (`message-ttl`, `expires`, `max-length`,
//! `max-length-bytes`, `delivery-limit`, `consumer-timeout`,
//! `delivery-delay`) the lowest of the argument, the
//! policy and the operator policy holds; for the others (`overflow`,
//! dead-lettering, `alternate-exchange`) the argument, when given, wins.
//!
//! The effective arguments are computed here as a field table in the
//! declare arguments' own form (`x-max-length`, ...), so the queue parses
//! them with the same code, the same checks and the same types as a
//! client's, and a policy cannot make a queue a client could not.

use std::collections::BTreeMap;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A policy as kept and shown (RabbitMQ's fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Name (unique in its vhost).
    pub name: String,
    /// A regular expression on queue and exchange names (unanchored, as
    /// RabbitMQ's: write `^...$` for whole names).
    pub pattern: String,
    /// `queues`, `classic_queues`, `quorum_queues`, `exchanges` or `all`.
    #[serde(rename = "apply-to")]
    pub apply_to: String,
    /// The highest priority of the matching policies applies.
    #[serde(default)]
    pub priority: i64,
    /// The keys it sets.
    pub definition: BTreeMap<String, Value>,
}

/// What a policy is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// An exchange.
    Exchange,
    /// A classic queue.
    ClassicQueue,
    /// A quorum queue.
    QuorumQueue,
    /// A stream.
    Stream,
}

/// The kinds of object a policy may apply to.
pub const APPLY_TO: [&str; 6] = [
    "queues",
    "classic_queues",
    "quorum_queues",
    "streams",
    "exchanges",
    "all",
];

/// Queue keys that are limits: the lowest of argument, policy and
/// operator policy holds.
pub const NUMERIC_KEYS: [&str; 7] = [
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
    "consumer-timeout",
    "delivery-delay",
];

/// Queue keys where a client's argument wins over a policy (`max-age`:
/// a stream's retention, as RabbitMQ's policies set it;
/// `queue-leader-locator`: where a quorum queue declared from then on is
/// first led).
pub const QUEUE_KEYS: [&str; 6] = [
    "overflow",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "queue-mode",
    "max-age",
    "queue-leader-locator",
];

/// Exchange keys: RabbitMQ's, and wasmq's own `transform` (the transform
/// plugin an exchange runs when its declare named none) and `filter` (the
/// filter plugin its bindings run when their bind named none).
pub const EXCHANGE_KEYS: [&str; 3] = ["alternate-exchange", "transform", "filter"];

/// Why a policy was refused: the field at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// `pattern`, `apply-to`, `definition.max-length`, ...
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn error(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

impl PolicyRecord {
    /// Check every field: the pattern compiles, `apply-to` is known, every
    /// key of the definition is one wasmq acts on (an operator policy's:
    /// only the numeric limits) with a value of its type.
    pub fn check(&self, operator: bool) -> Result<(), PolicyError> {
        crate::access::Pattern::new(&self.pattern).map_err(|e| {
            error(
                "pattern",
                format!(
                    "bad regular expression '{}': {e}",
                    crate::untrusted::text(&self.pattern)
                ),
            )
        })?;
        if !APPLY_TO.contains(&self.apply_to.as_str()) {
            return Err(error(
                "apply-to",
                format!(
                    "'{}' is not one of {}",
                    crate::untrusted::text(&self.apply_to),
                    APPLY_TO.join(", ")
                ),
            ));
        }
        if self.definition.is_empty() {
            return Err(error("definition", "sets no key"));
        }
        for (key, value) in &self.definition {
            let field = format!("definition.{}", crate::untrusted::text(key));
            if NUMERIC_KEYS.contains(&key.as_str()) {
                if value
                    .as_u64()
                    .is_none_or(|n| n > u64::from(u32::MAX) * 1000)
                {
                    return Err(error(
                        field,
                        format!("must be a non-negative integer (got {value})"),
                    ));
                }
                continue;
            }
            if operator {
                return Err(error(
                    field,
                    format!("operator policies cap {} only", NUMERIC_KEYS.join(", ")),
                ));
            }
            let text = || {
                value
                    .as_str()
                    .ok_or_else(|| error(&field, format!("must be a string (got {value})")))
            };
            match key.as_str() {
                "overflow" => {
                    let v = text()?;
                    if !["drop-head", "reject-publish", "reject-publish-dlx"].contains(&v) {
                        return Err(error(
                            field,
                            format!("'{v}' is not drop-head, reject-publish or reject-publish-dlx"),
                        ));
                    }
                }
                "queue-mode" => {
                    let v = text()?;
                    if !["default", "lazy"].contains(&v) {
                        return Err(error(field, format!("'{v}' is not default or lazy")));
                    }
                }
                "queue-leader-locator" => {
                    let v = text()?;
                    if !["client-local", "balanced"].contains(&v) {
                        return Err(error(
                            field,
                            format!(
                                "'{}' is not client-local or balanced",
                                crate::untrusted::text(v)
                            ),
                        ));
                    }
                }
                "dead-letter-exchange" | "dead-letter-routing-key" | "alternate-exchange" => {
                    text()?;
                }
                "max-age" => {
                    let v = text()?;
                    if crate::broker::stream::parse_age(v).is_none() {
                        return Err(error(
                            field,
                            format!(
                                "'{}' is not an age (a number and one of Y, M, D, h, m, s, as in 7D)",
                                crate::untrusted::text(v)
                            ),
                        ));
                    }
                }
                "transform" | "filter" => {
                    let v = text()?;
                    if !crate::plugin::valid_plugin_name(v) {
                        return Err(error(
                            field,
                            format!("'{}' is not a plugin name", crate::untrusted::text(v)),
                        ));
                    }
                }
                "max-priority" => {
                    return Err(error(
                        field,
                        "a queue's priorities are fixed when it is declared (x-max-priority), as in RabbitMQ",
                    ));
                }
                _ => {
                    return Err(error(
                        field,
                        format!(
                            "unknown key (queues: {}, {}; exchanges: {})",
                            NUMERIC_KEYS.join(", "),
                            QUEUE_KEYS.join(", "),
                            EXCHANGE_KEYS.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn applies_to(&self, target: Target) -> bool {
        matches!(
            (self.apply_to.as_str(), target),
            ("all", _)
                | ("exchanges", Target::Exchange)
                | (
                    "queues",
                    Target::ClassicQueue | Target::QuorumQueue | Target::Stream
                )
                | ("classic_queues", Target::ClassicQueue)
                | ("quorum_queues", Target::QuorumQueue)
                | ("streams", Target::Stream)
        )
    }
}

/// One vhost's policies (or operator policies), patterns compiled, best
/// first: matching an object is one regex per policy until the first
/// match, never a compile.
#[derive(Debug, Default)]
pub struct PolicySet {
    ordered: Vec<(PolicyRecord, regex::Regex)>,
}

impl PolicySet {
    /// The set of `policies` (already checked; one whose pattern no longer
    /// compiles matches nothing).
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a PolicyRecord>) -> PolicySet {
        let mut ordered: Vec<(PolicyRecord, regex::Regex)> = policies
            .into_iter()
            .filter_map(|p| {
                let re = regex::RegexBuilder::new(&p.pattern)
                    .size_limit(1 << 20)
                    .build()
                    .ok()?;
                Some((p.clone(), re))
            })
            .collect();
        ordered.sort_by(|(a, _), (b, _)| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        PolicySet { ordered }
    }

    /// Whether it has no policy.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The policy that applies to `name` of kind `target`.
    pub fn matching(&self, name: &str, target: Target) -> Option<&PolicyRecord> {
        self.ordered
            .iter()
            .find(|(p, re)| p.applies_to(target) && re.is_match(name))
            .map(|(p, _)| p)
    }
}

/// What applies to one queue or exchange: its policy and operator policy,
/// and the definition they make together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// The policy's name.
    pub policy: Option<String>,
    /// The operator policy's name.
    pub operator_policy: Option<String>,
    /// The keys both set, an operator policy's lower limits over the
    /// policy's (RabbitMQ's `effective_policy_definition`).
    pub definition: BTreeMap<String, Value>,
}

impl Applied {
    /// What `policy` and `operator` set together.
    pub fn of(policy: Option<&PolicyRecord>, operator: Option<&PolicyRecord>) -> Applied {
        let mut definition = policy.map(|p| p.definition.clone()).unwrap_or_default();
        if let Some(op) = operator {
            for (k, v) in &op.definition {
                let lower = match (definition.get(k).and_then(Value::as_u64), v.as_u64()) {
                    (Some(a), Some(b)) => Value::from(a.min(b)),
                    _ => v.clone(),
                };
                definition.insert(k.clone(), lower);
            }
        }
        Applied {
            policy: policy.map(|p| p.name.clone()),
            operator_policy: operator.map(|p| p.name.clone()),
            definition,
        }
    }

    /// Whether nothing applies.
    pub fn is_empty(&self) -> bool {
        self.definition.is_empty()
    }

    /// A queue's declare `arguments` with what applies laid over them, as
    /// the queue's own arguments would read: the lowest numeric limit
    /// holds, an argument the client gave wins over the other keys.
    pub fn queue_arguments(&self, arguments: &FieldTable) -> FieldTable {
        if self.definition.is_empty() {
            return arguments.clone();
        }
        let mut out = arguments.clone();
        for (key, value) in &self.definition {
            if key == "queue-mode" {
                // Every wasmq queue pages its backlog to disk: lazy and
                // default behave alike.
                continue;
            }
            let arg = format!("x-{key}");
            let given = arguments.inner().get(arg.as_str());
            if NUMERIC_KEYS.contains(&key.as_str()) {
                let Some(n) = value.as_u64() else { continue };
                let lower = match given.and_then(amqp_u64) {
                    Some(a) => a.min(n),
                    None => n,
                };
                out.insert(ShortString::from(arg), AMQPValue::LongLongInt(lower as i64));
            } else if given.is_none()
                && let Some(s) = value.as_str()
            {
                out.insert(ShortString::from(arg), AMQPValue::LongString(s.into()));
            }
        }
        out
    }

    /// An exchange's transform plugin: the argument's, else the policy's.
    pub fn transform(&self, declared: Option<&str>) -> Option<String> {
        declared.map(str::to_owned).or_else(|| {
            self.definition
                .get("transform")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }

    /// A binding's filter plugin: the binding argument's, else the
    /// policy's.
    pub fn filter(&self, declared: Option<&str>) -> Option<String> {
        declared.map(str::to_owned).or_else(|| {
            self.definition
                .get("filter")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }

    /// An exchange's alternate exchange: the argument's, else the
    /// policy's.
    pub fn alternate_exchange(&self, declared: Option<&str>) -> Option<String> {
        declared.map(str::to_owned).or_else(|| {
            self.definition
                .get("alternate-exchange")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
    }
}

fn amqp_u64(v: &AMQPValue) -> Option<u64> {
    crate::broker::queue_integer(v).and_then(|n| u64::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, pattern: &str, priority: i64, definition: Value) -> PolicyRecord {
        PolicyRecord {
            name: name.into(),
            pattern: pattern.into(),
            apply_to: "queues".into(),
            priority,
            definition: serde_json::from_value(definition).unwrap(),
        }
    }

    #[test]
    fn the_highest_priority_applies_and_only_to_its_kind() {
        let low = policy("low", "^orders\\.", 0, json!({"max-length": 10}));
        let high = policy("high", "^orders\\.eu", 5, json!({"max-length": 99}));
        let mut xs = policy("xs", ".*", 9, json!({"alternate-exchange": "ae"}));
        xs.apply_to = "exchanges".into();
        let set = PolicySet::new([&low, &high, &xs]);
        let name = |q, t| set.matching(q, t).map(|p| p.name.as_str());
        assert_eq!(name("orders.eu", Target::ClassicQueue), Some("high"));
        assert_eq!(name("orders.us", Target::QuorumQueue), Some("low"));
        assert_eq!(name("billing", Target::ClassicQueue), None);
        assert_eq!(name("orders.eu", Target::Exchange), Some("xs"));
    }

    #[test]
    fn the_lowest_limit_holds_and_a_clients_other_arguments_win() {
        let p = policy(
            "p",
            ".*",
            0,
            json!({"max-length": 100, "message-ttl": 5000, "dead-letter-exchange": "dlx", "overflow": "reject-publish"}),
        );
        let op = policy("cap", ".*", 0, json!({"max-length": 50}));
        let applied = Applied::of(Some(&p), Some(&op));
        assert_eq!(applied.definition["max-length"], json!(50));
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(1000));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("drop-head".into()),
        );
        let merged = applied.queue_arguments(&args);
        let get = |k: &str| merged.inner().get(k).cloned();
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongLongInt(50)));
        assert_eq!(
            get("x-message-ttl"),
            Some(AMQPValue::LongLongInt(1000)),
            "the client's lower TTL"
        );
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("drop-head".into())),
            "the client's"
        );
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("dlx".into()))
        );
    }

    #[test]
    fn a_bad_policy_names_its_field() {
        let bad = |p: PolicyRecord, operator| p.check(operator).unwrap_err().field;
        assert_eq!(
            bad(policy("p", "(", 0, json!({"max-length": 1})), false),
            "pattern"
        );
        assert_eq!(
            bad(policy("p", ".*", 0, json!({"max-length": "x"})), false),
            "definition.max-length"
        );
        assert_eq!(
            bad(policy("p", ".*", 0, json!({"bogus": 1})), false),
            "definition.bogus"
        );
        assert_eq!(
            bad(policy("p", ".*", 0, json!({"overflow": "drop"})), false),
            "definition.overflow"
        );
        assert_eq!(
            bad(
                policy("p", ".*", 0, json!({"queue-leader-locator": "random"})),
                false
            ),
            "definition.queue-leader-locator"
        );
        policy(
            "p",
            ".*",
            0,
            json!({"queue-leader-locator": "client-local"}),
        )
        .check(false)
        .unwrap();
        assert_eq!(
            bad(
                policy("p", ".*", 0, json!({"dead-letter-exchange": "x"})),
                true
            ),
            "definition.dead-letter-exchange"
        );
        assert_eq!(bad(policy("p", ".*", 0, json!({})), false), "definition");
        let mut p = policy("p", ".*", 0, json!({"max-length": 1}));
        p.apply_to = "superstreams".into();
        assert_eq!(bad(p, false), "apply-to");
    }
}
