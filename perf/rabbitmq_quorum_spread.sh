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
perf_bin=${WASMQ_PERF_BIN:-}
if [ -z "$perf_bin" ]; then
    cargo build --release -p wasmq-perf --bin wasmq-perf
    perf_bin=target/release/wasmq-perf
fi
source perf/rabbitmq3.sh
start_rabbitmq3
dpkg-query -W -f 'RabbitMQ ${Version}\n' rabbitmq-server 2>/dev/null || true
run() {
    "$perf_bin" --uri amqp://guest:guest@127.0.0.1:5681/%2f --quorum \
        --size 1024 --confirm 200 --persistent --prefetch 500 --multi-ack 50 \
        -x 4 -y 4 -z "$secs" "$@" | tail -1
}
echo "== one quorum queue"
run --queues 1
echo "== $queues quorum queues"
run --queues "$queues"
echo "== $queues quorum queues, x-queue-leader-locator = client-local"
run --queues "$queues" --leader-locator client-local
