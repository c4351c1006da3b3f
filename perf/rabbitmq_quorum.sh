#!/usr/bin/env bash
# RabbitMQ's quorum queues measured the way perf/quorum.sh measures
# wasmq's: three RabbitMQ nodes on loopback (Debian's rabbitmq-server;
# AMQP on 5681-5683, state in /tmp/wasmq-rabbitmq, which the rabbitmq user
# the server runs as can write), clustered, then the same
# wasmq-perf runs against node 1: 1 KiB persistent messages with confirms
# (200 outstanding), one consumer acking, with 1 and 4 producers, and at a
# fixed 5k msg/s. Needs rabbitmq-server installed (apt-get install
# rabbitmq-server); its own service is not used.
# Usage: perf/rabbitmq_quorum.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release -p wasmq-perf --bin wasmq-perf
source perf/rabbitmq3.sh
start_rabbitmq3
perf() {
    target/release/wasmq-perf --uri amqp://guest:guest@127.0.0.1:5681/%2f \
        --size 1024 --confirm 200 --persistent --prefetch 500 --multi-ack 50 -z "$secs" "$@" | tail -1
}
echo "== RabbitMQ quorum queue (3 replicas), 1 producer"
perf -x 1 --quorum
echo "== RabbitMQ quorum queue (3 replicas), 4 producers"
perf -x 4 --quorum
echo "== RabbitMQ quorum queue at 5k msg/s"
perf -x 1 --rate 5000 --quorum
echo "== RabbitMQ classic durable queue, 1 producer (node 1)"
perf -x 1
