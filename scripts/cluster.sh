#!/usr/bin/env bash
# Start a three-node cluster on loopback, with the built-in and example
# plugins: nodes a, b, c with AMQP on 5672/5673/5674, the admin API on
# 15672/15673/15674 and the node-to-node links on 25672/25673/25674. State
# lives in target/cluster/<node> (or $WASMQ_CLUSTER_DIR/<node>); Ctrl-C
# stops all three (their state is kept, so running it again restarts the
# same cluster). WASMQ_BIN=path runs a broker built elsewhere instead of
# building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/plugins.sh
. scripts/node-config.sh
build_example_plugins
bin=${WASMQ_BIN:-target/release/wasmq}
[ -n "${WASMQ_BIN:-}" ] || cargo build --release -p wasmq
root=${WASMQ_CLUSTER_DIR:-target/cluster}
mkdir -p "$root"
if [ ! -s "$root/secret" ]; then
    # The shared secret every node must prove it holds.
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$root/secret"
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM EXIT
i=0
for node in a b c; do
    node_config "$root" "$node" "$i" 5672 examples/plugins
    "$bin" serve --config "$root/$node/wasmq.toml" > >(sed "s/^/[$node] /") 2>&1 &
    pids+=($!)
    i=$((i + 1))
    sleep 1
done
echo "cluster of three on 127.0.0.1:5672-5674; status: target/release/wasmq cluster status"
wait
