#!/usr/bin/env bash
# Instance benchmarks for `tandem serve` with real Node-RED (release build):
#   1. time from POST /instances to the first 200 through the proxy (median of ROUNDS);
#   2. time from SIGKILL of one replica of a 2-replica HA instance until a request is answered by
#      that replica again, i.e. it is back in rotation (median of ROUNDS);
#   3. memory Tandem itself adds per running instance: tandem's RSS with 0, 1, 10 and 30
#      instances running (Node-RED's own processes excluded).
# Needs curl, jq, python3, node and npm. Usage: ROUNDS=5 bash benches/instances.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
MAX=${MAX:-30}
cargo build --release --quiet --bin tandem
BIN=${CARGO_TARGET_DIR:-target}/release/tandem
DIR=$(mktemp -d /tmp/tandem-bench-XXXXXX)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
APIP=$(port); HTTPP=$(port); METRICSP=$(port)
A=http://127.0.0.1:$APIP/api/v1
STACKS=${TANDEM_TEST_STACKS:-${TMPDIR:-/tmp}/tandem-test-stacks}/stacks
"$BIN" serve --data-dir "$DIR" --api-listen 127.0.0.1:$APIP --http-listen 127.0.0.1:$HTTPP \
  --metrics-listen 127.0.0.1:$METRICSP --stacks-dir "$STACKS" --stop-replicas-on-exit --max-ha-replicas 8 >"$DIR/tandem.log" 2>&1 &
TANDEM=$!
trap 'kill $TANDEM 2>/dev/null; wait $TANDEM 2>/dev/null; rm -rf "$DIR"' EXIT
until curl -sf http://127.0.0.1:$APIP/healthz >/dev/null; do sleep 0.05; done
H="Authorization: Bearer $(cat "$DIR/admin-token")"; J='content-type: application/json'
TEAM=$(curl -s $A/teams -H "$H" -H "$J" -d '{"name":"Bench"}' | jq -r .id)
APP=$(curl -s $A/applications -H "$H" -H "$J" -d "{\"team_id\":\"$TEAM\",\"name\":\"bench\"}" | jq -r .id)
STACK=$(curl -s $A/stacks -H "$H" | jq -r '.items[0].id')
FLOWS='[{"id":"t1","type":"tab","label":"B"},{"id":"in","type":"http in","z":"t1","url":"/hello","method":"get","wires":[["out"]]},{"id":"out","type":"http response","z":"t1","wires":[]}]'
now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f", m}'; }
create() { # name [ha-json]
  local ha=${2:-null}
  curl -s $A/instances -H "$H" -H "$J" \
    -d "{\"name\":\"$1\",\"application_id\":\"$APP\",\"stack_id\":\"$STACK\",\"flows\":$FLOWS,\"ha\":$ha}" | jq -r .id
}
code() { curl -s -o /dev/null -w '%{http_code}' -H "Host: $1.localhost" "http://127.0.0.1:$HTTPP/hello"; }
rss_kib() { awk '/VmRSS/ {print $2}' /proc/$TANDEM/status; }

# Warm the stack install so it is not measured.
W=$(create warm); until [ "$(code warm)" = 200 ]; do sleep 0.1; done
curl -s -X DELETE $A/instances/$W -H "$H" >/dev/null

echo "== 1. POST /instances -> first 200 through the proxy ($ROUNDS rounds)"
: >"$DIR/first"
for i in $(seq 1 "$ROUNDS"); do
  t0=$(now); ID=$(create "first$i")
  until [ "$(code first$i)" = 200 ]; do sleep 0.01; done
  echo $(( ($(now) - t0) / 1000000 )) >>"$DIR/first"
  curl -s -X DELETE $A/instances/$ID -H "$H" >/dev/null
done
echo "ms: $(tr '\n' ' ' <"$DIR/first")-> median $(median <"$DIR/first") ms"

echo "== 2. SIGKILL a replica -> back in rotation ($ROUNDS rounds, a new instance each)"
: >"$DIR/back"
for i in $(seq 1 "$ROUNDS"); do
  # A fresh instance each round: kills in a row would count as a crash loop and back off longer.
  ID=$(create "killed$i" '{"replicas":2}')
  ready() { curl -s $A/instances/$ID/status -H "$H" | jq -r .observed.summary; }
  until [ "$(ready)" = "running 2/2" ]; do sleep 0.1; done
  PID=$(curl -s $A/instances/$ID/status -H "$H" | jq -r '.observed.replicas[1].pid')
  t0=$(now); kill -9 "$PID"
  # Back in rotation: a request answered by the killed replica's slot again.
  while :; do
    r=$(curl -s -D - -o /dev/null -H "Host: killed$i.localhost" "http://127.0.0.1:$HTTPP/hello" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-tandem-replica" {print $2}')
    if [ "$r" = "killed$i-r1" ]; then break; fi
    sleep 0.005
  done
  echo $(( ($(now) - t0) / 1000000 )) >>"$DIR/back"
  curl -s -X DELETE $A/instances/$ID -H "$H" >/dev/null
done
echo "ms: $(tr '\n' ' ' <"$DIR/back")-> median $(median <"$DIR/back") ms (the 1,000 ms restart backoff included)"
sleep 2

echo "== 3. tandem's own RSS with N instances running"
base=$(rss_kib); echo "0 instances: ${base} KiB"
n=0
for target in 1 10 "$MAX"; do
  while [ $n -lt "$target" ]; do n=$((n+1)); create "mem$n" >/dev/null; done
  for k in $(seq 1 $n); do until [ "$(code mem$k)" = 200 ]; do sleep 0.2; done; done
  # Some traffic and a status read per instance, so buffers and tables are in use.
  for k in $(seq 1 $n); do code "mem$k" >/dev/null; done
  sleep 2
  r=$(rss_kib)
  echo "$n instances: ${r} KiB (+$(( (r - base) / n )) KiB per instance)"
done
echo "Node-RED itself, per replica: $(ps -o rss= -C node-red | awk '{s+=$1; n++} END {printf "%.0f KiB (%d processes)", s/n, n}')"
# FlowFuse's local driver runs one Node.js launcher process per instance next to Node-RED. Its
# floor is an idle Node.js process; the launcher itself (HTTP server, log buffer) is larger.
node -e 'setInterval(() => {}, 1000)' & IDLE=$!
sleep 1
echo "an idle Node.js process (floor of a per-instance launcher): $(awk '/VmRSS/ {print $2}' /proc/$IDLE/status) KiB"
kill $IDLE
