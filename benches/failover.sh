#!/usr/bin/env bash
# Failover benchmark: builds tandem (release) and runs the `failover` binary against it with
# real Node-RED replicas. ROUNDS (default 3) rounds per scenario.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tandem-controlplane --bin tandem
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p tandem-benches --bin failover -- "$target/release/tandem" "${ROUNDS:-3}"
