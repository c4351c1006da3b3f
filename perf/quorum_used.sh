#!/usr/bin/env bash
# What a quorum queue keeps once it has carried traffic, as opposed to one
# just declared: a fresh three-node cluster on loopback, N quorum queues
# declared and barely used, then SECONDS of confirmed 16-byte persistent
# messages from 4 producers through all of them (4 consumers), then the
# queues drained; the resident memory of the three processes at each step,
# what is still queued, and each node's live quorum log bytes once the
# idle groups have had time to compact (15 s).
#
#   perf/quorum_used.sh [N] [SECONDS]          (defaults: 100 queues, 20 s)
#
# WASMQ_BIN=path and WASMQ_PERF_BIN=path use built binaries instead of
# building the release ones.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
secs=${2:-20}
source perf/cluster3.sh
release_bins
start_cluster3 "$bin"
sleep 2
rss() {
    local t=0 p
    for p in "${pids[@]}"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done
    echo "$1: resident memory of the three nodes $((t / 1024)) MiB"
}
load() {
    "$perf_bin" --uri amqp://guest:guest@127.0.0.1:6672/%2f --quorum \
        --size 16 --prefetch 500 --multi-ack 50 --queues "$n" "$@" | tail -1
}
rss "no queues"
load --confirm 200 --persistent -x 2 -y 2 -z 1 -r 1 > /dev/null
sleep 5
rss "$n quorum queues, barely used"
load --keep --confirm 200 --persistent -x 4 -y 4 -z "$secs"
sleep 3
echo "== draining"
load --keep -x 0 -y 4 -z 15
sleep 15
for i in 0 1 2; do
    echo "node $i: $(curl -s -u guest:guest "http://127.0.0.1:$((16672 + i))/api/overview" | grep -o '"messages":[0-9]*') still queued," \
        "$(curl -s -u guest:guest "http://127.0.0.1:$((16672 + i))/metrics" | grep '^wasmq_quorum_log_live_bytes')"
done
rss "$n quorum queues, after traffic, drained"
