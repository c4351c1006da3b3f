# Sourced by run.sh and cluster.sh: build the example plugins into
# examples/plugins (installing the wasm32 target if it is missing).
build_example_plugins() {
    rustup target add wasm32-unknown-unknown
    local examples=(consistent-hash json-filter redact backoff)
    cargo build --profile plugin --target wasm32-unknown-unknown \
        $(printf -- '-p wasmq-example-%s ' "${examples[@]}")
    mkdir -p examples/plugins
    for p in "${examples[@]}"; do
        # Copy then rename: a running broker never sees a half-written file.
        cp "target/wasm32-unknown-unknown/plugin/wasmq_example_${p//-/_}.wasm" "examples/plugins/$p.wasm.tmp"
        mv "examples/plugins/$p.wasm.tmp" "examples/plugins/$p.wasm"
    done
}
