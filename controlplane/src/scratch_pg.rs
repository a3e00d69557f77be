//! A throwaway PostgreSQL server for tests and benchmarks: a fresh cluster in a temporary
//! directory, on a free port of 127.0.0.1, stopped and removed when the process that started it
//! exits. Needs Debian's `postgresql` package (`initdb` and `postgres`); `.ci/run` installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// A running throwaway server.
#[derive(Debug)]
pub struct ScratchPostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl ScratchPostgres {
    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> Result<String, String> {
        let name = format!("t_{}", crate::store::new_id());
        let mut c = sqlx::PgConnection::connect(&format!(
            "postgres://tandem@127.0.0.1:{}/postgres",
            self.port
        ))
        .await
        .map_err(|e| e.to_string())?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let _ = c.close().await;
        Ok(format!("postgres://tandem@127.0.0.1:{}/{name}", self.port))
    }
}

/// Where the PostgreSQL binaries are: the newest `/usr/lib/postgresql/<version>/bin`.
fn pg_bin_dir() -> Result<PathBuf, String> {
    let missing = || {
        "the PostgreSQL tests need initdb and postgres under /usr/lib/postgresql/<version>/bin: \
         install them with `apt-get install postgresql`"
            .to_string()
    };
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql").map_err(|_| missing())? {
        let Ok(entry) = entry else { continue };
        let bin = entry.path().join("bin");
        if !bin.join("initdb").is_file() || !bin.join("postgres").is_file() {
            continue;
        }
        let version: Vec<u32> = entry
            .file_name()
            .to_string_lossy()
            .split('.')
            .map(|p| p.parse().unwrap_or(0))
            .collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, b)| b).ok_or_else(missing)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    tandem_proxy::net::free_port().unwrap_or(0)
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts a server: initdb as the `postgres` user (initdb refuses root), then `postgres` under a
/// watchdog shell that stops it and removes its directory once this process is gone.
pub async fn start() -> Result<ScratchPostgres, String> {
    let bin = pg_bin_dir()?;
    let base = std::env::temp_dir().join(format!(
        "tandem-pg-{}-{}",
        std::process::id(),
        crate::store::new_id()
    ));
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {base:?}: {e}"))?;
    let data = base.join("data");
    let root = is_root();
    // As root, everything PostgreSQL touches belongs to `postgres`; otherwise we run it as us.
    let as_pg = |program: &Path| -> Vec<String> {
        let mut argv = Vec::new();
        if root {
            argv.extend(["runuser", "-u", "postgres", "--"].map(String::from));
        }
        argv.push(program.display().to_string());
        argv
    };
    if root {
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&base)
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !ok.success() {
            return Err(format!(
                "cannot chown {base:?} to the postgres user (is the postgresql package installed? \
                 `apt-get install postgresql`)"
            ));
        }
    }
    let mut initdb = as_pg(&bin.join("initdb"));
    initdb.extend(
        [
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "tandem",
            "--no-sync",
        ]
        .map(String::from),
    );
    let out = Command::new(&initdb[0])
        .args(&initdb[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {initdb:?}: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&base);
        return Err(format!(
            "{initdb:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    let mut postgres = as_pg(&bin.join("postgres"));
    postgres.extend(
        [
            "-D",
            &data.display().to_string(),
            "-p",
            &port.to_string(),
            "-k",
            &base.display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
        ]
        .map(String::from),
    );
    let postgres: Vec<String> = postgres.iter().map(|a| sh_quote(a)).collect();
    let log = base.join("postgres.log");
    let pidfile = data.join("postmaster.pid");
    // The watchdog: while this process lives, wait; then stop postgres (fast shutdown, through the
    // postmaster's own pid in case runuser does not pass the signal on), and remove everything.
    let script = format!(
        "{postgres} >{log} 2>&1 & pg=$!\n\
         while kill -0 {me} 2>/dev/null && kill -0 $pg 2>/dev/null; do sleep 0.5; done\n\
         pm=$(head -n 1 {pidfile} 2>/dev/null)\n\
         [ -n \"$pm\" ] && kill -INT \"$pm\" 2>/dev/null\n\
         kill -INT $pg 2>/dev/null\n\
         wait $pg\n\
         rm -rf {base}\n",
        postgres = postgres.join(" "),
        log = sh_quote(&log.display().to_string()),
        me = std::process::id(),
        pidfile = sh_quote(&pidfile.display().to_string()),
        base = sh_quote(&base.display().to_string()),
    );
    let mut watchdog = {
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the tests must not kill it before it cleans up.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start sh: {e}"))?
    };
    let url = format!("postgres://tandem@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match sqlx::PgConnection::connect(&url).await {
            Ok(c) => {
                let _ = c.close().await;
                // Dropping the handle leaves the watchdog running; it outlives us on purpose.
                drop(watchdog);
                return Ok(ScratchPostgres { port });
            }
            Err(e) => {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                if let Ok(Some(status)) = watchdog.try_wait() {
                    return Err(format!("postgres exited ({status}): {log}"));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "postgres did not accept connections on port {port} in 60 s ({e}): {log}"
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
