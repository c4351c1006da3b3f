# Sourced by perf/quorum_spread.sh and perf/rabbitmq_quorum_spread.sh: the
# one load both brokers get, so that their figures compare. 4 producers
# with confirms (200 outstanding each) and 4 consumers acking every 50,
# 1 KiB persistent messages, through one node: into one quorum queue,
# then spread over QUEUES, then spread with every leader on that node.
#
#   source perf/spread_load.sh; spread_load PERF_BIN URI QUEUES SECONDS
spread_load() {
    local perf_bin=$1 uri=$2 queues=$3 secs=$4
    run() {
        "$perf_bin" --uri "$uri" --quorum \
            --size 1024 --confirm 200 --persistent --prefetch 500 --multi-ack 50 \
            -x 4 -y 4 -z "$secs" "$@" | tail -1
    }
    echo "== one quorum queue"
    run --queues 1
    echo "== $queues quorum queues"
    run --queues "$queues"
    # Every leader on the node the load goes through: what forwarding to
    # other nodes' leaders costs the spread load.
    echo "== $queues quorum queues, x-queue-leader-locator = client-local"
    run --queues "$queues" --leader-locator client-local
}
