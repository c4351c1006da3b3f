#!/usr/bin/env bash
# The Redis front end beside Debian's redis-server, the same load for each
# (issue 32's figures, in docs/performance.md):
#
#   * LPUSH + RPOP pipelined (redis-benchmark -P 16), wasmq with its store
#     on (a reply means on disk), redis-server with `appendfsync always`
#     and with persistence off;
#   * PUBLISH to 100 subscribers (wasmq-resp fanout): deliveries per second;
#   * 10,000 idle connections (wasmq-resp idle): the server's memory.
#
#   perf/redis.sh [path/to/wasmq] [requests]
#
# Needs redis-server and redis-benchmark (Debian's redis-server and
# redis-tools); builds wasmq-resp in release if it is not built.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/rel/release/wasmq}
n=${2:-200000}
resp=target/rel/release/wasmq-resp
[ -x "$resp" ] || CARGO_TARGET_DIR="$PWD/target/rel" cargo build --release -p wasmq-perf --bin wasmq-resp
root=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$root"' EXIT
ulimit -n 65536 || true

mkdir -p "$root/always" "$root/off"
redis-server --port 7001 --dir "$root/always" --appendonly yes --appendfsync always --save '' --daemonize no > "$root/always.log" 2>&1 &
pids+=($!)
redis-server --port 7002 --dir "$root/off" --appendonly no --save '' --daemonize no > "$root/off.log" 2>&1 &
pids+=($!)
"$bin" serve --data-dir "$root/wasmq" --plugin-dir "$root/plugins" --listen 127.0.0.1:7010 \
    --listen-redis 127.0.0.1:7003 --admin-listen 127.0.0.1:7011 > "$root/wasmq.log" 2>&1 &
wasmq_pid=$!
pids+=($wasmq_pid)
# The same with group-commit rounds at most 0.5 ms apart (2 ms by default:
# fewer rounds cost less CPU at low rates, and bound a pipeline's rate).
printf '[store]\ngroup_commit_interval_us = 500\n' > "$root/paced.toml"
"$bin" serve --config "$root/paced.toml" --data-dir "$root/wasmq500" --plugin-dir "$root/plugins" --listen 127.0.0.1:7020 \
    --listen-redis 127.0.0.1:7004 --admin-listen 127.0.0.1:7021 > "$root/wasmq500.log" 2>&1 &
pids+=($!)
sleep 3

bench() { # name port [auth...]
    local name=$1 port=$2
    shift 2
    printf '%-34s' "$name"
    redis-benchmark -p "$port" "$@" -n "$n" -c 50 -P 16 -t lpush,rpop -q 2>/dev/null \
        | tr '\r' '\n' | grep -E '^(LPUSH|RPOP)' | grep 'requests per second' \
        | sed -E 's/: rps=.*//; s/ requests per second.*//' | tr '\n' ' '
    echo
}
echo "LPUSH + RPOP, $n requests, 50 clients, -P 16 (requests per second)"
bench "redis-server appendfsync always" 7001
bench "redis-server no persistence" 7002
bench "wasmq (on disk before each reply)" 7003 --user guest -a guest
bench "wasmq, commit rounds 0.5 ms apart" 7004 --user guest -a guest

echo
echo "PUBLISH to 100 subscribers"
for target in "redis-server:7002:" "wasmq:7003:--auth guest:guest"; do
    IFS=: read -r name port auth <<< "$target"
    printf '%-14s' "$name"
    # shellcheck disable=SC2086
    "$resp" --port "$port" ${auth:+--auth guest:guest} fanout --subscribers 100 --publishers 2 --seconds 5
done

echo
echo "10,000 idle connections"
printf '%-14s' "redis-server"
"$resp" --port 7002 idle --connections 10000 --pid "${pids[1]}"
printf '%-14s' "wasmq"
"$resp" --port 7003 --auth guest:guest idle --connections 10000 --pid "$wasmq_pid"
