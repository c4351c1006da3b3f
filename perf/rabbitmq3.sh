# Sourced by the RabbitMQ perf scripts: three RabbitMQ nodes on loopback
# from Debian's rabbitmq-server (AMQP on 5681-5683, state in
# /tmp/wasmq-rabbitmq, which the rabbitmq user the server runs as can
# write), clustered; stopped on exit. Its own service is not used:
# Debian's package starts it when installed, and it holds port 25672 (the
# link port of scripts/cluster.sh's first node) and 5672, so stop it first
# (`service rabbitmq-server stop`).
#
#   source perf/rabbitmq3.sh; start_rabbitmq3
#
# Sets `rabbit_pids` (the three Erlang VMs) and `host`.
start_rabbitmq3() {
    local root=/tmp/wasmq-rabbitmq i
    rm -rf "$root"
    mkdir -p "$root"/{1,2,3}
    host=$(hostname -s)
    : > "$root/enabled_plugins"
    trap stop_rabbitmq3 EXIT
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
    rabbit_pids=()
    for i in 1 2 3; do
        rabbit_pids+=("$(cat "$root/$i/pid")")
    done
}

stop_rabbitmq3() {
    local i p
    for i in 1 2 3; do
        RABBITMQ_NODENAME=rabbit$i@$host timeout 30 rabbitmqctl -n rabbit$i@$host stop > /dev/null 2>&1 || true
    done
    # A node with many queues may not stop in time: it must not go on
    # using the CPU the next measurement counts on.
    for p in "${rabbit_pids[@]:-}"; do
        [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
    done
}
