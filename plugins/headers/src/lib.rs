//! The `headers` exchange type: routes on message headers instead of the
//! routing key. A binding's arguments are the match specification and
//! `x-match` says how to combine them, as in RabbitMQ:
//!
//! * `all` (the default): every argument must match;
//! * `any`: at least one argument must match;
//! * `all-with-x` / `any-with-x`: the same, but arguments starting with `x-`
//!   take part too (otherwise they are ignored).
//!
//! An argument with a void value matches on the header's presence alone.
//! `all` with nothing to match matches every message; `any` matches none.

use wasmq_sdk::{
    Binding, BindingId, Destinations, Error, Exchange, FieldTable, FieldValue, Message, Router,
};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    All,
    Any,
}

struct Spec {
    id: BindingId,
    mode: Mode,
    pairs: Vec<(String, FieldValue)>,
}

/// Header-matching routing.
#[derive(Default)]
pub struct Headers {
    specs: Vec<Spec>,
}

fn parse(args: &FieldTable) -> Result<(Mode, bool), Error> {
    match args.get("x-match") {
        None => Ok((Mode::All, false)),
        Some(v) => match v.as_str() {
            Some("all") => Ok((Mode::All, false)),
            Some("any") => Ok((Mode::Any, false)),
            Some("all-with-x") => Ok((Mode::All, true)),
            Some("any-with-x") => Ok((Mode::Any, true)),
            _ => Err(Error::new(format!(
                "invalid x-match {v:?}: expected all, any, all-with-x or any-with-x"
            ))),
        },
    }
}

fn same(spec: &FieldValue, header: &FieldValue) -> bool {
    match (spec, header) {
        // Strings, the usual header values, compared in whole loads.
        (FieldValue::String(a), FieldValue::String(b)) => wasmq_sdk::bytes_eq(a, b),
        _ => match (spec.as_i64(), header.as_i64()) {
            // RabbitMQ compares numbers by value, whatever their wire width.
            (Some(a), Some(b)) => a == b,
            _ => spec == header,
        },
    }
}

impl Router for Headers {
    fn new(_exchange: &Exchange<'_>) -> Result<Self, Error> {
        Ok(Headers::default())
    }

    fn bind(&mut self, b: &Binding<'_>) -> Result<(), Error> {
        let (mode, with_x) = parse(b.arguments)?;
        let pairs = b
            .arguments
            .iter()
            .filter(|(k, _)| *k != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect();
        self.specs.push(Spec {
            id: b.id,
            mode,
            pairs,
        });
        Ok(())
    }

    fn unbind(&mut self, b: &Binding<'_>) {
        self.specs.retain(|s| s.id != b.id);
    }

    fn route(&mut self, m: &Message<'_>, out: &mut Destinations) {
        let headers = m.headers();
        for spec in &self.specs {
            let hit = |(k, v): &(String, FieldValue)| match headers.get(k) {
                None => false,
                Some(_) if *v == FieldValue::Void => true,
                Some(h) => same(v, h),
            };
            let matched = match spec.mode {
                Mode::All => spec.pairs.iter().all(hit),
                Mode::Any => spec.pairs.iter().any(hit),
            };
            if matched {
                out.push(spec.id);
            }
        }
    }
}

wasmq_sdk::plugin!(router = Headers);

// RabbitMQ's headers semantics, checked by the broker on the compiled
// plugin each time it loads this version.
wasmq_sdk::self_test!(
    r#"{"router": [{
  "bindings": [
    {"arguments": {"x-match": "all", "kind": "order", "region": "eu"}},
    {"arguments": {"x-match": "any", "kind": "order", "urgent": true}},
    {"arguments": {"kind": "refund"}},
    {"arguments": {"x-match": "any"}}
  ],
  "messages": [
    {"headers": {"kind": "order", "region": "eu"}, "expect": [0, 1]},
    {"headers": {"kind": "order", "region": "us"}, "expect": [1]},
    {"headers": {"urgent": true}, "expect": [1]},
    {"headers": {"kind": "refund", "region": "eu"}, "expect": [2]},
    {"expect": []}
  ]
}]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::Target;

    fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
        pairs.iter().cloned().collect()
    }

    fn routes(binding: FieldTable, headers: FieldTable) -> bool {
        let empty = FieldTable::new();
        let mut r = Headers::new(&Exchange {
            name: "h",
            arguments: &empty,
        })
        .unwrap();
        r.bind(&Binding {
            id: BindingId(1),
            key: "",
            target: Target::Queue("q"),
            arguments: &binding,
        })
        .unwrap();
        let mut out = Destinations::new();
        r.route(&Message::new("").with_headers(headers), &mut out);
        !out.is_empty()
    }

    #[test]
    fn x_match_modes() {
        let h = table(&[
            ("format", "pdf".into()),
            ("type", "report".into()),
            ("x-k", "v".into()),
        ]);
        let all = table(&[("format", "pdf".into()), ("type", "report".into())]);
        assert!(routes(all.clone(), h.clone()));
        let all_miss = table(&[("format", "pdf".into()), ("type", "log".into())]);
        assert!(!routes(all_miss.clone(), h.clone()));
        let mut any = all_miss.clone();
        any.insert("x-match", "any");
        assert!(routes(any, h.clone()));
        let mut any_none = table(&[("format", "zip".into())]);
        any_none.insert("x-match", "any");
        assert!(!routes(any_none, h.clone()));
        // x- arguments are ignored unless -with-x.
        let mut x_ignored = table(&[("x-k", "other".into())]);
        x_ignored.insert("x-match", "all");
        assert!(routes(x_ignored, h.clone()));
        let mut with_x = table(&[("x-k", "other".into())]);
        with_x.insert("x-match", "all-with-x");
        assert!(!routes(with_x, h.clone()));
        let mut any_with_x = table(&[("x-k", "v".into())]);
        any_with_x.insert("x-match", "any-with-x");
        assert!(routes(any_with_x, h.clone()));
        // Void matches on presence; numbers compare by value.
        assert!(routes(table(&[("format", FieldValue::Void)]), h.clone()));
        let n = table(&[("n", FieldValue::I64(5))]);
        assert!(routes(n, table(&[("n", FieldValue::U8(5))])));
        // Empty spec: all matches everything, any matches nothing.
        assert!(routes(FieldTable::new(), h.clone()));
        assert!(!routes(table(&[("x-match", "any".into())]), h));
    }

    #[test]
    fn bad_x_match_is_refused() {
        let empty = FieldTable::new();
        let mut r = Headers::new(&Exchange {
            name: "h",
            arguments: &empty,
        })
        .unwrap();
        let args = table(&[("x-match", "some".into())]);
        let err = r
            .bind(&Binding {
                id: BindingId(1),
                key: "",
                target: Target::Queue("q"),
                arguments: &args,
            })
            .unwrap_err();
        assert!(err.message().contains("x-match"));
    }
}
