//! `wasmq plugin build`: compile a plugin crate for the broker.
//!
//! One command instead of four steps an author gets wrong in turn: the
//! wasm32 target is installed if missing (`rustup` does not do it from a
//! `rust-toolchain.toml` when auto-install is off), cargo builds with the
//! crate's release profile, the `.wasm` is copied to
//! `target/wasmq/NAME.wasm` under the plugin's name (which is what the
//! broker calls it), and the caller then checks it as the broker will.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target plugins are built for.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No `Cargo.toml` in the folder.
    #[error("no Cargo.toml in {0}: run this in a plugin crate (see `wasmq plugin new`)")]
    NotACrate(PathBuf),
    /// A tool could not be run.
    #[error("running {tool}: {reason}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// cargo failed (its errors were printed).
    #[error("cargo build failed (its errors are above)")]
    Cargo,
    /// cargo built no `.wasm` (the crate is not a `cdylib`).
    #[error("the build made no .wasm: the crate's [lib] crate-type must include \"cdylib\"")]
    NoWasm,
    /// Copying the result failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The plugin name a crate declares: `[package.metadata.wasmq] name`, else
/// the package name.
fn plugin_name(manifest: &str) -> Option<String> {
    let doc: toml::Table = manifest.parse().ok()?;
    let package = doc.get("package")?.as_table()?;
    let declared = package
        .get("metadata")
        .and_then(|m| m.get("wasmq"))
        .and_then(|w| w.get("name"))
        .and_then(|n| n.as_str());
    declared
        .or_else(|| package.get("name")?.as_str())
        .map(str::to_owned)
}

/// Install the wasm32 target through rustup if it is missing. Without
/// rustup (a distribution's Rust), the build says what is missing itself.
fn ensure_target() -> Result<(), BuildError> {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stderr(Stdio::inherit())
        .output()
    else {
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == TARGET)
    {
        return Ok(());
    }
    eprintln!("installing the {TARGET} target (rustup target add {TARGET})");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .map_err(|e| BuildError::Tool {
            tool: "rustup",
            reason: e.to_string(),
        })?;
    if !status.success() {
        return Err(BuildError::Tool {
            tool: "rustup",
            reason: format!("`rustup target add {TARGET}` failed ({status})"),
        });
    }
    Ok(())
}

/// Build the plugin crate in `dir`; returns the plugin's name and the
/// `.wasm` written under `target/wasmq/`.
pub fn build(dir: &Path) -> Result<(String, PathBuf), BuildError> {
    let manifest_path = dir.join("Cargo.toml");
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|_| BuildError::NotACrate(dir.to_owned()))?;
    let name = plugin_name(&manifest).ok_or_else(|| BuildError::NotACrate(dir.to_owned()))?;
    ensure_target()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(["build", "--release", "--target", TARGET])
        .arg("--manifest-path")
        .arg(&manifest_path)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BuildError::Tool {
            tool: "cargo",
            reason: e.to_string(),
        })?;
    let stdout = child.stdout.take().expect("piped");
    let mut wasm = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["crate_types"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "cdylib"))
            && let Some(files) = msg["filenames"].as_array()
        {
            wasm = files
                .iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from)
                .or(wasm);
        }
    }
    let status = child.wait().map_err(|e| BuildError::Tool {
        tool: "cargo",
        reason: e.to_string(),
    })?;
    if !status.success() {
        return Err(BuildError::Cargo);
    }
    let wasm = wasm.ok_or(BuildError::NoWasm)?;
    // Beside cargo's own output, under the plugin's name.
    let out_dir = wasm
        .ancestors()
        .nth(3)
        .map(|t| t.join("wasmq"))
        .unwrap_or_else(|| dir.join("target/wasmq"));
    let out = out_dir.join(format!("{name}.wasm"));
    let io = |source| BuildError::Io {
        path: out.clone(),
        source,
    };
    std::fs::create_dir_all(&out_dir).map_err(io)?;
    std::fs::copy(&wasm, &out).map_err(io)?;
    Ok((name, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_name_is_the_declared_one_or_the_package_name() {
        let declared =
            "[package]\nname = \"crate-name\"\n[package.metadata.wasmq]\nname = \"geo\"\n";
        assert_eq!(plugin_name(declared).as_deref(), Some("geo"));
        assert_eq!(
            plugin_name("[package]\nname = \"crate-name\"\n").as_deref(),
            Some("crate-name")
        );
        assert_eq!(plugin_name("not toml ["), None);
    }
}
