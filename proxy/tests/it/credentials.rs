//! Tandem's credentials and the instance's admin secret against a real replica that shows every
//! header it got: the secret reaches only the editor paths of a gated instance, a client can
//! never send it, and no form of a Tandem token or session reaches a flow.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tandem_proxy::{EditorDecision, EditorGate, Proxy, ProxyStats, Routes, TicketDecision};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::*;

const SECRET: &str = "the-instance-secret";

/// A replica that answers with every header it got, one `name: value` line each.
struct HeaderEcho {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HeaderEcho {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let mut body = String::new();
                        for (name, value) in req.headers() {
                            body.push_str(&format!(
                                "{name}: {}\n",
                                String::from_utf8_lossy(value.as_bytes())
                            ));
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Self { addr, task }
    }
}

impl Drop for HeaderEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lets everyone in: these tests are about what reaches the replica, not about who may edit.
struct AllowAll;

impl EditorGate for AllowAll {
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
        _instance: &'a str,
        _ticket: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TicketDecision> + Send + 'a>> {
        Box::pin(async { TicketDecision::Refused("no tickets here\n".into()) })
    }
}

/// A proxy with a gated instance (`gated`, with an admin secret), an HA one with a secret
/// (`ha`), and one without a secret (`open`, as a routes file has it), all in front of `echo`.
async fn start(echo: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let mut gated = instance("gated", &[echo]);
    gated.editor_secret = Some(SECRET.into());
    let mut ha = instance("ha", &[echo]);
    ha.ha = true;
    ha.editor_secret = Some(SECRET.into());
    let open = instance("open", &[echo]);
    let routes = Arc::new(Routes::new());
    routes.publish(&[gated, ha, open]).unwrap();
    let proxy = Arc::new(
        Proxy::new(routes, test_config(), Arc::new(ProxyStats::default()))
            .with_editor_gate(Arc::new(AllowAll)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(tandem_proxy::server::serve(
        listener,
        proxy,
        std::future::pending(),
    ));
    (addr, task)
}

/// The headers the replica saw, as (name, value) pairs.
async fn seen(
    proxy: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut b = Request::builder().uri(path).header("host", host);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let r = send(proxy, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{host}{path}: {}", r.body);
    r.body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn values<'a>(seen: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test]
async fn the_admin_secret_reaches_only_the_editor_paths() {
    let echo = HeaderEcho::start().await;
    let (proxy, _task) = start(echo.addr).await;

    // The editor and its admin API: the proxy's secret, once, whatever the client sent.
    for path in ["/admin/flows", "/ADMIN/", "/%61dmin/settings"] {
        let s = seen(
            proxy,
            "gated.localhost",
            path,
            &[("x-tandem-token", "guess")],
        )
        .await;
        assert_eq!(values(&s, "x-tandem-token"), [SECRET], "{path}");
    }
    // Every other path is a flow's: no secret, and a client-sent one does not pass either.
    for path in [
        "/",
        "/api/orders",
        "/administrator",
        "/orders/admin",
        "/admin.json",
    ] {
        let s = seen(proxy, "gated.localhost", path, &[]).await;
        assert!(values(&s, "x-tandem-token").is_empty(), "{path}: {s:?}");
        let s = seen(
            proxy,
            "gated.localhost",
            path,
            &[("x-tandem-token", SECRET)],
        )
        .await;
        assert!(values(&s, "x-tandem-token").is_empty(), "{path}: {s:?}");
    }
}

#[tokio::test]
async fn a_client_sent_admin_secret_never_passes() {
    let echo = HeaderEcho::start().await;
    let (proxy, _task) = start(echo.addr).await;
    // An HA instance's flows, and every path of an instance without a secret.
    for (host, path) in [
        ("ha.localhost", "/"),
        ("ha.localhost", "/api/orders"),
        ("open.localhost", "/"),
        ("open.localhost", "/admin/flows"),
    ] {
        let s = seen(
            proxy,
            host,
            path,
            &[
                ("x-tandem-token", "client-sent"),
                ("X-Tandem-Token", "again"),
            ],
        )
        .await;
        assert!(
            values(&s, "x-tandem-token").is_empty(),
            "{host}{path}: {s:?}"
        );
    }
}

#[tokio::test]
async fn no_form_of_a_tandem_credential_reaches_a_flow() {
    let echo = HeaderEcho::start().await;
    let (proxy, _task) = start(echo.addr).await;
    for host in ["gated.localhost", "ha.localhost"] {
        for auth in [
            "Bearer tdm_abc",
            "Bearer\ttdm_abc",
            "bearer  \t tdm_abc",
            "BEARER tdm_abc",
            "Bearer flow, Bearer tdm_abc",
        ] {
            let s = seen(proxy, host, "/echo", &[("authorization", auth)]).await;
            assert!(
                values(&s, "authorization").is_empty(),
                "{host} {auth:?}: {s:?}"
            );
        }
        // Several Authorization headers: the flow's own stays, Tandem's goes.
        let s = seen(
            proxy,
            host,
            "/echo",
            &[
                ("authorization", "Bearer flow-token"),
                ("authorization", "Bearer\ttdm_abc"),
                ("cookie", "theme=dark; tandem_session=s3cret"),
                ("cookie", "tandem_session=again; lang=en"),
            ],
        )
        .await;
        assert_eq!(values(&s, "authorization"), ["Bearer flow-token"], "{s:?}");
        assert_eq!(values(&s, "cookie"), ["theme=dark; lang=en"], "{s:?}");
    }
}

/// A gate that knows one HTTP token (`tdh_good`) and one member (`Bearer tdm_member`), and
/// lets the editor through.
struct Flows;

impl EditorGate for Flows {
    fn check<'a>(
        &'a self,
        _instance: &'a str,
        access: tandem_proxy::Access,
        _method: &'a http::Method,
        headers: &'a http::HeaderMap,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = EditorDecision> + Send + 'a>> {
        let bearer = tandem_proxy::credentials::bearer(headers).map(str::to_owned);
        Box::pin(async move {
            use tandem_proxy::{Access, HttpAuth};
            match (access, bearer.as_deref()) {
                (Access::Editor, _) => EditorDecision::Allow,
                (Access::Flows(HttpAuth::Tokens), Some("tdh_good")) => EditorDecision::Allow,
                (Access::Flows(HttpAuth::Members), Some("tdm_member")) => EditorDecision::Allow,
                (Access::Flows(HttpAuth::Members), Some("tdm_stranger")) => {
                    EditorDecision::Deny("not in the team\n".into())
                }
                _ => EditorDecision::SignIn("who are you?\n".into()),
            }
        })
    }

    fn exchange<'a>(
        &'a self,
        _instance: &'a str,
        _ticket: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = TicketDecision> + Send + 'a>> {
        Box::pin(async { TicketDecision::Refused("no tickets here\n".into()) })
    }
}

#[tokio::test]
async fn protected_endpoints_need_the_gates_yes_and_the_credential_never_reaches_the_flow() {
    use tandem_proxy::HttpAuth;
    let echo = HeaderEcho::start().await;
    let mut specs = Vec::new();
    for (name, mode, ha) in [
        ("tokens", HttpAuth::Tokens, false),
        ("members", HttpAuth::Members, true),
        ("open", HttpAuth::None, false),
    ] {
        let mut i = instance(name, &[echo.addr]);
        i.editor_secret = Some(SECRET.into());
        i.http_auth = mode;
        i.ha = ha;
        specs.push(i);
    }
    let routes = Arc::new(Routes::new());
    routes.publish(&specs).unwrap();
    let proxy = Arc::new(
        Proxy::new(routes, test_config(), Arc::new(ProxyStats::default()))
            .with_editor_gate(Arc::new(Flows)),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _task = tokio::spawn(tandem_proxy::server::serve(
        listener,
        proxy,
        std::future::pending(),
    ));
    let call = |host: &'static str, auth: Option<&'static str>| async move {
        let mut b = Request::builder().uri("/api/orders").header("host", host);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        send(addr, b.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap()
    };
    // No credential, or a wrong one: 401 with a challenge, and nothing reaches the flow.
    for (host, auth) in [
        ("tokens.localhost", None),
        ("tokens.localhost", Some("Bearer tdh_wrong")),
        ("tokens.localhost", Some("Bearer tdm_member")),
        ("members.localhost", None),
    ] {
        let r = call(host, auth).await;
        assert_eq!(r.status, 401, "{host} {auth:?}: {}", r.body);
        assert_eq!(
            r.headers.get("www-authenticate").unwrap(),
            &format!("Bearer realm=\"{}\"", host.trim_end_matches(".localhost")),
        );
        assert!(!r.body.contains("authorization:"), "{}", r.body);
    }
    // Someone outside the team: 403.
    let r = call("members.localhost", Some("Bearer tdm_stranger")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // The right credential passes, and the flow does not see it.
    for (host, auth) in [
        ("tokens.localhost", "Bearer tdh_good"),
        ("members.localhost", "Bearer tdm_member"),
    ] {
        let r = call(host, Some(auth)).await;
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        assert!(r.body.contains("host: "), "{}", r.body);
        assert!(!r.body.contains("authorization"), "{host}: {}", r.body);
    }
    // An open instance asks nobody; an HTTP token is Tandem's and never reaches a flow.
    let r = call("open.localhost", Some("Bearer tdh_good")).await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("authorization"), "{}", r.body);
    // The editor keeps its own rules (here, the gate lets it in).
    let s = seen(addr, "tokens.localhost", "/admin/flows", &[]).await;
    assert_eq!(values(&s, "x-tandem-token"), [SECRET]);
}
