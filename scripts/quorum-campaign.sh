#!/usr/bin/env bash
# The long quorum-queue campaign: the checker of engine/tests/quorum_faults.rs
# with many faults (default 100), once with quiescent groups (the default)
# and once with groups on openraft's timers, then the replicated-stream
# checker under the same faults. Prints the seed, each fault
# and the checker's counts; WASMQ_FAULT_SEED=S replays a run. A test name
# after the count runs that one only (`100 quorum_queues_lose` for the
# default groups, `replicated_streams` for streams; WASMQ_QUIESCENT=0
# turns the quorum groups to timers).
#
#   ./scripts/quorum-campaign.sh [FAULTS] [TEST]
set -euo pipefail
cd "$(dirname "$0")/.."
export WASMQ_FAULTS="${1:-100}"
exec cargo test -p wasmq --test quorum_faults -- --nocapture "${@:2}"
