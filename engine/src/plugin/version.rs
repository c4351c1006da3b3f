//! One validated, compiled plugin file, as exchanges use it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::RwLock;
use wasmtime::Module;

use wasmq_sdk::abi;

/// One validated, compiled version of a plugin. Immutable; exchanges hold it
/// through their instances, so an old version lives until its last in-flight
/// call returns.
pub struct PluginVersion {
    /// The plugin name (the file stem).
    pub name: String,
    /// SHA-256 of the file, hex.
    pub hash: String,
    /// What it can be used as.
    pub roles: Roles,
    /// The ABI version it speaks.
    pub abi_version: u32,
    /// File size in bytes.
    pub size: usize,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Whether it is one of the broker's embedded built-ins.
    pub builtin: bool,
    /// The module's exports, for `wasmq plugin check` and the admin API.
    pub exports: Vec<String>,
    /// Messages its self-test vectors checked when it was loaded (0: it
    /// ships none).
    pub self_tests: usize,
    /// Faults across all its instances.
    pub faults: AtomicU64,
    /// Calls for messages (route, filter, transform) across all instances.
    pub calls: AtomicU64,
    /// Time of one call in eight (sampled: two clock reads cost ~10% of a
    /// small routing call).
    pub latency: crate::latency::Latency,
    /// The compiled code: baseline first when tiered, optimized later.
    pub(super) module: RwLock<Module>,
    pub(super) optimized: AtomicBool,
    /// A circuit over every use of this version together. Each exchange
    /// has its own circuit, but 50 exchanges whose routes loop each spend
    /// their threshold of deadlines per cooldown: faults in a row across
    /// all uses open this one, and every use refuses calls for a cooldown.
    pub(crate) circuit: super::circuit::Circuit,
}

impl std::fmt::Debug for PluginVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginVersion")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl PluginVersion {
    /// The code new instances get.
    pub(crate) fn module(&self) -> Module {
        self.module.read().clone()
    }

    /// Whether it runs Cranelift's optimized code (false while it runs the
    /// baseline compiler's, until [`super::PluginHost::optimize`] is done).
    pub fn optimized(&self) -> bool {
        self.optimized.load(Ordering::Acquire)
    }

    /// "optimized" or "baseline", for listings and log lines.
    pub fn code_tier(&self) -> &'static str {
        if self.optimized() {
            "optimized"
        } else {
            "baseline"
        }
    }

    /// The first 12 hex digits of the hash, for log lines.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

/// What a plugin can be used as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Roles {
    /// An exchange type.
    pub router: bool,
    /// A per-binding filter.
    pub filter: bool,
    /// A per-exchange transform.
    pub transform: bool,
    /// The router's decisions depend only on the routing key and bindings.
    pub deterministic: bool,
}

impl Roles {
    pub(super) fn from_bits(bits: i32) -> Self {
        Roles {
            router: bits & abi::ROLE_ROUTER != 0,
            filter: bits & abi::ROLE_FILTER != 0,
            transform: bits & abi::ROLE_TRANSFORM != 0,
            deterministic: bits & abi::FLAG_DETERMINISTIC != 0,
        }
    }

    pub(super) fn any(&self) -> bool {
        self.router || self.filter || self.transform
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.router {
            parts.push(if self.deterministic {
                "router (deterministic)"
            } else {
                "router"
            });
        }
        if self.filter {
            parts.push("filter");
        }
        if self.transform {
            parts.push("transform");
        }
        if parts.is_empty() {
            parts.push("none");
        }
        f.write_str(&parts.join(", "))
    }
}
