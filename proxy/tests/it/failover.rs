use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_proxy::{HealthConfig, ProxyConfig};

use crate::support::*;

/// Runs `workers` keep-alive clients sending GETs until `stop`; returns (ok, failed, bodies).
async fn load(
    addr: std::net::SocketAddr,
    host: &'static str,
    workers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, Vec<String>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let ok = ok.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut client = Client::connect(addr).await.unwrap();
            while !*stop.borrow() {
                match client.get(host, "/").await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => {
                        failures.push(format!("client error: {e}"));
                        client = Client::connect(addr).await.unwrap();
                    }
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    (ok.load(Ordering::Relaxed), failures)
}

#[tokio::test]
async fn a_killed_replica_costs_no_request_and_comes_back() {
    let mut ups = [Upstream::start("u0").await, Upstream::start("u1").await];
    let proxy = TestProxy::start(
        &[instance("orders", &[ups[0].addr, ups[1].addr])],
        test_config(),
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loader = tokio::spawn(load(proxy.addr, "orders.localhost", 4, stop_rx));

    tokio::time::sleep(Duration::from_millis(300)).await;
    ups[1].kill();
    // Abort takes effect when the runtime next polls the server's tasks.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let killed_at = ups[1].hits();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(ups[1].hits(), killed_at);

    // Back on the same port: once its ejection ends it takes traffic again.
    ups[1].restart().await;
    let back = eventually(Duration::from_secs(5), || {
        let n = ups[1].hits();
        async move { n > killed_at + 10 }
    })
    .await;
    let _ = stop_tx.send(true);
    let (ok, failures) = loader.await.unwrap();
    assert!(failures.is_empty(), "no request fails: {failures:?}");
    assert!(ok > 200, "the load ran: {ok}");
    assert!(back, "the restarted replica is back in rotation");

    let m = proxy.metrics().await;
    assert!(
        m.contains(
            "tandem_proxy_upstream_connect_errors_total{instance=\"orders\",replica=\"r1\"}"
        ),
        "{m}"
    );
    assert!(
        !m.contains(
            "tandem_proxy_upstream_connect_errors_total{instance=\"orders\",replica=\"r1\"} 0\n"
        ),
        "connect errors are counted"
    );
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_replica_even_for_post() {
    let live = Upstream::start("live").await;
    let proxy = TestProxy::start(
        &[instance("orders", &[dead_addr(), live.addr])],
        test_config(),
    )
    .await;
    for i in 0..20 {
        let r = send(
            proxy.addr,
            req("POST", "orders.localhost", "/echo", format!("body {i}")),
        )
        .await
        .unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, format!("body {i}").as_str())
        );
    }
    let m = proxy.metrics().await;
    let retries = m
        .lines()
        .find(|l| l.starts_with("tandem_proxy_retries_total{instance=\"orders\"}"))
        .unwrap();
    assert!(!retries.ends_with(" 0"), "{retries}");
}

#[tokio::test]
async fn active_probes_take_a_failing_replica_out_and_bring_it_back() {
    let mut ups = [Upstream::start("u0").await, Upstream::start("u1").await];
    let mut spec = instance("orders", &[ups[0].addr, ups[1].addr]);
    spec.health = Some(HealthConfig {
        path: "/".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    });
    let proxy = TestProxy::start(&[spec], test_config()).await;
    let healthy_line = "tandem_proxy_replica_healthy{instance=\"orders\",replica=\"r1\"}";

    ups[1].kill();
    let out = eventually(Duration::from_secs(3), || {
        let p = &proxy;
        async move { p.metrics().await.contains(&format!("{healthy_line} 0")) }
    })
    .await;
    assert!(out, "probes mark the dead replica unhealthy");
    // While it is out, every request goes to u0, without any connect attempt to u1.
    let errors_before = connect_errors(&proxy).await;
    for _ in 0..20 {
        assert_eq!(
            get(proxy.addr, "orders.localhost", "/").await.unwrap().body,
            "u0"
        );
    }
    assert_eq!(connect_errors(&proxy).await, errors_before);

    ups[1].restart().await;
    let back = eventually(Duration::from_secs(3), || {
        let p = &proxy;
        async move { p.metrics().await.contains(&format!("{healthy_line} 1")) }
    })
    .await;
    assert!(back, "probes bring the replica back");
    let mut bodies = std::collections::HashSet::new();
    for _ in 0..40 {
        bodies.insert(get(proxy.addr, "orders.localhost", "/").await.unwrap().body);
    }
    assert!(bodies.contains("u1"));
}

async fn connect_errors(proxy: &TestProxy) -> u64 {
    proxy
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("tandem_proxy_upstream_connect_errors_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The owner of the routes hears of every replica the proxy takes out: an ejection after a
/// failed connect (once per ejection, however many requests failed), a failed probe, and a
/// probe that passes again.
#[tokio::test]
async fn the_owner_of_the_routes_hears_the_proxys_verdicts() {
    let up = Upstream::start("u0").await;
    let mut probed = Upstream::start("p1").await;
    // No probes: a dead replica is found by the requests that fail to connect to it.
    let ejected = instance("ejected", &[up.addr, dead_addr()]);
    let mut with_probes = instance("probed", &[up.addr, probed.addr]);
    with_probes.health = Some(HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(200),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        ..HealthConfig::default()
    });
    let routes = Arc::new(tandem_proxy::Routes::new());
    let mut verdicts = routes.verdicts();
    routes.publish(&[ejected, with_probes]).unwrap();
    let proxy = TestProxy::start_with(routes.clone(), test_config()).await;
    for _ in 0..10 {
        let r = get(proxy.addr, "ejected.localhost", "/").await.unwrap();
        assert_eq!(r.status, 200);
    }
    let v = next_verdict(&mut verdicts).await;
    assert_eq!(
        (&*v.instance, &*v.replica, v.healthy),
        ("ejected", "r1", false),
        "{v:?}"
    );
    assert!(v.reason.starts_with("connect failed"), "{v:?}");

    probed.kill();
    let v = next_verdict(&mut verdicts).await;
    assert_eq!(
        (&*v.instance, &*v.replica, v.healthy),
        ("probed", "r1", false),
        "{v:?}"
    );
    probed.restart().await;
    let v = next_verdict(&mut verdicts).await;
    assert_eq!(
        (&*v.instance, &*v.replica, v.healthy),
        ("probed", "r1", true),
        "{v:?}"
    );
    // The failed requests of one ejection made one verdict, not one each.
    assert!(verdicts.try_recv().is_err());
}

async fn next_verdict(
    verdicts: &mut tokio::sync::broadcast::Receiver<tandem_proxy::health::Verdict>,
) -> tandem_proxy::health::Verdict {
    tokio::time::timeout(Duration::from_secs(10), verdicts.recv())
        .await
        .expect("a verdict within 10 s")
        .expect("the feed")
}

/// An instance that expects a replica (a standby taking over, a deploy switching the active)
/// holds requests that find none ready, and sends them on as soon as one is; one that does not
/// answers 503 at once, and a hold ends in 503 after `hold_timeout`.
#[tokio::test]
async fn requests_wait_for_a_replica_an_instance_expects() {
    let up = Upstream::start("u0").await;
    let mut waiting = instance("orders", &[up.addr]);
    waiting.hold = true;
    waiting.replicas[0].ready = false;
    let mut plain = instance("plain", &[up.addr]);
    plain.replicas[0].ready = false;
    let config = ProxyConfig {
        hold_timeout: Duration::from_secs(3),
        ..test_config()
    };
    let proxy = TestProxy::start(&[waiting.clone(), plain.clone()], config).await;

    let r = get(proxy.addr, "plain.localhost", "/").await.unwrap();
    assert_eq!(r.status, 503);

    let held = tokio::spawn(get(proxy.addr, "orders.localhost", "/"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the request waits for a ready replica");
    let mut ready = waiting.clone();
    ready.replicas[0].ready = true;
    proxy.routes.publish(&[ready, plain]).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(1), held)
        .await
        .expect("sent on once a replica is ready")
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(up.hits(), 1);
    assert_eq!(
        proxy
            .metric("tandem_proxy_requests_held_total{instance=\"orders\"}")
            .await,
        Some(1.0)
    );

    // Nothing comes: 503 once the hold is over.
    proxy.routes.publish(&[waiting]).unwrap();
    let asked = std::time::Instant::now();
    let r = get(proxy.addr, "orders.localhost", "/").await.unwrap();
    assert_eq!(r.status, 503);
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
}
