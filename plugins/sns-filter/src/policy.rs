//! Amazon SNS subscription filter policies: parsed once when a binding is
//! made (with an error that names what is wrong and where), matched
//! against each message's headers or JSON body.
//!
//! The semantics are SNS's:
//!
//! * the keys of a policy object must all match (AND); the values listed
//!   for a key are alternatives (OR); `$or` lists policy objects of which
//!   one must match;
//! * a value is an exact string, number (compared as a number: `301.5`
//!   matches `3.015e2`), boolean or `null`, or one operator: `prefix`,
//!   `suffix`, `equals-ignore-case`, `anything-but` (a value, a list, or
//!   `{"prefix"|"suffix": ...}`), `numeric` (`["=", n]` or bounds like
//!   `[">", 0, "<=", 150]`), `exists`;
//! * a key the message does not have matches only `{"exists": false}`;
//! * an array in the message matches when any of its elements does (also
//!   for `anything-but`, as SNS documents: `[100, 50]` matches
//!   `{"anything-but": [100, 500]}`);
//! * nested keys (an object as a key's value) are for the body scope only,
//!   as in SNS.
//!
//! SNS's bounds hold too: numbers within ±10⁹, and at most 150
//! combinations of values (the product of each key's alternatives, summed
//! over `$or` branches), so a policy costs a bounded number of comparisons
//! per message.

use serde_json::Value;
use wasmq_sdk::{FieldTable, FieldValue};

/// The most combinations of values a policy may have (SNS's limit).
pub const MAX_COMBINATIONS: u64 = 150;
/// The largest magnitude of a number in a policy (SNS's limit).
pub const MAX_NUMBER: f64 = 1e9;
/// How deep policy objects may nest (keys in keys, `$or` in `$or`).
pub const MAX_DEPTH: usize = 16;

/// Where a policy looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The message's headers (SNS's message attributes), the default.
    MessageAttributes,
    /// The message's body, a JSON object.
    MessageBody,
}

/// A parsed filter policy.
#[derive(Debug)]
pub struct Policy {
    root: Node,
    scope: Scope,
}

#[derive(Debug, Default)]
struct Node {
    /// Every key must match.
    keys: Vec<(String, Rule)>,
    /// Each `$or`: one of its branches must match.
    ors: Vec<Vec<Node>>,
}

#[derive(Debug)]
enum Rule {
    /// One of these must match the key's value.
    Any(Vec<Cond>),
    /// The key's value is an object this node must match.
    Nested(Node),
}

#[derive(Debug)]
enum Cond {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
    Prefix(String),
    Suffix(String),
    /// Lower-cased.
    IgnoreCase(String),
    AnythingBut(Vec<Lit>),
    AnythingButPrefix(String),
    AnythingButSuffix(String),
    /// Every comparison must hold.
    Numeric(Vec<(Op, f64)>),
    Exists(bool),
}

#[derive(Debug)]
enum Lit {
    Str(String),
    Num(f64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Why a policy was refused: where, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(at: &str, what: impl std::fmt::Display) -> Result<T, PolicyError> {
    Err(PolicyError(if at.is_empty() {
        format!("x-filter-policy: {what}")
    } else {
        format!("x-filter-policy at '{at}': {what}")
    }))
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

impl Policy {
    /// Parse `text` (the policy's JSON) for `scope`.
    pub fn parse(text: &str, scope: Scope) -> Result<Policy, PolicyError> {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return err("", format!("not JSON: {e}")),
        };
        let root = parse_node(&value, "", scope, 0)?;
        let combinations = root.combinations();
        if combinations > MAX_COMBINATIONS {
            return err(
                "",
                format!(
                    "{combinations} combinations of values, more than the {MAX_COMBINATIONS} allowed (the product of each key's values, summed over $or branches)"
                ),
            );
        }
        Ok(Policy { root, scope })
    }

    /// Where it looks.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Whether a message with these headers matches (attribute scope).
    pub fn matches_headers(&self, headers: &FieldTable) -> bool {
        self.root.matches(&|k| headers.get(k))
    }

    /// Whether a message with this body matches (body scope): a body that
    /// is not a JSON object matches nothing.
    pub fn matches_body(&self, body: &[u8]) -> bool {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return false;
        };
        if !value.is_object() {
            return false;
        }
        self.root.matches(&|k| value.get(k))
    }
}

fn parse_node(v: &Value, at: &str, scope: Scope, depth: usize) -> Result<Node, PolicyError> {
    if depth > MAX_DEPTH {
        return err(at, format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let Some(object) = v.as_object() else {
        return err(at, "must be a JSON object of keys and their values");
    };
    if object.is_empty() {
        return err(at, "names no key");
    }
    let mut node = Node::default();
    for (key, value) in object {
        let here = join(at, key);
        if key == "$or" {
            let Some(branches) = value.as_array().filter(|b| b.len() >= 2) else {
                return err(&here, "must be an array of at least two policy objects");
            };
            let parsed = branches
                .iter()
                .enumerate()
                .map(|(i, b)| parse_node(b, &format!("{here}[{i}]"), scope, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            node.ors.push(parsed);
            continue;
        }
        let rule = match value {
            Value::Array(values) => {
                if values.is_empty() {
                    return err(&here, "lists no value");
                }
                Rule::Any(
                    values
                        .iter()
                        .map(|c| parse_cond(c, &here))
                        .collect::<Result<_, _>>()?,
                )
            }
            Value::Object(_) if scope == Scope::MessageBody => {
                Rule::Nested(parse_node(value, &here, scope, depth + 1)?)
            }
            Value::Object(_) => {
                return err(
                    &here,
                    "nested keys apply to a JSON body: set x-filter-policy-scope to MessageBody",
                );
            }
            _ => {
                return err(
                    &here,
                    "must be an array of values (or, in a body, an object)",
                );
            }
        };
        node.keys.push((key.clone(), rule));
    }
    Ok(node)
}

fn number(v: &Value, at: &str, what: &str) -> Result<f64, PolicyError> {
    let Some(n) = v.as_f64() else {
        return err(at, format!("{what} must be a number, not {v}"));
    };
    if n.abs() > MAX_NUMBER {
        return err(
            at,
            format!("{what} {n} is outside the allowed range of -1e9 to 1e9"),
        );
    }
    Ok(n)
}

fn text<'a>(v: &'a Value, at: &str, op: &str) -> Result<&'a str, PolicyError> {
    match v.as_str() {
        Some(s) => Ok(s),
        None => err(at, format!("'{op}' takes a string, not {v}")),
    }
}

fn parse_cond(v: &Value, at: &str) -> Result<Cond, PolicyError> {
    Ok(match v {
        Value::String(s) => Cond::Str(s.clone()),
        Value::Number(_) => Cond::Num(number(v, at, "a value")?),
        Value::Bool(b) => Cond::Bool(*b),
        Value::Null => Cond::Null,
        Value::Array(_) => return err(at, "a value cannot be an array"),
        Value::Object(o) => {
            let mut ops = o.iter();
            let (Some((op, arg)), None) = (ops.next(), ops.next()) else {
                return err(at, "an operator object has exactly one operator");
            };
            match op.as_str() {
                "prefix" => Cond::Prefix(text(arg, at, op)?.to_owned()),
                "suffix" => Cond::Suffix(text(arg, at, op)?.to_owned()),
                "equals-ignore-case" => Cond::IgnoreCase(text(arg, at, op)?.to_lowercase()),
                "exists" => match arg {
                    Value::Bool(b) => Cond::Exists(*b),
                    _ => return err(at, format!("'exists' takes true or false, not {arg}")),
                },
                "anything-but" => anything_but(arg, at)?,
                "numeric" => numeric(arg, at)?,
                other => {
                    return err(
                        at,
                        format!(
                            "unknown operator '{other}' (prefix, suffix, equals-ignore-case, anything-but, numeric, exists)"
                        ),
                    );
                }
            }
        }
    })
}

fn anything_but(arg: &Value, at: &str) -> Result<Cond, PolicyError> {
    let lit = |v: &Value| -> Result<Lit, PolicyError> {
        match v {
            Value::String(s) => Ok(Lit::Str(s.clone())),
            Value::Number(_) => Ok(Lit::Num(number(v, at, "an anything-but value")?)),
            _ => err(
                at,
                format!("'anything-but' takes strings or numbers, not {v}"),
            ),
        }
    };
    Ok(match arg {
        Value::Array(items) if items.is_empty() => {
            return err(at, "'anything-but' lists no value");
        }
        Value::Array(items) => Cond::AnythingBut(items.iter().map(lit).collect::<Result<_, _>>()?),
        Value::Object(o) => {
            let mut ops = o.iter();
            match (ops.next(), ops.next()) {
                (Some((op, v)), None) if op == "prefix" => {
                    Cond::AnythingButPrefix(text(v, at, "anything-but prefix")?.to_owned())
                }
                (Some((op, v)), None) if op == "suffix" => {
                    Cond::AnythingButSuffix(text(v, at, "anything-but suffix")?.to_owned())
                }
                _ => {
                    return err(
                        at,
                        "'anything-but' takes a value, a list, or {\"prefix\": ...} / {\"suffix\": ...}",
                    );
                }
            }
        }
        other => Cond::AnythingBut(vec![lit(other)?]),
    })
}

fn numeric(arg: &Value, at: &str) -> Result<Cond, PolicyError> {
    let Some(items) = arg.as_array() else {
        return err(
            at,
            "'numeric' takes an array such as [\"=\", 100] or [\">\", 0, \"<=\", 150]",
        );
    };
    if items.is_empty() || items.len() % 2 != 0 || items.len() > 4 {
        return err(
            at,
            "'numeric' takes one comparison or a lower and an upper bound, e.g. [\">\", 0, \"<=\", 150]",
        );
    }
    let mut ops = Vec::new();
    for pair in items.chunks(2) {
        let op = match pair[0].as_str() {
            Some("=") => Op::Eq,
            Some("<") => Op::Lt,
            Some("<=") => Op::Le,
            Some(">") => Op::Gt,
            Some(">=") => Op::Ge,
            _ => {
                return err(
                    at,
                    format!(
                        "'numeric' operator {} is not one of =, <, <=, >, >=",
                        pair[0]
                    ),
                );
            }
        };
        ops.push((op, number(&pair[1], at, "a numeric bound")?));
    }
    if let [(lower, low), (upper, high)] = ops[..] {
        if !matches!(lower, Op::Gt | Op::Ge) || !matches!(upper, Op::Lt | Op::Le) {
            return err(
                at,
                "a numeric range is a lower bound (> or >=) then an upper bound (< or <=)",
            );
        }
        if low >= high {
            return err(
                at,
                format!("a numeric range's lower bound {low} is not below its upper bound {high}"),
            );
        }
    }
    Ok(Cond::Numeric(ops))
}

impl Node {
    fn combinations(&self) -> u64 {
        let mut n: u64 = 1;
        for (_, rule) in &self.keys {
            let k = match rule {
                Rule::Any(conds) => conds.len() as u64,
                Rule::Nested(node) => node.combinations(),
            };
            n = n.saturating_mul(k);
        }
        for branches in &self.ors {
            let sum = branches
                .iter()
                .map(Node::combinations)
                .fold(0u64, u64::saturating_add);
            n = n.saturating_mul(sum);
        }
        n
    }

    fn matches<'v, F: Field + 'v>(&self, get: &dyn Fn(&str) -> Option<&'v F>) -> bool {
        self.keys.iter().all(|(key, rule)| {
            let value = get(key);
            match rule {
                Rule::Any(conds) => conds.iter().any(|c| c.matches(value)),
                Rule::Nested(node) => match value {
                    None => node.matches::<F>(&|_| None),
                    Some(v) => match v.items() {
                        Some(items) => items.iter().any(|i| node.matches(&|k| i.child(k))),
                        None => node.matches(&|k| v.child(k)),
                    },
                },
            }
        }) && self
            .ors
            .iter()
            .all(|branches| branches.iter().any(|b| b.matches(get)))
    }
}

/// A value as a condition sees it.
#[derive(Debug, PartialEq)]
enum Scalar<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
    Null,
    /// Anything else (binary, a table where a value was expected).
    Other,
}

/// What the policy reads a message through: headers or a JSON body.
trait Field: Sized {
    fn scalar(&self) -> Scalar<'_>;
    fn items(&self) -> Option<&[Self]>;
    fn child(&self, key: &str) -> Option<&Self>;
}

impl Field for Value {
    fn scalar(&self) -> Scalar<'_> {
        match self {
            Value::String(s) => Scalar::Str(s),
            Value::Number(n) => n.as_f64().map_or(Scalar::Other, Scalar::Num),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Null => Scalar::Null,
            _ => Scalar::Other,
        }
    }
    fn items(&self) -> Option<&[Self]> {
        self.as_array().map(Vec::as_slice)
    }
    fn child(&self, key: &str) -> Option<&Self> {
        self.as_object()?.get(key)
    }
}

impl Field for FieldValue {
    fn scalar(&self) -> Scalar<'_> {
        match self {
            FieldValue::String(_) => self.as_str().map_or(Scalar::Other, Scalar::Str),
            FieldValue::Bool(b) => Scalar::Bool(*b),
            FieldValue::F32(f) => Scalar::Num(f64::from(*f)),
            FieldValue::F64(f) => Scalar::Num(*f),
            FieldValue::Decimal { scale, value } => {
                Scalar::Num(f64::from(*value) / 10f64.powi(i32::from(*scale)))
            }
            FieldValue::Void => Scalar::Null,
            other => other
                .as_i64()
                .map_or(Scalar::Other, |i| Scalar::Num(i as f64)),
        }
    }
    fn items(&self) -> Option<&[Self]> {
        match self {
            FieldValue::Array(items) => Some(items),
            _ => None,
        }
    }
    fn child(&self, key: &str) -> Option<&Self> {
        self.as_table()?.get(key)
    }
}

fn lowercase_eq(s: &str, lower: &str) -> bool {
    s.chars().flat_map(char::to_lowercase).eq(lower.chars())
}

impl Cond {
    fn matches<F: Field>(&self, value: Option<&F>) -> bool {
        let Some(v) = value else {
            return matches!(self, Cond::Exists(false));
        };
        if let Cond::Exists(want) = self {
            return *want;
        }
        match v.items() {
            Some(items) => items.iter().any(|i| self.matches_scalar(&i.scalar())),
            None => self.matches_scalar(&v.scalar()),
        }
    }

    fn matches_scalar(&self, s: &Scalar<'_>) -> bool {
        match (self, s) {
            (Cond::Str(want), Scalar::Str(got)) => want == got,
            (Cond::Num(want), Scalar::Num(got)) => want == got,
            (Cond::Bool(want), Scalar::Bool(got)) => want == got,
            (Cond::Null, Scalar::Null) => true,
            (Cond::Prefix(p), Scalar::Str(got)) => got.starts_with(p.as_str()),
            (Cond::Suffix(p), Scalar::Str(got)) => got.ends_with(p.as_str()),
            (Cond::IgnoreCase(lower), Scalar::Str(got)) => lowercase_eq(got, lower),
            (Cond::AnythingBut(lits), s) => !lits.iter().any(|l| match (l, s) {
                (Lit::Str(a), Scalar::Str(b)) => a == b,
                (Lit::Num(a), Scalar::Num(b)) => a == b,
                _ => false,
            }),
            (Cond::AnythingButPrefix(p), Scalar::Str(got)) => !got.starts_with(p.as_str()),
            (Cond::AnythingButSuffix(p), Scalar::Str(got)) => !got.ends_with(p.as_str()),
            (Cond::Numeric(ops), Scalar::Num(n)) => ops.iter().all(|(op, bound)| match op {
                Op::Eq => n == bound,
                Op::Lt => n < bound,
                Op::Le => n <= bound,
                Op::Gt => n > bound,
                Op::Ge => n >= bound,
            }),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of AWS's "Amazon SNS example filter policies" page, as
    /// headers (its `MessageAttributes`) and as a body.
    fn attributes() -> FieldTable {
        [
            (
                "customer_interests",
                FieldValue::Array(vec!["soccer".into(), "rugby".into(), "hockey".into()]),
            ),
            ("store", "example_corp".into()),
            ("event", "order_placed".into()),
            ("price_usd", FieldValue::F64(210.75)),
        ]
        .into_iter()
        .collect()
    }

    const BODY: &str = r#"{"customer_interests": ["soccer", "rugby", "hockey"],
        "store": "example_corp", "event": "order_placed", "price_usd": 210.75}"#;

    fn both(policy: &str) -> (bool, bool) {
        let a = Policy::parse(policy, Scope::MessageAttributes).unwrap();
        let b = Policy::parse(policy, Scope::MessageBody).unwrap();
        (
            a.matches_headers(&attributes()),
            b.matches_body(BODY.as_bytes()),
        )
    }

    fn accepts(policy: &str) -> bool {
        let (a, b) = both(policy);
        assert_eq!(a, b, "headers and body disagree on {policy}");
        a
    }

    #[test]
    fn the_aws_documentation_examples() {
        // "The following filter policy accepts the example message."
        assert!(accepts(
            r#"{"store": ["example_corp"], "event": [{"anything-but": "order_cancelled"}],
                "customer_interests": ["rugby", "football", "baseball"],
                "price_usd": [{"numeric": [">=", 100]}]}"#
        ));
        // A key the message lacks rejects it.
        assert!(!accepts(
            r#"{"store": ["example_corp"], "encrypted": [false]}"#
        ));
        // A value the message does not have rejects it.
        assert!(!accepts(r#"{"customer_interests": ["basketball"]}"#));
        // Numeric ranges.
        assert!(!accepts(
            r#"{"price_usd": [{"numeric": [">", 0, "<=", 150]}]}"#
        ));
        assert!(accepts(
            r#"{"price_usd": [{"numeric": [">", 200, "<", 300]}]}"#
        ));
        assert!(accepts(r#"{"price_usd": [210.75]}"#));
        assert!(accepts(r#"{"price_usd": [{"numeric": ["=", 2.1075e2]}]}"#));
        // Prefix, suffix, equals-ignore-case (any element of an array).
        assert!(accepts(r#"{"customer_interests": [{"prefix": "hoc"}]}"#));
        assert!(!accepts(r#"{"customer_interests": [{"prefix": "bas"}]}"#));
        assert!(accepts(r#"{"store": [{"suffix": "_corp"}]}"#));
        assert!(accepts(
            r#"{"store": [{"equals-ignore-case": "EXAMPLE_CORP"}]}"#
        ));
        // Anything-but: a value, a list, a prefix; an array matches when
        // any element is not excluded.
        assert!(!accepts(
            r#"{"event": [{"anything-but": ["order_placed", "x"]}]}"#
        ));
        assert!(accepts(
            r#"{"event": [{"anything-but": {"prefix": "order-"}}]}"#
        ));
        assert!(!accepts(
            r#"{"event": [{"anything-but": {"prefix": "order_"}}]}"#
        ));
        assert!(accepts(
            r#"{"customer_interests": [{"anything-but": ["rugby"]}]}"#
        ));
        assert!(accepts(r#"{"price_usd": [{"anything-but": [100, 500]}]}"#));
        assert!(!accepts(r#"{"price_usd": [{"anything-but": 210.75}]}"#));
        // Key matching.
        assert!(accepts(r#"{"store": [{"exists": true}]}"#));
        assert!(!accepts(r#"{"store": [{"exists": false}]}"#));
        assert!(accepts(r#"{"encrypted": [{"exists": false}]}"#));
        assert!(!accepts(r#"{"encrypted": [{"anything-but": "yes"}]}"#));
        // $or: one branch must match, beside the other keys.
        assert!(accepts(
            r#"{"store": ["example_corp"], "$or": [{"event": ["order_cancelled"]}, {"price_usd": [{"numeric": [">", 200]}]}]}"#
        ));
        assert!(!accepts(
            r#"{"store": ["example_corp"], "$or": [{"event": ["order_cancelled"]}, {"price_usd": [{"numeric": ["<", 200]}]}]}"#
        ));
    }

    #[test]
    fn the_aws_numeric_anything_but_arrays() {
        // AWS: {"anything-but": [100, 500]} matches [100, 50] (50 is not
        // excluded) and not 100.
        let p = Policy::parse(
            r#"{"price": [{"anything-but": [100, 500]}]}"#,
            Scope::MessageBody,
        )
        .unwrap();
        assert!(p.matches_body(br#"{"price": 101}"#));
        assert!(p.matches_body(br#"{"price": 100.1}"#));
        assert!(p.matches_body(br#"{"price": [100, 50]}"#));
        assert!(!p.matches_body(br#"{"price": 100}"#));
    }

    #[test]
    fn nested_keys_read_a_json_body() {
        let p = Policy::parse(
            r#"{"order": {"region": ["eu"], "total": [{"numeric": [">=", 100]}]}}"#,
            Scope::MessageBody,
        )
        .unwrap();
        assert!(p.matches_body(br#"{"order": {"region": "eu", "total": 150}}"#));
        assert!(!p.matches_body(br#"{"order": {"region": "us", "total": 150}}"#));
        assert!(!p.matches_body(br#"{"order": {"region": "eu"}}"#));
        assert!(!p.matches_body(br#"{"region": "eu", "total": 150}"#));
        assert!(!p.matches_body(b"not json"));
        assert!(!p.matches_body(b"[1, 2]"));
        // Arrays of objects: one element must match the nested keys.
        assert!(p.matches_body(
            br#"{"order": [{"region": "us", "total": 1}, {"region": "eu", "total": 100}]}"#
        ));
        // Nested keys are refused for headers, as SNS refuses them.
        let e = Policy::parse(r#"{"order": {"region": ["eu"]}}"#, Scope::MessageAttributes)
            .unwrap_err();
        assert!(
            e.0.contains("'order'") && e.0.contains("MessageBody"),
            "{e}"
        );
    }

    #[test]
    fn types_are_kept_apart() {
        let h: FieldTable = [
            ("n", FieldValue::I32(7)),
            ("s", FieldValue::from("7")),
            ("b", FieldValue::Bool(true)),
            (
                "d",
                FieldValue::Decimal {
                    scale: 2,
                    value: 1050,
                },
            ),
        ]
        .into_iter()
        .collect();
        let m = |p: &str| {
            Policy::parse(p, Scope::MessageAttributes)
                .unwrap()
                .matches_headers(&h)
        };
        assert!(m(r#"{"n": [7]}"#));
        assert!(!m(r#"{"n": ["7"]}"#), "a number is not a string");
        assert!(m(r#"{"s": ["7"]}"#));
        assert!(!m(r#"{"s": [7]}"#), "a string is not a number");
        assert!(!m(r#"{"s": [{"numeric": [">", 1]}]}"#));
        assert!(m(r#"{"b": [true]}"#));
        assert!(m(r#"{"d": [10.5]}"#), "a decimal is its value");
    }

    #[test]
    fn a_bad_policy_is_refused_naming_what_is_wrong() {
        let refused = |p: &str, scope: Scope, says: &str| {
            let e = Policy::parse(p, scope).unwrap_err();
            assert!(e.0.contains(says), "{p}: {e}");
        };
        let a = Scope::MessageAttributes;
        refused("{", a, "not JSON");
        refused("[1]", a, "must be a JSON object");
        refused("{}", a, "names no key");
        refused(r#"{"k": []}"#, a, "'k': lists no value");
        refused(r#"{"k": "v"}"#, a, "'k': must be an array");
        refused(r#"{"k": [{"prefix": 1}]}"#, a, "'prefix' takes a string");
        refused(
            r#"{"k": [{"prefix": "a", "suffix": "b"}]}"#,
            a,
            "exactly one operator",
        );
        refused(
            r#"{"k": [{"cidr": "10.0.0.0/8"}]}"#,
            a,
            "unknown operator 'cidr'",
        );
        refused(
            r#"{"k": [{"exists": "yes"}]}"#,
            a,
            "'exists' takes true or false",
        );
        refused(r#"{"k": [{"numeric": [">", "a"]}]}"#, a, "must be a number");
        refused(r#"{"k": [{"numeric": ["~", 1]}]}"#, a, "is not one of");
        refused(
            r#"{"k": [{"numeric": ["<", 1, ">", 0]}]}"#,
            a,
            "lower bound",
        );
        refused(r#"{"k": [{"numeric": [">", 5, "<", 1]}]}"#, a, "not below");
        refused(
            r#"{"k": [{"numeric": [">", 5e9]}]}"#,
            a,
            "outside the allowed range",
        );
        refused(r#"{"k": [{"anything-but": []}]}"#, a, "lists no value");
        refused(
            r#"{"k": [{"anything-but": [true]}]}"#,
            a,
            "strings or numbers",
        );
        refused(
            r#"{"$or": [{"a": ["x"]}]}"#,
            a,
            "'$or': must be an array of at least two",
        );
        refused(
            r#"{"a": {"b": ["x"]}, "c": [[1]]}"#,
            Scope::MessageBody,
            "'c': a value cannot be an array",
        );
        // 6 × 6 × 6 = 216 combinations.
        let six = r#"["1","2","3","4","5","6"]"#;
        refused(
            &format!(r#"{{"a": {six}, "b": {six}, "c": {six}}}"#),
            a,
            "216 combinations",
        );
        assert!(Policy::parse(&format!(r#"{{"a": {six}, "b": {six}}}"#), a).is_ok());
    }
}
