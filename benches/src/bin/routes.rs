//! Route micro-benchmark: host lookup with 10 and 10,000 hosts, host normalization, and how
//! long a published route table takes to become visible to a reader.
//!
//! Run with `cargo run --release -p tandem-benches --bin routes` (also run at the end of
//! `benches/http.sh`). Plain `std::time`, no benchmark framework: each figure is the median of
//! several batches of many iterations; results go through `std::hint::black_box` so that the
//! optimizer cannot drop the work.
//!
//! There is no tokio runtime here, so [`Routes::publish`] starts no health probes: only the
//! table build and swap are measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tandem_proxy::routes::normalize_host;
use tandem_proxy::{InstanceSpec, ReplicaSpec, Routes};

/// Batches per measurement; the median batch is reported.
const BATCHES: usize = 11;
/// Operations per batch.
const OPS_PER_BATCH: usize = 2_000_000;
/// Publish trials per table size.
const PUBLISH_TRIALS: usize = 50;

fn main() {
    println!("## Route micro-benchmark");
    println!();
    println!(
        "median of {BATCHES} batches x {OPS_PER_BATCH} operations; publish: median of {PUBLISH_TRIALS} trials"
    );
    println!();

    let small = lookup_bench(10);
    let large = lookup_bench(10_000);
    println!("| operation | 10 hosts (ns/op) | 10,000 hosts (ns/op) | ratio 10,000/10 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| `RouteTable::lookup` (table already loaded) | {:.1} | {:.1} | {:.2} |",
        small.lookup,
        large.lookup,
        large.lookup / small.lookup
    );
    println!(
        "| `Routes::load()` + `lookup` (as per request) | {:.1} | {:.1} | {:.2} |",
        small.load_lookup,
        large.load_lookup,
        large.load_lookup / small.load_lookup
    );
    println!();

    let mixed = "Node-RED-042.Bench.Local:8080";
    let lower = "node-red-042.bench.local";
    println!("| operation | ns/op |");
    println!("|---|---:|");
    println!(
        "| `normalize_host({mixed:?})` (port, upper case: allocates) | {:.1} |",
        per_op(|i| {
            let h = normalize_host(black_box(mixed)).unwrap();
            black_box(h);
            i
        })
    );
    println!(
        "| `normalize_host({lower:?})` (already normal: borrows) | {:.1} |",
        per_op(|i| {
            let h = normalize_host(black_box(lower)).unwrap();
            black_box(h);
            i
        })
    );
    println!();

    println!("| hosts | publish (median) | publish (p90) | call to visible in reader (median) | call to visible (p90) | visible before publish returned |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for n in [10, 10_000] {
        let p = publish_bench(n);
        println!(
            "| {n} | {} | {} | {} | {} | {}/{} |",
            fmt(p.publish_median),
            fmt(p.publish_p90),
            fmt(p.visible_median),
            fmt(p.visible_p90),
            p.visible_before_return,
            PUBLISH_TRIALS
        );
    }
}

/// `n` instances, one host and one replica each, no active health checks.
fn specs(n: usize) -> Vec<InstanceSpec> {
    (0..n)
        .map(|i| InstanceSpec {
            certificate: None,
            asleep: false,
            editor_secret: None,
            http_auth: Default::default(),
            name: format!("inst-{i}"),
            hosts: vec![format!("inst-{i}.bench.local")],
            ha: false,
            affinity: false,
            hold: false,
            replicas: vec![ReplicaSpec {
                id: "r0".into(),
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 10_000 + (i % 50_000) as u16)),
                ready: true,
            }],
            health: None,
        })
        .collect()
}

struct Lookup {
    lookup: f64,
    load_lookup: f64,
}

fn lookup_bench(n: usize) -> Lookup {
    let routes = Routes::new();
    routes.publish(&specs(n)).unwrap();
    // The hosts as requests would carry them, normalized, visited in a scattered order.
    let hosts: Vec<String> = (0..n)
        .map(|i| {
            normalize_host(&format!("Inst-{}.Bench.Local:80", (i * 7919) % n))
                .unwrap()
                .into_owned()
        })
        .collect();
    let table = routes.load();
    for h in &hosts {
        assert!(table.lookup(h).is_some(), "{h} is not routed");
    }
    let lookup = per_op(|i| {
        let found = table.lookup(black_box(&hosts[i % n]));
        black_box(found);
        i
    });
    drop(table);
    let load_lookup = per_op(|i| {
        let table = routes.load();
        let found = table.lookup(black_box(&hosts[i % n])).cloned();
        black_box(found);
        i
    });
    Lookup {
        lookup,
        load_lookup,
    }
}

/// Nanoseconds per call of `op`: the median over [`BATCHES`] batches of [`OPS_PER_BATCH`].
fn per_op(mut op: impl FnMut(usize) -> usize) -> f64 {
    let mut batches: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let start = Instant::now();
            for i in 0..OPS_PER_BATCH {
                black_box(op(black_box(i)));
            }
            start.elapsed().as_nanos() as f64 / OPS_PER_BATCH as f64
        })
        .collect();
    median(&mut batches)
}

struct Publish {
    publish_median: Duration,
    publish_p90: Duration,
    visible_median: Duration,
    visible_p90: Duration,
    visible_before_return: usize,
}

/// A reader thread spins on `routes.load().generation()`; the main thread publishes a table of
/// `n` hosts and waits until the reader reports the new generation.
fn publish_bench(n: usize) -> Publish {
    let specs = specs(n);
    let routes = Arc::new(Routes::new());
    routes.publish(&specs).unwrap();

    // The generation the reader waits for (0: none), and where it reports when it saw it.
    let want = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen_tx, seen_rx) = mpsc::channel::<Instant>();
    let reader = {
        let routes = routes.clone();
        let want = want.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let w = want.load(Ordering::Acquire);
                if w != 0 && routes.load().generation() >= w {
                    let at = Instant::now();
                    want.store(0, Ordering::Release);
                    seen_tx.send(at).unwrap();
                }
                std::hint::spin_loop();
            }
        })
    };

    let mut publish = Vec::with_capacity(PUBLISH_TRIALS);
    let mut visible = Vec::with_capacity(PUBLISH_TRIALS);
    let mut before_return = 0;
    // Three warm-up trials, not counted.
    for trial in 0..PUBLISH_TRIALS + 3 {
        let next = routes.load().generation() + 1;
        want.store(next, Ordering::Release);
        // Let the reader be spinning on the old table when the swap happens.
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        let table = routes.publish(black_box(&specs)).unwrap();
        let returned = Instant::now();
        assert_eq!(table.generation(), next);
        drop(table);
        let seen = seen_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        if trial >= 3 {
            publish.push(returned - start);
            visible.push(seen.saturating_duration_since(start));
            if seen < returned {
                before_return += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();

    publish.sort();
    visible.sort();
    Publish {
        publish_median: publish[publish.len() / 2],
        publish_p90: publish[publish.len() * 9 / 10],
        visible_median: visible[visible.len() / 2],
        visible_p90: visible[visible.len() * 9 / 10],
        visible_before_return: before_return,
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}
