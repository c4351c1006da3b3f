//! The clocks a queue reads.
//!
//! Deadlines (message TTL, `x-expires`) are [`Instant`]s of tokio's clock.
//! In the broker it is the monotonic clock (`std::time::Instant` underneath);
//! in tests built with tokio's `test-util` it can be paused and advanced
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`), so a TTL
//! test moves time exactly instead of sleeping past it.
//!
//! A message's publish time is wall-clock milliseconds ([`now_ms`]) because
//! it outlives the process: it is stored with a persistent message and
//! replicated with a quorum queue's, and a restarted or new leader counts
//! the message's remaining TTL from it.

pub use tokio::time::Instant;

pub use crate::message::now_ms;
