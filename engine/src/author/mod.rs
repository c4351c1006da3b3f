//! The plugin author's tools behind `wasmq plugin new|build|test`: make a
//! plugin crate, build it for the broker, and run a version offline
//! against captured traffic.
//!
//! These run on an author's machine, not in the broker: they shell out to
//! cargo and rustup and write files. They share the broker's own loader
//! and publish path (through [`crate::plugin::PluginHost`] and an
//! in-process [`crate::broker::Broker`]), so what they report is what the
//! broker will decide.

pub mod build;
pub mod scaffold;
pub mod test;
