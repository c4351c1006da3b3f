#!/usr/bin/env bash
# A replicated stream's costs on a fresh three-node cluster on loopback,
# through the raw probe of perf/stream.sh (wasmq-stream): N confirmed
# publishes of SIZE bytes (1,000 unconfirmed at most) through node a to a
# stream it declares (so it leads it: a confirm waits for a majority's
# sync), a replay from `first` and 20 attaches on node a, then the same
# replay and attaches on node c, a follower reading its own replica.
# Then the publishes again through node b, forwarded to the leader.
#
#   perf/stream_cluster.sh [MESSAGES] [SIZE]     (defaults 200000 16)
#
# WASMQ_BIN=path and WASMQ_PERF_BIN=path use built binaries instead of
# building the release ones (wasmq-stream is taken beside wasmq-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200000}
size=${2:-16}
source perf/cluster3.sh
release_bins
probe="$(dirname "$perf_bin")/wasmq-stream"
[ -x "$probe" ] || cargo build --release -p wasmq-perf --bin wasmq-stream
start_cluster3 "$bin"
sleep 2
echo "== publish through the leader's node (a), replay and attach there"
"$probe" --addr 127.0.0.1:6672 --queue replicated -n "$n" -s "$size"
echo "== replay and attach on a follower (c), from its own replica"
"$probe" --addr 127.0.0.1:6674 --queue replicated -n "$n" -s "$size" --skip-publish
echo "== publish through a follower (b): forwarded to the leader"
"$probe" --addr 127.0.0.1:6673 --queue replicated -n "$n" -s "$size" --attaches 0
