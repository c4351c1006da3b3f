#!/usr/bin/env bash
# Run the broker with the built-in plugins and the example plugins loaded.
# Extra arguments go to `wasmq serve` (e.g. --listen 127.0.0.1:5673).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-unknown-unknown
examples=(consistent-hash json-filter redact)
cargo build --profile plugin --target wasm32-unknown-unknown \
    $(printf -- '-p wasmq-example-%s ' "${examples[@]}")
mkdir -p examples/plugins
for p in "${examples[@]}"; do
    # Copy then rename: the running broker never sees a half-written file.
    cp "target/wasm32-unknown-unknown/plugin/wasmq_example_${p//-/_}.wasm" "examples/plugins/$p.wasm.tmp"
    mv "examples/plugins/$p.wasm.tmp" "examples/plugins/$p.wasm"
done
exec cargo run --release -p wasmq -- serve --plugin-dir examples/plugins "$@"
