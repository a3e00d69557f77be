//! The editor ticket handoff at the proxy: `/_tandem/editor-ticket` is answered by the proxy
//! itself on instances with an admin secret, in any spelling and whatever the answer, and never
//! reaches a replica; a good ticket becomes a host-only session cookie and a 303 to the editor.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_proxy::{EditorDecision, EditorGate, Proxy, ProxyStats, Routes, TicketDecision};
use tokio::net::TcpListener;

use crate::support::*;

/// Exchanges ticket `good` on instance `gated` once, for session `s3ssion`; refuses the rest.
/// Records every exchange it was asked for.
#[derive(Default)]
struct OneTicket {
    asked: Mutex<Vec<(String, String)>>,
}

impl EditorGate for OneTicket {
    fn check<'a>(
        &'a self,
        _instance: &'a str,
        _access: tandem_proxy::Access,
        _method: &'a http::Method,
        _headers: &'a http::HeaderMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = EditorDecision> + Send + 'a>> {
        Box::pin(async { EditorDecision::Allow })
    }

    fn exchange<'a>(
        &'a self,
        instance: &'a str,
        ticket: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TicketDecision> + Send + 'a>> {
        Box::pin(async move {
            let mut asked = self.asked.lock().unwrap();
            let first = !asked.iter().any(|(_, t)| t == ticket);
            asked.push((instance.to_string(), ticket.to_string()));
            match (instance, ticket) {
                ("gated", "good") if first => TicketDecision::Session {
                    secret: "s3ssion".into(),
                    home: tandem_proxy::TicketHome::Editor,
                },
                ("gated", "good") => TicketDecision::Refused("this ticket was used\n".into()),
                ("ha", "editor") => TicketDecision::Session {
                    secret: "s3ssion".into(),
                    home: tandem_proxy::TicketHome::Editor,
                },
                ("ha", "flows") => TicketDecision::Session {
                    secret: "fl0ws".into(),
                    home: tandem_proxy::TicketHome::Flows,
                },
                _ => TicketDecision::Refused("this ticket is not for this instance\n".into()),
            }
        })
    }
}

#[tokio::test]
async fn the_proxy_answers_editor_tickets_itself_and_sets_a_host_only_session() {
    let u = Upstream::start("u0").await;
    let mut gated = instance("gated", &[u.addr]);
    gated.editor_secret = Some("secret".into());
    let mut other = instance("other", &[u.addr]);
    other.editor_secret = Some("secret".into());
    let mut ha = instance("ha", &[u.addr]);
    ha.ha = true;
    ha.editor_secret = Some("secret".into());
    let open = instance("open", &[u.addr]);
    let routes = Arc::new(Routes::new());
    routes.publish(&[gated, other, ha, open]).unwrap();
    let gate = Arc::new(OneTicket::default());
    let proxy = Arc::new(
        Proxy::new(routes, test_config(), Arc::new(ProxyStats::default()))
            .with_editor_gate(gate.clone()),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _task = tokio::spawn(tandem_proxy::server::serve(
        listener,
        proxy,
        std::future::pending(),
    ));
    let call = |method: &'static str, host: &'static str, path: &'static str| async move {
        send(addr, req(method, host, path, Bytes::new()))
            .await
            .unwrap()
    };
    let no_store = |r: &Reply| {
        assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{r:?}");
    };

    // A ticket brought to the instance it is for: a session cookie for this host only, and
    // the editor.
    let r = call(
        "GET",
        "gated.localhost",
        "/_tandem/editor-ticket?ticket=good",
    )
    .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/admin/"));
    assert_eq!(
        r.header("set-cookie"),
        Some("tandem_session=s3ssion; Path=/; HttpOnly; SameSite=Lax")
    );
    no_store(&r);
    // Again, or on another instance's host: refused with the gate's words.
    let r = call(
        "GET",
        "gated.localhost",
        "/_tandem/editor-ticket?ticket=good",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "this ticket was used\n");
    assert!(r.header("set-cookie").is_none());
    no_store(&r);
    let r = call(
        "GET",
        "other.localhost",
        "/_tandem/editor-ticket?ticket=good",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("not for this instance"), "{}", r.body);
    // Spelled otherwise, it is still the proxy's.
    let r = call(
        "GET",
        "gated.localhost",
        "//_TANDEM/editor-ticket/?x=1&ticket=other",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    // No ticket: 400, and the gate is not asked.
    let r = call("GET", "gated.localhost", "/_tandem/editor-ticket").await;
    assert_eq!(r.status, 400, "{r:?}");
    no_store(&r);
    // Other methods: 405, the ticket untouched.
    for method in ["POST", "HEAD", "PUT"] {
        let r = call(
            method,
            "gated.localhost",
            "/_tandem/editor-ticket?ticket=fresh",
        )
        .await;
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("allow"), Some("GET"), "{method}");
    }
    // An HA instance has no editor to open, whatever the gate says; a ticket to its endpoints
    // (members mode) leads there.
    let r = call(
        "GET",
        "ha.localhost",
        "/_tandem/editor-ticket?ticket=editor",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("HA mode"), "{}", r.body);
    assert!(r.header("set-cookie").is_none(), "{r:?}");
    let r = call("GET", "ha.localhost", "/_tandem/editor-ticket?ticket=flows").await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/"));
    assert_eq!(
        r.header("set-cookie"),
        Some("tandem_session=fl0ws; Path=/; HttpOnly; SameSite=Lax")
    );

    let asked = gate.asked.lock().unwrap().clone();
    let pair = |i: &str, t: &str| (i.to_string(), t.to_string());
    assert_eq!(
        asked,
        [
            pair("gated", "good"),
            pair("gated", "good"),
            pair("other", "good"),
            pair("gated", "other"),
            pair("ha", "editor"),
            pair("ha", "flows"),
        ]
    );
    assert_eq!(u.hits(), 0, "no ticket request reached a replica");

    // An instance without an admin secret (a routes file's) has no gate: the path is its
    // flows'.
    let r = call("GET", "open.localhost", "/_tandem/editor-ticket?ticket=x").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(u.hits(), 1);
}
