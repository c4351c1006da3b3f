//! The plugin ABI, version 1: the only contract between a plugin and the host.
//!
//! The ABI is a handful of core-Wasm functions that pass integers and
//! (pointer, length) pairs. It was chosen over the component model for speed:
//! a core call costs ~10 ns, a component-model call with a string in and a
//! list out ~300 ns, and the routing call is on every message's path.
//! `docs/plugin-abi.md` is the prose version of this file; the two must agree.
//!
//! # Exports (guest → host)
//!
//! | export | signature | meaning |
//! |---|---|---|
//! | `memory` | memory | the guest's linear memory |
//! | `wasmq_abi_version` | `() -> i32` | [`ABI_VERSION`]; checked at load |
//! | `wasmq_roles` | `() -> i32` | bit set of [`ROLE_ROUTER`], [`ROLE_FILTER`], [`ROLE_TRANSFORM`], [`FLAG_DETERMINISTIC`] |
//! | `wasmq_buffer` | `(len) -> ptr` | a guest-owned input buffer of at least `len` bytes; the host writes call inputs there |
//! | `wasmq_init` | `(role, len) -> result` | input: [`str`](#encodings) exchange name, `str` binding key (filters) or empty, `table` arguments |
//! | `wasmq_bind` / `wasmq_unbind` | `(binding_id, len) -> result` | input: `str` binding key, `u8` target kind (0 queue, 1 exchange), `str` target name, `table` binding arguments (routers) |
//! | `wasmq_route` | `(key_len, props_len, body_len) -> result` | input: the routing key; output: `u32` LE binding ids |
//! | `wasmq_filter` | `(key_len, props_len, body_len) -> i32` | input: the routing key; returns [`FILTER_PASS`] or [`FILTER_DROP`] |
//! | `wasmq_transform` | `(key_len, props_len, body_len) -> result` | input: the routing key; output: a transform decision |
//!
//! A `result` is an `i64` packing a pointer to guest memory in its high 32 bits
//! and a length in its low 32 bits. The bytes there start with a status byte:
//! [`STATUS_OK`] followed by the call's output, or [`STATUS_ERROR`] followed by
//! a UTF-8 message that the host shows to the user.
//!
//! # Imports (host → guest), module `wasmq`
//!
//! | import | signature | meaning |
//! |---|---|---|
//! | `read` | `(what, dst, offset, len) -> i32` | copy part of the current message's properties ([`READ_PROPERTIES`], AMQP encoding) or body ([`READ_BODY`]) to `dst`; returns the bytes copied, the total size when `len` is 0, or -1 |
//! | `log` | `(level, ptr, len)` | a log line, levels 1 (error) to 5 (trace) |
//!
//! `props_len` and `body_len` passed to the message calls are the sizes the
//! host holds, or -1 when it does not know yet (the guest then asks `read`
//! with `len` 0). The properties and body are fetched lazily: a router that never asks for the
//! body never pays for copying it.
//!
//! # Encodings
//!
//! `str` and `bytes` are a `u32` LE length followed by the bytes. `table` is the
//! rest of the input: the body of an AMQP 0-9-1 field table (without its own
//! length prefix). Properties are the AMQP 0-9-1 basic content-header property
//! list (16-bit flags, then the present fields).
//!
//! A transform decision is one op byte: [`TRANSFORM_KEEP`], [`TRANSFORM_DROP`],
//! [`TRANSFORM_DEAD_LETTER`] followed by a `str` reason, or
//! [`TRANSFORM_REWRITE`] followed by a flag byte ([`REWRITE_KEY`],
//! [`REWRITE_PROPERTIES`], [`REWRITE_BODY`]) and a `bytes` for each flag set, in
//! that order.

/// The ABI version this SDK speaks. The host refuses a plugin whose version
/// differs, naming both versions.
pub const ABI_VERSION: u32 = 1;

/// Role bit: the plugin is an exchange type (routes messages to bindings).
pub const ROLE_ROUTER: i32 = 1;
/// Role bit: the plugin filters messages per binding (pass or drop).
pub const ROLE_FILTER: i32 = 2;
/// Role bit: the plugin transforms messages before routing.
pub const ROLE_TRANSFORM: i32 = 4;
/// Flag bit: the router's decision depends only on the routing key and the
/// bindings, so the host may memoize it per binding generation.
pub const FLAG_DETERMINISTIC: i32 = 1 << 8;

/// Status byte: the call succeeded; its output follows.
pub const STATUS_OK: u8 = 0;
/// Status byte: the call failed; a UTF-8 message follows.
pub const STATUS_ERROR: u8 = 1;

/// `wasmq_filter` result: deliver through this binding.
pub const FILTER_PASS: i32 = 1;
/// `wasmq_filter` result: do not deliver through this binding.
pub const FILTER_DROP: i32 = 0;

/// Transform op: route the message unchanged.
pub const TRANSFORM_KEEP: u8 = 0;
/// Transform op: route a rewritten message.
pub const TRANSFORM_REWRITE: u8 = 1;
/// Transform op: drop the message (counted, not an error).
pub const TRANSFORM_DROP: u8 = 2;
/// Transform op: dead-letter the message with a reason.
pub const TRANSFORM_DEAD_LETTER: u8 = 3;

/// Rewrite flag: a new routing key follows.
pub const REWRITE_KEY: u8 = 1;
/// Rewrite flag: new properties (AMQP encoding) follow.
pub const REWRITE_PROPERTIES: u8 = 2;
/// Rewrite flag: a new body follows.
pub const REWRITE_BODY: u8 = 4;

/// `read` selector: the message properties, AMQP-encoded.
pub const READ_PROPERTIES: i32 = 0;
/// `read` selector: the message body.
pub const READ_BODY: i32 = 1;

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "wasmq")]
unsafe extern "C" {
    /// See the module docs.
    #[link_name = "read"]
    pub(crate) fn host_read(what: i32, dst: *mut u8, offset: i32, len: i32) -> i32;
    /// See the module docs.
    #[link_name = "log"]
    pub(crate) fn host_log(level: i32, ptr: *const u8, len: i32);
}

/// Name of the custom section holding a plugin's self-test vectors (JSON,
/// see [`self_test!`](crate::self_test)). The host runs them through the
/// compiled plugin when it loads a version; a version that fails one is
/// rejected.
pub const SELF_TEST_SECTION: &str = "wasmq-self-test";
