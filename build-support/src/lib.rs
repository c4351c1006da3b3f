//! Compiles plugin crates of this workspace to `wasm32-unknown-unknown` from a
//! build script, so that `cargo build` and `cargo test` on a fresh clone
//! produce every `.wasm` they need with no manual step (compiled plugins are
//! never committed).
//!
//! The nested `cargo build` uses its own target folder (`target/wasm`) so it
//! never waits on the outer build's lock, and drops the outer build's flags
//! (`RUSTFLAGS` for the host, the jobserver) that mean nothing for wasm32.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Wasm target plugins are built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// One plugin crate to build: its package name and the plugin name (the
/// file stem the broker will know it by).
pub struct PluginCrate<'a> {
    /// The cargo package, e.g. `wasmq-plugin-topic`.
    pub package: &'a str,
    /// The plugin name, e.g. `topic` (becomes `topic.wasm`).
    pub plugin: &'a str,
    /// The crate folder, relative to the workspace root (for rerun-if-changed).
    pub dir: &'a str,
}

/// Build `crates` for wasm32 and copy each into `dest` as `<plugin>.wasm`.
/// Returns the paths written. Panics with an actionable message on failure,
/// which is how a build script reports errors.
pub fn build_plugins(workspace: &Path, crates: &[PluginCrate<'_>], dest: &Path) -> Vec<PathBuf> {
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("guest-sdk").display()
    );
    for c in crates {
        println!("cargo:rerun-if-changed={}", workspace.join(c.dir).display());
    }
    ensure_target();

    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--profile", "plugin", "--target", TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for c in crates {
        cmd.args(["-p", c.package]);
    }
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build wasm plugins: {e}"));
    assert!(
        status.success(),
        "building the wasm plugins failed (see the cargo output above)"
    );

    std::fs::create_dir_all(dest).expect("create plugin output folder");
    crates
        .iter()
        .map(|c| {
            let built = target_dir
                .join(TARGET)
                .join("plugin")
                .join(format!("{}.wasm", c.package.replace('-', "_")));
            let out = dest.join(format!("{}.wasm", c.plugin));
            std::fs::copy(&built, &out)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), out.display()));
            out
        })
        .collect()
}

/// Install the wasm32 target if this toolchain lacks it. Machines set
/// `RUSTUP_AUTO_INSTALL=0`, so nothing else would.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| PathBuf::from(s.trim()));
    if let Some(root) = sysroot
        && root.join("lib/rustlib").join(TARGET).exists()
    {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup");
    let ok = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and rebuild"
    );
}
