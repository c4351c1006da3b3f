#!/usr/bin/env bash
# Confirmed throughput into one quorum queue against the same load spread
# over many, on a fresh three-node cluster on loopback: 1 KiB persistent
# messages with confirms (200 outstanding per producer), 4 producers and
# 4 consumers acking every 50, all through node a. With a log per queue,
# spreading the load multiplied the syncs; with the node's shared log, a
# sync covers every queue's appends.
#
#   perf/quorum_spread.sh [QUEUES] [SECONDS]     (defaults: 100 queues, 10 s)
#
# WASMQ_BIN=path and WASMQ_PERF_BIN=path use built binaries instead of
# building the release ones.
set -euo pipefail
cd "$(dirname "$0")/.."
queues=${1:-100}
secs=${2:-10}
source perf/cluster3.sh
release_bins
start_cluster3 "$bin"
sleep 2
source perf/spread_load.sh
spread_load "$perf_bin" amqp://guest:guest@127.0.0.1:6672/%2f "$queues" "$secs"
