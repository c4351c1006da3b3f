//! Builds the example plugins and the misbehaving test plugin to wasm32, so
//! the integration tests never skip for want of a `.wasm`.

use std::path::PathBuf;

use wasmq_build::{PluginCrate, build_plugins};

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("plugins");
    build_plugins(
        &workspace,
        &[
            PluginCrate {
                package: "wasmq-example-consistent-hash",
                plugin: "consistent-hash",
                dir: "examples/consistent-hash",
            },
            PluginCrate {
                package: "wasmq-example-json-filter",
                plugin: "json-filter",
                dir: "examples/json-filter",
            },
            PluginCrate {
                package: "wasmq-example-redact",
                plugin: "redact",
                dir: "examples/redact",
            },
            PluginCrate {
                package: "wasmq-example-backoff",
                plugin: "backoff",
                dir: "examples/backoff",
            },
            PluginCrate {
                package: "wasmq-test-faulty",
                plugin: "faulty",
                dir: "tests/plugins/faulty",
            },
            PluginCrate {
                package: "wasmq-plugin-topic",
                plugin: "topic",
                dir: "plugins/topic",
            },
            PluginCrate {
                package: "wasmq-plugin-direct",
                plugin: "direct",
                dir: "plugins/direct",
            },
        ],
        &out,
    );
    println!("cargo:rustc-env=WASMQ_TEST_PLUGINS={}", out.display());
}
