//! Tandem HA benchmark (`cluster` binary, issue 13): how fast a change of the route table reaches
//! standalone proxies, how fast a control plane takes over from a killed leader, and how many
//! requests fail while `tandem serve` restarts, through its own proxy and through a standalone
//! one.
//!
//! Usage: `cargo run --release -p tandem-benches --bin cluster -- <tandem binary> [rounds]
//! [changes]` (`benches/cluster.sh` builds tandem and runs it). Rounds (default 3, at most 10)
//! apply to the takeover and the restart parts, changes (default 100, 10 to 500) to the feed.
//! PostgreSQL comes from Debian's `postgresql` (`tandem_controlplane::scratch_pg`), Node-RED from
//! the shared stacks (`TANDEM_TEST_STACKS`, default `<tmp>/tandem-test-stacks`). `PARTS` (default
//! `123`) picks the parts to run; `KEEP_TMP=1` keeps the data directories and logs.
//!
//! 1. **Route feed.** One `tandem serve --no-proxy` on PostgreSQL, with `2 × changes` stopped
//!    instances put straight into the database (no Node-RED runs: a stopped instance is in the
//!    table with no replica, answered 503). A change is `DELETE /api/v1/instances/{id}` of one
//!    of them; from the call's return, every proxy is asked for its host every 2 ms (one
//!    keep-alive connection each) until it answers 404; then its `tandem_proxy_feed_generation`
//!    must have moved. `changes` deletes with 1 proxy connected, the deleted instances put back,
//!    then `changes` deletes with 8. The peer is a `tandem proxy --routes` whose file loses the
//!    instance (written to a new file and renamed over the old one): picked up by its poll
//!    (`--reload-poll-ms`, default 1000), and by `SIGHUP` right after the rename.
//! 2. **Takeover.** Two `tandem serve --no-proxy` on one PostgreSQL database with one platform
//!    key, `--lease-ttl-ms` 5000 (the default) and then 1500, `2 × rounds` rounds each: the
//!    leader is SIGKILLed at a random point of its renewal period; the other is asked
//!    `GET /api/v1/cluster` (500 ms client timeout) every 10 ms until it answers that it leads.
//!    The killed one is started again (it follows) and is killed in the next round once it
//!    leads. The reference is the lease: the takeover is due between 2/3 and 4/3 of a lease
//!    time after the kill (the lease was renewed 0 to 1/3 of it before; the survivor tries every
//!    third).
//! 3. **Restart.** `tandem serve` (SQLite) with a 2-replica balanced HA instance of real
//!    Node-RED and one standalone proxy following it. Two workers per path send `GET /hello`
//!    one at a time (5 s deadline, 10 ms apart) through `tandem serve`'s own proxy and through
//!    the standalone proxy; `tandem serve` gets SIGTERM (and is waited for) or SIGKILL, and is
//!    started again on its data directory at once (replicas keep running and are adopted).
//!    Requests answered (or failed) are counted from the signal until 1 s after the instance is
//!    whole again; every answer but 200 `hello` fails. SIGTERM and SIGKILL rounds alternate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sqlx::Connection;

#[path = "../common.rs"]
mod common;
use common::{call, free_port, Error};

/// How often a proxy is asked whether a change reached it.
const POLL: Duration = Duration::from_millis(2);

// === HTTP ===

/// An API call as the admin; an answer of 300 or more is an error.
async fn api(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Error> {
    let a = call(addr, method, "api", path, Some(token), body.as_ref()).await?;
    if a.status >= 300 {
        return Err(format!(
            "{method} {path}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        )
        .into());
    }
    Ok(serde_json::from_slice(&a.body).unwrap_or(Value::Null))
}

/// A keep-alive connection, made again when it breaks: the pollers ask every 2 ms, and a new
/// connection per question would double their cost on the 2 shared cores.
struct KeepAlive {
    addr: SocketAddr,
    send: Option<SendRequest<Full<Bytes>>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, send: None }
    }

    /// `GET path` of `host`; its status.
    async fn get(&mut self, host: &str, path: &str) -> Result<u16, Error> {
        let mut send = match self.send.take() {
            Some(s) if !s.is_closed() => s,
            _ => {
                let stream = tokio::net::TcpStream::connect(self.addr).await?;
                let _ = stream.set_nodelay(true);
                let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                s
            }
        };
        send.ready().await?;
        let req = Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))?;
        let res = send.send_request(req).await?;
        let status = res.status().as_u16();
        res.into_body().collect().await?;
        self.send = Some(send);
        Ok(status)
    }
}

fn signal(pid: u32, sig: &str) -> Result<(), Error> {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?
        .success();
    if ok {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid} failed").into())
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, Error> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?)
}

// === impl Serve ===

/// A `tandem serve` on a data directory, with ports of its own kept across restarts (its
/// replicas reach its storage API where they were told it is).
struct Serve {
    bin: String,
    dir: PathBuf,
    api: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Serve {
    fn new(bin: &str, dir: PathBuf, args: &[&str]) -> Result<Self, Error> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            bin: bin.to_owned(),
            dir,
            api: free_port()?,
            http: free_port()?,
            metrics: free_port()?,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        })
    }

    /// Starts it and waits until `GET /healthz` answers 200.
    async fn start(&mut self) -> Result<(), Error> {
        let log = log_file(&self.dir.join("tandem.log"))?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--api-listen", &self.api.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .args(["--metrics-listen", &self.metrics.to_string()])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = call(self.api, "GET", "api", "/healthz", None, None);
            if matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Ok(a)) if a.status == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("tandem serve in {} did not start", self.dir.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn token(&self) -> Result<String, Error> {
        Ok(std::fs::read_to_string(self.dir.join("admin-token"))?
            .trim()
            .to_owned())
    }

    /// SIGTERM, and waits for the exit (SIGKILL after 40 s); how long it took.
    async fn term(&mut self) -> Result<Duration, Error> {
        let start = Instant::now();
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        signal(child.id(), "-TERM")?;
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(start.elapsed())
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// === impl Proxy ===

/// A running `tandem proxy` (fed by a control plane, or by a routes file).
struct Proxy {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Proxy {
    fn spawn(bin: &str, log: &Path, args: &[String]) -> Result<Self, Error> {
        let (addr, metrics) = (free_port()?, free_port()?);
        let log = log_file(log)?;
        let child = Command::new(bin)
            .arg("proxy")
            .args(args)
            .args(["--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--access-log", "false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            addr,
            metrics,
        })
    }

    /// `tandem proxy --control-plane`.
    fn fed(
        bin: &str,
        dir: &Path,
        api: SocketAddr,
        token_file: &Path,
        id: &str,
    ) -> Result<Self, Error> {
        let args = [
            "--control-plane".to_string(),
            format!("http://{api}"),
            "--token-file".to_string(),
            token_file.display().to_string(),
            "--cache-file".to_string(),
            dir.join(format!("{id}-routes.json")).display().to_string(),
            "--proxy-id".to_string(),
            id.to_string(),
        ];
        Self::spawn(bin, &dir.join(format!("{id}.log")), &args)
    }

    /// The value of `name` on its metrics page.
    async fn metric(&self, name: &str) -> Option<f64> {
        let a = call(self.metrics, "GET", "metrics", "/metrics", None, None)
            .await
            .ok()?;
        String::from_utf8_lossy(&a.body)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    async fn generation(&self) -> Result<u64, Error> {
        let g = self
            .metric("tandem_proxy_feed_generation")
            .await
            .ok_or("no tandem_proxy_feed_generation on a proxy's metrics page")?;
        Ok(g as u64)
    }

    /// Waits until its metrics page shows it connected to the control plane.
    async fn connected(&self) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric("tandem_proxy_control_plane_connected").await != Some(1.0) {
            if Instant::now() > deadline {
                return Err(format!("the proxy on {} never connected", self.addr).into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until every host answers something else than 404 (the proxy knows it).
    async fn knows(&self, hosts: &[String]) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = KeepAlive::new(self.addr);
        for host in hosts {
            // `/hello`: a running instance's Node-RED answers 404 on `/`.
            while conn.get(host, "/hello").await.unwrap_or(404) == 404 {
                if Instant::now() > deadline {
                    return Err(format!("the proxy on {} never served {host}", self.addr).into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every process whose working directory is under the benchmark's directory (replicas
/// outlive the `tandem serve` that started them by design), then removes the directory.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let (Ok(root), Ok(procs)) = (self.0.canonicalize(), std::fs::read_dir("/proc")) {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&root))
                {
                    let _ = signal(pid, "-KILL");
                }
            }
        }
        if std::env::var_os("KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

// === Numbers ===

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

/// The nearest-rank percentile of sorted values.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median(v: &[Duration]) -> Duration {
    pct(&sorted(v.to_vec()), 0.5)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn list(v: &[Duration]) -> String {
    v.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ")
}

// === 1. The route feed ===

/// What one change did: the API call's time, and when each proxy answered the host 404
/// (from the call's return).
struct Change {
    call: Duration,
    seen: Vec<Duration>,
    /// How far each proxy's generation moved.
    moved: Vec<u64>,
}

/// Asks `host` through `conn` every [`POLL`] until it answers 404; the time since `from`.
async fn until_404(
    mut conn: KeepAlive,
    host: String,
    from: Instant,
) -> (KeepAlive, Result<Duration, String>) {
    loop {
        if let Ok(404) = conn.get(&host, "/").await {
            return (conn, Ok(from.elapsed()));
        }
        if from.elapsed() > Duration::from_secs(20) {
            let e = format!("{host} not gone after 20 s on {}", conn.addr);
            return (conn, Err(e));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls every proxy until `host` answers 404; the time each took from `from`.
async fn all_404(
    conns: &mut Vec<KeepAlive>,
    host: &str,
    from: Instant,
) -> Result<Vec<Duration>, Error> {
    let tasks: Vec<_> = conns
        .drain(..)
        .map(|c| tokio::spawn(until_404(c, host.to_owned(), from)))
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        let (c, r) = t.await?;
        conns.push(c);
        seen.push(r?);
    }
    Ok(seen)
}

/// The feed's part: a control plane, its database for seeding, its proxies.
struct Feed {
    serve: Serve,
    token: String,
    db: sqlx::PgConnection,
    team: String,
    app: String,
    stack: String,
    /// Instances seeded and not deleted yet: (id, host).
    instances: Vec<(String, String)>,
    seeded: usize,
}

impl Feed {
    /// Puts `n` stopped instances into the database, and has the coordinator read them (an
    /// action calls it; otherwise it reads the store every 30 s).
    async fn seed(&mut self, n: usize) -> Result<Vec<String>, Error> {
        let now = tandem_controlplane::store::now_ms();
        let mut hosts = Vec::new();
        for _ in 0..n {
            let id = tandem_controlplane::store::new_id();
            let name = format!("feed-{}", self.seeded);
            self.seeded += 1;
            sqlx::query(
                "INSERT INTO instances (id, name, team_id, application_id, stack_id, template_id, settings, env, flows, credentials, flows_in_store, ha_replicas, ha_mode, ha_affinity, desired_state, created_at, updated_at, modules) \
                 VALUES ($1, $2, $3, $4, $5, NULL, '{}', '{}', '[]', '{}', 1, NULL, NULL, NULL, 'stopped', $6, $6, '{}')",
            )
            .bind(&id)
            .bind(&name)
            .bind(&self.team)
            .bind(&self.app)
            .bind(&self.stack)
            .bind(now)
            .execute(&mut self.db)
            .await?;
            let host = format!("{name}.localhost");
            hosts.push(host.clone());
            self.instances.push((id, host));
        }
        let id = self.instances[0].0.clone();
        api(
            self.serve.api,
            &self.token,
            "POST",
            &format!("/api/v1/instances/{id}/actions/stop"),
            None,
        )
        .await?;
        Ok(hosts)
    }

    /// One change: the DELETE of the oldest seeded instance, seen by every proxy.
    async fn change(
        &mut self,
        proxies: &[&Proxy],
        conns: &mut Vec<KeepAlive>,
    ) -> Result<Change, Error> {
        let (id, host) = self.instances.remove(0);
        let mut before = Vec::new();
        for p in proxies {
            before.push(p.generation().await?);
        }
        let start = Instant::now();
        api(
            self.serve.api,
            &self.token,
            "DELETE",
            &format!("/api/v1/instances/{id}"),
            None,
        )
        .await?;
        let returned = Instant::now();
        let seen = all_404(conns, &host, returned).await?;
        let mut moved = Vec::new();
        for (p, b) in proxies.iter().zip(&before) {
            moved.push(p.generation().await?.saturating_sub(*b));
        }
        Ok(Change {
            call: returned - start,
            seen,
            moved,
        })
    }
}

/// One row of the propagation table.
struct Propagation {
    label: String,
    proxies: usize,
    /// Per change, the time each proxy took.
    seen: Vec<Vec<Duration>>,
    calls: Vec<Duration>,
}

impl Propagation {
    fn print_row(&self) {
        let each = sorted(self.seen.iter().flatten().copied().collect());
        let last = sorted(
            self.seen
                .iter()
                .map(|s| s.iter().copied().max().unwrap_or_default())
                .collect(),
        );
        let call = if self.calls.is_empty() {
            "-".to_string()
        } else {
            ms(median(&self.calls))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.label,
            self.proxies,
            self.seen.len(),
            ms(pct(&each, 0.5)),
            ms(pct(&each, 0.99)),
            ms(pct(&each, 1.0)),
            ms(pct(&last, 0.5)),
            ms(pct(&last, 0.99)),
            ms(pct(&last, 1.0)),
            call
        );
    }

    fn last_p(&self, p: f64) -> Duration {
        let last = sorted(
            self.seen
                .iter()
                .map(|s| s.iter().copied().max().unwrap_or_default())
                .collect(),
        );
        pct(&last, p)
    }
}

async fn feed(
    bin: &str,
    base: &Path,
    url: &str,
    key: &Path,
    stacks: &Path,
    changes: usize,
) -> Result<Vec<Propagation>, Error> {
    let dir = base.join("feed");
    let key = key.display().to_string();
    let stacks = stacks.display().to_string();
    let mut serve = Serve::new(
        bin,
        dir.clone(),
        &[
            "--database-url",
            url,
            "--platform-key-file",
            &key,
            "--stacks-dir",
            &stacks,
            "--no-proxy",
        ],
    )?;
    serve.start().await?;
    let token = serve.token()?;
    let team = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/teams",
        Some(json!({"name": "Feed"})),
    )
    .await?;
    let app = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/applications",
        Some(json!({"name": "app", "team_id": team["id"]})),
    )
    .await?;
    let stacks = api(serve.api, &token, "GET", "/api/v1/stacks", None).await?;
    let s = |v: &Value| v.as_str().map(str::to_owned).ok_or("no id");
    let mut f = Feed {
        token: token.clone(),
        db: sqlx::PgConnection::connect(url).await?,
        team: s(&team["id"])?,
        app: s(&app["id"])?,
        stack: s(&stacks["items"][0]["id"])?,
        instances: Vec::new(),
        seeded: 0,
        serve,
    };
    let hosts = f.seed(2 * changes).await?;
    let pt = api(
        f.serve.api,
        &token,
        "POST",
        "/api/v1/proxy-tokens",
        Some(json!({"name": "bench"})),
    )
    .await?;
    let token_file = dir.join("proxy-token");
    std::fs::write(
        &token_file,
        pt["token_value"].as_str().ok_or("no token_value")?,
    )?;
    let mut proxies = vec![Proxy::fed(bin, &dir, f.serve.api, &token_file, "p0")?];
    proxies[0].connected().await?;
    proxies[0].knows(&hosts).await?;

    let mut out = Vec::new();
    for n in [1usize, 8] {
        while proxies.len() < n {
            let id = format!("p{}", proxies.len());
            proxies.push(Proxy::fed(bin, &dir, f.serve.api, &token_file, &id)?);
        }
        // The table back to 2 × changes instances, the size the 1-proxy run started with.
        let more = 2 * changes - f.instances.len();
        let hosts: Vec<String> = if more > 0 {
            f.seed(more).await?
        } else {
            Vec::new()
        };
        for p in &proxies {
            p.connected().await?;
            p.knows(&hosts).await?;
            p.knows(&[f.instances[0].1.clone()]).await?;
        }
        let refs: Vec<&Proxy> = proxies.iter().collect();
        let mut conns: Vec<KeepAlive> = proxies.iter().map(|p| KeepAlive::new(p.addr)).collect();
        let mut row = Propagation {
            label: "route feed".into(),
            proxies: n,
            seen: Vec::new(),
            calls: Vec::new(),
        };
        let mut moved_other = 0;
        for _ in 0..changes {
            let c = f.change(&refs, &mut conns).await?;
            moved_other += c.moved.iter().filter(|m| **m != 1).count();
            row.calls.push(c.call);
            row.seen.push(c.seen);
            tokio::time::sleep(Duration::from_millis(20) + jitter(Duration::from_millis(30))).await;
        }
        println!(
            "  feed, {n} prox{}: per change, the last proxy to answer 404 (ms): {}",
            if n == 1 { "y" } else { "ies" },
            list(
                &row.seen
                    .iter()
                    .map(|s| s.iter().copied().max().unwrap_or_default())
                    .collect::<Vec<_>>()
            )
        );
        println!(
            "    DELETE calls (ms, median {}), generation moved by other than 1 on {moved_other} of {} proxy-changes",
            ms(median(&row.calls)),
            changes * n
        );
        out.push(row);
    }
    Ok(out)
}

/// A routes file of `names` (each with one replica that refuses connections).
fn routes_file(names: &[String], dead: SocketAddr) -> String {
    let mut s = String::new();
    for n in names {
        s.push_str(&format!(
            "[[instance]]\nname = \"{n}\"\nhosts = [\"{n}.localhost\"]\nreplicas = [\"{dead}\"]\nhealth_check = false\n\n"
        ));
    }
    s
}

/// A pseudo-random duration below `max` (from the clock's nanoseconds: no random-number crate).
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(u64::from(nanos).wrapping_mul(2_654_435_761) % max)
}

fn write_atomically(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The peer: `tandem proxy --routes`, the file losing one instance per change, picked up by
/// the file's poll (`sighup` false, default 1000 ms) or by SIGHUP.
async fn routes_peer(
    bin: &str,
    base: &Path,
    changes: usize,
    sighup: bool,
) -> Result<Propagation, Error> {
    let dir = base.join(if sighup { "file-hup" } else { "file-poll" });
    std::fs::create_dir_all(&dir)?;
    let dead = free_port()?;
    // One more that stays: a file without instances is not what is measured.
    let mut names: Vec<String> = (0..=changes).map(|i| format!("peer-{i}")).collect();
    let file = dir.join("routes.toml");
    write_atomically(&file, &routes_file(&names, dead))?;
    let mut args = vec!["--routes".to_string(), file.display().to_string()];
    if sighup {
        // Only the signal reloads it.
        args.extend(["--reload-poll-ms".to_string(), "3600000".to_string()]);
    }
    let p = Proxy::spawn(bin, &dir.join("proxy.log"), &args)?;
    let hosts: Vec<String> = names.iter().map(|n| format!("{n}.localhost")).collect();
    p.knows(&hosts).await?;
    let mut conns = vec![KeepAlive::new(p.addr)];
    let mut row = Propagation {
        label: if sighup {
            "routes file, SIGHUP".into()
        } else {
            "routes file, poll (1000 ms)".into()
        },
        proxies: 1,
        seen: Vec::new(),
        calls: Vec::new(),
    };
    for _ in 0..changes {
        // At a random point of the file's poll period: a change written right after the last
        // one was seen would always land at the same point of it.
        if !sighup {
            tokio::time::sleep(jitter(Duration::from_millis(1000))).await;
        }
        let name = names.remove(0);
        write_atomically(&file, &routes_file(&names, dead))?;
        // From the rename: the signal's sending (a `kill` process) is part of the reload.
        let from = Instant::now();
        if sighup {
            signal(p.child.id(), "-HUP")?;
        }
        row.seen
            .push(all_404(&mut conns, &format!("{name}.localhost"), from).await?);
    }
    println!(
        "  {}: per change (ms): {}",
        row.label,
        list(&row.seen.iter().map(|s| s[0]).collect::<Vec<_>>())
    );
    Ok(row)
}

// === 2. Takeover ===

/// `GET /api/v1/cluster` with a 500 ms deadline: the answer's status and body, or what went
/// wrong.
async fn cluster(s: &Serve, token: &str) -> Result<(u16, Value), String> {
    let c = call(s.api, "GET", "api", "/api/v1/cluster", Some(token), None);
    match tokio::time::timeout(Duration::from_millis(500), c).await {
        Ok(Ok(a)) => Ok((
            a.status,
            serde_json::from_slice(&a.body).unwrap_or(Value::Null),
        )),
        Ok(Err(e)) => Err(format!("error: {e}")),
        Err(_) => Err("no answer within 500 ms".into()),
    }
}

/// Waits until `s` answers that `id` leads (itself, when `id` is its own: a follower answers
/// with the leader's `self`).
async fn answers_leader(s: &Serve, token: &str, id: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, c)) = cluster(s, token).await {
            if c["self"]["id"] == id && c["self"]["leader"] == true {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{id} never led: {:?}", cluster(s, token).await).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Takeover {
    took: Duration,
    /// What the survivor answered meanwhile: a count per kind.
    answers: BTreeMap<String, usize>,
}

async fn takeover(
    bin: &str,
    base: &Path,
    url: &str,
    key: &Path,
    ttl_ms: u64,
    rounds: usize,
) -> Result<Vec<Takeover>, Error> {
    let key = key.display().to_string();
    let ttl = ttl_ms.to_string();
    let ids = ["a", "b"];
    let mut planes = Vec::new();
    for id in ids {
        planes.push(Serve::new(
            bin,
            base.join(format!("lease-{ttl_ms}-{id}")),
            &[
                "--database-url",
                url,
                "--platform-key-file",
                &key,
                "--lease-ttl-ms",
                &ttl,
                "--control-plane-id",
                id,
                "--no-proxy",
            ],
        )?);
    }
    planes[0].start().await?;
    let token = planes[0].token()?;
    answers_leader(&planes[0], &token, "a").await?;
    planes[1].start().await?;
    answers_leader(&planes[1], &token, "a").await?;
    let (mut l, mut f) = (0usize, 1usize);
    let mut out = Vec::new();
    for round in 1..=rounds {
        // The survivor has followed for a while (its own view, not a start-up's), and the kill
        // falls anywhere in the leader's renewal period: a fixed pause would always kill it
        // at the same point of it, and time the same case every round.
        tokio::time::sleep(
            Duration::from_millis(ttl_ms / 2) + jitter(Duration::from_millis(ttl_ms / 3)),
        )
        .await;
        answers_leader(&planes[f], &token, ids[l]).await?;
        planes[l].kill();
        let from = Instant::now();
        let mut answers: BTreeMap<String, usize> = BTreeMap::new();
        loop {
            let kind = match cluster(&planes[f], &token).await {
                Ok((200, c)) if c["self"]["id"] == ids[f] && c["self"]["leader"] == true => break,
                Ok((200, c)) => format!("200 self={}", c["self"]["id"]),
                Ok((s, c)) => format!("{s} {}", c["error"]["message"].as_str().unwrap_or("")),
                Err(e) => e,
            };
            let kind: String = kind.chars().take(90).collect();
            *answers.entry(kind).or_default() += 1;
            if from.elapsed() > Duration::from_millis(ttl_ms * 4) {
                return Err(format!("{} did not take over: {answers:?}", ids[f]).into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = from.elapsed();
        println!(
            "  lease {ttl_ms} ms, round {round}: {} killed, {} leads after {} ms ({:.2} lease times); meanwhile it answered {:?}",
            ids[l],
            ids[f],
            ms(took),
            took.as_secs_f64() * 1000.0 / ttl_ms as f64,
            answers
        );
        out.push(Takeover { took, answers });
        // The killed one again: it follows.
        planes[l].start().await?;
        answers_leader(&planes[l], &token, ids[f]).await?;
        std::mem::swap(&mut l, &mut f);
    }
    Ok(out)
}

// === 3. Restart ===

/// One request of the load: when it was sent and answered, its status (0 when it got no
/// answer) and body.
struct Reply {
    sent: Instant,
    done: Instant,
    status: u16,
    body: String,
}

/// Two workers sending `GET /hello` one at a time, 10 ms apart; every reply kept.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Reply>>>,
}

impl Load {
    fn start(addr: SocketAddr, host: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..2)
            .map(|_| {
                let (stop, host) = (stop.clone(), host.to_owned());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) && out.len() < 1_000_000 {
                        let sent = Instant::now();
                        let get = call(addr, "GET", &host, "/hello", None, None);
                        out.push(
                            match tokio::time::timeout(Duration::from_secs(5), get).await {
                                Ok(Ok(a)) => Reply {
                                    sent,
                                    done: Instant::now(),
                                    status: a.status,
                                    body: String::from_utf8_lossy(&a.body).into_owned(),
                                },
                                Ok(Err(e)) => Reply {
                                    sent,
                                    done: Instant::now(),
                                    status: 0,
                                    body: e.to_string(),
                                },
                                Err(_) => Reply {
                                    sent,
                                    done: Instant::now(),
                                    status: 0,
                                    body: "no answer within 5 s".into(),
                                },
                            },
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    out
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> Result<Vec<Reply>, Error> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await?);
        }
        all.sort_by_key(|r| r.sent);
        Ok(all)
    }
}

/// What one path saw of one restart.
struct Seen {
    sent: usize,
    failed: usize,
    /// From the first failed request's answer (or error) to the last one's, after the signal.
    window: Option<(Duration, Duration)>,
}

impl Seen {
    /// Counts the requests answered (or failed) after `from`: those in flight at the signal
    /// included.
    fn new(replies: &[Reply], from: Instant, label: &str) -> Self {
        let window: Vec<&Reply> = replies.iter().filter(|r| r.done >= from).collect();
        let failed: Vec<&&Reply> = window
            .iter()
            .filter(|r| r.status != 200 || r.body != "hello")
            .collect();
        for r in replies
            .iter()
            .filter(|r| r.done < from && (r.status != 200 || r.body != "hello"))
        {
            let body: String = r.body.chars().take(80).collect();
            println!(
                "      {label}: failed {} ms before the signal: {} {body:?}",
                ms(from.saturating_duration_since(r.done)),
                r.status
            );
        }
        if !failed.is_empty() {
            let mut kinds: BTreeMap<(u16, String), usize> = BTreeMap::new();
            for r in &failed {
                let body: String = r.body.chars().take(80).collect();
                *kinds.entry((r.status, body)).or_default() += 1;
            }
            let kinds: Vec<String> = kinds
                .into_iter()
                .map(|((s, b), n)| format!("{n} x {s} {b:?}"))
                .collect();
            println!("      {label}: {}", kinds.join("; "));
        }
        let at = |r: &Reply| r.done.saturating_duration_since(from);
        Self {
            sent: window.len(),
            failed: failed.len(),
            window: failed
                .first()
                .zip(failed.last())
                .map(|(a, b)| (at(a), at(b))),
        }
    }

    fn describe(&self) -> String {
        match self.window {
            Some((a, b)) => format!(
                "{} of {} failed, answered from +{} to +{} ms",
                self.failed,
                self.sent,
                ms(a),
                ms(b)
            ),
            None => format!("0 of {} failed", self.sent),
        }
    }
}

struct RestartRound {
    kill: bool,
    inproc: Seen,
    standalone: Seen,
}

fn pids(s: &Value) -> Vec<u64> {
    s["replicas"]
        .as_array()
        .map(|rs| rs.iter().filter_map(|r| r["pid"].as_u64()).collect())
        .unwrap_or_default()
}

/// Polls the instance's observed status until it runs with 2 ready replicas.
async fn whole(s: &Serve, token: &str, id: &str) -> Result<Value, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let path = format!("/api/v1/instances/{id}/status");
    loop {
        let st = call(s.api, "GET", "api", &path, Some(token), None);
        if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(2), st).await {
            let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            let o = &v["observed"];
            if a.status == 200 && o["state"] == "running" && o["ready"].as_u64() == Some(2) {
                return Ok(o.clone());
            }
            if Instant::now() > deadline {
                return Err(format!("{id} never ran whole: {v}").into());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{id}: no status").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_restarts(
    bin: &str,
    base: &Path,
    stacks: &Path,
    rounds: usize,
) -> Result<Vec<RestartRound>, Error> {
    let dir = base.join("restart");
    let stacks = stacks.display().to_string();
    let mut serve = Serve::new(bin, dir.clone(), &["--stacks-dir", &stacks])?;
    serve.start().await?;
    let token = serve.token()?;
    let team = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/teams",
        Some(json!({"name": "Restart"})),
    )
    .await?;
    let app = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/applications",
        Some(json!({"name": "app", "team_id": team["id"]})),
    )
    .await?;
    let st = api(serve.api, &token, "GET", "/api/v1/stacks", None).await?;
    let flows = json!([
        { "id": "t1", "type": "tab", "label": "Hello" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/hello", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = 'hello'; return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ]);
    let i = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/instances",
        Some(json!({
            "name": "ha", "application_id": app["id"], "stack_id": st["items"][0]["id"],
            "flows": flows, "ha": { "replicas": 2 },
        })),
    )
    .await?;
    let id = i["id"].as_str().ok_or("no instance id")?.to_owned();
    whole(&serve, &token, &id).await?;
    let pt = api(
        serve.api,
        &token,
        "POST",
        "/api/v1/proxy-tokens",
        Some(json!({"name": "edge"})),
    )
    .await?;
    let token_file = dir.join("proxy-token");
    std::fs::write(
        &token_file,
        pt["token_value"].as_str().ok_or("no token_value")?,
    )?;
    let edge = Proxy::fed(bin, &dir, serve.api, &token_file, "edge")?;
    edge.connected().await?;
    edge.knows(&["ha.localhost".to_string()]).await?;

    let mut out = Vec::new();
    for round in 0..2 * rounds {
        let kill = round % 2 == 1;
        let before = pids(&whole(&serve, &token, &id).await?);
        edge.connected().await?;
        let inproc = Load::start(serve.http, "ha.localhost");
        let standalone = Load::start(edge.addr, "ha.localhost");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let from = Instant::now();
        let down = if kill {
            serve.kill();
            from.elapsed()
        } else {
            serve.term().await?
        };
        serve.start().await?;
        let up = from.elapsed();
        let after = pids(&whole(&serve, &token, &id).await?);
        let again = from.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (a, b) = (inproc.finish().await?, standalone.finish().await?);
        let signal = if kill { "SIGKILL" } else { "SIGTERM" };
        println!(
            "  restart {} ({signal}): exited after {} ms, API up at +{} ms, instance whole at +{} ms, replicas {}",
            round / 2 + 1,
            ms(down),
            ms(up),
            ms(again),
            if after.len() == 2 && after.iter().all(|p| before.contains(p)) {
                "adopted (same pids)".to_string()
            } else {
                format!("changed: {before:?} -> {after:?}")
            }
        );
        let r = RestartRound {
            kill,
            inproc: Seen::new(&a, from, "tandem serve's proxy"),
            standalone: Seen::new(&b, from, "standalone proxy"),
        };
        println!(
            "    tandem serve's proxy: {}; standalone proxy: {}",
            r.inproc.describe(),
            r.standalone.describe()
        );
        out.push(r);
    }
    Ok(out)
}

// === main ===

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .ok_or("usage: cluster <tandem binary> [rounds] [changes]")?;
    let rounds: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .clamp(1, 10);
    let changes: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100)
        .clamp(10, 500);
    let base = std::env::temp_dir().join(format!("tandem-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let _reaper = Reaper(base.clone());
    let stacks = std::env::var_os("TANDEM_TEST_STACKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"));
    let key = base.join("platform-key");
    std::fs::write(&key, format!("{}\n", "5e".repeat(32)))?;
    let pg = tandem_controlplane::scratch_pg::start().await?;
    let started = Instant::now();

    // PARTS (default 123) picks the parts to run, for a look at one of them.
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "123".into());
    let mut rows = Vec::new();
    if parts.contains('1') {
        println!("1. Route feed: DELETE of a stopped instance, until each proxy answers its host 404 ({changes} changes)");
        rows = feed(
            &bin,
            &base,
            &pg.create_database().await?,
            &key,
            &stacks,
            changes,
        )
        .await?;
        let peer_poll = (changes / 5).max(10);
        rows.push(routes_peer(&bin, &base, peer_poll, false).await?);
        rows.push(routes_peer(&bin, &base, changes, true).await?);
    }
    let feed_done = started.elapsed();
    let mut leases = Vec::new();
    if parts.contains('2') {
        println!("2. Takeover: SIGKILL of the leader, until the other answers GET /api/v1/cluster as leader");
        for ttl in [5000u64, 1500] {
            // Twice the rounds: where the kill falls in the renewal period spreads the times.
            let t = takeover(
                &bin,
                &base,
                &pg.create_database().await?,
                &key,
                ttl,
                2 * rounds,
            )
            .await?;
            leases.push((ttl, t));
        }
    }
    let lease_done = started.elapsed();
    let mut restarts = Vec::new();
    if parts.contains('3') {
        println!("3. Restarts of tandem serve under load, 2-replica HA instance of real Node-RED");
        restarts = run_restarts(&bin, &base, &stacks, rounds).await?;
    }
    let all_done = started.elapsed();

    if let [one, eight, poll, hup] = &rows[..] {
        println!();
        println!("Route feed: time from the API call's return until a proxy answers the deleted instance's host 404 (ms; p99 is nearest-rank)");
        println!();
        println!("| source | proxies | changes | each proxy p50 | p99 | max | last of the proxies p50 | p99 | max | API call p50 |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            r.print_row();
        }
        println!();
        println!(
            "8 proxies, last of them: p99 {} ms (target: under 100 ms). Ratios of medians (last proxy): feed/poll {:.3}, feed/SIGHUP {:.2}; 8/1 proxies {:.2}",
            ms(eight.last_p(0.99)),
            eight.last_p(0.5).as_secs_f64() / poll.last_p(0.5).as_secs_f64(),
            eight.last_p(0.5).as_secs_f64() / hup.last_p(0.5).as_secs_f64(),
            eight.last_p(0.5).as_secs_f64() / one.last_p(0.5).as_secs_f64(),
        );
    }
    if !leases.is_empty() {
        println!();
        println!("Takeover after SIGKILL of the leader (due between 2/3 and 4/3 of a lease time)");
        println!();
        println!("| lease | median | median / lease | min | max | every round (ms) | bound (ms) |");
        println!("|---:|---:|---:|---:|---:|---|---|");
        for (ttl, t) in &leases {
            let took: Vec<Duration> = t.iter().map(|t| t.took).collect();
            let s = sorted(took.clone());
            println!(
                "| {ttl} ms | {} ms | {:.2} | {} | {} | {} | {}-{} |",
                ms(median(&took)),
                median(&took).as_secs_f64() * 1000.0 / *ttl as f64,
                ms(s[0]),
                ms(s[s.len() - 1]),
                list(&took),
                ttl * 2 / 3,
                ttl * 4 / 3
            );
        }
        println!();
        for (ttl, t) in &leases {
            // By status (and the first words of the message): the per-round lines have it all.
            let mut answers: BTreeMap<String, usize> = BTreeMap::new();
            for r in t {
                for (k, n) in &r.answers {
                    let short: String = k.split(" at ").next().unwrap_or(k).to_string();
                    *answers.entry(short).or_default() += n;
                }
            }
            println!("Lease {ttl} ms: the survivor's answers until it led (polled every 10 ms): {answers:?}");
        }
    }
    if !restarts.is_empty() {
        println!();
        println!("Restarts of tandem serve: failed requests (2 workers per path, 10 ms apart)");
        println!();
        println!("| signal | path | failed per round | median failed | sent per round | failures answered within (ms after the signal) |");
        println!("|---|---|---|---:|---|---|");
        for kill in [false, true] {
            let rs: Vec<&RestartRound> = restarts.iter().filter(|r| r.kill == kill).collect();
            for (path, pick) in [
                (
                    "tandem serve's proxy",
                    (|r: &RestartRound| &r.inproc) as fn(&RestartRound) -> &Seen,
                ),
                ("standalone proxy", |r: &RestartRound| &r.standalone),
            ] {
                let mut failed: Vec<usize> = rs.iter().map(|r| pick(r).failed).collect();
                let per_round = failed
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let sent = rs
                    .iter()
                    .map(|r| pick(r).sent.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let windows = rs
                    .iter()
                    .map(|r| match pick(r).window {
                        Some((a, b)) => format!("{}-{}", ms(a), ms(b)),
                        None => "-".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                failed.sort();
                println!(
                    "| {} | {path} | {per_round} | {} | {sent} | {windows} |",
                    if kill { "SIGKILL" } else { "SIGTERM" },
                    failed[failed.len() / 2]
                );
            }
        }
    }
    println!();
    println!(
        "Took {:.0} s: feed {:.0} s, takeover {:.0} s, restarts {:.0} s.",
        all_done.as_secs_f64(),
        feed_done.as_secs_f64(),
        (lease_done - feed_done).as_secs_f64(),
        (all_done - lease_done).as_secs_f64()
    );
    Ok(())
}
