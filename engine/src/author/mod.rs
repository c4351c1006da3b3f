//! The plugin author's tools, kept together so that `broker/` shows only
//! a message's way.
//!
//! Offline, behind `wasmq plugin new|build|test` (`scaffold`, `build`,
//! `test`): make a plugin crate, build it for the broker, and run a version
//! against captured traffic. These run on an author's machine, not in the
//! broker: they shell out to cargo and rustup and write files. They share
//! the broker's own loader and publish path (through
//! [`crate::plugin::PluginHost`] and an in-process
//! [`crate::broker::Broker`]), so what they report is what the broker will
//! decide.
//!
//! In the running broker, beside the publish path: `capture` keeps
//! messages published to an exchange to test a version against,
//! `candidate` tries a new version on live traffic (a shadow compared with
//! the serving one, or a canary deciding for a share of keys) before it
//! serves everything, and `trace` records one message's way through
//! transform, router, filters and queues. The publish path calls into
//! them only where an exchange is staged, captured or a message traced.

pub mod build;
pub mod candidate;
pub mod capture;
pub mod scaffold;
pub mod test;
pub mod trace;
