#!/usr/bin/env bash
# Deploy benchmark: builds tandem (release) and runs the `deploy` binary against it with real
# Node-RED replicas: in-place deploys versus restarts of every replica, 1, 3 and 5 replicas.
# ROUNDS (default 3, at most 5) rounds per size.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tandem-controlplane --bin tandem
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p tandem-benches --bin deploy -- "$target/release/tandem" "${ROUNDS:-3}"
