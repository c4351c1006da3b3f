#!/usr/bin/env bash
# Quorum queues against a durable classic queue, on a fresh three-node
# cluster on loopback (./scripts/cluster.sh, release build), through the
# lapin-based wasmq-perf: 1 KiB persistent messages with confirms (200
# outstanding per producer), one consumer acking, all through node a.
#
#   * confirmed throughput: a classic durable queue on a (no replication),
#     a quorum queue (three replicas) with 1 and with 4 producers;
#   * latency at a fixed 5k msg/s, classic and quorum.
#
# Usage: perf/quorum.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release -p wasmq-perf --bin wasmq-perf
export WASMQ_CLUSTER_DIR=target/cluster-bench
rm -rf "$WASMQ_CLUSTER_DIR"
mkdir -p "$WASMQ_CLUSTER_DIR"
./scripts/cluster.sh > "$WASMQ_CLUSTER_DIR/bench.log" 2>&1 &
cluster=$!
trap 'kill $cluster 2>/dev/null; wait $cluster 2>/dev/null' EXIT
for _ in $(seq 1 300); do
    if target/release/wasmq cluster status --url http://127.0.0.1:15674 2>/dev/null | grep -q "leader"; then
        break
    fi
    sleep 1
done
sleep 2
perf() {
    target/release/wasmq-perf --uri amqp://guest:guest@127.0.0.1:5672/%2f \
        --size 1024 --confirm 200 --persistent --prefetch 500 --multi-ack 50 -z "$secs" "$@" | tail -1
}
echo "== classic durable queue, 1 producer"
perf -x 1
echo "== quorum queue (3 replicas), 1 producer"
perf -x 1 --quorum
echo "== quorum queue (3 replicas), 4 producers"
perf -x 4 --quorum
echo "== classic durable queue at 5k msg/s"
perf -x 1 --rate 5000
echo "== quorum queue at 5k msg/s"
perf -x 1 --rate 5000 --quorum
target/release/wasmq queues --url http://127.0.0.1:15672
