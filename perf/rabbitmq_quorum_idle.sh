#!/usr/bin/env bash
# What idle quorum queues cost RabbitMQ, measured by the same lines as
# perf/quorum_idle.sh measures wasmq (perf/idle_cost.sh): three
# RabbitMQ nodes on loopback (perf/rabbitmq3.sh, Debian's
# rabbitmq-server), N quorum queues declared through node 1, then the
# CPU of the three Erlang VMs over a window with no traffic, their open
# files and their resident memory.
#
#   perf/rabbitmq_quorum_idle.sh [N] [SECONDS]      (defaults: 100 queues, 20 s)
#
# Needs rabbitmq-server (apt-get install rabbitmq-server) and pika
# (./scripts/test.sh installs it in target/pika-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
secs=${2:-20}
source perf/rabbitmq3.sh
start_rabbitmq3
dpkg-query -W -f 'RabbitMQ ${Version}\n' rabbitmq-server 2>/dev/null || true
source perf/idle_cost.sh
idle_cost 5681 "$n" "$secs" "${rabbit_pids[@]}"
