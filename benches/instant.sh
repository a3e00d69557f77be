#!/usr/bin/env bash
# Instant instances (issue 17), with real Node-RED and a release build, all in one run:
#   1. POST /instances -> first 200 of the instance's flow through the proxy: with the pool of
#      warm runtimes on (`--warm-runtimes 1`, waiting for the pool to refill between rounds),
#      with it off (`--warm-runtimes 0`), and Node-RED alone (`node red.js` spawned by hand
#      with the same flow, to its first 200);
#   2. wake -> first 200: an instance asleep (`sleep_after_s`), its next request timed;
#   3. memory of N instances (default 50): all awake; then all but 5 asleep; then those asleep
#      deleted. Memory is the RSS of tandem and of every Node-RED process it runs (replicas and
#      warm runtimes, found by their working directory under the data directory).
# Installs curl, jq, python3, nodejs and npm with apt-get when they are missing.
# Usage: ROUNDS=5 N=50 bash benches/instant.sh
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in curl jq python3; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi
ROUNDS=${ROUNDS:-5}
N=${N:-50}
AWAKE=${AWAKE:-5}
cargo build --release --quiet --bin tandem
BIN=${CARGO_TARGET_DIR:-target}/release/tandem
STACKS=${TANDEM_TEST_STACKS:-${TMPDIR:-/tmp}/tandem-test-stacks}/stacks
ROOT=$(mktemp -d /tmp/tandem-instant-XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$ROOT"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s%N; }
ms_since() { echo $(( ($(now) - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f", m}'; }
FLOWS='[{"id":"t1","type":"tab","label":"B"},{"id":"in","type":"http in","z":"t1","url":"/hello","method":"get","wires":[["fn"]]},{"id":"fn","type":"function","z":"t1","func":"msg.payload = \"hello\"; return msg;","wires":[["out"]]},{"id":"out","type":"http response","z":"t1","wires":[]}]'

# start NAME [serve flags...]: a tandem serve in its own data directory; sets A_<NAME>, P_<NAME>, D_<NAME>.
start() {
  local name=$1; shift
  local dir="$ROOT/$name" api http metrics
  api=$(port); http=$(port); metrics=$(port)
  mkdir -p "$dir"
  "$BIN" serve --data-dir "$dir" --api-listen 127.0.0.1:$api --http-listen 127.0.0.1:$http \
    --metrics-listen 127.0.0.1:$metrics --stacks-dir "$STACKS" --stop-replicas-on-exit "$@" \
    >"$dir/tandem.log" 2>&1 &
  PIDS+=($!)
  printf -v "PID_$name" '%s' $!
  until curl -sf "http://127.0.0.1:$api/healthz" >/dev/null; do sleep 0.05; done
  printf -v "A_$name" '%s' "http://127.0.0.1:$api/api/v1"
  printf -v "P_$name" '%s' "$http"
  printf -v "D_$name" '%s' "$dir"
}
# api NAME METHOD PATH [BODY]
api() {
  local base="A_$1" dir="D_$1"
  local h="Authorization: Bearer $(cat "${!dir}/admin-token")"
  if [ $# -ge 4 ]; then
    curl -s -X "$2" "${!base}$3" -H "$h" -H 'content-type: application/json' -d "$4"
  else
    curl -s -X "$2" "${!base}$3" -H "$h"
  fi
}
setup() { # NAME: team, application; sets APP_<NAME>, STACK_<NAME>
  local team app stack
  team=$(api "$1" POST /teams '{"name":"Bench"}' | jq -r .id)
  app=$(api "$1" POST /applications "{\"team_id\":\"$team\",\"name\":\"bench\"}" | jq -r .id)
  stack=$(api "$1" GET /stacks | jq -r '.items[0].id')
  printf -v "APP_$1" '%s' "$app"; printf -v "STACK_$1" '%s' "$stack"
}
create() { # NAME instance -> id
  local app="APP_$1" stack="STACK_$1"
  api "$1" POST /instances "{\"name\":\"$2\",\"application_id\":\"${!app}\",\"stack_id\":\"${!stack}\",\"flows\":$FLOWS}" | jq -r .id
}
code() { # NAME instance
  local p="P_$1"
  curl -s -o /dev/null -w '%{http_code}' -H "Host: $2.localhost" "http://127.0.0.1:${!p}/hello"
}
warm_ready() { # NAME: warm runtimes booted so far (log lines)
  local d="D_$1"; grep -c 'a warm runtime is ready' "${!d}/tandem.log" || true
}
state() { api "$1" GET "/instances/$2/status" | jq -r .observed.state; }
# Memory, MiB: tandem NAME's RSS plus that of every process working under its data directory.
memory() {
  local pid="PID_$1" d="D_$1"
  python3 - "${!pid}" "${!d}" <<'EOF'
import os, sys
pid, root = sys.argv[1], os.path.realpath(sys.argv[2])
def rss(p):
    try:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
total, n = rss(pid), 0
for p in os.listdir("/proc"):
    if not p.isdigit() or p == pid:
        continue
    try:
        cwd = os.path.realpath(os.readlink(f"/proc/{p}/cwd"))
    except OSError:
        continue
    if cwd.startswith(root + "/"):
        total += rss(p); n += 1
print(f"{total / 1024:.1f} {n}")
EOF
}

echo "== building and starting two tandem serve (pool on, pool off)"
start warm --warm-runtimes 1
start cold --warm-runtimes 0
setup warm; setup cold
# The stack installed and the pool warm before anything is measured.
for t in warm cold; do
  id=$(create $t prime); until [ "$(code $t prime)" = 200 ]; do sleep 0.1; done
  api $t DELETE "/instances/$id" >/dev/null
done
until [ "$(warm_ready warm)" -ge 1 ]; do sleep 0.1; done

echo "== 1. POST /instances -> first 200 ($ROUNDS rounds each)"
: >"$ROOT/t.warm"; : >"$ROOT/t.cold"; : >"$ROOT/t.raw"
RED=$(ls -d "$STACKS"/node-red-*/node_modules/node-red | head -1)
NODE=$(ls "$STACKS"/node-*/node_modules/node/bin/node 2>/dev/null | head -1 || true)
NODE=${NODE:-node}
for i in $(seq 1 "$ROUNDS"); do
  booted=$(warm_ready warm)
  t0=$(now); create warm "w$i" >/dev/null
  until [ "$(code warm w$i)" = 200 ]; do sleep 0.005; done
  ms_since "$t0" >>"$ROOT/t.warm"
  # The next round starts with the pool full again.
  until [ "$(warm_ready warm)" -gt "$booted" ]; do sleep 0.05; done

  t0=$(now); create cold "c$i" >/dev/null
  until [ "$(code cold c$i)" = 200 ]; do sleep 0.005; done
  ms_since "$t0" >>"$ROOT/t.cold"

  raw="$ROOT/raw$i"; mkdir -p "$raw"; rp=$(port)
  echo "$FLOWS" >"$raw/flows.json"
  echo "module.exports = { uiHost: '127.0.0.1', uiPort: $rp, flowFile: 'flows.json', credentialSecret: 'x', httpAdminRoot: '/admin' };" >"$raw/settings.js"
  t0=$(now)
  "$NODE" "$RED/red.js" --settings "$raw/settings.js" --userDir "$raw" >"$raw/out" 2>&1 &
  rpid=$!
  until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$rp/hello")" = 200 ]; do sleep 0.005; done
  ms_since "$t0" >>"$ROOT/t.raw"
  kill "$rpid"; wait "$rpid" 2>/dev/null || true
done
W=$(median <"$ROOT/t.warm"); C=$(median <"$ROOT/t.cold"); R=$(median <"$ROOT/t.raw")
echo "pool on  (ms): $(tr '\n' ' ' <"$ROOT/t.warm")-> median $W"
echo "pool off (ms): $(tr '\n' ' ' <"$ROOT/t.cold")-> median $C"
echo "Node-RED alone (ms): $(tr '\n' ' ' <"$ROOT/t.raw")-> median $R"
python3 -c "print(f'pool on vs Node-RED alone: {$W/$R:.2f}x; pool off vs Node-RED alone: {$C/$R:.2f}x')"

echo "== 2. wake -> first 200 ($ROUNDS rounds)"
: >"$ROOT/t.wake"
id=$(create warm napper); until [ "$(code warm napper)" = 200 ]; do sleep 0.05; done
api warm PUT "/instances/$id" '{"sleep_after_s": 1}' >/dev/null
for i in $(seq 1 "$ROUNDS"); do
  until [ "$(state warm "$id")" = sleeping ]; do sleep 0.1; done
  # The pool refilled since the last wake.
  sleep 2
  t0=$(now)
  c=$(code warm napper)
  ms_since "$t0" >>"$ROOT/t.wake"
  [ "$c" = 200 ] || { echo "wake answered $c"; exit 1; }
done
echo "wake (ms): $(tr '\n' ' ' <"$ROOT/t.wake")-> median $(median <"$ROOT/t.wake")"

echo "== 3. memory of $N instances: all awake, then $AWAKE awake and the rest asleep, then the rest deleted"
api warm DELETE "/instances/$id" >/dev/null
ids=()
# One after the other: 50 Node-RED booting at once on 2 cores would pass the ready timeout.
for i in $(seq 1 "$N"); do
  ids+=("$(create warm "m$i")")
  until [ "$(code warm m$i)" = 200 ]; do sleep 0.05; done
done
sleep 3
read -r all_awake procs_awake < <(memory warm)
for i in $(seq $((AWAKE + 1)) "$N"); do
  api warm PUT "/instances/${ids[$((i - 1))]}" '{"sleep_after_s": 1}' >/dev/null
done
for i in $(seq $((AWAKE + 1)) "$N"); do
  until [ "$(state warm "${ids[$((i - 1))]}")" = sleeping ]; do sleep 0.2; done
done
sleep 3
read -r some_asleep procs_asleep < <(memory warm)
for i in $(seq $((AWAKE + 1)) "$N"); do api warm DELETE "/instances/${ids[$((i - 1))]}" >/dev/null; done
sleep 3
read -r only_awake procs_only < <(memory warm)
asleep=$((N - AWAKE))
echo "$N awake: $all_awake MiB ($procs_awake Node-RED processes)"
echo "$AWAKE awake + $asleep asleep: $some_asleep MiB ($procs_asleep Node-RED processes)"
echo "$AWAKE awake, the $asleep deleted: $only_awake MiB ($procs_only Node-RED processes)"
python3 -c "print(f'saved by sleep: {($all_awake - $some_asleep) / $asleep:.1f} MiB per instance; a sleeping instance costs {($some_asleep - $only_awake) / $asleep * 1024:.0f} KiB')"
