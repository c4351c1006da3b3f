# Sourced by the perf scripts: a fresh three-node wasmq cluster on
# loopback (AMQP 6672-6674, admin 16672-16674, links 26672-26674) from
# the broker binary given, in a temporary folder removed on exit.
#
#   source perf/cluster3.sh; start_cluster3 path/to/wasmq
#
# `[cluster] quiescent_quorum` is on (the default); WASMQ_QUIESCENT=0 turns
# it off on every node (groups on openraft's own heartbeats and timers).
#
# Sets `pids` (the three processes) and `root` (their folder).
source scripts/node-config.sh

# Sets `bin` and `perf_bin`: WASMQ_BIN and WASMQ_PERF_BIN, or the release
# builds (built here when either is not given).
release_bins() {
    bin=${WASMQ_BIN:-}
    perf_bin=${WASMQ_PERF_BIN:-}
    if [ -z "$bin" ] || [ -z "$perf_bin" ]; then
        cargo build --release -p wasmq -p wasmq-perf
        bin=${bin:-target/release/wasmq}
        perf_bin=${perf_bin:-target/release/wasmq-perf}
    fi
}

start_cluster3() {
    local bin=$1 i=0 node quiescent=true
    [ "${WASMQ_QUIESCENT:-1}" = 0 ] && quiescent=false
    root=$(mktemp -d)
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$root/secret"
    pids=()
    trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$root"' EXIT
    for node in a b c; do
        node_config "$root" "$node" "$i" 6672 "$root/$node/plugins" "quiescent_quorum = $quiescent"
        "$bin" serve --config "$root/$node/wasmq.toml" > "$root/$node.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
        sleep 1
    done
    # Three voters and a leader.
    local voters
    for _ in $(seq 1 60); do
        if curl -s -u guest:guest http://127.0.0.1:16672/api/cluster | grep -q '"leader":"'; then
            voters=$(curl -s -u guest:guest http://127.0.0.1:16672/api/cluster | grep -o '"voter":true' | wc -l)
            [ "$voters" = 3 ] && return 0
        fi
        sleep 1
    done
    echo "the cluster did not form" >&2
    return 1
}
