//! One live plugin instance: a wasmtime `Store` with its memory, the typed
//! exports of the ABI, and the host functions' view of the current message.
//!
//! Every call sets the epoch deadline first, and every failure is classified
//! into a [`PluginFault`] here, so callers never see a wasmtime error.

use std::sync::Arc;

use super::shape::ModuleLimits;
use wasmq_sdk::abi;
use wasmtime::{Caller, Linker, Memory, Module, ResourceLimiter, Store, Trap, TypedFunc};

use super::PluginFault;
use super::PluginLimits;
use super::clock::EpochClock;
use super::log::PluginLog;
use super::version::PluginVersion;
use crate::message::Message;

/// Per-instance host state: what the imports see.
pub(crate) struct HostState {
    /// Plugin name and version (short hash), for log lines.
    plugin: Arc<str>,
    version: Arc<str>,
    limiter: Limiter,
    memory: Option<Memory>,
    /// The message of the call in progress; set by the caller of a message
    /// call and cleared after it, so `read` outside a call returns -1.
    current: CurrentMessage,
    /// The plugin's log, shared with its other instances.
    log: Arc<PluginLog>,
}

/// A borrowed pointer to the message of the call in progress. Not an
/// `Arc` clone: this is set and cleared on every routing call, and the two
/// atomic operations of a clone were measurable there.
struct CurrentMessage(*const Message);

// SAFETY: the pointer is only set for the duration of a call made through
// `Instance::message_call`, which holds a borrow of the message for that
// whole time, and the store is used by one thread at a time (`&mut`).
unsafe impl Send for CurrentMessage {}

impl CurrentMessage {
    fn get(&self) -> Option<&Message> {
        // SAFETY: see the `Send` impl: non-null only while the borrow lives.
        unsafe { self.0.as_ref() }
    }
}

/// Enforces the memory cap and remembers that it did, so the fault that
/// follows is reported as a memory fault and not a generic trap.
/// Memories and tables are counted together, so that however many a
/// module has, the instance as a whole stays within the caps.
struct Limiter {
    max_memory: usize,
    hit: bool,
    /// Bytes of linear memory the instance has, all memories together.
    memory: usize,
    /// Elements of all its tables together.
    table_elements: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = (self.memory - current.min(self.memory)).saturating_add(desired);
        if total > self.max_memory {
            self.hit = true;
            // An error traps the guest at the `memory.grow`, which gives the
            // precise place; returning Ok(false) would let a Rust guest abort
            // later with a less useful message.
            return Err(wasmtime::format_err!("memory limit exceeded"));
        }
        self.memory = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total =
            (self.table_elements - current.min(self.table_elements)).saturating_add(desired);
        if total as u64 > super::shape::TABLE_ELEMENTS {
            return Ok(false);
        }
        self.table_elements = total;
        Ok(true)
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        ModuleLimits::default().tables as usize
    }
}

/// Define the imports a plugin may use: `wasmq::read` and `wasmq::log`.
pub(crate) fn define_imports(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "wasmq",
        "read",
        |mut caller: Caller<'_, HostState>,
         what: i32,
         dst: i32,
         offset: i32,
         len: i32|
         -> wasmtime::Result<i32> {
            let state = caller.data();
            let (Some(memory), Some(message)) = (state.memory, state.current.get()) else {
                return Ok(-1);
            };
            // `Bytes` clones are cheap and end the borrow of the store.
            let src: bytes::Bytes = match what {
                abi::READ_PROPERTIES => message.encoded_properties().clone(),
                abi::READ_BODY => message.body.clone(),
                _ => return Ok(-1),
            };
            if offset < 0 || len < 0 {
                return Ok(-1);
            }
            if len == 0 {
                return Ok(src.len() as i32);
            }
            let offset = (offset as usize).min(src.len());
            let n = (len as usize).min(src.len() - offset);
            // A destination outside the guest's memory is a guest bug: trap.
            memory
                .write(&mut caller, dst as u32 as usize, &src[offset..offset + n])
                .map_err(|_| {
                    wasmtime::format_err!("wasmq::read destination outside guest memory")
                })?;
            Ok(n as i32)
        },
    )?;
    linker.func_wrap(
        "wasmq",
        "log",
        |caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let Some(memory) = caller.data().memory else {
                return Ok(());
            };
            let state = caller.data();
            let len = len.max(0) as usize;
            // Counted before the guest's memory is read: a refused line
            // costs nothing but the count.
            if !state.log.admit(len.min(super::log::LINE_BYTES)) {
                return Ok(());
            }
            let data = memory.data(&caller);
            let start = ptr as u32 as usize;
            let bytes = data
                .get(start..start.saturating_add(len))
                .ok_or_else(|| wasmtime::format_err!("wasmq::log message outside guest memory"))?;
            let text = super::log::line(bytes);
            state.log.write(&state.plugin, &state.version, level, text);
            Ok(())
        },
    )?;
    Ok(())
}

/// A call that did not succeed: a fault, or a refusal the plugin worded.
#[derive(Debug)]
pub(crate) enum CallError {
    Fault(PluginFault),
    Refused(String),
}

impl From<PluginFault> for CallError {
    fn from(f: PluginFault) -> Self {
        CallError::Fault(f)
    }
}

impl CallError {
    /// On the message path a refusal is a fault too: the message still needs
    /// an outcome.
    pub(crate) fn into_fault(self) -> PluginFault {
        match self {
            CallError::Fault(f) => f,
            CallError::Refused(m) => PluginFault::Reported(m),
        }
    }
}

type MessageFn<R> = TypedFunc<(i32, i32, i32), R>;

pub(crate) struct Instance {
    /// Binding ids below this were replayed into the instance when it was
    /// built (set by the router role); 0 for other roles.
    pub(crate) bound_from: u32,
    store: Store<HostState>,
    memory: Memory,
    buffer: TypedFunc<i32, i32>,
    /// The guest input buffer: (pointer, capacity), from `wasmq_buffer`.
    input: (u32, u32),
    init: TypedFunc<(i32, i32), i64>,
    bind: Option<TypedFunc<(i32, i32), i64>>,
    unbind: Option<TypedFunc<(i32, i32), i64>>,
    route: Option<MessageFn<i64>>,
    filter: Option<MessageFn<i32>>,
    transform: Option<MessageFn<i64>>,
    abi_version: TypedFunc<(), i32>,
    roles: TypedFunc<(), i32>,
    deadline_ticks: u64,
    setup_ticks: u64,
    memory_limit: usize,
    deadline: std::time::Duration,
    setup_deadline: std::time::Duration,
    clock: Arc<EpochClock>,
}

fn export_err(name: &str, e: impl std::fmt::Display) -> PluginFault {
    PluginFault::Malformed(format!("export `{name}`: {e}"))
}

/// What an instance needs from the host that makes it: the code, the
/// limits, the deadline clock, the linker with the host imports, and its
/// plugin's log budget. Passed in, so instances need not know the host.
pub(crate) struct InstanceEnv<'a> {
    /// The version's code, read once: a version's module is replaced when
    /// its optimized code is ready, and the linker must be the one of the
    /// engine that compiled this very module (a module of one engine
    /// cannot be instantiated with another's linker).
    pub module: Module,
    pub limits: &'a PluginLimits,
    pub clock: &'a Arc<EpochClock>,
    pub linker: &'a Linker<HostState>,
    pub log: Arc<PluginLog>,
    /// A message call's deadline, and a set-up call's, in clock ticks.
    pub deadline_ticks: u64,
    pub setup_ticks: u64,
}

impl Instance {
    /// Instantiate `version`. Fails on a start-function trap, a memory that
    /// starts above the cap, or a missing or mistyped required export.
    pub(crate) fn new(env: InstanceEnv<'_>, version: &PluginVersion) -> Result<Self, PluginFault> {
        let limits = env.limits;
        let module = env.module;
        let mut store = Store::new(
            module.engine(),
            HostState {
                plugin: version.name.as_str().into(),
                version: version.short_hash().into(),
                limiter: Limiter {
                    max_memory: limits.memory,
                    hit: false,
                    memory: 0,
                    table_elements: 0,
                },
                memory: None,
                current: CurrentMessage(std::ptr::null()),
                log: env.log,
            },
        );
        store.limiter(|s| &mut s.limiter);
        let (deadline_ticks, setup_ticks) = (env.deadline_ticks, env.setup_ticks);
        let setup_deadline = limits.setup_deadline.max(limits.deadline);
        env.clock.running();
        store.set_epoch_deadline(setup_ticks);
        let instance = match env.linker.instantiate(&mut store, &module) {
            Ok(i) => i,
            Err(e) => return Err(classify(&store, e, limits.memory, setup_deadline)),
        };
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| PluginFault::Malformed("no exported memory `memory`".into()))?;
        store.data_mut().memory = Some(memory);
        macro_rules! req {
            ($name:literal) => {
                instance
                    .get_typed_func(&mut store, $name)
                    .map_err(|e| export_err($name, e))?
            };
        }
        macro_rules! opt {
            ($name:literal) => {
                match instance.get_export(&mut store, $name) {
                    None => None,
                    Some(_) => Some(req!($name)),
                }
            };
        }
        Ok(Instance {
            bound_from: 0,
            memory,
            buffer: req!("wasmq_buffer"),
            input: (0, 0),
            init: req!("wasmq_init"),
            bind: opt!("wasmq_bind"),
            unbind: opt!("wasmq_unbind"),
            route: opt!("wasmq_route"),
            filter: opt!("wasmq_filter"),
            transform: opt!("wasmq_transform"),
            abi_version: req!("wasmq_abi_version"),
            roles: req!("wasmq_roles"),
            deadline_ticks,
            setup_ticks,
            memory_limit: limits.memory,
            deadline: limits.deadline,
            setup_deadline,
            clock: env.clock.clone(),
            store,
        })
    }

    /// A message call, under the message deadline.
    fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, PluginFault> {
        self.clock.running();
        self.store.set_epoch_deadline(self.deadline_ticks);
        f.call(&mut self.store, params)
            .map_err(|e| classify(&self.store, e, self.memory_limit, self.deadline))
    }

    /// A set-up call (init, bind, unbind, metadata), under the set-up deadline.
    fn setup_call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, PluginFault> {
        self.clock.running();
        self.store.set_epoch_deadline(self.setup_ticks);
        f.call(&mut self.store, params)
            .map_err(|e| classify(&self.store, e, self.memory_limit, self.setup_deadline))
    }

    pub(crate) fn abi_version(&mut self) -> Result<i32, PluginFault> {
        let f = self.abi_version.clone();
        self.setup_call(&f, ())
    }

    pub(crate) fn roles(&mut self) -> Result<i32, PluginFault> {
        let f = self.roles.clone();
        self.setup_call(&f, ())
    }

    pub(crate) fn has_export(&self, role: i32) -> bool {
        match role {
            abi::ROLE_ROUTER => {
                self.route.is_some() && self.bind.is_some() && self.unbind.is_some()
            }
            abi::ROLE_FILTER => self.filter.is_some(),
            abi::ROLE_TRANSFORM => self.transform.is_some(),
            _ => false,
        }
    }

    /// Copy `parts` back to back into the guest's input buffer, growing it
    /// through `wasmq_buffer` when needed. Returns the total length. In a
    /// set-up call (`setup`) growing the buffer gets the set-up deadline
    /// too: a fresh instance's first allocation touches new memory, and on
    /// a loaded machine it ran past the 5 ms message deadline and failed a
    /// broker's start.
    fn write_input(&mut self, parts: &[&[u8]], setup: bool) -> Result<i32, PluginFault> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > i32::MAX as usize {
            return Err(PluginFault::Malformed("input too large".into()));
        }
        if total as u32 > self.input.1 || self.input.1 == 0 {
            let want = total.max(256) as i32;
            let f = self.buffer.clone();
            let ptr = if setup {
                self.setup_call(&f, want)?
            } else {
                self.call(&f, want)?
            };
            self.input = (ptr as u32, want as u32);
        }
        let start = self.input.0 as usize;
        let data = self.memory.data_mut(&mut self.store);
        let dst = data
            .get_mut(start..start + total)
            .ok_or_else(|| PluginFault::Malformed("wasmq_buffer points outside memory".into()))?;
        let mut at = 0;
        for p in parts {
            dst[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Ok(total as i32)
    }

    /// Read a packed (pointer, length) reply and hand its payload (after the
    /// status byte) to `f`. An error status becomes `CallError::Refused`.
    fn reply<R>(
        &self,
        packed: i64,
        f: impl FnOnce(&[u8]) -> Result<R, PluginFault>,
    ) -> Result<R, CallError> {
        let ptr = (packed as u64 >> 32) as usize;
        let len = (packed as u64 & 0xffff_ffff) as usize;
        let data = self.memory.data(&self.store);
        let bytes = data.get(ptr..ptr.saturating_add(len)).ok_or_else(|| {
            PluginFault::Malformed(format!("reply at {ptr}+{len} is outside memory"))
        })?;
        match bytes.split_first() {
            Some((&abi::STATUS_OK, rest)) => Ok(f(rest)?),
            Some((&abi::STATUS_ERROR, msg)) => Err(CallError::Refused(
                String::from_utf8_lossy(msg).into_owned(),
            )),
            Some((s, _)) => Err(PluginFault::Malformed(format!("unknown status byte {s}")).into()),
            None => Err(PluginFault::Malformed("empty reply".into()).into()),
        }
    }

    /// `wasmq_init(role, input)`; `input` is the ABI init encoding.
    pub(crate) fn init(&mut self, role: i32, input: &[u8]) -> Result<(), CallError> {
        let len = self.write_input(&[input], true)?;
        let f = self.init.clone();
        let packed = self.setup_call(&f, (role, len))?;
        self.reply(packed, |_| Ok(()))
    }

    /// `wasmq_bind` / `wasmq_unbind`; `input` is the ABI binding encoding
    /// (see [`super::binding_input`]), made once per binding.
    fn binding_call(&mut self, bind: bool, id: u32, input: &[u8]) -> Result<(), CallError> {
        let f = if bind {
            self.bind.clone()
        } else {
            self.unbind.clone()
        };
        let f = f.ok_or_else(|| PluginFault::Malformed("not a router".into()))?;
        let len = self.write_input(&[input], true)?;
        let packed = self.setup_call(&f, (id as i32, len))?;
        self.reply(packed, |_| Ok(()))
    }

    pub(crate) fn bind(&mut self, id: u32, input: &[u8]) -> Result<(), CallError> {
        self.binding_call(true, id, input)
    }

    pub(crate) fn unbind(&mut self, id: u32, input: &[u8]) -> Result<(), CallError> {
        self.binding_call(false, id, input)
    }

    /// Run a message call with `message` visible to `wasmq::read`.
    fn message_call<R: wasmtime::WasmResults>(
        &mut self,
        f: &MessageFn<R>,
        message: &Arc<Message>,
    ) -> Result<R, PluginFault> {
        let key_len = self.write_input(&[message.routing_key.as_bytes()], false)?;
        let props_len = message.encoded_properties_len().map_or(-1, |n| n as i32);
        let body_len = message.body.len() as i32;
        self.store.data_mut().current = CurrentMessage(Arc::as_ptr(message));
        let r = self.call(f, (key_len, props_len, body_len));
        self.store.data_mut().current = CurrentMessage(std::ptr::null());
        r
    }

    /// `wasmq_route`: appends the chosen binding ids to `out`.
    pub(crate) fn route(
        &mut self,
        message: &Arc<Message>,
        out: &mut Vec<u32>,
    ) -> Result<(), CallError> {
        // Taken out and put back rather than cloned: a `TypedFunc` clone
        // is an atomic increment and decrement of its type's registration,
        // 4% of an unmemoized topic route under perf.
        let f = self
            .route
            .take()
            .ok_or_else(|| PluginFault::Malformed("not a router".into()))?;
        let r = self.message_call(&f, message);
        self.route = Some(f);
        let packed = r?;
        self.reply(packed, |ids| {
            if ids.len() % 4 != 0 {
                return Err(PluginFault::Malformed(format!(
                    "route reply of {} bytes is not a list of u32 ids",
                    ids.len()
                )));
            }
            out.extend(
                ids.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
            );
            Ok(())
        })
    }

    /// `wasmq_filter`.
    pub(crate) fn filter(&mut self, message: &Arc<Message>) -> Result<bool, PluginFault> {
        let f = self
            .filter
            .take()
            .ok_or_else(|| PluginFault::Malformed("not a filter".into()))?;
        let r = self.message_call(&f, message);
        self.filter = Some(f);
        match r? {
            abi::FILTER_PASS => Ok(true),
            abi::FILTER_DROP => Ok(false),
            other => Err(PluginFault::Malformed(format!(
                "filter returned {other}, expected 0 or 1"
            ))),
        }
    }

    /// `wasmq_transform`: returns the raw decision bytes for the caller to parse.
    pub(crate) fn transform<R>(
        &mut self,
        message: &Arc<Message>,
        parse: impl FnOnce(&[u8]) -> Result<R, PluginFault>,
    ) -> Result<R, CallError> {
        let f = self
            .transform
            .take()
            .ok_or_else(|| PluginFault::Malformed("not a transform".into()))?;
        let r = self.message_call(&f, message);
        self.transform = Some(f);
        let packed = r?;
        self.reply(packed, parse)
    }
}

/// Turn a wasmtime error from a call into a fault.
fn classify(
    store: &Store<HostState>,
    e: wasmtime::Error,
    memory_limit: usize,
    deadline: std::time::Duration,
) -> PluginFault {
    if store.data().limiter.hit {
        return PluginFault::MemoryLimit(memory_limit);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginFault::Deadline(deadline),
        Some(trap) => PluginFault::Trap(trap.to_string()),
        None => PluginFault::Trap(
            format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
    }
}
