#!/usr/bin/env bash
# What idle quorum queues cost: a fresh three-node cluster on loopback,
# N quorum queues declared through node a, then, with no traffic at all,
# the CPU the three processes use over a window, their open files and
# their resident memory. The issue's RabbitMQ figures were taken the same
# way (declare, then idle CPU of all three nodes over 20 s).
#
#   perf/quorum_idle.sh [N] [SECONDS]          (defaults: 100 queues, 20 s)
#
# WASMQ_BIN=path uses a built broker instead of building the release one;
# WASMQ_QUIESCENT=0 runs the nodes without `[cluster] quiescent_quorum`
# (on by default).
# Needs pika (./scripts/test.sh installs it in target/pika-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
secs=${2:-20}
bin=${WASMQ_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -p wasmq
    bin=target/release/wasmq
fi
python=${WASMQ_PYTHON:-target/pika-venv/bin/python}
source perf/cluster3.sh
start_cluster3 "$bin"
source perf/idle_cost.sh
idle_cost 6672 "$n" "$secs" "${pids[@]}"
