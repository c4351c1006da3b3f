//! # Built-in binding filter `redis-channel`: Redis pub/sub matching
//!
//! The RESP front end binds each Redis subscription to a topic exchange
//! with this filter, so a channel name or pattern means what it means to
//! Redis, not what a topic binding key means to AMQP (where `*` and `#`
//! are words). Binding arguments, one of:
//!
//! * `x-redis-channel`: the message's routing key is exactly this;
//! * `x-redis-pattern`: the routing key matches this Redis glob: `*` any
//!   run of bytes, `?` one byte, `[abc]`, `[a-z]` and `[^...]` classes,
//!   `\x` the byte `x` itself (Redis's `stringmatchlen`).
//!
//! Any AMQP binding may use it too: `x-wasmq-filter: redis-channel` with a
//! `#` binding key on a topic exchange passes what the glob matches.

pub mod glob;

use glob::glob;
use wasmq_sdk::{Error, Filter, Message, Subscription};

/// The filter of one binding.
pub enum RedisChannel {
    /// One channel.
    Channel(String),
    /// A glob.
    Pattern(Vec<u8>),
}

impl Filter for RedisChannel {
    fn new(sub: &Subscription<'_>) -> Result<Self, Error> {
        let args = sub.arguments;
        match (args.get("x-redis-channel"), args.get("x-redis-pattern")) {
            (Some(c), None) => Ok(RedisChannel::Channel(
                c.as_str()
                    .ok_or("x-redis-channel must be a string")?
                    .to_owned(),
            )),
            (None, Some(p)) => Ok(RedisChannel::Pattern(
                p.as_str()
                    .ok_or("x-redis-pattern must be a string")?
                    .as_bytes()
                    .to_vec(),
            )),
            _ => Err("redis-channel needs one of x-redis-channel or x-redis-pattern".into()),
        }
    }

    fn filter(&mut self, m: &Message<'_>) -> bool {
        match self {
            RedisChannel::Channel(c) => m.routing_key() == c,
            RedisChannel::Pattern(p) => glob(p, m.routing_key().as_bytes()),
        }
    }
}

wasmq_sdk::plugin!(filter = RedisChannel);

// Checked by the broker on the compiled plugin when it loads it.
wasmq_sdk::self_test!(
    r#"{"filter": [
  {
    "arguments": {"x-redis-pattern": "news.*"},
    "messages": [
      {"routing_key": "news.sport.today", "expect": "pass"},
      {"routing_key": "weather", "expect": "drop"}
    ]
  },
  {
    "arguments": {"x-redis-channel": "a.*"},
    "messages": [
      {"routing_key": "a.*", "expect": "pass"},
      {"routing_key": "a.b", "expect": "drop"}
    ]
  }
]}"#
);
