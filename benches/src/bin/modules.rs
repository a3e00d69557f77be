//! Modules benchmark (`modules` binary, issue 12): how long adding an npm module to an instance
//! of `tandem serve` takes, first install and cached, with 1 and 3 replicas; and the disk that 10
//! instances with the same module set use. The peer, measured in the same run, is FlowFuse's
//! launcher, which runs `npm install` in each replica's own userDir at its start.
//!
//! Usage: `cargo run --release -p tandem-benches --bin modules -- <tandem binary> [rounds]`
//! (at most 5 rounds) (`benches/modules.sh` builds tandem and runs it). `MODULES` lists the
//! modules, `name@version` separated by commas (default
//! `node-red-node-random@0.4.1,@flowfuse/node-red-dashboard@1.31.0`). Node-RED comes from the
//! stacks shared with the other benchmarks (`TANDEM_TEST_STACKS`, default
//! `<tmp>/tandem-test-stacks`), linked into a stacks directory of the benchmark's own, so that
//! removing its module sets touches nobody else's.
//!
//! For each module, 1 and 3 replicas (balanced), each round, medians printed with every round:
//! - Tandem, first install: the stacks directory's `modules-*` removed and Tandem's npm cache
//!   (`npm_config_cache` of `tandem serve`) emptied; `PUT /api/v1/instances/{id}/modules` on a
//!   running instance, then `GET /api/v1/deployments/{id}` every 50 ms; time from the PUT to
//!   `succeeded` (npm's download and install, then every replica replaced one at a time);
//! - Tandem, cached: the same set put on a second running instance: the set is installed, so
//!   only the replicas are replaced;
//! - peer, first: `npm install --ignore-scripts <module>@<version>` into a fresh directory per
//!   replica, one after the other (as each replica's launcher would at its start), with an
//!   empty npm cache before the first replica (the later replicas find it warm); then, timed
//!   apart, Node-RED of the same stack started on that directory as its userDir, until it
//!   answers `GET /` (it listens once its flows started) and `GET /nodes` lists the module;
//!   stopped before the next replica;
//! - peer, cached: the same with the cache the first install left;
//! - peer, parallel (3 replicas only): the three installs at once, from an empty cache and from
//!   a warm one, as replicas starting together would (npm only).
//!
//! Tandem's time includes replacing every replica; the peer's is printed twice: npm alone (the
//! install itself) and npm plus the Node-RED start that follows it in each replica.
//!
//! Disk: 10 instances of one replica with the last module's set: `du -sb` (apparent bytes) and
//! `du -sB1` (allocated) of the shared `modules-<hash>/node_modules` plus the 10 userDirs'
//! `node_modules` (links into it), against 10 times one per-replica install of the peer's
//! (`node_modules` of a real install, measured once).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../common.rs"]
mod common;
use common::{call, free_port, median, Error};

/// The benchmark's directory: Tandem's data and stacks, both npm caches, the peer's replicas.
/// Removed on drop.
struct Dirs {
    base: PathBuf,
}

impl Dirs {
    fn new() -> Result<Self, Error> {
        let base = std::env::temp_dir().join(format!("tandem-modules-{}", std::process::id()));
        for sub in ["data", "stacks", "npm-tandem", "npm-peer", "peer"] {
            std::fs::create_dir_all(base.join(sub))?;
        }
        Ok(Self { base })
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    fn stacks(&self) -> PathBuf {
        self.base.join("stacks")
    }

    /// Tandem's npm cache (`npm_config_cache` of `tandem serve`).
    fn tandem_cache(&self) -> PathBuf {
        self.base.join("npm-tandem")
    }

    /// The peer's npm cache.
    fn peer_cache(&self) -> PathBuf {
        self.base.join("npm-peer")
    }

    fn peer(&self) -> PathBuf {
        self.base.join("peer")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Removes `dir` and makes it again, empty.
fn empty(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

struct Tandem {
    api: SocketAddr,
    token: String,
    child: std::process::Child,
}

impl Tandem {
    async fn start(bin: &str, dirs: &Dirs) -> Result<Self, Error> {
        let (api, http, metrics) = (free_port()?, free_port()?, free_port()?);
        let log = std::fs::File::create(dirs.base.join("tandem.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dirs.data())
            .arg("--stacks-dir")
            .arg(dirs.stacks())
            .args(["--api-listen", &api.to_string()])
            .args(["--http-listen", &http.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--stop-replicas-on-exit", "true"])
            .env("npm_config_cache", dirs.tandem_cache())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        // From here on, `Drop` stops it, whatever happens.
        let mut t = Self {
            api,
            token: String::new(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(call(api, "GET", "api", "/healthz", None, None).await, Ok(a) if a.status == 200)
        {
            if Instant::now() > deadline {
                return Err("tandem serve did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t.token = std::fs::read_to_string(dirs.data().join("admin-token"))?
            .trim()
            .to_owned();
        Ok(t)
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Error> {
        let a = call(
            self.api,
            method,
            "api",
            path,
            Some(&self.token),
            body.as_ref(),
        )
        .await?;
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

    /// Polls the observed status every 100 ms until every one of `n` replicas is ready.
    async fn wait_whole(&self, id: &str, n: u64) -> Result<(), Error> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let s = self
                .api("GET", &format!("/api/v1/instances/{id}/status"), None)
                .await?;
            let s = &s["observed"];
            if s["state"] == "running" && s["ready"].as_u64() == Some(n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{id} never ran whole: {s}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A running balanced instance of `n` replicas (1 = no `ha`) with no module.
    async fn create(
        &self,
        app: &Value,
        stack: &Value,
        name: &str,
        n: u64,
    ) -> Result<String, Error> {
        let mut body = json!({ "name": name, "application_id": app["id"], "stack_id": stack });
        if n > 1 {
            body["ha"] = json!({ "replicas": n });
        }
        let i = self.api("POST", "/api/v1/instances", Some(body)).await?;
        let id = i["id"]
            .as_str()
            .ok_or_else(|| format!("POST /instances answered no id: {i}"))?
            .to_owned();
        self.wait_whole(&id, n).await?;
        Ok(id)
    }

    /// Deletes an instance and waits until the driver removed its directory (its replicas
    /// stopped), so that no replica of it shares the cores with the next measurement.
    async fn delete(&self, dirs: &Dirs, id: &str, name: &str) -> Result<(), Error> {
        self.api("DELETE", &format!("/api/v1/instances/{id}"), None)
            .await?;
        let dir = dirs.data().join("instances").join(name);
        let deadline = Instant::now() + Duration::from_secs(60);
        while dir.exists() {
            if Instant::now() > deadline {
                return Err(format!("{} still there after the delete", dir.display()).into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Puts `modules` on the instance; polls the deploy every 50 ms until it is no longer
    /// pending or running. Returns the time from the PUT until `succeeded` was seen.
    async fn put_modules(&self, id: &str, module: &Module) -> Result<Duration, Error> {
        let from = Instant::now();
        let d = self
            .api(
                "PUT",
                &format!("/api/v1/instances/{id}/modules"),
                Some(json!({ "modules": { &module.name: &module.version } })),
            )
            .await?;
        let did = d["id"]
            .as_str()
            .ok_or_else(|| format!("PUT modules answered no deploy id: {d}"))?
            .to_owned();
        let deadline = from + Duration::from_secs(600);
        let d = loop {
            let d = self
                .api("GET", &format!("/api/v1/deployments/{did}"), None)
                .await?;
            if !matches!(d["status"].as_str(), Some("pending" | "running")) {
                break d;
            }
            if Instant::now() > deadline {
                return Err(format!("deploy {did} never ended: {d}").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let took = from.elapsed();
        if d["status"] != "succeeded" {
            return Err(format!("the deploy of {} did not succeed: {d}", module.spec()).into());
        }
        let m = self
            .api("GET", &format!("/api/v1/instances/{id}/modules"), None)
            .await?;
        if m["modules"][&module.name]["installed"] != module.version.as_str() {
            return Err(format!("{} is not what runs after the deploy: {m}", module.spec()).into());
        }
        Ok(took)
    }

    /// How long npm took in the instance's last module install, from the log's notes
    /// (`installing ... with npm` → `installed modules ...`); `None` when it ran no npm.
    async fn npm_time(&self, id: &str) -> Result<Option<Duration>, Error> {
        let page = self
            .api(
                "GET",
                &format!("/api/v1/instances/{id}/logs?replica=tandem&limit=1000"),
                None,
            )
            .await?;
        let entries = page["log"].as_array().cloned().unwrap_or_default();
        let at = |prefix: &str| {
            entries
                .iter()
                .rev()
                .find(|e| e["msg"].as_str().is_some_and(|m| m.starts_with(prefix)))
                .and_then(|e| e["ts"].as_i64())
        };
        Ok(match (at("installing "), at("installed modules")) {
            (Some(a), Some(b)) if b >= a => Some(Duration::from_millis((b - a) as u64)),
            _ => None,
        })
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A module of the registry, pinned.
#[derive(Clone)]
struct Module {
    name: String,
    version: String,
}

impl Module {
    fn parse(spec: &str) -> Result<Self, Error> {
        // `@scope/name@1.0.0`: the version is after the last `@`, which is not the first char.
        match spec.trim().rsplit_once('@') {
            Some((name, version)) if !name.is_empty() && !version.is_empty() => Ok(Self {
                name: name.to_owned(),
                version: version.to_owned(),
            }),
            _ => Err(format!("{spec:?} is not name@version").into()),
        }
    }

    fn spec(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// How the peer runs Node-RED: the stack's Node.js and `red.js`, as Tandem runs them.
struct Runtime {
    node: PathBuf,
    red: PathBuf,
}

/// Starts Node-RED on `dir` as its userDir; returns the time until it answered `GET /` (it
/// listens once its flows started), after checking that `GET /nodes` lists `module`; stops it.
async fn peer_start(rt: &Runtime, dir: &Path, module: &Module) -> Result<Duration, Error> {
    let addr = free_port()?;
    let log = std::fs::File::create(dir.join("node-red.log"))?;
    let from = Instant::now();
    let mut child = tokio::process::Command::new(&rt.node)
        .arg(&rt.red)
        .arg("--userDir")
        .arg(dir)
        .args(["--port", &addr.port().to_string()])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let deadline = from + Duration::from_secs(60);
    let took = loop {
        if matches!(call(addr, "GET", "node-red", "/", None, None).await, Ok(a) if a.status == 200)
        {
            break from.elapsed();
        }
        if Instant::now() > deadline {
            return Err(format!("Node-RED on {} did not answer", dir.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let nodes = call(addr, "GET", "node-red", "/nodes", None, None).await?;
    let nodes: Value = serde_json::from_slice(&nodes.body).unwrap_or(Value::Null);
    let loaded = nodes.as_array().is_some_and(|ns| {
        ns.iter()
            .any(|n| n["module"] == module.name.as_str() && n["enabled"] != false)
    });
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = child.wait().await;
    if !loaded {
        return Err(format!(
            "Node-RED on {} did not load {}",
            dir.display(),
            module.spec()
        )
        .into());
    }
    Ok(took)
}

/// The peer's install for one replica: a fresh directory with a `package.json`, as a replica's
/// userDir, and `npm install` with the flags Tandem uses; returns how long npm took.
async fn peer_install(dir: &Path, cache: &Path, module: &Module) -> Result<Duration, Error> {
    empty(dir)?;
    std::fs::write(
        dir.join("package.json"),
        r#"{"name":"replica","private":true}"#,
    )?;
    let from = Instant::now();
    let out = tokio::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--ignore-scripts",
            "--",
        ])
        .arg(module.spec())
        .current_dir(dir)
        .env("npm_config_cache", cache)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let took = from.elapsed();
    if !out.status.success() {
        return Err(format!(
            "npm install {} failed: {}",
            module.spec(),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(took)
}

/// One peer replica's times: its `npm install`, then its Node-RED start.
#[derive(Clone, Copy)]
struct PeerReplica {
    npm: Duration,
    start: Duration,
}

/// `n` replicas' installs and starts one after the other; each replica's times.
async fn peer_sequential(
    dirs: &Dirs,
    rt: &Runtime,
    module: &Module,
    n: u64,
) -> Result<Vec<PeerReplica>, Error> {
    let mut out = Vec::new();
    for k in 0..n {
        let dir = dirs.peer().join(format!("r{k}"));
        let npm = peer_install(&dir, &dirs.peer_cache(), module).await?;
        let start = peer_start(rt, &dir, module).await?;
        out.push(PeerReplica { npm, start });
    }
    Ok(out)
}

/// `n` replicas' installs at once; the time until the last ended.
async fn peer_parallel(dirs: &Dirs, module: &Module, n: u64) -> Result<Duration, Error> {
    let from = Instant::now();
    let mut installs = tokio::task::JoinSet::new();
    for k in 0..n {
        let (dir, cache, module) = (
            dirs.peer().join(format!("p{k}")),
            dirs.peer_cache(),
            module.clone(),
        );
        installs.spawn(async move { peer_install(&dir, &cache, &module).await });
    }
    while let Some(r) = installs.join_next().await {
        r??;
    }
    Ok(from.elapsed())
}

/// Removes every installed module set of the stacks directory.
fn remove_module_sets(stacks: &Path) -> Result<(), Error> {
    for e in std::fs::read_dir(stacks)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("modules-") {
            std::fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

/// Links the shared Node-RED (and Node.js) stacks into the benchmark's stacks directory, so
/// that they are not installed again; without them there, Tandem installs them (untimed).
/// Returns where they are for the peer.
fn link_stacks(dirs: &Dirs, stack: &Value) -> Result<Runtime, Error> {
    let shared = std::env::var_os("TANDEM_TEST_STACKS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tandem-test-stacks"));
    let v = stack["nodered_version"]
        .as_str()
        .ok_or_else(|| format!("a stack with no Node-RED version: {stack}"))?;
    let mut wanted = vec![("node-red", format!("node-red-{v}"))];
    let mut rt = Runtime {
        node: "node".into(),
        red: dirs
            .stacks()
            .join(format!("node-red-{v}/node_modules/node-red/red.js")),
    };
    if let Some(v) = stack["node_version"].as_str() {
        wanted.push(("node", format!("node-{v}")));
        rt.node = dirs
            .stacks()
            .join(format!("node-{v}/node_modules/node/bin/node"));
    }
    for (package, dir) in wanted {
        // The failover and deploy benchmarks keep stacks at the top, the tests under `stacks/`.
        let found = [shared.join(&dir), shared.join("stacks").join(&dir)]
            .into_iter()
            .find(|d| {
                d.join("node_modules")
                    .join(package)
                    .join("package.json")
                    .exists()
            });
        match found {
            Some(from) => std::os::unix::fs::symlink(&from, dirs.stacks().join(&dir))?,
            None => println!(
                "{dir} is not in {}: Tandem installs it (untimed)",
                shared.display()
            ),
        }
    }
    Ok(rt)
}

/// `du -s` of `paths` with `flags`, the total in bytes (hard links counted once).
fn du(flags: &str, paths: &[PathBuf]) -> Result<u64, Error> {
    let out = Command::new("du")
        .arg(flags)
        .arg("-c")
        .args(paths)
        .output()?;
    if !out.status.success() {
        return Err(format!("du failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let total = text
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("du printed no total: {text}"))?;
    Ok(total)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn list(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn npm_sum(rs: &[PeerReplica]) -> Duration {
    rs.iter().map(|r| r.npm).sum()
}

fn start_sum(rs: &[PeerReplica]) -> Duration {
    rs.iter().map(|r| r.start).sum()
}

/// Each replica's `npm+start`, in seconds.
fn each(rs: &[PeerReplica]) -> String {
    rs.iter()
        .map(|r| format!("{:.2}+{:.2}", r.npm.as_secs_f64(), r.start.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB ({bytes} B)", bytes as f64 / (1024.0 * 1024.0))
}

/// Every round's times of one module and replica count.
#[derive(Default)]
struct Times {
    tandem_first: Vec<Duration>,
    /// npm's part of Tandem's first install, from the instance's log.
    tandem_npm: Vec<Duration>,
    tandem_cached: Vec<Duration>,
    /// Per round, each replica's times.
    peer_first: Vec<Vec<PeerReplica>>,
    peer_cached: Vec<Vec<PeerReplica>>,
    peer_parallel_first: Vec<Duration>,
    peer_parallel_cached: Vec<Duration>,
}

/// One round of one module and replica count: Tandem's first and cached installs on two new
/// instances, then the peer's (or the peer's first, every other round).
#[allow(clippy::too_many_arguments)]
async fn round(
    t: &Tandem,
    dirs: &Dirs,
    rt: &Runtime,
    app: &Value,
    stack: &Value,
    module: &Module,
    n: u64,
    name: &str,
    peer_first: bool,
    times: &mut Times,
) -> Result<(), Error> {
    let tandem = async {
        let (a, b) = (format!("{name}-a"), format!("{name}-b"));
        let first_id = t.create(app, stack, &a, n).await?;
        let cached_id = t.create(app, stack, &b, n).await?;
        remove_module_sets(&dirs.stacks())?;
        empty(&dirs.tandem_cache())?;
        let first = t.put_modules(&first_id, module).await?;
        let npm = t.npm_time(&first_id).await?;
        let cached = t.put_modules(&cached_id, module).await?;
        if let Some(npm) = t.npm_time(&cached_id).await? {
            return Err(format!("the cached install ran npm ({npm:?})").into());
        }
        t.delete(dirs, &first_id, &a).await?;
        t.delete(dirs, &cached_id, &b).await?;
        println!(
            "  {name}: Tandem first {} (npm {}), cached {}",
            secs(first),
            npm.map(secs).unwrap_or_else(|| "?".into()),
            secs(cached)
        );
        Ok::<_, Error>((first, npm, cached))
    };
    let peer = async {
        empty(&dirs.peer_cache())?;
        let first = peer_sequential(dirs, rt, module, n).await?;
        let cached = peer_sequential(dirs, rt, module, n).await?;
        let parallel = if n > 1 {
            empty(&dirs.peer_cache())?;
            let cold = peer_parallel(dirs, module, n).await?;
            let warm = peer_parallel(dirs, module, n).await?;
            Some((cold, warm))
        } else {
            None
        };
        empty(&dirs.peer())?;
        println!(
            "  {name}: peer first npm {} + start {} ({} per replica), cached npm {} + start {} ({} per replica){}",
            secs(npm_sum(&first)),
            secs(start_sum(&first)),
            each(&first),
            secs(npm_sum(&cached)),
            secs(start_sum(&cached)),
            each(&cached),
            parallel
                .map(|(c, w)| format!(", parallel first {}, parallel cached {}", secs(c), secs(w)))
                .unwrap_or_default()
        );
        Ok::<_, Error>((first, cached, parallel))
    };
    // The order alternates between rounds, so that drift of the machine or the registry
    // does not always fall on the same side.
    let ((first, npm, cached), (pfirst, pcached, parallel)) = if peer_first {
        let p = peer.await?;
        (tandem.await?, p)
    } else {
        let tt = tandem.await?;
        (tt, peer.await?)
    };
    times.tandem_first.push(first);
    times.tandem_npm.extend(npm);
    times.tandem_cached.push(cached);
    times.peer_first.push(pfirst);
    times.peer_cached.push(pcached);
    if let Some((cold, warm)) = parallel {
        times.peer_parallel_first.push(cold);
        times.peer_parallel_cached.push(warm);
    }
    Ok(())
}

/// Disk of 10 one-replica instances with `module`'s set: Tandem's shared set plus the link
/// farms, against 10 times one peer install.
async fn disk(
    t: &Tandem,
    dirs: &Dirs,
    app: &Value,
    stack: &Value,
    module: &Module,
) -> Result<(), Error> {
    let mut cached = Vec::new();
    let mut farms = Vec::new();
    let mut ids = Vec::new();
    for k in 0..10 {
        let name = format!("disk-{k}");
        let id = t.create(app, stack, &name, 1).await?;
        cached.push(t.put_modules(&id, module).await?);
        ids.push(id);
        farms.push(
            dirs.data()
                .join("instances")
                .join(&name)
                .join("r0/node_modules"),
        );
    }
    println!(
        "10 one-replica instances given {}: median {} from the PUT to succeeded ({})",
        module.spec(),
        secs(median(cached.clone())),
        list(&cached)
    );
    // The shared set is where the links of the first instance's farm point.
    let link = std::fs::read_link(farms[0].join(&module.name))?;
    let set = link
        .ancestors()
        .find(|p| p.ends_with("node_modules"))
        .ok_or_else(|| format!("{} is not in a node_modules", link.display()))?
        .to_path_buf();
    for f in &farms {
        let l = std::fs::read_link(f.join(&module.name))?;
        if !l.starts_with(&set) {
            return Err(format!("{} does not link into {}", f.display(), set.display()).into());
        }
    }
    let one = dirs.peer().join("disk");
    peer_install(&one, &dirs.peer_cache(), module).await?;
    let one = one.join("node_modules");
    let mut tandem_paths = vec![set.clone()];
    tandem_paths.extend(farms.iter().cloned());
    let rows = [
        ("apparent (`du -sb`)", "-sb"),
        ("allocated (`du -sB1`)", "-sB1"),
    ];
    println!();
    println!("| 10 instances, {} | shared set | 10 link farms | Tandem total | peer: one install | peer: 10 installs | peer / Tandem |", module.spec());
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, flag) in rows {
        let shared = du(flag, std::slice::from_ref(&set))?;
        let total = du(flag, &tandem_paths)?;
        let peer_one = du(flag, std::slice::from_ref(&one))?;
        println!(
            "| {label} | {} | {} | {} | {} | {} | {:.1} |",
            mib(shared),
            mib(total - shared),
            mib(total),
            mib(peer_one),
            mib(10 * peer_one),
            (10 * peer_one) as f64 / total as f64
        );
    }
    for (k, id) in ids.iter().enumerate() {
        t.delete(dirs, id, &format!("disk-{k}")).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .ok_or("usage: modules <tandem binary> [rounds]")?;
    let rounds: usize = args
        .next()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .clamp(1, 5);
    let modules = std::env::var("MODULES").unwrap_or_else(|_| {
        "node-red-node-random@0.4.1,@flowfuse/node-red-dashboard@1.31.0".into()
    });
    let modules: Vec<Module> = modules
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Module::parse)
        .collect::<Result<_, _>>()?;
    let last = modules.last().ok_or("MODULES lists no module")?;
    let dirs = Dirs::new()?;
    let t = Tandem::start(&bin, &dirs).await?;
    let stacks = t.api("GET", "/api/v1/stacks", None).await?;
    let stack = stacks["items"][0].clone();
    let rt = link_stacks(&dirs, &stack)?;
    let stack_id = stack["id"].clone();
    let team = t
        .api("POST", "/api/v1/teams", Some(json!({"name": "Bench"})))
        .await?;
    let app = t
        .api(
            "POST",
            "/api/v1/applications",
            Some(json!({"name": "app", "team_id": team["id"]})),
        )
        .await?;
    let started = Instant::now();
    let sizes = [1u64, 3];
    let mut table: Vec<Vec<Times>> = modules
        .iter()
        .map(|_| sizes.iter().map(|_| Times::default()).collect())
        .collect();
    for r in 1..=rounds {
        println!("round {r}");
        for (mi, module) in modules.iter().enumerate() {
            for (si, &n) in sizes.iter().enumerate() {
                let name = format!("m{mi}-n{n}-r{r}");
                println!(" {} with {n} replica(s)", module.spec());
                round(
                    &t,
                    &dirs,
                    &rt,
                    &app,
                    &stack_id,
                    module,
                    n,
                    &name,
                    r % 2 == 0,
                    &mut table[mi][si],
                )
                .await?;
            }
        }
    }
    println!("rounds took {}", secs(started.elapsed()));
    println!();
    for (label, first) in [("first install", true), ("cached", false)] {
        println!();
        println!("{label} (medians; peer npm = its npm installs, peer npm + start = with each replica's Node-RED start):");
        println!();
        println!("| module | replicas | Tandem | Tandem's npm | peer npm | Tandem / peer npm | peer npm + start | Tandem / (peer npm + start) | peer npm, 3 in parallel |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (module, by_size) in modules.iter().zip(&table) {
            for (n, x) in sizes.iter().zip(by_size) {
                let (tandem, peer, parallel) = if first {
                    (&x.tandem_first, &x.peer_first, &x.peer_parallel_first)
                } else {
                    (&x.tandem_cached, &x.peer_cached, &x.peer_parallel_cached)
                };
                let tm = median(tandem.clone());
                let npm = median(peer.iter().map(|rs| npm_sum(rs)).collect());
                let whole = median(peer.iter().map(|rs| npm_sum(rs) + start_sum(rs)).collect());
                let opt = |v: &Vec<Duration>| {
                    if v.is_empty() {
                        "-".to_owned()
                    } else {
                        secs(median(v.clone()))
                    }
                };
                println!(
                    "| {} | {n} | {} | {} | {} | {:.2} | {} | {:.2} | {} |",
                    module.spec(),
                    secs(tm),
                    if first {
                        opt(&x.tandem_npm)
                    } else {
                        "none".into()
                    },
                    secs(npm),
                    tm.as_secs_f64() / npm.as_secs_f64(),
                    secs(whole),
                    tm.as_secs_f64() / whole.as_secs_f64(),
                    opt(parallel),
                );
            }
        }
    }
    println!();
    println!("Every round (s; peer per replica as npm+start):");
    for (module, by_size) in modules.iter().zip(&table) {
        for (n, x) in sizes.iter().zip(by_size) {
            let rounds = |v: &[Vec<PeerReplica>]| {
                v.iter()
                    .map(|rs| format!("[{}]", each(rs)))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "- {} x{n}: Tandem first {} (npm in it {}), cached {}; peer first {}, cached {}{}",
                module.spec(),
                list(&x.tandem_first),
                list(&x.tandem_npm),
                list(&x.tandem_cached),
                rounds(&x.peer_first),
                rounds(&x.peer_cached),
                if x.peer_parallel_first.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; peer npm in parallel: first {}, cached {}",
                        list(&x.peer_parallel_first),
                        list(&x.peer_parallel_cached)
                    )
                },
            );
        }
    }
    println!();
    disk(&t, &dirs, &app, &stack_id, last).await?;
    drop(t);
    Ok(())
}
