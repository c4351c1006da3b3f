#!/usr/bin/env bash
# RabbitMQ's quorum queues under the load perf/quorum_spread.sh puts on
# wasmq: three RabbitMQ nodes on loopback (perf/rabbitmq3.sh, Debian's
# rabbitmq-server), 4 producers with confirms (200 outstanding each) and
# 4 consumers acking every 50, 1 KiB persistent messages, all through
# node 1: into one quorum queue, then spread over N. What spreading costs
# a broker whose every queue is a Raft group of its own (Ra's groups share
# a write-ahead log per node, as wasmq's do).
#
#   perf/rabbitmq_quorum_spread.sh [QUEUES] [SECONDS]   (defaults: 100, 10)
#
# Needs rabbitmq-server (apt-get install rabbitmq-server); its own service
# is not used. WASMQ_PERF_BIN=path uses a built load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
queues=${1:-100}
secs=${2:-10}
perf_bin=${WASMQ_PERF_BIN:-target/release/wasmq-perf}
[ -n "${WASMQ_PERF_BIN:-}" ] || cargo build --release -p wasmq-perf --bin wasmq-perf
source perf/rabbitmq3.sh
start_rabbitmq3
dpkg-query -W -f 'RabbitMQ ${Version}\n' rabbitmq-server 2>/dev/null || true
source perf/spread_load.sh
spread_load "$perf_bin" amqp://guest:guest@127.0.0.1:5681/%2f "$queues" "$secs"
