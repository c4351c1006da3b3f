//! The plugin host: runs Wasm plugins for the broker, sandboxed and bounded.
//!
//! This is the only module that names a wasmtime type. The broker sees three
//! role handles ([`RouterPlugin`], [`FilterPlugin`], [`TransformPlugin`]),
//! each a small pool of instances of one [`PluginVersion`], and the
//! [`PluginRegistry`] that knows which version of each plugin is serving.
//!
//! Files, in dependency order: `version` (a compiled plugin file and its
//! roles), `clock` (the epoch clock deadlines run on), `instance` (one
//! sandboxed instance: store, limiter, calls; it is handed what it needs,
//! and does not know the host), `host` (the engines, compiling, validating,
//! the compile cache), `roles` (the role handles and their instance pools),
//! `registry`, `watcher`, `self_test`, `shape`, `circuit`, `log`.
//!
//! # Why it is built this way
//!
//! * **Core-module ABI** (see `wasmq_sdk::abi` and `docs/plugin-abi.md`):
//!   integer and pointer/length calls, ~10 ns each, instead of the component
//!   model's ~300 ns for a string in and a list out. Routing happens on every
//!   message, so the ABI is chosen for speed.
//! * **Compile once, a `Store` per instance.** A version is compiled (or
//!   loaded from the on-disk cache, keyed by content hash) once; each
//!   exchange gets its own instances, so a plugin's state (its binding
//!   index) belongs to one exchange and a fault fails only that exchange.
//! * **Two tiers of code.** A hot swap waits for the compiler, so a new
//!   version first runs Winch's baseline code (~5× faster to compile) and
//!   then Cranelift's, compiled in the background ([`Compiler`], `host.rs`).
//! * **A few instances per exchange, not one behind a lock.** Publishers on
//!   different cores take different instances (`try_lock` in order), so
//!   routing scales with cores without a global lock. Bindings are applied
//!   to every live instance before bind-ok; an instance built later replays
//!   the binding table.
//! * **Always bounded.** Every call has an epoch deadline (a 1 ms ticker
//!   thread advances the epoch) and every instance a memory cap enforced by a
//!   resource limiter. Epochs cost less than fuel here and bound wall time,
//!   which is what a publisher waiting on a confirm feels.
//! * **Faults are contained.** A trap, deadline, memory-cap hit or malformed
//!   reply discards that instance (rebuilt on next use, bindings replayed)
//!   and is returned as a [`PluginFault`] so the broker can give the message a
//!   defined outcome. Repeated faults open a circuit for that exchange.
//! * **No WASI.** The linker offers only `wasmq::read` and `wasmq::log`; a
//!   module importing anything else is refused at load.

mod circuit;
mod clock;
mod decision;
mod function_cache;
mod host;
mod instance;
pub mod log;
mod registry;
mod roles;
mod self_test;
pub mod shape;
mod version;
mod watcher;

use std::time::Duration;

pub use decision::TransformDecision;
pub use function_cache::FunctionCacheStats;
pub use host::{
    HostError, MAX_PLUGIN_NAME, PluginHost, PluginVersion, Roles, binding_input, content_hash,
    plugin_name, valid_plugin_name,
};
pub use registry::{PluginRegistry, PluginState, PluginStatus};
pub use roles::{BindingSource, BindingVisitor, FilterPlugin, RouterPlugin, TransformPlugin};
pub use watcher::PluginWatcher;

/// Bounds applied to every plugin instance and call.
#[derive(Clone, Debug)]
pub struct PluginLimits {
    /// Wall-clock deadline of one call into a plugin for a message (route,
    /// filter, transform).
    pub deadline: Duration,
    /// Deadline of the calls that set an instance up (instantiation, init,
    /// bind, unbind): off the message path, so it can be generous, and a
    /// loaded machine must not fail a start or a swap on a 5 ms budget.
    pub setup_deadline: Duration,
    /// Linear-memory cap of one instance, in bytes.
    pub memory: usize,
    /// Instances per exchange (or filter binding), at most; built on demand
    /// when publishers contend.
    pub instances: usize,
    /// Consecutive faults that open an exchange's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit refuses calls before trying again.
    pub circuit_cooldown: Duration,
    /// What a module may contain, checked before it is compiled.
    pub module: shape::ModuleLimits,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            deadline: Duration::from_millis(5),
            setup_deadline: Duration::from_secs(1),
            memory: 16 << 20,
            instances: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            circuit_threshold: 5,
            circuit_cooldown: Duration::from_secs(1),
            module: shape::ModuleLimits::default(),
        }
    }
}

/// How plugin code is compiled (`[plugins] compiler` in the config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compiler {
    /// Winch's baseline code first, so a new version serves sooner (~5×
    /// faster to compile); Cranelift's optimized code replaces it in the
    /// background. See `host.rs`.
    #[default]
    Tiered,
    /// Cranelift only: a new version serves once its optimized code is ready.
    Optimizing,
}

/// Why a call into a plugin did not produce a decision. The broker turns it
/// into an outcome for the message (dead-letter, nack or return).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PluginFault {
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    #[error("trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline and was interrupted.
    #[error("ran past its {0:?} deadline")]
    Deadline(Duration),
    /// The instance tried to grow its memory past the cap.
    #[error("exceeded its memory limit of {} MiB", .0 >> 20)]
    MemoryLimit(usize),
    /// The reply broke the ABI (bad pointer, unknown binding, bad encoding).
    #[error("returned a malformed reply: {0}")]
    Malformed(String),
    /// The plugin answered with an error status.
    #[error("reported an error: {0}")]
    Reported(String),
    /// Too many faults in a row; calls are refused until the cooldown ends.
    #[error("is disabled after repeated faults (circuit open for another {0:?})")]
    CircuitOpen(Duration),
}

impl PluginFault {
    /// A short stable name, for metrics labels and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginFault::Trap(_) => "trap",
            PluginFault::Deadline(_) => "deadline",
            PluginFault::MemoryLimit(_) => "memory",
            PluginFault::Malformed(_) => "malformed",
            PluginFault::Reported(_) => "reported",
            PluginFault::CircuitOpen(_) => "circuit_open",
        }
    }
}

/// Why a plugin file was not accepted. The previous version, if any, keeps
/// serving.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a Wasm module, or one wasmtime cannot compile.
    #[error("plugin '{name}' is not a valid Wasm module: {reason}")]
    Compile {
        /// Plugin name.
        name: String,
        /// Compiler's reason.
        reason: String,
    },
    /// Built against another ABI version.
    #[error(
        "plugin '{name}' speaks plugin ABI version {found}, but this broker speaks version {expected}; rebuild it against wasmq-sdk {expected}"
    )]
    AbiVersion {
        /// Plugin name.
        name: String,
        /// The plugin's version.
        found: i64,
        /// Ours.
        expected: u32,
    },
    /// Imports something the sandbox does not offer.
    #[error(
        "plugin '{name}' imports `{module}::{field}`, which the sandbox does not offer (plugins get no WASI: no filesystem, network or clock; only wasmq::read and wasmq::log)"
    )]
    ForbiddenImport {
        /// Plugin name.
        name: String,
        /// Import module.
        module: String,
        /// Import name.
        field: String,
    },
    /// An export the ABI requires is missing or has the wrong type.
    #[error("plugin '{name}' has no usable export `{export}`: {reason}")]
    Export {
        /// Plugin name.
        name: String,
        /// Export name.
        export: String,
        /// What is wrong.
        reason: String,
    },
    /// Holds more than a plugin may (functions, code, memories, ...);
    /// refused before it is compiled.
    #[error("plugin '{name}' is refused before compiling: {reason}")]
    TooBig {
        /// Plugin name.
        name: String,
        /// Which bound, and by how much.
        reason: shape::TooBig,
    },
    /// The module declares no role.
    #[error("plugin '{name}' declares no role (wasmq_roles returned {roles:#x})")]
    NoRoles {
        /// Plugin name.
        name: String,
        /// What it returned.
        roles: i32,
    },
    /// Instantiating or initialising it faulted.
    #[error("plugin '{name}' failed validation during {stage}: {fault}")]
    Fault {
        /// Plugin name.
        name: String,
        /// What was being done.
        stage: &'static str,
        /// The fault.
        fault: PluginFault,
    },
    /// It decided differently from the self-test vectors it ships.
    #[error("plugin '{name}' failed its self-test: {reason}")]
    SelfTest {
        /// Plugin name.
        name: String,
        /// The case, the message and what went wrong.
        reason: String,
    },
    /// The file could not be read.
    #[error("plugin file {path} cannot be read: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// An operation on a plugin-backed exchange or binding failed; the message
/// is meant for the AMQP client (reply text of a channel close).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The plugin refused the exchange or binding (its own message).
    #[error("plugin '{plugin}' refused: {message}")]
    Refused {
        /// Plugin name.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin faulted while setting up.
    #[error("plugin '{plugin}' {fault}")]
    Fault {
        /// Plugin name.
        plugin: String,
        /// The fault.
        fault: PluginFault,
    },
    /// The plugin lacks the role it is used in.
    #[error("plugin '{plugin}' is not a {role} (it is: {has})")]
    WrongRole {
        /// Plugin name.
        plugin: String,
        /// The role needed.
        role: &'static str,
        /// The roles it has.
        has: String,
    },
}
