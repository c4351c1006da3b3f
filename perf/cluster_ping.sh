#!/usr/bin/env bash
# What a message's trip across nodes costs: a three-node cluster on
# loopback (./scripts/cluster.sh, release build) and wasmq-ping consuming
# on node b, publishing on b itself (local) and then on a (every message
# forwarded a -> b), paced at 10k msg/s for latency and unpaced for
# throughput. Usage: perf/cluster_ping.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release -p wasmq-perf --bin wasmq-ping
mkdir -p target/cluster
./scripts/cluster.sh > target/cluster/bench.log 2>&1 &
cluster=$!
trap 'kill $cluster 2>/dev/null; wait $cluster 2>/dev/null' EXIT
for _ in $(seq 1 120); do
    if target/release/wasmq cluster status --url http://127.0.0.1:15673 2>/dev/null | grep -q leader; then
        break
    fi
    sleep 1
done
sleep 2
ping=target/release/wasmq-ping
for rate in 10000 0; do
    echo "== local: publish and consume on b, rate $rate"
    $ping --addr 127.0.0.1:5673 --rate $rate -z "$secs" | tail -1
    echo "== across: publish on a, queue and consumer on b, rate $rate"
    $ping --addr 127.0.0.1:5673 --publish-addr 127.0.0.1:5672 --rate $rate -z "$secs" | tail -1
done
