//! Log lines from a plugin. In the broker they go to its `tracing` log under
//! the target `wasmq::plugin`; in native tests they go to stderr.

/// Log at `error` level.
pub fn error(message: &str) {
    write(1, message)
}

/// Log at `warn` level.
pub fn warn(message: &str) {
    write(2, message)
}

/// Log at `info` level.
pub fn info(message: &str) {
    write(3, message)
}

/// Log at `debug` level.
pub fn debug(message: &str) {
    write(4, message)
}

#[cfg(target_arch = "wasm32")]
fn write(level: i32, message: &str) {
    // SAFETY: the host reads `len` bytes at `ptr` from this module's memory.
    unsafe { crate::abi::host_log(level, message.as_ptr(), message.len() as i32) }
}

#[cfg(not(target_arch = "wasm32"))]
fn write(level: i32, message: &str) {
    eprintln!("[plugin level {level}] {message}");
}
