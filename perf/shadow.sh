#!/usr/bin/env bash
# The serving path's latency while a candidate shadows it.
#
# A scaffolded router (equal keys, like `direct`) serves an exchange; the
# candidate is the same crate built again with a marker section, so it
# decides the same and every comparison agrees. wasmq-ping publishes through
# the exchange at a fixed rate, alternating runs without a candidate and
# with one shadowing one message in SAMPLE, and prints each run's latency
# summary and the shadow's counts.
#
#   perf/shadow.sh [ROUNDS] [SAMPLE] [RATE] [MODE]   (defaults 3, 10, 10000, shadow)
#
# MODE canary stages the candidate as a canary for 0.01% of keys instead:
# the staged publish path without the comparison thread.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SAMPLE=${2:-10}
RATE=${3:-10000}
MODE=${4:-shadow}
cargo build --release -q -p wasmq -p wasmq-perf
BIN=$PWD/target/release/wasmq
PING=$PWD/target/release/wasmq-ping
work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$BIN" plugin new shadowed --role router --dir "$work/shadowed" >/dev/null
"$BIN" plugin build "$work/shadowed" >/dev/null 2>&1
mkdir "$work/plugins"
cp "$work/shadowed/target/wasmq/shadowed.wasm" "$work/plugins/"
cat >>"$work/shadowed/src/lib.rs" <<'EOF'

// Another build of the same decisions: only this section differs.
#[used]
#[unsafe(link_section = "wasmq-bench-mark")]
static MARK: [u8; 2] = *b"v2";
EOF
"$BIN" plugin build "$work/shadowed" >/dev/null 2>&1
candidate="$work/candidate.wasm"
cp "$work/shadowed/target/wasmq/shadowed.wasm" "$candidate"
cmp -s "$candidate" "$work/plugins/shadowed.wasm" && { echo "the candidate build is the same file"; exit 1; }

export WASMQ_ADMIN_URL=http://127.0.0.1:15699
"$BIN" serve --listen 127.0.0.1:5699 --admin-listen 127.0.0.1:15699 \
    --data-dir "$work/data" --plugin-dir "$work/plugins" >"$work/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    (echo >/dev/tcp/127.0.0.1/5699) 2>/dev/null && break
    sleep 0.1
done
ping() {
    "$PING" --addr 127.0.0.1:5699 --exchange-type shadowed --rate "$RATE" -z "$1" | tail -1
}
ping 3 >/dev/null # declares the exchange; warms up
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round, no candidate:        $(ping 10)"
    if [ "$MODE" = canary ]; then
        "$BIN" plugin canary shadowed "$candidate" --percent 0.01 \
            --promote-after-messages 1000000000 >/dev/null
        echo "round $round, canary 0.01%:        $(ping 10)"
    else
        "$BIN" plugin shadow shadowed "$candidate" --sample "$SAMPLE" >/dev/null
        echo "round $round, shadow 1 in $SAMPLE:  $(ping 10)"
    fi
    "$BIN" plugins | grep -E "compared|candidate" | sed 's/^ */    /'
    "$BIN" plugin abort shadowed >/dev/null
done
