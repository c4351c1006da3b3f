//! Builds the built-in exchange types (`plugins/`) to wasm32 from source and
//! embeds them, so the broker starts with `direct`, `topic`, `fanout` and
//! `headers` and `super-stream`, and the `sns-filter` and `redis-channel` binding filters, with no
//! manual step.

use std::path::PathBuf;

use wasmq_build::{PluginCrate, build_plugins};

const BUILTINS: &[PluginCrate<'static>] = &[
    PluginCrate {
        package: "wasmq-plugin-direct",
        plugin: "direct",
        dir: "plugins/direct",
    },
    PluginCrate {
        package: "wasmq-plugin-topic",
        plugin: "topic",
        dir: "plugins/topic",
    },
    PluginCrate {
        package: "wasmq-plugin-fanout",
        plugin: "fanout",
        dir: "plugins/fanout",
    },
    PluginCrate {
        package: "wasmq-plugin-headers",
        plugin: "headers",
        dir: "plugins/headers",
    },
    PluginCrate {
        package: "wasmq-plugin-sns-filter",
        plugin: "sns-filter",
        dir: "plugins/sns-filter",
    },
    PluginCrate {
        package: "wasmq-plugin-redis-channel",
        plugin: "redis-channel",
        dir: "plugins/redis-channel",
    },
    PluginCrate {
        package: "wasmq-plugin-super-stream",
        plugin: "super-stream",
        dir: "plugins/super-stream",
    },
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtins");
    let paths = build_plugins(&workspace, BUILTINS, &out);

    let mut src = String::from(
        "/// The built-in plugins: (name, wasm bytes).\npub static BUILTINS: &[(&str, &[u8])] = &[\n",
    );
    for (c, path) in BUILTINS.iter().zip(&paths) {
        src.push_str(&format!(
            "    ({:?}, include_bytes!({:?})),\n",
            c.plugin,
            path.display().to_string()
        ));
    }
    src.push_str("];\n");
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("builtins.rs"),
        src,
    )
    .unwrap();
    embed_guest_sdk(&workspace);
}

/// The guest SDK's source, compiled into the binary so that
/// `wasmq plugin new` can write it beside a new plugin crate wherever the
/// binary runs (no checkout, no registry).
fn embed_guest_sdk(workspace: &std::path::Path) {
    let sdk = workspace.join("guest-sdk");
    let mut files = vec![sdk.join("README.md")];
    let mut src: Vec<PathBuf> = std::fs::read_dir(sdk.join("src"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    src.sort();
    files.extend(src);
    let mut out = String::from(
        "/// The guest SDK's files: (path in the crate, text).\npub static GUEST_SDK: &[(&str, &str)] = &[\n",
    );
    for f in &files {
        let rel = f
            .strip_prefix(&sdk)
            .unwrap()
            .to_str()
            .unwrap()
            .replace('\\', "/");
        out.push_str(&format!(
            "    ({rel:?}, include_str!({:?})),\n",
            f.display().to_string()
        ));
    }
    out.push_str("];\n");
    println!("cargo:rerun-if-changed={}", sdk.join("src").display());
    println!("cargo:rerun-if-changed={}", sdk.join("README.md").display());
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guest_sdk.rs"),
        out,
    )
    .unwrap();
}
