#!/usr/bin/env bash
# The long quorum-queue campaign: the checker of engine/tests/quorum_faults.rs
# with many faults (default 100). Prints the seed, each fault and the
# checker's counts; WASMQ_FAULT_SEED=S replays a run.
#
#   ./scripts/quorum-campaign.sh [FAULTS]
set -euo pipefail
cd "$(dirname "$0")/.."
export WASMQ_FAULTS="${1:-100}"
exec cargo test -p wasmq --test quorum_faults -- --nocapture
