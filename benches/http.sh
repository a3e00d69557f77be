#!/usr/bin/env bash
# HTTP proxy benchmark: direct upstream vs nginx vs HAProxy vs `tandem proxy`, measured in the
# same run, against the same upstream, with interleaved rounds. See benches/README.md.
#
#   bash benches/http.sh                      # DURATION=10 ROUNDS=3
#   DURATION=30 ROUNDS=5 bash benches/http.sh
#
# Environment:
#   DURATION      seconds per wrk run (default 10)
#   ROUNDS        interleaved rounds (default 3)
#   WARMUP        seconds of warm-up per target before round 1 (default 2)
#   CONNECTIONS   wrk connections (default 32)
#   ROUTES_BENCH  1 (default) runs the route micro-benchmark at the end; 0 skips it
#   KEEP_TMP      1 keeps the temporary directory (configs, logs, raw wrk output, perf data)
#   ACCESS_LOG    1 runs the proxies with their access logs on, as users run them: nginx's
#                 buffered to a file (`buffer=64k`), `tandem proxy`'s default (a JSON line per
#                 request on stderr, here a file). 0 (default): both off
#   PROFILE       1 profiles instead of benchmarking: user/system CPU per request of tandem and
#                 the nginx proxy, then `perf record` of each under the same wrk load, summarized
#                 by benches/perf_summary.py (perf is installed with apt if missing)
#   CALLGRAPH     perf call graphs in PROFILE mode: dwarf (default; the release binary has no
#                 frame pointers) or fp (`perf record -g`)
#
# Everything runs on 127.0.0.1 on ports picked at run time; configs, pid files, temp paths and
# logs live in a mktemp directory; every process started here is stopped on exit.
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-32}
ROUTES_BENCH=${ROUTES_BENCH:-1}
KEEP_TMP=${KEEP_TMP:-0}
PROFILE=${PROFILE:-0}
CALLGRAPH=${CALLGRAPH:-dwarf}
ACCESS_LOG=${ACCESS_LOG:-0}
HOST_HEADER="bench.local"
TARGETS=(direct nginx haproxy tandem)

die() {
    echo "http.sh: error: $*" >&2
    exit 1
}
log() { echo "==> $*" >&2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# --- tools -----------------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "$PROFILE" = 1 ]; then
    command -v perf >/dev/null 2>&1 || missing+=(linux-perf)
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi
for tool in wrk nginx haproxy curl python3 cargo getconf; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not available"
done
CLK_TCK=$(getconf CLK_TCK)

# --- build -----------------------------------------------------------------------------------
log "building tandem and the route micro-benchmark (release)"
(cd "$root" && cargo build --release -p tandem-controlplane --bin tandem)
if [ "$ROUTES_BENCH" = 1 ] && [ "$PROFILE" != 1 ]; then
    (cd "$root" && cargo build --release -p tandem-benches --bin routes)
fi
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
TANDEM="$target_dir/release/tandem"
tandem_rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$root" status --porcelain -- proxy controlplane coordinator Cargo.lock 2>/dev/null)" ]; then
    tandem_rev="$tandem_rev+uncommitted changes"
fi
[ -x "$TANDEM" ] || die "$TANDEM was not built"

# --- scratch directory and cleanup -----------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench.XXXXXX")
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        # Give each process a moment to exit, then force it.
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$KEEP_TMP" = 1 ]; then
        echo "http.sh: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$status"
}
trap cleanup EXIT
# Processes to stop on exit; ones that ended are taken off the list so that a reused pid is
# never signalled.
track() { pids+=("$1"); }
untrack() {
    local keep=() p
    for p in "${pids[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    pids=("${keep[@]}")
}
trap 'exit 130' INT
trap 'exit 143' TERM

# Free ports on 127.0.0.1, all distinct (each socket stays bound until all are chosen).
read -r UP_PORT NGINX_PORT HAPROXY_PORT TANDEM_PORT TANDEM_METRICS_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')

# --- configs ---------------------------------------------------------------------------------
nginx_v=$(nginx -V 2>&1)
# Temp paths of the modules compiled into this nginx, all moved under $tmp so that nothing
# under /var/lib/nginx is touched (a directive of a missing module would be an error).
nginx_temp_paths() {
    local name=$1 kind
    for kind in client-body fastcgi proxy scgi uwsgi; do
        if grep -q -- "--http-$kind-temp-path" <<<"$nginx_v"; then
            mkdir -p "$tmp/$name-temp/$kind"
            echo "    ${kind//-/_}_temp_path $tmp/$name-temp/$kind;"
        fi
    done
}

write_nginx_conf() { # name, http-block body
    local name=$1 body=$2
    cat >"$tmp/$name.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $tmp/$name.pid;
error_log $tmp/$name.error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
$(nginx_temp_paths "$name")
$body
}
EOF
}

write_nginx_conf upstream "
    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            return 200 'ok';
        }
    }"

write_nginx_conf nginx "
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
$([ "$ACCESS_LOG" != 1 ] || echo "        access_log $tmp/nginx.access.log combined buffer=64k;")
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
    }"

cat >"$tmp/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend upstream

backend upstream
    server u1 127.0.0.1:$UP_PORT
EOF

cat >"$tmp/routes.toml" <<EOF
[[instance]]
name = "bench"
hosts = ["$HOST_HEADER"]
replicas = ["127.0.0.1:$UP_PORT"]
health_check = false
EOF

# --- processes -------------------------------------------------------------------------------
start() { # name, command...
    local name=$1
    shift
    "$@" >"$tmp/$name.out" 2>&1 &
    local pid=$!
    track "$pid"
    printf -v "PID_$name" '%s' "$pid"
}

nginx -t -q -e "$tmp/upstream.error.log" -p "$tmp" -c "$tmp/upstream.conf" ||
    die "nginx rejects $tmp/upstream.conf"
nginx -t -q -e "$tmp/nginx.error.log" -p "$tmp" -c "$tmp/nginx.conf" ||
    die "nginx rejects $tmp/nginx.conf"
haproxy -c -q -f "$tmp/haproxy.cfg" || die "haproxy rejects $tmp/haproxy.cfg"

start upstream nginx -e "$tmp/upstream.error.log" -p "$tmp" -c "$tmp/upstream.conf"
start nginx nginx -e "$tmp/nginx.error.log" -p "$tmp" -c "$tmp/nginx.conf"
start haproxy haproxy -db -f "$tmp/haproxy.cfg"
if [ "$ACCESS_LOG" = 1 ]; then
    tandem_log=(env RUST_LOG=warn,tandem::access=info)
    tandem_access=true
else
    tandem_log=(env RUST_LOG=warn)
    tandem_access=false
fi
start tandem "${tandem_log[@]}" "$TANDEM" proxy --routes "$tmp/routes.toml" \
    --listen "127.0.0.1:$TANDEM_PORT" --metrics-listen "127.0.0.1:$TANDEM_METRICS_PORT" \
    --threads 1 --access-log "$tandem_access"

declare -A PORT=([direct]=$UP_PORT [nginx]=$NGINX_PORT [haproxy]=$HAPROXY_PORT [tandem]=$TANDEM_PORT)
# The process(es) whose CPU time is charged to each target.
declare -A CPU_PIDS=([direct]=$PID_upstream [nginx]=$PID_nginx [haproxy]=$PID_haproxy [tandem]=$PID_tandem)

# Each target must answer 200 with body "ok" before anything is measured.
check() { # target
    local t=$1 url="http://127.0.0.1:${PORT[$1]}/" code="" body=""
    for _ in $(seq 1 100); do
        code=$(curl -s -o "$tmp/check.$t" -w '%{http_code}' -H "Host: $HOST_HEADER" "$url" || true)
        body=$(cat "$tmp/check.$t" 2>/dev/null || true)
        if [ "$code" = 200 ] && [ "$body" = ok ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "http.sh: $t at $url answered status '$code' body '$body' (want 200 'ok'); its log:" >&2
    local name=$t
    [ "$t" = direct ] && name=upstream
    cat "$tmp/$name.out" "$tmp/$name.error.log" 2>/dev/null | tail -n 30 >&2 || true
    die "$t is not serving"
}
for t in "${TARGETS[@]}"; do
    check "$t"
    log "$t on 127.0.0.1:${PORT[$t]} answers 200 ok"
done

# --- measuring -------------------------------------------------------------------------------
ticks() { # pids... -> utime+stime in clock ticks, summed
    local sum=0 pid stat
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null || die "process $pid died (see $tmp/*.out)"
        stat=$(<"/proc/$pid/stat")
        stat=${stat##*) } # fields after "(comm) "; utime, stime are fields 14, 15 -> 12, 13 here
        read -r -a f <<<"$stat"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}

machine_jiffies() { # -> "busy total" over all CPUs, from the first line of /proc/stat
    awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

to_us() { # wrk latency such as 812.00us, 1.23ms, 2.00s -> microseconds
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); m = 1 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); m = 1000 }
        else if (v ~ /m$/) { sub(/m$/, "", v); m = 60000000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); m = 1000000 }
        else { exit 1 }
        printf "%.0f", v * m
    }'
}

# Runs wrk against a target; wrk's own CPU time goes to outfile.times (bash `times` of the
# subshell). wrk runs in the background and is waited for, so that a signal to this script
# stops it at once (the subshell forwards SIGTERM to wrk).
wrk_run() { # target seconds outfile
    (
        wrk -t1 -c"$CONNECTIONS" -d"$2"s --latency -H "Host: $HOST_HEADER" \
            "http://127.0.0.1:${PORT[$1]}/" >"$3" 2>&1 &
        child=$!
        trap 'kill "$child" 2>/dev/null; exit 143' TERM
        rc=0
        wait "$child" || rc=$?
        times >"$3.times"
        exit "$rc"
    ) &
    local job=$!
    track "$job"
    wait "$job" || die "wrk failed against $1: $(cat "$3")"
    untrack "$job"
}

wrk_ticks() { # outfile -> wrk's user+system time in clock ticks (children line of `times`)
    awk -v hz="$CLK_TCK" 'function sec(v, m) { m = v; sub(/m.*/, "", m); sub(/^[0-9]+m/, "", v); sub(/s$/, "", v); return m * 60 + v }
        NR == 2 { printf "%.0f", (sec($1) + sec($2)) * hz }' "$1.times"
}

results="$tmp/results.tsv"
printf 'round\ttarget\trps\tp50_us\tp99_us\trequests\tcpu_us_per_req\tupstream_cpu_us_per_req\tother_cpu_pct\terrors\n' >"$results"

measure() { # round target
    local r=$1 t=$2 out="$tmp/wrk.$1.$2.txt"
    local before up_before after up_after m_before m_after
    before=$(ticks ${CPU_PIDS[$t]})
    up_before=$(ticks "$PID_upstream")
    m_before=$(machine_jiffies)
    wrk_run "$t" "$DURATION" "$out"
    m_after=$(machine_jiffies)
    after=$(ticks ${CPU_PIDS[$t]})
    up_after=$(ticks "$PID_upstream")

    local rps requests p50 p99 non2xx sockerr
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    requests=$(awk '/ requests in / {print $1}' "$out")
    p50=$(awk '$1 == "50%" {print $2}' "$out")
    p99=$(awk '$1 == "99%" {print $2}' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    sockerr=$(awk '/Socket errors:/ {print}' "$out")
    [ -n "$rps" ] && [ -n "$requests" ] && [ -n "$p50" ] && [ -n "$p99" ] ||
        die "cannot parse wrk output for $t: $(cat "$out")"
    [ "$requests" -gt 0 ] || die "no request completed against $t"
    local errors=0
    [ -n "$non2xx" ] && errors=$non2xx
    if [ -n "$sockerr" ] || [ -n "$non2xx" ]; then
        echo "http.sh: warning: $t round $r: ${non2xx:+$non2xx non-2xx responses }$sockerr" >&2
    fi
    local cpu up_cpu
    cpu=$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')
    up_cpu=$(awk -v d=$((up_after - up_before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN {printf "%.2f", d / hz * 1e6 / n}')
    # CPU used by anything but wrk, the proxy and the upstream, in % of the whole machine: other
    # load on the machine makes the round less trustworthy.
    local ours=$((after - before + $(wrk_ticks "$out")))
    [ "$t" = direct ] || ours=$((ours + up_after - up_before))
    local busy
    busy=$(awk -v a="$m_before" -v b="$m_after" -v ours="$ours" 'BEGIN {
        split(a, x, " "); split(b, y, " "); o = 100 * (y[1] - x[1] - ours) / (y[2] - x[2])
        printf "%.0f", (o < 0 ? 0 : o) }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$rps" "$(to_us "$p50")" "$(to_us "$p99")" \
        "$requests" "$cpu" "$up_cpu" "$busy" "$errors" >>"$results"
    printf '  %-8s %10s req/s  p50 %8s  p99 %8s  proxy CPU %7s us/req  (upstream %s us/req, %s requests, other load %s%% of the machine)\n' \
        "$t" "$rps" "$p50" "$p99" "$cpu" "$up_cpu" "$requests" "$busy" >&2
}

log "warm-up: ${WARMUP}s per target"
for t in "${TARGETS[@]}"; do
    wrk_run "$t" "$WARMUP" "$tmp/wrk.warmup.$t.txt"
done

# --- profile mode ----------------------------------------------------------------------------
if [ "$PROFILE" = 1 ]; then
    perf record -q -e cpu-clock -o "$tmp/perf.probe.data" -- true >/dev/null 2>&1 ||
        die "perf record does not work here; profile with valgrind --tool=callgrind instead (see README)"
    echo "## Profile: wrk -t1 -c$CONNECTIONS -d${DURATION}s against each proxy; tandem $tandem_rev"
    echo
    echo "| proxy | req/s | user CPU (us/req) | system CPU (us/req) | total (us/req) |"
    echo "|---|---:|---:|---:|---:|"
    declare -A TOTAL_US
    for t in tandem nginx; do
        pid=${CPU_PIDS[$t]}
        read -r -a b <<<"$(cut -d')' -f2 "/proc/$pid/stat")"
        wrk_run "$t" "$DURATION" "$tmp/wrk.split.$t.txt"
        read -r -a a <<<"$(cut -d')' -f2 "/proc/$pid/stat")"
        n=$(awk '/ requests in / {print $1}' "$tmp/wrk.split.$t.txt")
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$tmp/wrk.split.$t.txt")
        # After "(comm)": field 12 is utime, 13 is stime (1-based: 14, 15 of /proc/<pid>/stat).
        read -r u sy tot < <(awk -v u=$((a[11] - b[11])) -v s=$((a[12] - b[12])) -v hz="$CLK_TCK" -v n="$n" \
            'BEGIN {printf "%.2f %.2f %.2f\n", u / hz * 1e6 / n, s / hz * 1e6 / n, (u + s) / hz * 1e6 / n}')
        TOTAL_US[$t]=$tot
        echo "| $t | $rps | $u | $sy | $tot |"
    done
    cg=(--call-graph dwarf,16384)
    [ "$CALLGRAPH" = fp ] && cg=(-g)
    for t in tandem nginx; do
        log "perf record ${cg[*]} of $t (pid ${CPU_PIDS[$t]}) under wrk"
        # perf starts 1 s into the wrk run and stops 1 s before its end.
        (
            sleep 1
            exec perf record -q -F 1999 "${cg[@]}" -p "${CPU_PIDS[$t]}" -o "$tmp/perf.$t.data" \
                -- sleep "$DURATION" >"$tmp/perf.$t.out" 2>&1
        ) &
        perf_job=$!
        track "$perf_job"
        wrk_run "$t" $((DURATION + 2)) "$tmp/wrk.perf.$t.txt"
        wait "$perf_job" || die "perf record failed for $t: $(cat "$tmp/perf.$t.out")"
        untrack "$perf_job"
        echo
        echo "wrk under perf: $(awk '/^Requests\/sec:/ {print $2}' "$tmp/wrk.perf.$t.txt") req/s"
        echo
        perf script -i "$tmp/perf.$t.data" --no-inline -F ip,sym,dso 2>/dev/null |
            python3 "$root/benches/perf_summary.py" --title "$t" --us-per-req "${TOTAL_US[$t]}"
        echo
        echo "Flat profile of $t, top 25 (perf report --no-children --sort dso,sym):"
        echo
        echo '```'
        perf report -i "$tmp/perf.$t.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null |
            awk '/^ +[0-9]/ && n++ < 25' | cut -c1-150
        echo '```'
    done
    exit 0
fi

log "measuring: $ROUNDS rounds x ${#TARGETS[@]} targets x ${DURATION}s, wrk -t1 -c$CONNECTIONS, CLK_TCK=$CLK_TCK"
n=${#TARGETS[@]}
for r in $(seq 1 "$ROUNDS"); do
    log "round $r"
    # Rotate the order each round so that no target always runs first or last.
    for i in $(seq 0 $((n - 1))); do
        measure "$r" "${TARGETS[$(((i + r - 1) % n))]}"
    done
done

# --- report ----------------------------------------------------------------------------------
echo
echo "## HTTP proxy benchmark"
echo
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency -H 'Host: $HOST_HEADER'; $ROUNDS interleaved rounds;" \
    "$(nproc) CPUs; tandem $tandem_rev, $(nginx -v 2>&1 | sed 's/.*version: //'), HAProxy $(haproxy -v | awk 'NR==1 {print $3}'), $(wrk -v 2>&1 | awk 'NR==1 {print $1, $2}')"
python3 - "$results" <<'EOF'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
targets = ["direct", "nginx", "haproxy", "tandem"]
num = ["rps", "p50_us", "p99_us", "cpu_us_per_req", "upstream_cpu_us_per_req", "other_cpu_pct"]
for r in rows:
    for k in num:
        r[k] = float(r[k])

def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"

print("\n### All rounds\n")
print("| round | target | req/s | p50 (us) | p99 (us) | proxy CPU (us/req) | upstream CPU (us/req) | other load | req/s vs nginx | CPU/req vs nginx |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for rnd in sorted({r["round"] for r in rows}, key=int):
    by = {r["target"]: r for r in rows if r["round"] == rnd}
    ng = by["nginx"]
    for t in targets:
        r = by[t]
        print(f"| {rnd} | {t} | {r['rps']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
              f"{r['cpu_us_per_req']:.2f} | {r['upstream_cpu_us_per_req']:.2f} | {r['other_cpu_pct']:.0f}% | "
              f"{ratio(r['rps'], ng['rps'])} | {ratio(r['cpu_us_per_req'], ng['cpu_us_per_req'])} |")

med = {t: {k: statistics.median(r[k] for r in rows if r["target"] == t) for k in num} for t in targets}
errors = {t: sum(int(r["errors"]) for r in rows if r["target"] == t) for t in targets}
print("\n### Summary (median over rounds)\n")
print("| target | req/s | p50 (us) | p99 (us) | proxy CPU (us/req) | upstream CPU (us/req) | other load | req/s vs nginx | CPU/req vs nginx | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
ng = med["nginx"]
for t in targets:
    m = med[t]
    print(f"| {t} | {m['rps']:.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} | {m['cpu_us_per_req']:.2f} | "
          f"{m['upstream_cpu_us_per_req']:.2f} | {m['other_cpu_pct']:.0f}% | {ratio(m['rps'], ng['rps'])} | "
          f"{ratio(m['cpu_us_per_req'], ng['cpu_us_per_req'])} | {errors[t]} |")
print("\n'direct' charges the upstream's own CPU as its proxy CPU. Ratios are of the medians."
      " 'other load': CPU used by processes other than wrk, the proxy and the upstream, in % of the machine.")
EOF

# --- route micro-benchmark -------------------------------------------------------------------
if [ "$ROUTES_BENCH" = 1 ]; then
    echo
    log "route micro-benchmark"
    (cd "$root" && cargo run --quiet --release -p tandem-benches --bin routes)
fi
