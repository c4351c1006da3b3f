#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test
# (unit, doc, plugin, example and integration tests, and a Python pika
# client; the build scripts compile the Wasm plugins the tests load).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-unknown-unknown
# RabbitMQ's Python client, for tests/tests/clients.rs.
python3 -m venv target/pika-venv
target/pika-venv/bin/pip install --quiet --disable-pip-version-check pika==1.4.4
export WASMQ_PYTHON="$PWD/target/pika-venv/bin/python"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
