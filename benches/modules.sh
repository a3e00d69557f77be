#!/usr/bin/env bash
# Modules benchmark (issue 12): builds tandem (release) and runs the `modules` binary against it
# with real npm and Node-RED: adding a module to an instance of 1 and 3 replicas, first install
# and cached, against `npm install` in each replica's own directory (FlowFuse's launcher); then
# the disk of 10 instances sharing one module set. ROUNDS (default 3, at most 5) rounds; MODULES
# (`name@version`, comma-separated) the modules. Needs npm and the npm registry.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tandem-controlplane --bin tandem
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p tandem-benches --bin modules -- "$target/release/tandem" "${ROUNDS:-3}"
