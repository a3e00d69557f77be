use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn ha_instances_refuse_the_editor_however_it_is_spelled() {
    let u = Upstream::start("u0").await;
    let mut ha = instance("orders", &[u.addr]);
    ha.ha = true;
    let proxy = TestProxy::start(&[ha, instance("solo", &[u.addr])], test_config()).await;
    for path in [
        "/admin",
        "/admin/",
        "/admin/flows",
        "/ADMIN/flows",
        "/admin//flows",
        "/Admin/",
        "//admin/comms",
        "/%61dmin/flows",
        "/x/../admin/flows",
    ] {
        for method in ["GET", "POST", "DELETE"] {
            let r = send(proxy.addr, req(method, "orders.localhost", path, ""))
                .await
                .unwrap();
            assert_eq!(r.status, 403, "{method} {path}");
            assert!(
                r.body.contains("editor is disabled") && r.body.contains("snapshot"),
                "{}",
                r.body
            );
        }
    }
    assert_eq!(u.hits(), 0, "nothing reached the replica");
    // The flows themselves are untouched, and so is a non-HA instance's editor.
    for path in ["/", "/api/orders", "/administrator", "/ui/"] {
        assert_eq!(
            get(proxy.addr, "orders.localhost", path)
                .await
                .unwrap()
                .status,
            200,
            "{path}"
        );
    }
    assert_eq!(
        get(proxy.addr, "solo.localhost", "/admin/flows")
            .await
            .unwrap()
            .status,
        200
    );
    let m = proxy.metrics().await;
    assert!(
        m.contains("tandem_proxy_editor_blocked_total{instance=\"orders\"} 27"),
        "{m}"
    );
}

#[tokio::test]
async fn ha_instances_refuse_editor_websockets() {
    let ws = WsEcho::start().await;
    let mut ha = instance("orders", &[ws.addr]);
    ha.ha = true;
    let proxy = TestProxy::start(&[ha], test_config()).await;
    for path in ["/admin/comms", "/ADMIN/comms", "/admin//comms"] {
        let mut request = format!("ws://{}{path}", proxy.addr)
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("host", "orders.localhost".parse().unwrap());
        let err = tokio_tungstenite::connect_async(request).await.unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status(), 403, "{path}")
            }
            other => panic!("{path}: expected a 403, got {other}"),
        }
    }
    // A WebSocket to the flows' own path works.
    let mut request = format!("ws://{}/ws/data", proxy.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("host", "orders.localhost".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("hi"));
}
