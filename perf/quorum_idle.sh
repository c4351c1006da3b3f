#!/usr/bin/env bash
# What idle quorum queues cost: a fresh three-node cluster on loopback,
# N quorum queues declared through node a, then, with no traffic at all,
# the CPU the three processes use over a window, their open files and
# their resident memory. The issue's RabbitMQ figures were taken the same
# way (declare, then idle CPU of all three nodes over 20 s).
#
#   perf/quorum_idle.sh [N] [SECONDS]          (defaults: 100 queues, 20 s)
#
# WASMQ_BIN=path uses a built broker instead of building the release one.
# Needs pika (./scripts/test.sh installs it in target/pika-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100}
secs=${2:-20}
bin=${WASMQ_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -p wasmq
    bin=target/release/wasmq
fi
python=${WASMQ_PYTHON:-target/pika-venv/bin/python}
source perf/cluster3.sh
start_cluster3 "$bin"
started=$(date +%s.%N)
"$python" - "$n" <<'PY'
import sys, pika
n = int(sys.argv[1])
conn = pika.BlockingConnection(pika.ConnectionParameters(port=6672))
ch = conn.channel()
for i in range(n):
    ch.queue_declare(queue=f"idle-{i}", durable=True, arguments={"x-queue-type": "quorum"})
conn.close()
PY
declared=$(date +%s.%N)
awk -v a="$started" -v b="$declared" -v n="$n" \
    'BEGIN { printf "declared %d quorum queues in %.1f s (%.1f ms each)\n", n, b - a, (b - a) * 1000 / n }'
# Let elections and first snapshots settle before measuring.
sleep 5
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A before
for p in "${pids[@]}"; do before[$p]=$(cpu "$p"); done
sleep "$secs"
total=0
files=0
rss=0
for p in "${pids[@]}"; do
    used=$(( $(cpu "$p") - before[$p] ))
    total=$((total + used))
    files=$((files + $(ls "/proc/$p/fd" | wc -l)))
    rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
done
awk -v t="$total" -v k="$ticks" -v s="$secs" \
    'BEGIN { printf "idle CPU of the three nodes over %d s: %.1f%% of a core\n", s, 100 * t / k / s }'
echo "open files: $files; resident memory: $((rss / 1024)) MiB"
