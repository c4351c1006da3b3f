#!/usr/bin/env bash
# A stream's costs, wasmq beside RabbitMQ, through the same raw AMQP probe
# (wasmq-stream): N confirmed publishes of SIZE bytes to a fresh stream
# (1,000 unconfirmed at most), a replay of all of it from `first`
# (prefetch 2,000, acks with `multiple`), and 20 attaches at offsets
# spread over it (basic.consume to first delivery). Prints each broker's
# figures and wasmq's peak RSS over the run and its RSS after the replay.
#
# wasmq: a release build on 127.0.0.1:5691 with a fresh data directory.
# RabbitMQ: Debian's rabbitmq-server, one node on 127.0.0.1:5692 with its
# state in /tmp/wasmq-rabbitmq-stream (skipped when it is not installed;
# `apt-get install rabbitmq-server`, and stop its own service, which
# holds 5672).
#
# Usage: perf/stream.sh [MESSAGES] [SIZE]   (defaults 1000000 16)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
size=${2:-16}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p wasmq -p wasmq-perf --bin wasmq --bin wasmq-stream
dir=target/stream-bench
rm -rf "$dir"
mkdir -p "$dir/plugins"
cat > "$dir/wasmq.toml" <<TOML
listen = "127.0.0.1:5691"
data_dir = "$dir/data"
plugin_dir = "$dir/plugins"
[admin]
enabled = false
TOML
"$target/release/wasmq" serve --config "$dir/wasmq.toml" > "$dir/broker.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
sleep 1
rss() { awk '/VmRSS/ {print $2}' "/proc/$broker/status"; }
( peak=0; while kill -0 $broker 2>/dev/null; do
      r=$(rss 2>/dev/null || echo 0); [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" > "$dir/peak"
      sleep 0.2
  done ) &
echo "== wasmq"
"$target/release/wasmq-stream" --addr 127.0.0.1:5691 -n "$n" -s "$size"
echo "RSS after the replay: $(( $(rss) / 1024 )) MiB; peak $(( $(cat "$dir/peak") / 1024 )) MiB; on disk $(du -sh "$dir/data" | cut -f1)"
kill $broker
wait $broker 2>/dev/null || true

command -v rabbitmq-server > /dev/null || { echo "rabbitmq-server not installed: RabbitMQ skipped"; exit 0; }
echo "== RabbitMQ $(rabbitmqctl version 2>/dev/null)"
root=/tmp/wasmq-rabbitmq-stream
host=$(hostname -s)
rm -rf "$root"
mkdir -p "$root"
: > "$root/enabled_plugins"
printf 'loopback_users = none\nlisteners.tcp.default = 5692\n' > "$root/rabbitmq.conf"
chown -R rabbitmq:rabbitmq "$root" 2>/dev/null || true
export RABBITMQ_NODENAME=streambench@$host RABBITMQ_NODE_PORT=5692 RABBITMQ_DIST_PORT=25692 \
    RABBITMQ_MNESIA_BASE="$root/mnesia" RABBITMQ_LOG_BASE="$root/log" \
    RABBITMQ_CONFIG_FILE="$root/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$root/enabled_plugins" \
    RABBITMQ_PID_FILE="$root/pid"
rabbitmq-server -detached
trap 'rabbitmqctl -n streambench@$host stop > /dev/null 2>&1 || true' EXIT
rabbitmqctl -n "streambench@$host" wait "$root/pid" > /dev/null
"$target/release/wasmq-stream" --addr 127.0.0.1:5692 -n "$n" -s "$size"
