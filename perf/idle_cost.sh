# Sourced by perf/quorum_idle.sh and perf/rabbitmq_quorum_idle.sh, so that
# wasmq and RabbitMQ are measured by the same lines: declare N quorum
# queues through the AMQP port given (pika, one at a time), let them
# settle, then with no traffic at all take the CPU the node processes
# use over a window, their open files and their resident memory.
#
#   idle_cost AMQP_PORT N SECONDS PID...
idle_cost() {
    local port=$1 n=$2 secs=$3
    shift 3
    local python=${WASMQ_PYTHON:-target/pika-venv/bin/python}
    local started declared ticks total=0 files=0 rss=0 p used
    started=$(date +%s.%N)
    "$python" - "$n" "$port" <<'PY'
import sys, pika
n, port = int(sys.argv[1]), int(sys.argv[2])
conn = pika.BlockingConnection(pika.ConnectionParameters(port=port))
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
    declare -A before
    for p in "$@"; do before[$p]=$(awk '{print $14 + $15}' "/proc/$p/stat"); done
    sleep "$secs"
    for p in "$@"; do
        used=$(( $(awk '{print $14 + $15}' "/proc/$p/stat") - before[$p] ))
        total=$((total + used))
        files=$((files + $(ls "/proc/$p/fd" | wc -l)))
        rss=$((rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status")))
    done
    awk -v t="$total" -v k="$ticks" -v s="$secs" \
        'BEGIN { printf "idle CPU of the three nodes over %d s: %.1f%% of a core\n", s, 100 * t / k / s }'
    echo "open files: $files; resident memory: $((rss / 1024)) MiB"
}
