use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn routes_by_host_whatever_its_case_port_or_trailing_dot() {
    let a = Upstream::start("orders-0").await;
    let b = Upstream::start("billing-0").await;
    let proxy = TestProxy::start(
        &[
            instance("orders", &[a.addr]),
            instance("billing", &[b.addr]),
        ],
        test_config(),
    )
    .await;
    for host in [
        "orders.localhost",
        "ORDERS.localhost:8080",
        "orders.localhost.",
    ] {
        let r = get(proxy.addr, host, "/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "orders-0"), "{host}");
    }
    let r = get(proxy.addr, "billing.localhost", "/x").await.unwrap();
    assert_eq!(r.body, "billing-0");
    assert_eq!(r.header("x-tandem-replica"), Some("r0"));
}

#[tokio::test]
async fn balances_over_replicas_and_tags_the_answer() {
    let ups = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let proxy = TestProxy::start(&[instance("orders", &addrs)], test_config()).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..300 {
        let r = client.get("orders.localhost", "/").await.unwrap();
        assert_eq!(r.status, 200);
        // The replica header names the replica that answered.
        let replica = r.header("x-tandem-replica").unwrap().to_string();
        assert_eq!(format!("r{}", &r.body[1..]), replica);
        *counts.entry(r.body).or_default() += 1;
    }
    for u in &ups {
        let n = counts.get(&u.name).copied().unwrap_or(0);
        assert!(n > 50, "each replica gets a share: {counts:?}");
    }
}

#[tokio::test]
async fn a_slow_replica_gets_fewer_requests() {
    let ups = [Upstream::start("u0").await, Upstream::start("u1").await];
    let proxy = TestProxy::start(
        &[instance("orders", &[ups[0].addr, ups[1].addr])],
        test_config(),
    )
    .await;
    // Pin a few slow requests: whichever replica takes them is busy for 800 ms.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let addr = proxy.addr;
        slow.push(tokio::spawn(async move {
            get(addr, "orders.localhost", "/slow?ms=800").await.unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = [ups[0].hits(), ups[1].hits()];
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..40 {
        client.get("orders.localhost", "/").await.unwrap();
    }
    let got = [ups[0].hits() - before[0], ups[1].hits() - before[1]];
    let replies: Vec<_> = futures_util::future::join_all(slow).await;
    // With least in-flight, the slow requests spread 2/1 or 3/0; the quick ones then go where
    // fewer requests are pending. At least the busier replica must get fewer.
    let slow_on_0 = replies
        .iter()
        .filter(|r| r.as_ref().unwrap().body == "u0")
        .count();
    if slow_on_0 >= 2 {
        assert!(got[1] > got[0], "u0 is busier, u1 should get more: {got:?}");
    } else {
        assert!(got[0] > got[1], "u1 is busier, u0 should get more: {got:?}");
    }
}

#[tokio::test]
async fn replica_header_can_be_switched_off() {
    let a = Upstream::start("u0").await;
    let mut config = test_config();
    config.replica_header = false;
    let proxy = TestProxy::start(&[instance("orders", &[a.addr])], config).await;
    let r = get(proxy.addr, "orders.localhost", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.header("x-tandem-replica").is_none());
}

#[tokio::test]
async fn affinity_cookie_pins_a_client_to_its_replica() {
    let ups = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    ];
    let mut spec = instance("dash", &ups.iter().map(|u| u.addr).collect::<Vec<_>>());
    spec.affinity = true;
    let proxy = TestProxy::start(&[spec], test_config()).await;

    let mut seen = HashMap::new();
    for _ in 0..30 {
        // A new client: gets a cookie, and every later request with it lands on the same replica.
        let first = get(proxy.addr, "dash.localhost", "/").await.unwrap();
        let cookie = first
            .header("set-cookie")
            .expect("a new client gets a cookie")
            .to_string();
        assert!(
            cookie.starts_with("tandem_affinity=") && cookie.contains("HttpOnly"),
            "{cookie}"
        );
        let value = cookie.split(';').next().unwrap().to_string();
        let mut client = Client::connect(proxy.addr).await.unwrap();
        for _ in 0..5 {
            let mut r = req("GET", "dash.localhost", "/", "");
            r.headers_mut()
                .insert("cookie", format!("theme=dark; {value}").parse().unwrap());
            let again = client.send(r).await.unwrap();
            assert_eq!(
                again.body, first.body,
                "the cookie keeps the client on its replica"
            );
            assert!(
                again.header("set-cookie").is_none(),
                "a known client gets no new cookie"
            );
        }
        *seen.entry(first.body).or_insert(0) += 1;
    }
    assert!(
        seen.len() >= 2,
        "different clients land on different replicas: {seen:?}"
    );
}

/// Collects what the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_access_log_line_names_instance_and_replica() {
    // The access log follows the `tandem::access` target's filter, as `RUST_LOG` sets it.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("tandem::access=info")
        .with_writer(std::io::sink)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let captured = Captured::default();
    let ups = [Upstream::start("u0").await, Upstream::start("u1").await];
    let mut config = test_config();
    config.access_log = true;
    let routes = Arc::new(tandem_proxy::Routes::new());
    routes
        .publish(&[instance("orders", &[ups[0].addr, ups[1].addr])])
        .unwrap();
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let log =
        tandem_proxy::access_log::AccessLog::to_writer(captured.clone(), 1 << 20, dropped.clone());
    let proxy = TestProxy::start_from(routes, |routes, stats| {
        tandem_proxy::Proxy::new(routes, config, stats).with_access_log(log)
    })
    .await;
    let mut client = Client::connect(proxy.addr).await.unwrap();
    for _ in 0..20 {
        client.get("orders.localhost", "/path").await.unwrap();
    }
    get(proxy.addr, "nope.localhost", "/").await.unwrap();
    // The writer runs on a thread of its own: its lines come a moment later.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..200 {
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(lines.len(), 20, "one line per routed request: {lines:?}");
    for l in &lines {
        assert_eq!(
            (&l["target"], &l["instance"], &l["path"], &l["status"]),
            (
                &serde_json::json!("tandem::access"),
                &serde_json::json!("orders"),
                &serde_json::json!("/path"),
                &serde_json::json!(200)
            ),
            "{l}"
        );
        assert!(
            l["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{l}"
        );
    }
    let replicas: std::collections::BTreeSet<&str> =
        lines.iter().filter_map(|l| l["replica"].as_str()).collect();
    assert_eq!(replicas, ["r0", "r1"].into_iter().collect(), "{lines:?}");
    assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// A client whose replica leaves the rotation moves, gets a cookie for its new replica, and
/// stays there once the old one is back: a session broken once, not twice.
#[tokio::test]
async fn a_moved_client_stays_where_it_went() {
    let ups = [Upstream::start("u0").await, Upstream::start("u1").await];
    let mut spec = instance("dash", &[ups[0].addr, ups[1].addr]);
    spec.affinity = true;
    let proxy = TestProxy::start(&[spec.clone()], test_config()).await;
    let with = |cookie: &str| {
        let mut r = req("GET", "dash.localhost", "/", "");
        r.headers_mut().insert("cookie", cookie.parse().unwrap());
        send(proxy.addr, r)
    };
    let first = get(proxy.addr, "dash.localhost", "/").await.unwrap();
    let cookie = first
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let home = first.body.clone();
    let (home_slot, other_body) = if home == "u0" { (0, "u1") } else { (1, "u0") };
    assert_eq!(cookie, format!("tandem_affinity=r{home_slot}"));

    // Its replica leaves the rotation: it moves, and is told where it is now.
    let mut away = spec.clone();
    away.replicas[home_slot].ready = false;
    proxy.routes.publish(&[away]).unwrap();
    let moved = with(&cookie).await.unwrap();
    assert_eq!(moved.body, other_body);
    let new_cookie = moved
        .header("set-cookie")
        .expect("a cookie for its new replica");
    let new_cookie = new_cookie.split(';').next().unwrap().to_string();
    assert_eq!(new_cookie, format!("tandem_affinity=r{}", 1 - home_slot));

    // The old replica is back: the moved client stays where it went, with no new cookie.
    proxy.routes.publish(&[spec]).unwrap();
    for _ in 0..10 {
        let r = with(&new_cookie).await.unwrap();
        assert_eq!(r.body, other_body);
        assert!(r.header("set-cookie").is_none());
    }
    // And a client of the old replica is still its client.
    assert_eq!(with(&cookie).await.unwrap().body, home);
}
