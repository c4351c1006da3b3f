//! Which version of each plugin is serving, and what happened to the files
//! that were not accepted. The broker asks it for a version by name when an
//! exchange is declared; the hot-swap path records its results here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;

use super::host::PluginVersion;

/// What state a plugin name is in.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    /// A version is serving and its file is present (or it is a built-in).
    Serving,
    /// The latest file was rejected; `serving` (if any) is the last good one.
    Rejected,
    /// The file was deleted; the last good version keeps serving.
    Orphaned,
}

/// A snapshot of one plugin for listings (CLI, admin API).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginStatus {
    /// Plugin name.
    pub name: String,
    /// State.
    pub state: PluginState,
    /// Roles of the serving version.
    pub roles: Option<String>,
    /// Content hash of the serving version.
    pub hash: Option<String>,
    /// ABI version of the serving version.
    pub abi_version: Option<u32>,
    /// Whether the serving version is a built-in.
    pub builtin: bool,
    /// `"baseline"` while the serving version runs the baseline compiler's
    /// code, `"optimized"` once it runs Cranelift's.
    pub code: Option<&'static str>,
    /// When the serving version was loaded (seconds since the epoch).
    pub loaded_at: Option<u64>,
    /// Faults of the serving version.
    pub faults: u64,
    /// Message calls (route, filter, transform) of the serving version.
    pub calls: u64,
    /// Call time percentiles of the serving version, µs (bucket upper
    /// bounds; sampled calls).
    pub latency_us: Option<Percentiles>,
    /// Times a new version replaced a serving one.
    pub swaps: u64,
    /// Why the latest file was rejected, if it was.
    pub rejection: Option<String>,
    /// Whether repeated faults across every exchange it serves have
    /// opened the serving version's own circuit (its calls are skipped,
    /// each message given the role's defined outcome, until it cools).
    pub circuit_open: bool,
}

/// Latency percentiles, µs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<u64>,
    /// 90th.
    pub p90: Option<u64>,
    /// 99th.
    pub p99: Option<u64>,
}

#[derive(Default)]
struct Entry {
    swaps: u64,
    serving: Option<Arc<PluginVersion>>,
    state: Option<PluginState>,
    rejection: Option<String>,
}

/// Plugin name → serving version and state.
#[derive(Default)]
pub struct PluginRegistry {
    entries: RwLock<BTreeMap<String, Entry>>,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("plugins", &self.entries.read().len())
            .finish()
    }
}

impl PluginRegistry {
    /// The serving version of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<PluginVersion>> {
        self.entries
            .read()
            .get(name)
            .and_then(|e| e.serving.clone())
    }

    /// Record `version` as serving. The version already serving, again
    /// (its instances rebuilt on optimized code), changes nothing: not a
    /// swap, and a rejection or deletion recorded since stays recorded.
    pub(crate) fn serve(&self, version: Arc<PluginVersion>) {
        let mut entries = self.entries.write();
        let e = entries.entry(version.name.clone()).or_default();
        if let Some(serving) = &e.serving {
            if Arc::ptr_eq(serving, &version) {
                return;
            }
            e.swaps += 1;
        }
        e.serving = Some(version);
        e.state = Some(PluginState::Serving);
        e.rejection = None;
    }

    /// Record that the latest file of `name` was rejected.
    pub(crate) fn reject(&self, name: &str, reason: String) {
        let mut entries = self.entries.write();
        let e = entries.entry(name.to_owned()).or_default();
        e.state = Some(PluginState::Rejected);
        e.rejection = Some(reason);
    }

    /// Record that the file of `name` is gone. Returns the version that
    /// keeps serving, if any.
    pub(crate) fn orphan(&self, name: &str) -> Option<Arc<PluginVersion>> {
        let mut entries = self.entries.write();
        let e = entries.get_mut(name)?;
        if e.serving.as_ref().is_some_and(|v| !v.builtin) {
            e.state = Some(PluginState::Orphaned);
        }
        e.serving.clone()
    }

    /// All plugins, by name.
    pub fn list(&self) -> Vec<PluginStatus> {
        self.entries
            .read()
            .iter()
            .map(|(name, e)| {
                let v = e.serving.as_ref();
                PluginStatus {
                    name: name.clone(),
                    state: e.state.clone().unwrap_or(PluginState::Rejected),
                    roles: v.map(|v| v.roles.to_string()),
                    hash: v.map(|v| v.hash.clone()),
                    abi_version: v.map(|v| v.abi_version),
                    builtin: v.is_some_and(|v| v.builtin),
                    code: v.map(|v| v.code_tier()),
                    loaded_at: v
                        .and_then(|v| v.loaded_at.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    faults: v.map_or(0, |v| v.faults.load(std::sync::atomic::Ordering::Relaxed)),
                    calls: v.map_or(0, |v| v.calls.load(std::sync::atomic::Ordering::Relaxed)),
                    latency_us: v
                        .map(|v| v.latency.snapshot())
                        .filter(|s| s.count() > 0)
                        .map(|s| Percentiles {
                            p50: s.quantile_us(0.5),
                            p90: s.quantile_us(0.9),
                            p99: s.quantile_us(0.99),
                        }),
                    swaps: e.swaps,
                    rejection: e.rejection.clone(),
                    circuit_open: v.is_some_and(|v| v.circuit.is_open()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{Compiler, PluginHost};

    #[test]
    fn serving_the_same_version_again_keeps_its_state() {
        let host = PluginHost::new(Default::default(), None, Compiler::Optimizing).unwrap();
        let (_, bytes) = crate::builtins::BUILTINS[0];
        let v1 = host.load("p", bytes, false).unwrap();
        let v2 = host.load("p", bytes, false).unwrap();
        let r = PluginRegistry::default();
        let state = |r: &PluginRegistry| {
            let s = r.list().into_iter().next().unwrap();
            (s.state, s.swaps, s.rejection)
        };
        r.serve(v1.clone());
        r.reject("p", "bad file".into());
        r.serve(v1.clone()); // v1 again, optimized: not a swap, still rejected
        assert_eq!(
            state(&r),
            (PluginState::Rejected, 0, Some("bad file".into()))
        );
        r.serve(v2); // a new version
        assert_eq!(state(&r), (PluginState::Serving, 1, None));
    }
}
