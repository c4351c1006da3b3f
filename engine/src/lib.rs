//! # wasmq
//!
//! An AMQP 0-9-1 message broker whose routing, filtering and transformation
//! decisions are made by sandboxed WebAssembly plugins. Every exchange type,
//! the built-in `direct`, `topic`, `fanout` and `headers` included, is a Wasm
//! module built with the guest SDK (`wasmq-sdk`), and a new version dropped
//! into the plugin folder replaces the old one on the running broker.
//!
//! # Layout
//!
//! The modules follow a published message:
//!
//! * [`amqp`]: the AMQP 0-9-1 front end: frames, connections, channels.
//!   A published message enters here, a delivery leaves here.
//! * [`config`]: the TOML file and its defaults.
//! * [`message`]: the message as the broker holds it (`Arc`-shared,
//!   `Bytes` body, properties encoded at most once).
//! * [`broker`]: virtual hosts, exchanges, bindings, queues, and the publish
//!   path: an exchange's transform runs first, then its router picks
//!   bindings, each binding's filter may drop the message, and the message is
//!   delivered to every queue reached (exchange-to-exchange bindings recurse,
//!   alternate exchanges catch the unroutable, plugin faults are
//!   dead-lettered or reported). No protocol code lives here.
//! * [`plugin`]: the plugin host, the only module that knows wasmtime:
//!   compiling and validating plugin files, instance pools per exchange with
//!   deadlines and memory caps, fault containment and circuit breakers, the
//!   registry of serving versions and the folder watcher that hot-swaps them.
//! * [`store`]: the message store: durable definitions (a snapshot and a
//!   log of changes), one append-only log per durable queue, and the group commit that publisher confirms
//!   of persistent messages wait for. Messages of a queue's backlog are
//!   kept on disk and read back when delivered.
//! * [`cluster`]: consensus and transport for several nodes: the
//!   definitions and plugin versions replicated through Raft (openraft),
//!   the log on disk, authenticated (optionally TLS) node links, and each
//!   quorum queue's Raft group.
//! * [`nodes`]: several nodes as one broker, the broker's side of the
//!   cluster: the definitions log applied to this node, messages to and
//!   from queues on other nodes, quorum queues' live queues, plugin
//!   versions and rollouts agreed by every node.
//! * [`admin`]: the HTTP admin API and Prometheus metrics, read off the
//!   broker's own objects and counters.
//! * [`tls`]: certificates for AMQPS, the admin API's HTTPS and node links, reloaded
//!   when they change on disk, and the client-certificate (`EXTERNAL`)
//!   login.
//! * [`access`]: users, vhosts, their per-vhost configure/write/read
//!   permissions, limits and policies as changed at run time, the login
//!   rules and stored passwords, shared by AMQP, the admin API and the
//!   config.
//! * [`policy`]: RabbitMQ's policies and operator policies: which applies
//!   to a queue or exchange, and what it makes of the declare arguments.
//! * [`dedup`]: the message ids a deduplicating queue or exchange took
//!   within its window.
//! * [`alarm`]: the disk and memory alarms that block publishers while a
//!   resource runs low.
//! * [`json`]: AMQP field tables as JSON, as the admin API and definitions
//!   files show and take them.
//! * [`latency`]: the lock-free latency histogram of plugin calls and store
//!   syncs, read by the admin API and `/metrics`.
//! * [`untrusted`]: a peer's strings made safe for a log line, and
//!   refusals logged once per source and window.
//! * [`server`]: wires it together from a [`Config`] and stops it cleanly.
//! * [`builtins`]: the built-in plugins, compiled from `plugins/` by the
//!   build script and embedded.
//! * [`author`]: the plugin author's tools: behind `wasmq plugin new`,
//!   `build` and `test` (they make and check plugin crates on an author's
//!   machine), and, beside the publish path, captures, traces and
//!   candidate versions tried as shadows or canaries.
//!
//! The plugin ABI is specified in `wasmq_sdk::abi` and `docs/plugin-abi.md`.

pub mod access;
pub mod admin;
pub mod alarm;
pub mod amqp;
pub mod author;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod dedup;
pub mod json;
pub mod latency;
pub mod message;
pub mod nodes;
pub mod plugin;
pub mod policy;
pub mod resp;
pub mod server;
pub mod store;
pub mod tls;
pub mod untrusted;

/// The built-in plugins, built from `plugins/` by `build.rs`.
pub mod builtins {
    include!(concat!(env!("OUT_DIR"), "/builtins.rs"));
}

/// The allocator the broker is built and measured with. The `wasmq` binary
/// and the integration tests install it:
///
/// ```ignore
/// #[global_allocator]
/// static ALLOCATOR: wasmq::Allocator = wasmq::Allocator;
/// ```
///
/// A message's buffers are allocated on its publisher's thread and freed
/// on its consumer's. glibc's malloc takes the allocating arena's lock for
/// such a free, so publisher and consumer contended on every message;
/// mimalloc hands a foreign free to its owner without a lock (1 KiB
/// messages: ~3.6 to ~2.7 µs of broker CPU each, `docs/performance.md`).
pub use mimalloc::MiMalloc as Allocator;

pub use broker::{Broker, BrokerError, Destination, ExchangeSpec, PublishOutcome};
pub use config::Config;
pub use message::Message;
