//! # Example: retries with exponential back-off
//!
//! Shows a transform that decides a delay. On a delayed exchange
//! (`x-delayed-message`) declared with `x-wasmq-transform: backoff`, each
//! message is held for `base * 2^attempts` milliseconds, capped, before the
//! exchange routes it; `attempts` is how often it failed before:
//!
//! * its `x-delivery-count` header (a quorum queue, or a classic queue with
//!   `x-delivery-limit`, counts returns there), else
//! * the `count` of its newest `x-death` entry (a consumer rejected it
//!   and its queue dead-lettered it here), else 0.
//!
//! Arguments: `x-backoff-base-ms` (default 1000) and `x-backoff-max-ms`
//! (default 600000, ten minutes). A message that carries a positive
//! `x-delay` keeps it: its publisher decided. One delayed before carries a
//! negative one (a delayed exchange negates it when the message is due, as
//! RabbitMQ's plugin does) and gets a new back-off.
//!
//! The retry loop it makes: the work queue has `x-dead-letter-exchange:
//! retry`; `retry` is `x-delayed-message` with `x-delayed-type: direct`
//! and this transform, and binds the work queue back. A consumer rejects a
//! message it cannot handle yet; it comes back after 1 s, 2 s, 4 s, ...
//! (add `x-delivery-limit` or count `x-death` to stop for good).
//!
//! Build and load (the README's run command does this for you):
//!
//! ```text
//! cargo build --profile plugin --target wasm32-unknown-unknown -p wasmq-example-backoff
//! cp target/wasm32-unknown-unknown/plugin/wasmq_example_backoff.wasm examples/plugins/backoff.wasm.tmp
//! mv examples/plugins/backoff.wasm.tmp examples/plugins/backoff.wasm
//! ```

use wasmq_sdk::{DELAY_HEADER, Error, Exchange, FieldValue, Message, Outcome, Transform};

/// The transform.
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
}

fn argument(exchange: &Exchange<'_>, key: &str, default: u64) -> Result<u64, Error> {
    match exchange.arguments.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| Error::new(format!("{key} must be a non-negative integer"))),
    }
}

/// How often `m` failed before.
fn attempts(m: &Message<'_>) -> u32 {
    let headers = m.headers();
    if let Some(n) = headers.get("x-delivery-count").and_then(FieldValue::as_i64) {
        return u32::try_from(n).unwrap_or(0);
    }
    let newest = match headers.get("x-death") {
        Some(FieldValue::Array(deaths)) => deaths.first().and_then(FieldValue::as_table),
        _ => None,
    };
    newest
        .and_then(|d| d.get("count"))
        .and_then(FieldValue::as_i64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(0))
}

impl Backoff {
    /// The delay before attempt `n + 1`.
    pub fn delay_after(&self, n: u32) -> u64 {
        let factor = 1u64.checked_shl(n.min(63)).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.max_ms)
    }
}

impl Transform for Backoff {
    fn new(exchange: &Exchange<'_>) -> Result<Self, Error> {
        let base_ms = argument(exchange, "x-backoff-base-ms", 1000)?;
        let max_ms = argument(exchange, "x-backoff-max-ms", 600_000)?;
        if max_ms > u64::from(u32::MAX) {
            return Err(Error::new(
                "x-backoff-max-ms is past the broker's longest delay (2^32 - 1 ms)",
            ));
        }
        Ok(Backoff { base_ms, max_ms })
    }

    fn transform(&mut self, m: &Message<'_>) -> Outcome {
        let own = m.headers().get(DELAY_HEADER).and_then(FieldValue::as_i64);
        if own.is_some_and(|d| d > 0) {
            return Outcome::Keep;
        }
        Outcome::delay(m, self.delay_after(attempts(m)))
    }
}

wasmq_sdk::plugin!(transform = Backoff);

// Checked by the broker on the compiled plugin when it loads it.
wasmq_sdk::self_test!(
    r#"{"transform": [{
  "exchange_arguments": {"x-backoff-base-ms": 100},
  "messages": [
    {"routing_key": "work", "expect": {"outcome": "route", "routing_key": "work", "headers": {"x-delay": 100}}},
    {"headers": {"x-delivery-count": 3}, "expect": {"outcome": "route", "headers": {"x-delivery-count": 3, "x-delay": 800}}}
  ]
}]}"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmq_sdk::FieldTable;

    fn backoff(base: i64, max: i64) -> Backoff {
        let mut args = FieldTable::new();
        args.insert("x-backoff-base-ms", base);
        args.insert("x-backoff-max-ms", max);
        Backoff::new(&Exchange {
            name: "retry",
            arguments: &args,
        })
        .unwrap()
    }

    fn delay_of(o: Outcome) -> Option<i64> {
        let Outcome::Rewrite(rw) = o else {
            return None;
        };
        rw.properties?.headers().get(DELAY_HEADER)?.as_i64()
    }

    #[test]
    fn the_delay_doubles_with_each_attempt_up_to_the_cap() {
        let mut b = backoff(100, 1000);
        let mut headers = FieldTable::new();
        assert_eq!(
            delay_of(b.transform(&Message::new("k").with_headers(headers.clone()))),
            Some(100)
        );
        headers.insert("x-delivery-count", 2i64);
        assert_eq!(
            delay_of(b.transform(&Message::new("k").with_headers(headers.clone()))),
            Some(400)
        );
        headers.insert("x-delivery-count", 40i64);
        assert_eq!(
            delay_of(b.transform(&Message::new("k").with_headers(headers))),
            Some(1000)
        );
    }

    #[test]
    fn a_publishers_own_delay_is_kept() {
        let mut b = backoff(100, 1000);
        let mut headers = FieldTable::new();
        headers.insert(DELAY_HEADER, 5i64);
        assert_eq!(
            b.transform(&Message::new("k").with_headers(headers)),
            Outcome::Keep
        );
    }

    #[test]
    fn a_message_delayed_before_gets_a_new_back_off() {
        let mut b = backoff(100, 1000);
        let mut headers = FieldTable::new();
        headers.insert(DELAY_HEADER, -100i64);
        headers.insert("x-delivery-count", 1i64);
        assert_eq!(
            delay_of(b.transform(&Message::new("k").with_headers(headers))),
            Some(200)
        );
    }

    #[test]
    fn a_bad_argument_is_refused() {
        let mut args = FieldTable::new();
        args.insert("x-backoff-base-ms", "soon");
        assert!(
            Backoff::new(&Exchange {
                name: "retry",
                arguments: &args,
            })
            .is_err()
        );
    }
}
