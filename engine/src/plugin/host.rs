//! The wasmtime engines and what they compile: [`PluginHost`] owns the
//! engines, the linkers with the host imports and the epoch ticker;
//! [`PluginVersion`] is one validated, compiled plugin file.
//!
//! # Two tiers of code
//!
//! A hot swap waits for the compiler, and Cranelift takes ~50 ms for a
//! 57 KB plugin on two cores. With [`Compiler::Tiered`] (the default) a new
//! version is first compiled by Winch, wasmtime's baseline compiler (~11 ms
//! for the same file: one pass, no optimization), validated and swapped in
//! on that code; Cranelift then compiles it in the background
//! ([`PluginHost::optimize`]) and the broker rebuilds the version's
//! instances on the optimized code (bindings replayed, as in any swap). It
//! is the same module either way, so decisions do not change, only their
//! speed. A version whose optimized code is in the on-disk cache skips the
//! baseline tier.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmq_sdk::abi;
use wasmtime::{Config, Engine, ExternType, Linker, Module};

use parking_lot::RwLock;

use super::clock::{EpochClock, TICK};
use super::function_cache::{FunctionCache, FunctionCacheStats};
use super::instance::{CallError, HostState, Instance, InstanceEnv, define_imports};
pub use super::version::{PluginVersion, Roles};
use super::{Compiler, LoadError, PluginFault, PluginLimits};

/// Bytes of compiled functions kept for reuse. The four built-ins and the
/// 123 KB consistent-hash example (~600 functions together) take 1 MB, so
/// this holds the code of dozens of versions.
const FUNCTION_CACHE_BYTES: usize = 32 << 20;

/// Owns the wasmtime engines. One per broker; cheap to share behind an `Arc`.
pub struct PluginHost {
    /// Cranelift: the optimized code every version ends up running.
    engine: Engine,
    linker: Linker<HostState>,
    /// Winch, for a version's first code ([`Compiler::Tiered`]).
    baseline: Option<(Engine, Linker<HostState>)>,
    limits: PluginLimits,
    cache_dir: Option<PathBuf>,
    clock: Arc<EpochClock>,
    /// Compiled functions, reused by later compiles.
    functions: Arc<FunctionCache>,
    /// Each plugin's log budget, across its instances and versions.
    logs: super::log::PluginLogs,
    /// Bounds how many set-up calls run at once (see [`PluginHost::setup`]).
    setup_slots: Slots,
}

/// A counting semaphore for threads (set-up calls block their thread).
struct Slots {
    free: parking_lot::Mutex<usize>,
    freed: parking_lot::Condvar,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: parking_lot::Mutex::new(n.max(1)),
            freed: parking_lot::Condvar::new(),
        }
    }

    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        {
            let mut free = self.free.lock();
            while *free == 0 {
                self.freed.wait(&mut free);
            }
            *free -= 1;
        }
        struct Release<'a>(&'a Slots);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                *self.0.free.lock() += 1;
                self.0.freed.notify_one();
            }
        }
        let _release = Release(self);
        f()
    }
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Why the plugin host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// wasmtime refused the engine configuration or the host's imports.
    #[error("wasmtime {what}: {reason}")]
    Engine {
        /// What was being set up.
        what: &'static str,
        /// wasmtime's words.
        reason: String,
    },
    /// The compile cache folder or the epoch thread could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being made.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

impl PluginHost {
    /// Create the engines and start the epoch ticker. `cache_dir`, if
    /// given, keeps optimized code keyed by content hash so restarts skip
    /// the compilers.
    pub fn new(
        limits: PluginLimits,
        cache_dir: Option<PathBuf>,
        compiler: Compiler,
    ) -> Result<Arc<Self>, HostError> {
        let engine_err = |what| {
            move |e: wasmtime::Error| HostError::Engine {
                what,
                reason: format!("{e:#}"),
            }
        };
        let mut config = base_config();
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let functions = Arc::new(FunctionCache::new(FUNCTION_CACHE_BYTES));
        config
            .enable_incremental_compilation(functions.clone())
            .map_err(engine_err("engine"))?;
        let engine = Engine::new(&config).map_err(engine_err("engine"))?;
        let mut linker = Linker::new(&engine);
        define_imports(&mut linker).map_err(engine_err("plugin imports"))?;
        let baseline = match compiler {
            Compiler::Optimizing => None,
            Compiler::Tiered => {
                let mut config = base_config();
                config.strategy(wasmtime::Strategy::Winch);
                match Engine::new(&config) {
                    Ok(engine) => {
                        let mut linker = Linker::new(&engine);
                        define_imports(&mut linker).map_err(engine_err("plugin imports"))?;
                        Some((engine, linker))
                    }
                    Err(e) => {
                        tracing::info!(
                            "no baseline compiler on this platform ({e}); plugins serve once Cranelift has compiled them"
                        );
                        None
                    }
                }
            }
        };
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|source| HostError::Io {
                what: format!("creating the compile cache {}", dir.display()),
                source,
            })?;
        }
        let clock = Arc::new(EpochClock::default());
        {
            let mut engines = vec![engine.clone()];
            engines.extend(baseline.as_ref().map(|(e, _)| e.clone()));
            let clock2 = clock.clone();
            // Park only after the longest deadline has passed for every
            // call that started (plus a margin).
            let idle_after = ticks(limits.setup_deadline.max(limits.deadline)) + 10;
            let handle = std::thread::Builder::new()
                .name("wasmq-epoch".into())
                .spawn(move || clock2.run(&engines, idle_after))
                .map_err(|source| HostError::Io {
                    what: "starting the epoch thread".into(),
                    source,
                })?;
            let _ = clock.ticker.set(handle.thread().clone());
        }
        Ok(Arc::new(PluginHost {
            engine,
            linker,
            baseline,
            limits,
            cache_dir,
            clock,
            functions,
            logs: Default::default(),
            setup_slots: Slots::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
        }))
    }

    /// How many functions compiles have reused from earlier plugin
    /// versions, and how many they compiled.
    pub fn function_cache_stats(&self) -> FunctionCacheStats {
        self.functions.stats()
    }

    /// Forget every compiled function, so the next compile starts cold
    /// (for benchmarks that measure a compile from nothing).
    pub fn clear_function_cache(&self) {
        self.functions.clear();
    }

    /// Whether the deadline clock is asleep: no plugin call has started for
    /// longer than the longest deadline.
    pub fn deadline_clock_idle(&self) -> bool {
        self.clock.idle.load(Ordering::SeqCst)
    }

    /// The deadline clock; a call must tell it it runs.
    /// Run `f`, a call that sets a plugin up (instantiate, init, bind,
    /// unbind: up to the set-up deadline, a second by default), without
    /// stalling the async runtime: on a runtime worker the worker is handed
    /// over to the runtime's other tasks for the duration
    /// (`block_in_place`), so other connections keep their latency while
    /// a plugin loops in `init`. At most as many set-up calls as there are
    /// cores run at once; the rest wait their turn (off the runtime too).
    pub(crate) fn setup<R>(&self, f: impl FnOnce() -> R) -> R {
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker {
            tokio::task::block_in_place(|| self.setup_slots.run(f))
        } else {
            self.setup_slots.run(f)
        }
    }

    /// Plugin `name`'s log budget.
    /// A new instance of `version`, with this host's limits and clock.
    pub(crate) fn instantiate(&self, version: &PluginVersion) -> Result<Instance, PluginFault> {
        let module = version.module();
        Instance::new(
            InstanceEnv {
                linker: self.linker_for(&module),
                module,
                limits: &self.limits,
                clock: &self.clock,
                log: self.plugin_log(&version.name),
                deadline_ticks: self.deadline_ticks(),
                setup_ticks: self.setup_ticks(),
            },
            version,
        )
    }

    /// The log of plugin `name` (its budget, counts, last lines, followers).
    pub fn plugin_log(&self, name: &str) -> Arc<super::log::PluginLog> {
        self.logs.of(name)
    }

    /// Whether plugin `name` has a log yet (asking does not make one).
    pub fn has_plugin_log(&self, name: &str) -> bool {
        self.logs.contains(name)
    }

    /// Log lines dropped per plugin for being over its budget.
    pub fn log_lines_dropped(&self) -> Vec<(String, u64)> {
        self.logs.dropped()
    }

    /// Lines each plugin logged, per level (for `/metrics`).
    pub fn log_lines(&self) -> Vec<(String, [(&'static str, u64); 5])> {
        self.logs.counts()
    }

    /// The linker of the engine that compiled `module`.
    pub(crate) fn linker_for(&self, module: &Module) -> &Linker<HostState> {
        match &self.baseline {
            Some((engine, linker)) if Engine::same(engine, module.engine()) => linker,
            _ => &self.linker,
        }
    }

    /// Whether new versions start on baseline code ([`Compiler::Tiered`]
    /// and a baseline compiler for this platform).
    pub fn tiered(&self) -> bool {
        self.baseline.is_some()
    }

    /// The limits every instance and call gets.
    pub fn limits(&self) -> &PluginLimits {
        &self.limits
    }

    /// Ticks of the epoch clock that make one call's deadline. One extra
    /// tick because the current tick may be about to end.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        ticks(self.limits.deadline)
    }

    /// Ticks of a set-up call's deadline (never shorter than a message call's).
    pub(crate) fn setup_ticks(&self) -> u64 {
        ticks(self.limits.setup_deadline.max(self.limits.deadline))
    }

    /// Read, compile and validate a plugin file.
    pub fn load_file(&self, path: &Path) -> Result<Arc<PluginVersion>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let name = plugin_name(path);
        self.load(&name, &bytes, false)
    }

    /// Compile and validate a plugin. Nothing is swapped in here: the caller
    /// decides what to do with a valid version.
    pub fn load(
        &self,
        name: &str,
        bytes: &[u8],
        builtin: bool,
    ) -> Result<Arc<PluginVersion>, LoadError> {
        super::shape::check(bytes, &self.limits.module).map_err(|reason| LoadError::TooBig {
            name: name.to_owned(),
            reason,
        })?;
        let hash = content_hash(bytes);
        let (module, optimized) = self.compile(name, bytes, &hash)?;
        self.check_imports(name, &module)?;
        let exports = module.exports().map(|e| e.name().to_owned()).collect();
        let mut version = PluginVersion {
            name: name.to_owned(),
            hash,
            roles: Roles::default(),
            abi_version: 0,
            size: bytes.len(),
            loaded_at: SystemTime::now(),
            builtin,
            exports,
            self_tests: 0,
            faults: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            latency: Default::default(),
            module: RwLock::new(module),
            optimized: AtomicBool::new(optimized),
            circuit: super::circuit::Circuit::new(
                self.limits
                    .circuit_threshold
                    .saturating_mul(PLUGIN_CIRCUIT_FACTOR),
                self.limits.circuit_cooldown,
            ),
        };
        let fault = |stage, fault: PluginFault| LoadError::Fault {
            name: name.to_owned(),
            stage,
            fault,
        };
        let export = |export: &str, reason: String| LoadError::Export {
            name: name.to_owned(),
            export: export.into(),
            reason,
        };

        // A probe instance: ABI version first, so a plugin from another ABI
        // gets the version message rather than a confusing export error.
        let mut probe = self.instantiate(&version).map_err(|f| match f {
            PluginFault::Malformed(reason) => export("(required)", reason),
            f => fault("instantiation", f),
        })?;
        let found = probe
            .abi_version()
            .map_err(|f| fault("wasmq_abi_version", f))?;
        if found as i64 != abi::ABI_VERSION as i64 {
            return Err(LoadError::AbiVersion {
                name: name.into(),
                found: found.into(),
                expected: abi::ABI_VERSION,
            });
        }
        version.abi_version = found as u32;
        let bits = probe.roles().map_err(|f| fault("wasmq_roles", f))?;
        version.roles = Roles::from_bits(bits);
        if !version.roles.any() {
            return Err(LoadError::NoRoles {
                name: name.into(),
                roles: bits,
            });
        }
        for (role, on, exports) in [
            (
                abi::ROLE_ROUTER,
                version.roles.router,
                "wasmq_bind, wasmq_unbind and wasmq_route",
            ),
            (abi::ROLE_FILTER, version.roles.filter, "wasmq_filter"),
            (
                abi::ROLE_TRANSFORM,
                version.roles.transform,
                "wasmq_transform",
            ),
        ] {
            if on && !probe.has_export(role) {
                return Err(export(
                    exports,
                    format!("role bit {role} is declared but the export is missing"),
                ));
            }
        }
        drop(probe);
        again_after_deadline(|| self.smoke_test(&version), |(_, f)| Some(f))
            .map_err(|(stage, f)| fault(stage, f))?;
        for section in super::self_test::sections(bytes) {
            let checked = again_after_deadline(
                || super::self_test::run(self, &version, section),
                |e| match e {
                    super::self_test::Failure::Fault(_, f) => Some(f),
                    super::self_test::Failure::Wrong(_) => None,
                },
            )
            .map_err(|f| LoadError::SelfTest {
                name: name.to_owned(),
                reason: f.to_string(),
            })?;
            version.self_tests += checked;
        }
        Ok(Arc::new(version))
    }

    /// Exercise each role once on a fresh instance with empty arguments. A
    /// plugin may refuse empty arguments (that is its right); it may not trap,
    /// hang, bomb memory or answer garbage.
    fn smoke_test(&self, version: &PluginVersion) -> Result<(), (&'static str, PluginFault)> {
        let tolerate = |r: Result<(), CallError>, stage| match r {
            Ok(()) => Ok(true),
            Err(CallError::Refused(_)) => Ok(false),
            Err(CallError::Fault(f)) => Err((stage, f)),
        };
        let probe_msg = Arc::new(crate::message::Message::new(
            "",
            "wasmq.validate",
            Default::default(),
            &b"{}"[..],
        ));
        if version.roles.router {
            let probe_binding = binding_input("wasmq.validate", false, "wasmq.validate", &[]);
            let mut i = self
                .instantiate(version)
                .map_err(|f| ("instantiation", f))?;
            let input = init_input("wasmq.validate", "", &[]);
            if tolerate(i.init(abi::ROLE_ROUTER, &input), "router init")?
                && tolerate(i.bind(0, &probe_binding), "router bind")?
            {
                let mut out = Vec::new();
                tolerate(i.route(&probe_msg, &mut out), "route")?;
                if let Some(bad) = out.iter().find(|id| **id != 0) {
                    return Err((
                        "route",
                        PluginFault::Malformed(format!(
                            "routed to binding {bad}, which was never bound"
                        )),
                    ));
                }
                tolerate(i.unbind(0, &probe_binding), "router unbind")?;
            }
        }
        if version.roles.filter {
            let mut i = self
                .instantiate(version)
                .map_err(|f| ("instantiation", f))?;
            if tolerate(
                i.init(abi::ROLE_FILTER, &init_input("wasmq.validate", "", &[])),
                "filter init",
            )? {
                i.filter(&probe_msg).map_err(|f| ("filter", f))?;
            }
        }
        if version.roles.transform {
            let mut i = self
                .instantiate(version)
                .map_err(|f| ("instantiation", f))?;
            if tolerate(
                i.init(abi::ROLE_TRANSFORM, &init_input("wasmq.validate", "", &[])),
                "transform init",
            )? {
                let r = i.transform(&probe_msg, |bytes| {
                    super::decision::parse_decision(bytes).map(|_| ())
                });
                tolerate(r, "transform")?;
            }
        }
        Ok(())
    }

    /// A version's first code, and whether it is the optimized one: from
    /// the disk cache if it is there, else the baseline compiler's (when
    /// tiered), else Cranelift's.
    fn compile(&self, name: &str, bytes: &[u8], hash: &str) -> Result<(Module, bool), LoadError> {
        if let Some(path) = self.cache_path(hash)
            && path.exists()
        {
            // SAFETY: the cache folder belongs to this broker; its files are
            // written only by `compile_optimized`, by `Module::serialize` of
            // this same engine configuration, under a name keyed by the
            // source's hash.
            match unsafe { Module::deserialize_file(&self.engine, &path) } {
                Ok(m) => return Ok((m, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unusable compile cache entry: {e}")
                }
            }
        }
        if let Some((engine, _)) = &self.baseline {
            match Module::new(engine, bytes) {
                Ok(m) => return Ok((m, false)),
                // Something Winch does not support: Cranelift may. If the
                // file is bad, Cranelift's error says so just as well.
                Err(e) => tracing::debug!(plugin = %name, "baseline compile failed: {e:#}"),
            }
        }
        Ok((self.compile_optimized(name, bytes, hash)?, true))
    }

    /// Give `version` (compiled from `bytes`) its optimized code, if it
    /// runs baseline code. Instances made from now on get the optimized
    /// code; the ones that exist keep theirs until they are rebuilt (the
    /// broker rebuilds them as in a swap). Runs the whole compile: call it
    /// off the message path.
    pub fn optimize(&self, version: &PluginVersion, bytes: &[u8]) -> Result<(), LoadError> {
        if version.optimized() {
            return Ok(());
        }
        let module = self.compile_optimized(&version.name, bytes, &version.hash)?;
        *version.module.write() = module;
        version.optimized.store(true, Ordering::Release);
        Ok(())
    }

    fn cache_path(&self, hash: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        Some(dir.join(format!("{hash}-{:016x}.cwasm", h.finish())))
    }

    /// Cranelift's code for `bytes`, written to the disk cache.
    fn compile_optimized(&self, name: &str, bytes: &[u8], hash: &str) -> Result<Module, LoadError> {
        let module = Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
            name: name.into(),
            reason: format!("{e:#}"),
        })?;
        let Some(path) = self.cache_path(hash) else {
            return Ok(module);
        };
        if let Ok(code) = module.serialize() {
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, code)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
            {
                tracing::warn!(path = %path.display(), "could not write compile cache entry");
            }
        }
        Ok(module)
    }

    fn check_imports(&self, name: &str, module: &Module) -> Result<(), LoadError> {
        for import in module.imports() {
            let allowed = import.module() == "wasmq"
                && matches!(import.name(), "read" | "log")
                && matches!(import.ty(), ExternType::Func(_));
            if !allowed {
                return Err(LoadError::ForbiddenImport {
                    name: name.into(),
                    module: import.module().into(),
                    field: import.name().into(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.clock.stop();
    }
}

/// The ABI's init input: `str` exchange name, `str` binding key, table body.
pub(crate) fn init_input(name: &str, key: &str, args: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + name.len() + key.len() + args.len());
    v.extend_from_slice(&(name.len() as u32).to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(key.len() as u32).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(args);
    v
}

/// The ABI's binding input: `str` key, `u8` target kind (0 queue, 1
/// exchange), `str` target name, table body.
pub fn binding_input(key: &str, to_exchange: bool, target: &str, args: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + key.len() + target.len() + args.len());
    v.extend_from_slice(&(key.len() as u32).to_le_bytes());
    v.extend_from_slice(key.as_bytes());
    v.push(to_exchange as u8);
    v.extend_from_slice(&(target.len() as u32).to_le_bytes());
    v.extend_from_slice(target.as_bytes());
    v.extend_from_slice(args);
    v
}

/// The longest plugin name the admin API takes: with `.wasm` and a temporary
/// file's suffix it stays a legal file name (255 bytes) everywhere.
pub const MAX_PLUGIN_NAME: usize = 200;

/// Whether `name` may name a plugin given through the admin API: 1 to
/// [`MAX_PLUGIN_NAME`] ASCII letters, digits, `-` and `_` (it becomes a
/// file name in the plugin folder).
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PLUGIN_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A plugin's name is its file stem: `plugins/topic.wasm` is `topic`.
pub fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// SHA-256 of a plugin file, hex: its identity in the registry and the
/// compile cache.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Epoch ticks for a deadline. One extra tick because the current tick may
/// be about to end.
fn ticks(d: std::time::Duration) -> u64 {
    (d.as_micros() as u64).div_ceil(TICK.as_micros() as u64) + 1
}

/// Run a validation step, and once more on fresh instances if it failed
/// with a deadline fault: on a loaded machine a thread preempted for longer
/// than the 5 ms message deadline fails a healthy plugin,
/// while a plugin that really hangs fails both times, for the price of one
/// more deadline.
fn again_after_deadline<T, E>(
    step: impl Fn() -> Result<T, E>,
    fault: impl Fn(&E) -> Option<&PluginFault>,
) -> Result<T, E> {
    match step() {
        Err(e) if matches!(fault(&e), Some(PluginFault::Deadline(_))) => step(),
        r => r,
    }
}

/// A plugin version's own circuit opens after this many times an
/// exchange's threshold of faults in a row, across all its uses.
const PLUGIN_CIRCUIT_FACTOR: u32 = 4;

/// What both engines share: epoch deadlines, the stack bound, no address map.
fn base_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Plugins recurse little; a small stack bounds a runaway recursion
    // quickly and keeps per-instance memory low.
    config.max_wasm_stack(512 << 10);
    // The native-to-bytecode offset map is only for finer trap locations
    // (traps still name the guest function); without it a 57 KB plugin
    // compiles ~8% faster, which a hot swap waits for.
    config.generate_address_map(false);
    // The memory cap applies per linear memory: a module of several would
    // multiply it. `shape::check` refuses such modules with a clearer
    // message; this keeps the compiler from accepting them regardless.
    config.wasm_multi_memory(false);
    if std::env::var_os("WASMQ_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version's module is replaced when its optimized code is ready,
    /// while connections instantiate it. Each instance must get the linker
    /// of the engine that compiled the module it is made from; reading the
    /// module twice once gave a baseline linker to Cranelift's module
    /// ("cross-`Engine` instantiation is not currently supported"). That
    /// window is a few instructions wide, so this run finds it only on a
    /// loaded machine; it checks that instantiation and tier-up can run
    /// side by side at all.
    #[test]
    fn instances_made_while_the_code_tiers_up_use_their_modules_engine() {
        let host = PluginHost::new(Default::default(), None, Compiler::Tiered).unwrap();
        if !host.tiered() {
            return; // no baseline compiler on this platform: nothing tiers up
        }
        let (_, bytes) = crate::builtins::BUILTINS[0];
        for round in 0..8 {
            // A distinct hash each round, so that each compiles afresh.
            let mut bytes = bytes.to_vec();
            bytes.extend_from_slice(&[0, 3, 1, b'x', round]);
            let version = host.load("p", &bytes, false).unwrap();
            assert!(!version.optimized());
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                let instantiating = s.spawn(|| {
                    let mut made = 0;
                    while !stop.load(Ordering::Relaxed) || made == 0 {
                        host.instantiate(&version).unwrap();
                        made += 1;
                    }
                });
                host.optimize(&version, &bytes).unwrap();
                stop.store(true, Ordering::Relaxed);
                instantiating.join().unwrap();
            });
            assert!(version.optimized());
            host.instantiate(&version).unwrap();
        }
    }
}
