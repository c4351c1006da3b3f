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
root=/tmp/wasmq-rabbitmq
rm -rf "$root"
mkdir -p "$root"/{1,2,3}
host=$(hostname -s)
: > "$root/enabled_plugins"
stop() {
    for i in 1 2 3; do
        RABBITMQ_NODENAME=rabbit$i@$host rabbitmqctl -n rabbit$i@$host stop > /dev/null 2>&1 || true
    done
}
trap stop EXIT
for i in 1 2 3; do
    printf 'loopback_users = none\nlisteners.tcp.default = %s\n' $((5680 + i)) > "$root/$i/rabbitmq.conf"
    chown -R rabbitmq:rabbitmq "$root" 2>/dev/null || true
    RABBITMQ_NODENAME=rabbit$i@$host \
    RABBITMQ_NODE_PORT=$((5680 + i)) \
    RABBITMQ_DIST_PORT=$((25680 + i)) \
    RABBITMQ_MNESIA_BASE="$root/$i/mnesia" \
    RABBITMQ_LOG_BASE="$root/$i/log" \
    RABBITMQ_CONFIG_FILE="$root/$i/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$root/enabled_plugins" \
    RABBITMQ_PID_FILE="$root/$i/pid" \
        rabbitmq-server -detached
done

for i in 1 2 3; do
    rabbitmqctl -n rabbit$i@$host wait "$root/$i/pid" > /dev/null
done
for i in 2 3; do
    rabbitmqctl -n rabbit$i@$host stop_app > /dev/null
    rabbitmqctl -n rabbit$i@$host join_cluster rabbit1@$host > /dev/null
    rabbitmqctl -n rabbit$i@$host start_app > /dev/null
done
rabbitmqctl -n rabbit1@$host cluster_status | grep -A4 "Running Nodes"
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
