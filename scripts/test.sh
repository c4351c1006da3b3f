#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test
# (unit, doc, plugin, example and integration tests, a bounded fuzzing pass,
# RabbitMQ's Python client pika, amqplib's own test suites and the web UI
# in headless Chromium; the build scripts compile the Wasm plugins the
# tests load).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental state, which would double
# the disk the build takes (CI machines may have little).
export CARGO_INCREMENTAL=0
rustup target add wasm32-unknown-unknown
# RabbitMQ's Python client, for tests/tests/integration/clients.rs, and
# redis-py, for the Redis front end's (tests/tests/integration/redis.rs).
python3 -m venv target/pika-venv
target/pika-venv/bin/pip install --quiet --disable-pip-version-check pika==1.4.4 redis==5.2.1
export WASMQ_PYTHON="$PWD/target/pika-venv/bin/python"
# amqplib's own live-broker test suites, for tests/tests/integration/clients.rs,
# and node-redis, for tests/tests/integration/redis.rs: Node
# from Debian's packages, the suites (pinned in tests/node/package.json)
# from the npm registry.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
# Debian's Chromium, which tests/tests/integration/ui.rs drives headless
# through playwright-core (installed with amqplib's suites below).
if ! command -v chromium >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
mkdir -p target/amqplib
cp tests/node/package.json target/amqplib/package.json
(cd target/amqplib && npm install --silent --no-audit --no-fund --no-package-lock)
export WASMQ_AMQPLIB="$PWD/target/amqplib"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
