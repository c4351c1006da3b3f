#!/usr/bin/env bash
# Run the broker with the built-in plugins and the example plugins loaded.
# Extra arguments go to `wasmq serve` (e.g. --listen 127.0.0.1:5673).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/plugins.sh
build_example_plugins
exec cargo run --release -p wasmq -- serve --plugin-dir examples/plugins "$@"
