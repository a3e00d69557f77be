//! `tandem proxy` as a process: a routes file, real HTTP upstreams, reloads, signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// A real HTTP server answering `name` (after `?ms=` milliseconds on `/slow`).
async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(800)).await;
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(name),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn routes(instances: &[(&str, SocketAddr)]) -> String {
    instances
        .iter()
        .map(|(name, addr)| {
            format!("[[instance]]\nname = \"{name}\"\nhosts = [\"{name}.localhost\"]\nreplicas = [\"{addr}\"]\nhealth_check = false\n\n")
        })
        .collect()
}

/// A running `tandem proxy`, its addresses read from its start-up log line.
struct Tandem {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
    /// The HTTPS listener, if any.
    https: Option<SocketAddr>,
    lines: mpsc::Receiver<String>,
}

impl Tandem {
    /// `tandem proxy` checking the routes file every 50 ms, with `extra` flags.
    fn start(routes: &std::path::Path, extra: &[&str]) -> Result<Self, String> {
        let fixed = ["--metrics-listen", "127.0.0.1:0", "--reload-poll-ms", "50"];
        Self::spawn(routes, &[&fixed[..], extra].concat(), &[])
    }

    /// `tandem proxy` with `args` (which must say where metrics go and may set the poll) and
    /// `envs`.
    fn spawn(
        routes: &std::path::Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["proxy", "--routes"])
            .arg(routes)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("TANDEM_METRICS_LISTEN")
            .env_remove("TANDEM_ADMIN_LISTEN")
            .envs(envs.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if line.contains("tandem proxy serving") {
                        let field = |k: &str| -> Option<SocketAddr> {
                            let rest = &line[line.find(&format!(" {k}="))? + k.len() + 2..];
                            rest.split_whitespace().next()?.parse().ok()
                        };
                        return Ok(Self {
                            listen: field("listen").unwrap(),
                            metrics: field("metrics").unwrap(),
                            https: field("https"),
                            child,
                            lines: rx,
                        });
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                            seen.push(l);
                        }
                        return Err(format!("exited with {status}: {}", seen.join("\n")));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let status = child.wait();
                    return Err(format!("stderr closed ({status:?}): {}", seen.join("\n")));
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("did not start: {}", seen.join("\n")))
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// The next log line containing `needle`, if one comes `within`.
    fn line_with(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                if line.contains(needle) {
                    return Some(line);
                }
            }
        }
        None
    }

    fn wait_for_line(&self, needle: &str, within: Duration) -> bool {
        self.line_with(needle, within).is_some()
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new temporary directory (removed on drop) and the path of `routes.toml` in it.
fn temp_routes() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("tandem-cli-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("routes.toml");
    (dir, path)
}

#[tokio::test]
async fn serves_reloads_on_change_and_stops_gracefully() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let (_dir, path) = temp_routes();
    std::fs::write(&path, routes(&[("orders", a)])).unwrap();
    let mut tandem = Tandem::start(&path, &[]).unwrap();

    assert_eq!(
        get(tandem.listen, "orders.localhost", "/").await,
        (200, "a".into())
    );
    let (status, body) = get(tandem.listen, "billing.localhost", "/").await;
    assert_eq!(status, 404, "{body}");

    // A changed file is picked up by itself.
    std::fs::write(&path, routes(&[("orders", a), ("billing", b)])).unwrap();
    assert!(tandem.wait_for_line("routes reloaded", Duration::from_secs(5)));
    assert_eq!(
        get(tandem.listen, "billing.localhost", "/").await,
        (200, "b".into())
    );

    // A broken file is reported and changes nothing.
    std::fs::write(&path, "[[instance]]\nname = 5\n").unwrap();
    assert!(tandem.wait_for_line("routes not reloaded", Duration::from_secs(5)));
    assert_eq!(
        get(tandem.listen, "billing.localhost", "/").await,
        (200, "b".into())
    );

    // Fixed again, picked up again.
    std::fs::write(&path, routes(&[("orders", b)])).unwrap();
    assert!(tandem.wait_for_line("routes reloaded", Duration::from_secs(5)));
    assert_eq!(
        get(tandem.listen, "orders.localhost", "/").await,
        (200, "b".into())
    );

    let (status, metrics) = get(tandem.metrics, "metrics", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tandem_proxy_route_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        get(tandem.metrics, "metrics", "/healthz").await,
        (200, "ok\n".into())
    );

    // SIGTERM: the in-flight request still gets its answer, then the process exits 0.
    let listen = tandem.listen;
    let slow = tokio::spawn(async move { get(listen, "orders.localhost", "/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tandem.signal("-TERM");
    assert_eq!(slow.await.unwrap(), (200, "b".into()));
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = tandem.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tandem did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// SIGHUP reloads the routes file at once. The poll is set to an hour, so nothing else can
/// reload it: a change stays unseen until the signal.
#[tokio::test]
async fn sighup_reloads_the_routes_file_that_the_poll_has_not_seen() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let (_dir, path) = temp_routes();
    std::fs::write(&path, routes(&[("orders", a)])).unwrap();
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let hour = ["--reload-poll-ms", "3600000"];
    let tandem = Tandem::spawn(&path, &[&metrics[..], &hour[..]].concat(), &[]).unwrap();
    assert_eq!(
        get(tandem.listen, "orders.localhost", "/").await,
        (200, "a".into())
    );

    std::fs::write(&path, routes(&[("orders", b)])).unwrap();
    // Without the signal the change is not picked up. This waits on purpose: it shows that
    // the poll is off, so that the reload below can only come from the signal.
    assert_eq!(
        tandem.line_with("routes reloaded", Duration::from_millis(500)),
        None
    );
    assert_eq!(
        get(tandem.listen, "orders.localhost", "/").await,
        (200, "a".into())
    );

    tandem.signal("-HUP");
    let line = tandem
        .line_with("routes reloaded", Duration::from_secs(5))
        .expect("no reload after SIGHUP");
    assert!(line.contains("signal=true"), "{line}");
    assert_eq!(
        get(tandem.listen, "orders.localhost", "/").await,
        (200, "b".into())
    );
    let (status, metrics) = get(tandem.metrics, "metrics", "/metrics").await;
    assert_eq!(status, 200);
    // The load at start and the one the signal asked for.
    assert!(
        metrics.contains("tandem_proxy_route_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

/// `--admin-listen` and `TANDEM_ADMIN_LISTEN`, the metrics listener's earlier names, still
/// work; `TANDEM_METRICS_LISTEN` wins over `TANDEM_ADMIN_LISTEN`.
#[tokio::test]
async fn the_earlier_admin_listen_names_still_place_the_metrics_listener() {
    let a = upstream("a").await;
    let (_dir, path) = temp_routes();
    std::fs::write(&path, routes(&[("orders", a)])).unwrap();
    let free = || format!("127.0.0.1:{}", tandem_proxy::net::free_port().unwrap());
    let (flag, env, both, loser) = (free(), free(), free(), free());
    for (args, envs, want) in [
        (vec!["--admin-listen", flag.as_str()], vec![], &flag),
        (vec![], vec![("TANDEM_ADMIN_LISTEN", env.as_str())], &env),
        (
            vec![],
            vec![
                ("TANDEM_ADMIN_LISTEN", loser.as_str()),
                ("TANDEM_METRICS_LISTEN", both.as_str()),
            ],
            &both,
        ),
    ] {
        let tandem = Tandem::spawn(&path, &args, &envs).unwrap();
        assert_eq!(tandem.metrics.to_string(), *want, "{args:?} {envs:?}");
        let (status, metrics) = get(tandem.metrics, "metrics", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("tandem_proxy_routes_instances 1"),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn refuses_to_start_on_a_bad_routes_file_and_says_why() {
    let (_dir, path) = temp_routes();
    std::fs::write(
        &path,
        "[[instance]]\nname = \"Orders\"\nhosts = [\"o.localhost\"]\nreplicas = []\n",
    )
    .unwrap();
    let err = Tandem::start(&path, &[]).err().expect("must not start");
    assert!(err.contains("instance name \"Orders\" is invalid"), "{err}");
}

/// Every argument of every subcommand, as clap knows them, is in that subcommand's `--help`:
/// with a description, its flag, its environment variable and its aliases. Hidden arguments
/// are not listed there, but their environment variables must be named (in the description of
/// the flag they are an earlier name of). Hidden subcommands are checked too: their `--help` is
/// where their flags are described.
#[test]
fn help_documents_every_flag_its_environment_variable_and_its_aliases() {
    use clap::CommandFactory;

    /// `cmd` and its subcommands, each with the words that name it after `tandem`.
    fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            walk(sub, p, out);
        }
        out.push((path, cmd.clone()));
    }

    let mut commands = Vec::new();
    walk(
        &tandem_controlplane::cli::Cli::command(),
        Vec::new(),
        &mut commands,
    );
    let mut missing = Vec::new();
    let mut checked = Vec::new();
    for (path, cmd) in &commands {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "tandem {path:?} --help: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let name = format!("tandem {}", path.join(" "));
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let mut want: Vec<String> = arg
                .get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .into_iter()
                .collect();
            if !arg.is_hide_set() {
                let help = arg
                    .get_long_help()
                    .or(arg.get_help())
                    .map(|h| h.to_string());
                match help
                    .as_deref()
                    .and_then(|h| h.lines().next())
                    .filter(|l| !l.trim().is_empty())
                {
                    Some(first) => want.push(first.trim().to_string()),
                    None => missing.push(format!("{name}: {id} has no description")),
                }
                want.extend(arg.get_long().map(|l| format!("--{l}")));
                want.extend(arg.get_short().map(|c| format!("-{c}")));
                want.extend(
                    arg.get_all_aliases()
                        .into_iter()
                        .flatten()
                        .map(|a| format!("--{a}")),
                );
                if arg.is_positional() {
                    let names = arg
                        .get_value_names()
                        .map(|v| v.iter().map(|n| n.to_string()).collect())
                        .unwrap_or_else(|| vec![id.to_uppercase()]);
                    want.extend(names.into_iter().map(|n| format!("<{n}>")));
                }
            }
            for w in want {
                if !text.contains(&w) {
                    missing.push(format!("{name}: {id}: {w:?} not in --help"));
                }
            }
            checked.push(format!("{name} {id}"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // The walk found the commands and their flags (a check of nothing passes too).
    for (command, id) in [
        ("tandem proxy", "reload_poll_ms"),
        ("tandem serve", "require_isolation"),
        ("tandem user create", "name"),
        ("tandem sandbox-exec", "read_write"),
    ] {
        assert!(
            checked.contains(&format!("{command} {id}")),
            "{command} {id} was not checked: {checked:?}"
        );
    }
}

#[tokio::test]
async fn https_from_the_routes_file_by_sni_with_h2_a_redirect_and_reloads() {
    use tandem_proxy::tls::test_ca::{is_leaf_of, TestCa};
    let ca = TestCa::new();
    let a = upstream("a").await;
    let (dir, path) = temp_routes();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let save = |name: &str, pair: &tandem_proxy::tls::PemKeyPair| {
        std::fs::write(
            dir.path().join(format!("tls/{name}.pem")),
            &pair.certificate,
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("tls/{name}.key")), &pair.key).unwrap();
    };
    let wildcard = ca.issue(&["*.example.test"]);
    let customer = ca.issue(&["flows.customer.org"]);
    save("wildcard", &wildcard);
    save("customer", &customer);
    let instance = format!(
        "[[instance]]\nname = \"orders\"\nhosts = [\"orders.example.test\", \"flows.customer.org\", \"api.customer.org\"]\nreplicas = [\"{a}\"]\nhealth_check = false\n\n"
    );
    // Relative paths: from the routes file's directory.
    let tls = "[tls]\ncert = \"tls/wildcard.pem\"\nkey = \"tls/wildcard.key\"\n\n[[tls.certificate]]\nhosts = [\"flows.customer.org\"]\ncert = \"tls/customer.pem\"\nkey = \"tls/customer.key\"\n";
    std::fs::write(&path, format!("{instance}{tls}")).unwrap();
    let tandem = Tandem::start(
        &path,
        &["--https-listen", "127.0.0.1:0", "--https-redirect"],
    )
    .unwrap();
    let https = tandem
        .https
        .expect("the HTTPS listener in the start-up line");
    {
        let stream = TcpStream::connect(tandem.listen).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(
                hyper::Request::post("/api/x?a=1")
                    .header("host", "orders.example.test")
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 308, "the plain listener redirects");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let port: u16 = location
            .strip_prefix("https://orders.example.test:")
            .and_then(|r| r.strip_suffix("/api/x?a=1"))
            .unwrap_or_else(|| panic!("{location}"))
            .parse()
            .unwrap();
        assert_eq!(port, https.port(), "to the HTTPS listener's port");
    }

    let seen = ca
        .get(https, "orders.example.test", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&wildcard, &seen.chain));
    assert_eq!(
        (seen.version, seen.status, seen.body.as_str()),
        (http::Version::HTTP_2, 200, "a")
    );
    let seen = ca
        .get(https, "flows.customer.org", &[b"http/1.1"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&customer, &seen.chain));
    assert_eq!((seen.status, seen.body.as_str()), (200, "a"));
    // No certificate covers api.customer.org yet: the client refuses the default one.
    assert!(ca
        .get(https, "api.customer.org", &[b"h2"], "/")
        .await
        .is_err());

    // The routes file gains a certificate: served after the reload, no restart.
    let api = ca.issue(&["api.customer.org"]);
    save("api", &api);
    std::fs::write(
        &path,
        format!("{instance}{tls}\n[[tls.certificate]]\nhosts = [\"api.customer.org\"]\ncert = \"tls/api.pem\"\nkey = \"tls/api.key\"\n"),
    )
    .unwrap();
    assert!(tandem.wait_for_line("routes reloaded", Duration::from_secs(5)));
    let seen = ca
        .get(https, "api.customer.org", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&api, &seen.chain));

    // The default certificate renewed on disk: served without a reload of the routes.
    let renewed = ca.issue(&["*.example.test"]);
    save("wildcard", &renewed);
    assert!(tandem.wait_for_line("TLS certificates reloaded", Duration::from_secs(5)));
    let seen = ca
        .get(https, "orders.example.test", &[b"h2"], "/")
        .await
        .unwrap();
    assert!(is_leaf_of(&renewed, &seen.chain));

    // A [tls] section without an HTTPS listener is refused at start, and says why.
    let (_dir2, plain) = temp_routes();
    std::fs::write(
        &plain,
        format!(
            "{instance}[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.path().join("tls/api.pem").display(),
            dir.path().join("tls/api.key").display()
        ),
    )
    .unwrap();
    let e = Tandem::start(&plain, &[]).err().unwrap();
    assert!(e.contains("--https-listen"), "{e}");
}
