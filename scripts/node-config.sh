# Sourced by scripts/cluster.sh and perf/cluster3.sh: the configuration
# of one node of a three-node loopback cluster.
#
#   node_config ROOT NODE I AMQP_BASE PLUGIN_DIR [EXTRA]
#
# writes ROOT/NODE/wasmq.toml for node NODE, the I-th (from 0): AMQP on
# AMQP_BASE+I, the admin API on AMQP_BASE+10000+I, links on
# AMQP_BASE+20000+I, seeded by the first node, the secret in
# ROOT/secret; EXTRA lines go in its [cluster] section.
node_config() {
    local root=$1 node=$2 i=$3 base=$4 plugins=$5 extra=${6:-} peers=""
    mkdir -p "$root/$node"
    [ "$i" != 0 ] && peers="\"127.0.0.1:$((base + 20000))\""
    cat > "$root/$node/wasmq.toml" <<TOML
listen = "127.0.0.1:$((base + i))"
data_dir = "$root/$node/data"
plugin_dir = "$plugins"

[admin]
listen = "127.0.0.1:$((base + 10000 + i))"

[cluster]
name = "$node"
listen = "127.0.0.1:$((base + 20000 + i))"
peers = [$peers]
secret_file = "$root/secret"
$extra
TOML
}
