//! Sleeping instances at the proxy (issue 17): a request to one asks the waker and waits for a
//! replica, then is answered; the instance's use (last request, open WebSockets, requests in
//! flight) is what the sleeper reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use tandem_proxy::{InstanceSpec, Proxy, Routes};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A waker that records who it was asked for and, like the control plane, starts the instance:
/// publishes `awake` a moment later.
struct TestWaker {
    asked: Mutex<Vec<String>>,
    routes: Arc<Routes>,
    awake: InstanceSpec,
}

impl tandem_proxy::activity::Waker for TestWaker {
    fn wake(&self, instance: &str) {
        self.asked.lock().unwrap().push(instance.to_owned());
        let (routes, awake) = (self.routes.clone(), self.awake.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            routes.publish(&[awake]).unwrap();
        });
    }
}

fn asleep(spec: &InstanceSpec) -> InstanceSpec {
    InstanceSpec {
        asleep: true,
        hold: true,
        replicas: Vec::new(),
        ..spec.clone()
    }
}

#[tokio::test]
async fn a_request_to_a_sleeping_instance_wakes_it_and_is_answered() {
    let up = Upstream::start("napper-r0").await;
    let awake = instance("napper", &[up.addr]);
    let (_routes, waker, proxy) = asleep_behind_a_proxy(awake).await;
    let r = get(proxy.addr, "napper.localhost", "/").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "napper-r0"));
    assert_eq!(*waker.asked.lock().unwrap(), ["napper"]);
    assert_eq!(
        proxy
            .metric("tandem_proxy_wakes_total{instance=\"napper\"}")
            .await,
        Some(1.0)
    );
    // Awake now: no more wake-ups.
    let r = get(proxy.addr, "napper.localhost", "/").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(waker.asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn without_a_waker_a_sleeping_instance_answers_503_after_the_hold() {
    let routes = Arc::new(Routes::new());
    routes
        .publish(&[asleep(&instance("napper", &[dead_addr()]))])
        .unwrap();
    let mut config = test_config();
    config.hold_timeout = Duration::from_millis(200);
    let proxy = TestProxy::start_with(routes, config).await;
    let r = get(proxy.addr, "napper.localhost", "/").await.unwrap();
    assert_eq!(r.status, 503);
}

#[tokio::test]
async fn the_use_of_an_instance_is_its_last_request_its_websockets_and_its_requests_in_flight() {
    let ws = WsEcho::start().await;
    let proxy = TestProxy::start(&[instance("napper", &[ws.addr])], test_config()).await;
    let table = proxy.routes.snapshot();
    let napper = table.lookup("napper.localhost").unwrap().clone();
    let before = napper.activity();
    assert_eq!(
        (before.last_request_ms, before.tunnels, before.in_flight),
        (0, 0, 0)
    );
    assert!(before.is_quiet());

    let mut request = format!("ws://{}/ws", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "napper.localhost".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            napper.activity().tunnels == 1
        })
        .await,
        "{:?}",
        napper.activity()
    );
    let open = napper.activity();
    assert!(open.last_request_ms > 0 && !open.is_quiet(), "{open:?}");

    drop(socket);
    assert!(
        eventually(Duration::from_secs(5), || async {
            napper.activity().tunnels == 0
        })
        .await,
        "{:?}",
        napper.activity()
    );
    assert!(napper.activity().is_quiet());
}

#[tokio::test]
async fn a_request_refused_at_the_proxy_does_not_wake_a_sleeping_instance() {
    let up = Upstream::start("napper-r0").await;
    let mut awake = instance("napper", &[up.addr]);
    // Its endpoints need a token, and no gate here accepts any: every request is refused 401.
    awake.http_auth = tandem_proxy::HttpAuth::Tokens;
    let (routes, waker, proxy) = asleep_behind_a_proxy(awake).await;
    let r = get(proxy.addr, "napper.localhost", "/").await.unwrap();
    assert_eq!(r.status, 401);
    assert!(waker.asked.lock().unwrap().is_empty());
    let table = routes.snapshot();
    let napper = table.lookup("napper.localhost").unwrap();
    assert_eq!(napper.activity().last_request_ms, 0, "a refusal is no use");
}

/// `awake`, published asleep, behind a proxy whose [`TestWaker`] wakes it: the routes, the
/// waker and the proxy.
async fn asleep_behind_a_proxy(awake: InstanceSpec) -> (Arc<Routes>, Arc<TestWaker>, TestProxy) {
    let routes = Arc::new(Routes::new());
    routes.publish(&[asleep(&awake)]).unwrap();
    let waker = Arc::new(TestWaker {
        asked: Mutex::default(),
        routes: routes.clone(),
        awake,
    });
    let w = waker.clone();
    let proxy = TestProxy::start_from(routes.clone(), move |routes, stats| {
        Proxy::new(routes, test_config(), stats).with_waker(w)
    })
    .await;
    (routes, waker, proxy)
}
