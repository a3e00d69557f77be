#!/usr/bin/env bash
# Memory of idle keep-alive client connections: `tandem proxy` against nginx, in one run.
#
# Each proxy forwards to the same nginx upstream (`return 200 'ok'`). In each round a fresh proxy
# process gets N clients that connect over about 3 s, as idle connections pile up in use: each
# sends one request, reads the answer and stays connected, idle. The proxy's RSS is read before
# the clients and 2 s after the last answer. Tandem's HTTP/1.1 core gives the buffers of a
# connection idle for 1 s back, and later connections reuse them. Prints KiB of RSS per
# connection and tandem's ratio to nginx.
#
#   N=2000 bash benches/idle.sh
#
# Knobs: N (default 2000 connections), ROUNDS (default 3; medians are printed).
set -euo pipefail

N=${N:-2000}
ROUNDS=${ROUNDS:-3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { echo "==> $*" >&2; }
die() {
    echo "idle.sh: error: $*" >&2
    exit 1
}

export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    "${sudo[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi
ulimit -n $((N * 2 + 1024)) 2>/dev/null || die "cannot raise the open-file limit to $((N * 2 + 1024))"

log "building tandem (release)"
(cd "$root" && cargo build --release -p tandem-controlplane --bin tandem)
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
TANDEM="$target_dir/release/tandem"

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port)
NGINX=$(port)
TANDEM_PORT=$(port)
METRICS=$(port)

nginx_conf() { # name, server block
    cat >"$tmp/$1.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $tmp/$1.pid;
error_log $tmp/$1.error.log warn;
events { worker_connections $((N * 2 + 512)); }
http {
    access_log off;
    keepalive_timeout 75s;
    client_body_temp_path $tmp/$1.body;
    proxy_temp_path $tmp/$1.proxy;
    fastcgi_temp_path $tmp/$1.fastcgi;
    uwsgi_temp_path $tmp/$1.uwsgi;
    scgi_temp_path $tmp/$1.scgi;
$2
}
EOF
}
nginx_conf upstream "    server { listen 127.0.0.1:$UP; location / { return 200 'ok'; } }"
nginx_conf nginx "    upstream backend { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX;
        location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
    }"
cat >"$tmp/routes.toml" <<EOF
[[instance]]
name = "bench"
hosts = ["bench.local"]
replicas = ["127.0.0.1:$UP"]
health_check = false
EOF

nginx -p "$tmp" -e "$tmp/upstream.error.log" -c "$tmp/upstream.conf" &
pids+=($!)

answers() { # port
    for _ in $(seq 1 100); do
        [ "$(curl -s -H 'Host: bench.local' "http://127.0.0.1:$1/" || true)" = ok ] && return 0
        sleep 0.1
    done
    die "nothing answers on $1"
}

# Starts a fresh `$1` (nginx or tandem) and sets PID and PORT.
start_proxy() {
    if [ "$1" = nginx ]; then
        nginx -p "$tmp" -e "$tmp/nginx.error.log" -c "$tmp/nginx.conf" >/dev/null 2>&1 &
        PORT=$NGINX
    else
        RUST_LOG=warn "$TANDEM" proxy --routes "$tmp/routes.toml" --listen "127.0.0.1:$TANDEM_PORT" \
            --metrics-listen "127.0.0.1:$METRICS" --threads 1 --access-log false >"$tmp/tandem.out" 2>&1 &
        PORT=$TANDEM_PORT
    fi
    PID=$!
    pids+=("$PID")
    answers "$PORT"
}

# The client: N connections, one request each (32 at a time), then idle; says "answered" and
# waits to be stopped.
cat >"$tmp/clients.py" <<'EOF'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def main():
    gate = asyncio.Semaphore(32)
    async def one(i):
        # Spread over about 3 s, as idle connections accumulate in use.
        await asyncio.sleep(3.0 * i / n)
        async with gate:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\nok"):
                chunk = await r.read(4096)
                if not chunk:
                    raise SystemExit("closed before the answer")
                data += chunk
            return r, w
    conns = await asyncio.gather(*(one(i) for i in range(n)))
    print("answered", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
EOF

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# One round: a fresh proxy, N clients; KiB of RSS per connection once all are idle.
round() { # nginx|tandem
    local before idle line
    start_proxy "$1"
    before=$(rss_kib "$PID")
    coproc CLIENTS { exec python3 "$tmp/clients.py" "$PORT" "$N"; }
    local client=$CLIENTS_PID
    read -r line <&"${CLIENTS[0]}" || die "the clients failed on port $PORT"
    [ "$line" = answered ] || die "the clients said $line"
    sleep 2
    idle=$(rss_kib "$PID")
    kill "$client" "$PID" 2>/dev/null || true
    wait "$client" "$PID" 2>/dev/null || true
    python3 -c "import sys; b,i,n=map(int,sys.argv[1:]); print(f'{(i-b)/n:.2f}')" "$before" "$idle" "$N"
}

log "$N idle keep-alive connections, $ROUNDS rounds; KiB of RSS per connection"
declare -A K
for r in $(seq 1 "$ROUNDS"); do
    for t in nginx tandem; do
        k=$(round "$t")
        K[$t]+="$k "
        printf '  round %s %-7s %8s KiB/conn\n' "$r" "$t" "$k" >&2
    done
done
python3 - "${K[nginx]}" "${K[tandem]}" <<'EOF'
import statistics, sys
n, t = (statistics.median(map(float, s.split())) for s in sys.argv[1:3])
print("| proxy | RSS per idle connection (KiB, median) |")
print("|---|---:|")
print(f"| nginx | {n:.2f} |")
print(f"| tandem | {t:.2f} |")
print(f"\ntandem vs nginx: {t / n:.2f}x" if n > 0 else "")
EOF
