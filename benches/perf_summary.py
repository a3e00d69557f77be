#!/usr/bin/env python3
"""Summarizes `perf script --no-inline -F ip,sym,dso` output (call graphs) of one proxy process.

Each sample is charged to one bucket: kernel samples by the system call they are in, user-space
samples by the first frame, from the leaf up, that matches one of BUCKETS (tandem, its HTTP/1.1
core, hyper and tokio phases). With --us-per-req, shares are also converted to CPU microseconds per request.

    perf script -i perf.data --no-inline -F ip,sym,dso | python3 perf_summary.py --us-per-req 21
"""

import argparse
import collections
import re
import sys

# (bucket, regex on a frame's symbol); the first bucket matching a frame, leaf first, wins.
BUCKETS = [
    ("tandem core: access log line", r"tandem_proxy::access_log"),
    ("tandem core: httparse (request and response heads)", r"httparse::"),
    ("tandem core: request checks and the replica's request head (h1::prepare)", r"tandem_proxy::h1::prepare"),
    ("tandem core: the client's response head (h1::response_head)", r"tandem_proxy::h1::response_head"),
    ("tandem core: route lookup, balancing, counters",
     r"tandem_proxy::routes|tandem_proxy::balance|tandem_proxy::metrics|tandem_proxy::activity|tandem_proxy::health"),
    ("tandem core: connection loop, exchange, relay (h1::serve, exchange, ask, relay)", r"tandem_proxy::h1::"),
    ("tandem: strip_hop_by_hop (request and response)", r"tandem_proxy::proxy::strip_hop_by_hop"),
    ("tandem: upstream_request (X-Forwarded-*, Host, URI)", r"tandem_proxy::proxy::Proxy::upstream_request"),
    ("tandem: client_response", r"tandem_proxy::proxy::Proxy::client_response"),
    ("tandem: request_host / normalize_host", r"tandem_proxy::proxy::request_host|normalize_host"),
    ("tandem: pool take/put, body wrappers", r"tandem_proxy::pool::Pool|tandem_proxy::body"),
    ("hyper: parse request head (server side)", r"role::Server as hyper::proto::h1::Http1Transaction>::parse"),
    ("hyper: parse response head (client side)", r"role::Client as hyper::proto::h1::Http1Transaction>::parse"),
    ("hyper: encode response head (server side)", r"role::Server as hyper::proto::h1::Http1Transaction>::encode"),
    ("hyper: encode request head (client side)", r"role::Client as hyper::proto::h1::Http1Transaction>::encode"),
    ("hyper client: request/response hand-off to the connection task (mpsc, oneshot, want)",
     r"hyper::client::dispatch|tokio::sync::(mpsc|oneshot)|want::"),
    ("tandem: Proxy::handle, rest (clones, counters, Instant::now, drops)", r"tandem_proxy::proxy::Proxy::handle"),
    ("hyper: h1 buffers, read/write, dispatcher state", r"hyper::proto::h1|hyper::body|hyper::server|hyper::client"),
    ("tokio: timers (hyper header_read_timeout, tokio::time::timeout)", r"tokio::runtime::time|tokio::time"),
    ("tokio: I/O driver, task scheduling, wakers", r"tokio::|mio::"),
    ("nginx", r"^ngx_"),
    ("haproxy", r"haproxy"),
]
SYSCALL = re.compile(r"^__(?:x64|se|do)_sys_(\w+)")
ALLOC = re.compile(r"malloc|free|_int_|unlink_chunk|realloc|calloc|tcache")


def read_samples(stream):
    samples, cur = [], []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if cur:
                samples.append(cur)
                cur = []
            continue
        m = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", line)
        if m:
            cur.append((m[1], m[2]))
    if cur:
        samples.append(cur)
    return samples


def kernel_bucket(frames):
    names = [f for f, _ in frames]
    if any(f in ("do_writev", "vfs_writev", "tcp_sendmsg") for f in names):
        if any("softirq" in f for f in names):
            return "kernel: send (writev), delivering to the receiving socket in softirq (loopback)"
        return "kernel: send (writev), TCP transmit"
    for f in names:
        m = SYSCALL.match(f)
        if m:
            return {
                "writev": "kernel: send (writev), TCP transmit",
                "brk": "kernel: brk (heap grow/trim by malloc)",
            }.get(m[1], f"kernel: {m[1]}")
    if any("tcp_recvmsg" in f for f in names):
        return "kernel: recvfrom"
    if "do_syscall_64" in names or any("entry_SYSCALL" in f for f in names):
        return "kernel: system call entry/exit"
    return "kernel: other (interrupts, scheduling)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--us-per-req", type=float, default=None)
    ap.add_argument("--title", default="profile")
    args = ap.parse_args()
    samples = read_samples(sys.stdin)
    n = len(samples)
    if n == 0:
        sys.exit("perf_summary.py: no samples")
    kernel, user, leaf_kind, leaf_sym = (collections.Counter() for _ in range(4))
    inclusive = collections.Counter()
    for s in samples:
        leaf, dso = s[0]
        if "kernel" in dso:
            kernel[kernel_bucket(s)] += 1
            continue
        if "libc" in dso and ALLOC.search(leaf):
            kind = "malloc/free (libc)"
        elif re.search(r"mem(move|cpy|set|cmp)", leaf):
            kind = "memcpy/memmove/memset"
        elif "clock_gettime" in leaf:
            kind = "clock_gettime (vdso)"
        else:
            kind = "other code"
        leaf_kind[kind] += 1
        leaf_sym[leaf[:110]] += 1
        bucket = next(
            (name for f, _ in s for name, pat in BUCKETS if re.search(pat, f)), "other user space"
        )
        user[bucket] += 1
        for name, pat in [
            ("heap allocation (malloc/free/realloc)", r"malloc|free|realloc"),
            ("http::HeaderMap operations", r"http::header::map"),
            ("clock_gettime", r"clock_gettime"),
        ]:
            if any(re.search(pat, f) for f, _ in s):
                inclusive[name] += 1

    def show(counter, header):
        print(f"\n{header}\n")
        if args.us_per_req:
            print("| share of samples | ~us/request | where |")
            print("|---:|---:|---|")
        else:
            print("| share of samples | where |")
            print("|---:|---|")
        for k, v in counter.most_common():
            share = 100 * v / n
            if args.us_per_req:
                print(f"| {share:.1f}% | {args.us_per_req * v / n:.2f} | {k} |")
            else:
                print(f"| {share:.1f}% | {k} |")

    k_total, u_total = sum(kernel.values()), sum(user.values())
    print(f"### {args.title}: {n} samples, kernel {100 * k_total / n:.1f}%, user space {100 * u_total / n:.1f}%")
    show(kernel, "Kernel, by system call:")
    show(user, "User space, by phase (first matching frame from the leaf up):")
    show(leaf_kind, "User space, by kind of leaf function:")
    show(inclusive, "User space, inclusive (a sample counts if any frame matches):")
    top = collections.Counter(dict(leaf_sym.most_common(15)))
    show(top, "Top user-space leaf functions (self time):")


if __name__ == "__main__":
    main()
