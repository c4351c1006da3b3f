#!/usr/bin/env bash
# A million scheduled messages: a release broker on 127.0.0.1:5690 with a
# fresh data directory, a durable x-delayed-message exchange (routing as
# direct) and the lapin-based wasmq-perf publishing N persistent 16-byte
# messages with confirms at RATE msg/s (four producers), each with the
# same x-delay, while consumers wait. The delay is longer than the
# publishing takes, so all N are scheduled at once before the first is
# due; they then come due at RATE, which the consumers keep up with, so
# the lateness measured is the scheduler's. (Unpaced, a million confirmed
# in 4 s come due faster than two consumers take them, and the lateness
# is the consumers' queue.)
#
# Prints the broker's peak RSS (sampled every 200 ms from /proc), its RSS
# with all N scheduled, and wasmq-perf's lateness percentiles (time past
# each message's due time, from publish to delivery minus the delay).
#
# Usage: perf/delayed.sh [MESSAGES] [DELAY_MS] [RATE]
#        (defaults 1000000 60000 50000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
delay=${2:-60000}
rate=${3:-50000}
cargo build --release -p wasmq -p wasmq-perf
dir=target/delayed-bench
rm -rf "$dir"
mkdir -p "$dir/plugins"
cat > "$dir/wasmq.toml" <<TOML
listen = "127.0.0.1:5690"
data_dir = "$dir/data"
plugin_dir = "$dir/plugins"
[admin]
enabled = false
TOML
target/release/wasmq serve --config "$dir/wasmq.toml" > "$dir/broker.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null' EXIT
sleep 2
rss() { awk '/VmRSS/ {print $2}' "/proc/$broker/status"; }
peak=0
( while kill -0 $broker 2>/dev/null; do
      r=$(rss); [ "$r" -gt "$peak" ] && peak=$r && echo "$peak" > "$dir/peak"
      sleep 0.2
  done ) &
sampler=$!
producers=4
secs=$(( delay / 1000 + n / rate + 15 ))
target/release/wasmq-perf --uri amqp://guest:guest@127.0.0.1:5690/%2f \
    --persistent --confirm 500 -x $producers -y 2 --multi-ack 100 --prefetch 1000 \
    --rate $(( rate / producers )) --pmessages $(( n / producers )) \
    --delay "$delay" -z "$secs" > "$dir/perf.log" &
perf=$!
# Sample the RSS when everything is published and nothing is due yet.
sleep $(( delay / 1000 - 2 ))
echo "RSS with $n scheduled: $(( $(rss) / 1024 )) MiB"
wait $perf
kill $sampler 2>/dev/null || true
grep summary "$dir/perf.log"
echo "peak RSS: $(( $(cat "$dir/peak") / 1024 )) MiB"
du -sh "$dir/data"
