#!/usr/bin/env bash
# Tandem HA benchmark (issue 13): builds tandem (release) and runs the `cluster` binary against
# it: route-feed propagation to 1 and 8 standalone proxies (peer: a routes file, polled and
# SIGHUP), leader takeover after a SIGKILL on PostgreSQL (lease 5000 and 1500 ms), and failed
# requests across restarts of tandem serve through its own proxy and a standalone one, with real
# Node-RED. ROUNDS (default 3, at most 10) rounds of takeover and restart; CHANGES (default 100)
# route changes per proxy count. Needs Debian's postgresql. PARTS (default 123) picks the parts;
# KEEP_TMP=1 keeps data dirs and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tandem-controlplane --bin tandem
target="${CARGO_TARGET_DIR:-target}"
cargo run --release -p tandem-benches --bin cluster -- "$target/release/tandem" "${ROUNDS:-3}" "${CHANGES:-100}"
