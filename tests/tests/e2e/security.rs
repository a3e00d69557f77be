//! Issue 9's attacks by a flow, against real Node-RED replicas of a real `tandem serve`: reading
//! the instance's secrets (environment, `/proc/<pid>/environ`, standard input), reading Tandem's
//! data directory and a neighbour's files from `exec` and `file` nodes, and catching the admin
//! secret on a flow route under `/admin`. And the upgrade: replicas started the old way are
//! replaced one at a time, with no failed request.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{hello_flows, Tandem};

/// Flows that probe what a flow can reach:
/// - `GET /env`: what `env.get` finds of Tandem's secrets and settings;
/// - `GET /exec?cmd=…`: runs `cmd` with the exec node, answers its output and exit code;
/// - `GET /read?path=…`: reads a file with the `file in` node, answers `{ok, len}` or the error;
/// - `GET /admin/echo`: a flow route under `/admin`, answers the headers it got.
pub(crate) fn probe_flows() -> Value {
    json!([
        { "id": "t", "type": "tab", "label": "Probe" },
        { "id": "ein", "type": "http in", "z": "t", "url": "/env", "method": "get", "wires": [["efn"]] },
        { "id": "efn", "type": "function", "z": "t", "wires": [["out"]],
          "func": "msg.payload = { admin: env.get('TANDEM_ADMIN_SECRET') || null, credentials: env.get('TANDEM_CREDENTIAL_SECRET') || null, database: env.get('TANDEM_DATABASE_URL') || null, data_dir: env.get('TANDEM_DATA_DIR') || null }; return msg;" },
        { "id": "xin", "type": "http in", "z": "t", "url": "/exec", "method": "get", "wires": [["xfn"]] },
        { "id": "xfn", "type": "function", "z": "t", "wires": [["x"]],
          "func": "msg.payload = msg.req.query.cmd + ' 2>&1; echo rc=$?'; return msg;" },
        { "id": "x", "type": "exec", "z": "t", "command": "", "addpay": "payload", "append": "", "useSpawn": "false", "timer": "10", "oldrc": false, "wires": [["out"], [], []] },
        { "id": "rin", "type": "http in", "z": "t", "url": "/read", "method": "get", "wires": [["rfn"]] },
        { "id": "rfn", "type": "function", "z": "t", "wires": [["rfile"]],
          "func": "msg.filename = msg.req.query.path; return msg;" },
        { "id": "rfile", "type": "file in", "z": "t", "filename": "filename", "filenameType": "msg", "format": "utf8", "chunk": false, "sendError": false, "encoding": "none", "allProps": false, "wires": [["rok"]] },
        { "id": "rok", "type": "function", "z": "t", "wires": [["out"]],
          "func": "msg.payload = { ok: true, len: msg.payload.length }; return msg;" },
        { "id": "rcatch", "type": "catch", "z": "t", "scope": ["rfile"], "uncaught": false, "wires": [["rerr"]] },
        { "id": "rerr", "type": "function", "z": "t", "wires": [["out"]],
          "func": "msg.payload = { ok: false, error: String(msg.error && msg.error.message) }; return msg;" },
        { "id": "ain", "type": "http in", "z": "t", "url": "/admin/echo", "method": "get", "wires": [["afn"]] },
        { "id": "afn", "type": "function", "z": "t", "wires": [["out"]],
          "func": "msg.payload = { headers: msg.req.headers, raw: msg.req.rawHeaders }; return msg;" },
        { "id": "out", "type": "http response", "z": "t", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn exec(t: &Tandem, cmd: &str) -> String {
    let r = t
        .get("prober", &format!("/exec?cmd={}", encode(cmd)))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{cmd}: {}", r.body);
    r.body
}

async fn read(t: &Tandem, path: &str) -> Value {
    let r = t
        .get("prober", &format!("/read?path={}", encode(path)))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_cannot_read_secrets_or_anything_outside_their_user_dir() {
    let t = Tandem::start("isolation").await;
    let (app, _) = t.team_and_app("Iso").await;
    let neighbour = t.instance(&app, "neighbour", hello_flows(), 1).await;
    let id = t.instance(&app, "prober", probe_flows(), 1).await;
    t.wait_running(&neighbour, 1).await;
    let status = t.wait_running(&id, 1).await;
    let data = t.dir.canonicalize().unwrap();

    // The data directory is private to Tandem's user.
    assert_eq!(mode(&data), 0o700);
    for f in ["tandem.db", "tandem.db-wal", "admin-token", "secret-key"] {
        let p = data.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }

    // Secrets are in no environment a flow can read: env.get, the process's own environ, its
    // standard input (the pipe they came through, drained and closed).
    let env = t.get("prober", "/env").await.unwrap();
    assert_eq!(
        env.json(),
        json!({ "admin": null, "credentials": null, "database": null, "data_dir": null }),
        "{}",
        env.body
    );
    let environ = exec(&t, "tr '\\0' '\\n' < /proc/$PPID/environ").await;
    assert!(environ.ends_with("rc=0\n"), "{environ}");
    assert!(
        !environ.contains("TANDEM_ADMIN_SECRET") && !environ.contains("TANDEM_CREDENTIAL_SECRET"),
        "{environ}"
    );
    assert!(
        !environ.lines().any(|l| l.starts_with("TANDEM_")),
        "Tandem's own settings reached the replica: {environ}"
    );
    let stdin = exec(&t, "timeout 2 cat /proc/$PPID/fd/0").await;
    assert_eq!(
        stdin.trim(),
        "rc=0",
        "the secrets pipe still holds something: {stdin}"
    );

    // The admin secret never reaches a flow's own route under /admin, even when the proxy lets
    // a member's request through to the editor paths.
    let admin = format!("Bearer {}", t.token);
    let r = t
        .request("prober", "GET", "/admin/echo", &[("Authorization", &admin)])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !r.body.to_ascii_lowercase().contains("x-tandem-token"),
        "the flow saw the admin secret: {}",
        r.body
    );

    // The sandbox: nothing of the data directory but the replica's own userDir.
    let landlock = matches!(
        tandem_coordinator::sandbox::probe(),
        tandem_coordinator::sandbox::Isolation::Landlock { .. }
    );
    if !landlock {
        assert_eq!(status["isolation"], "none", "{status}");
        eprintln!("skipping the sandbox checks: this kernel has no Landlock");
        return;
    }
    assert_eq!(status["isolation"], "landlock", "{status}");
    assert_eq!(status["replicas"][0]["isolation"], "landlock", "{status}");
    let secret_key = data.join("secret-key");
    let db = data.join("tandem.db");
    // Flows live in Tandem's store; the userDir keeps the generated settings.
    let theirs = data.join("instances/neighbour/r0/settings.js");
    let own = data.join("instances/prober/r0/settings.js");
    assert!(secret_key.exists() && db.exists() && theirs.exists() && own.exists());
    for path in [&secret_key, &db, &theirs, &data.join("admin-token")] {
        let out = exec(&t, &format!("cat '{}'", path.display())).await;
        assert!(
            out.contains("Permission denied") && !out.ends_with("rc=0\n"),
            "exec read {}: {out}",
            path.display()
        );
        let r = read(&t, &path.display().to_string()).await;
        assert_eq!(r["ok"], false, "file in read {}: {r}", path.display());
    }
    let out = exec(&t, &format!("ls '{}'", data.display())).await;
    assert!(out.contains("Permission denied"), "{out}");
    let out = exec(&t, "touch /tmp/tandem-escape").await;
    assert!(!out.ends_with("rc=0\n"), "wrote to /tmp: {out}");
    // Its own userDir works, read and write, with both nodes.
    let r = read(&t, &own.display().to_string()).await;
    assert_eq!(r["ok"], true, "{r}");
    let out = exec(&t, "echo hi > mine.txt && cat mine.txt").await;
    assert_eq!(out, "hi\nrc=0\n");
    // And Tandem's own process (the replica's parent) is out of reach through /proc: its
    // environment may hold a database URL with a password.
    let out = exec(
        &t,
        "tandem=$(cut -d' ' -f4 /proc/$PPID/stat); test -r /proc/$tandem/environ && cat /proc/$tandem/environ",
    )
    .await;
    assert!(out.ends_with("rc=1\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_the_old_way_are_replaced_one_at_a_time_without_a_failed_request() {
    let temp = tempfile::Builder::new()
        .prefix("tandem-e2e-upgrade-")
        .tempdir()
        .unwrap();
    // The data directory is made inside by the harness, as `Tandem::start` does.
    let dir = temp.path().join("data");
    let mut t = Tandem::start_in(&dir, false).await;
    let (app, _) = t.team_and_app("Upgrade").await;
    let id = t.instance(&app, "upgraded", hello_flows(), 2).await;
    let before = t.wait_running(&id, 2).await;
    let pids: Vec<u64> = before["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    t.stop();
    // As an older Tandem would have left them: running, recorded under another spec hash.
    for slot in 0..2 {
        let path = dir.join(format!("instances/upgraded/r{slot}/replica.json"));
        let mut record: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        record["spec"] = json!("0000000000000000");
        std::fs::write(&path, record.to_string()).unwrap();
    }
    let t = Tandem::start_in(&dir, true).await;
    // Requests all along the replacement: none fails.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut failed = Vec::new();
    let mut served = 0;
    loop {
        match t.get("upgraded", "/hello").await {
            Ok(r) if r.status == 200 => served += 1,
            Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
            Err(e) => failed.push(e.to_string()),
        }
        let s = t.status(&id).await;
        let now: Vec<u64> = s["replicas"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["pid"].as_u64()).collect())
            .unwrap_or_default();
        let replaced = s["state"] == "running"
            && now.len() == 2
            && now.iter().all(|p| !pids.contains(p))
            && s["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["isolation"] == s["isolation"]);
        if replaced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not replaced: {s}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {served} failed: {failed:?}",
        failed.len()
    );
    for p in pids {
        assert!(!crate::harness::alive(p), "old replica {p} still runs");
    }
    let logs = t.logs(&id, "limit=200").await;
    assert!(
        logs.iter().any(|l| l["msg"]
            .as_str()
            .is_some_and(|m| m.contains("will be replaced"))),
        "{logs:?}"
    );
}

/// Issue 11's secret variables: a real replica's flow reads the value; no API shows it, and the
/// data directory does not hold it in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_variable_reaches_the_flows_and_nothing_else() {
    let t = Tandem::start("secret-env").await;
    let (app, _) = t.team_and_app("Secrets").await;
    let flows = json!([
        { "id": "t", "type": "tab", "label": "Secret" },
        { "id": "in", "type": "http in", "z": "t", "url": "/token", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t", "wires": [["out"]],
          "func": "msg.payload = env.get('API_TOKEN') || 'none'; return msg;" },
        { "id": "out", "type": "http response", "z": "t", "statusCode": "", "headers": {}, "wires": [] }
    ]);
    let r = t
        .api(
            "POST",
            "/api/v1/instances",
            json!({
                "name": "vault",
                "application_id": app,
                "stack_id": t.stack().await,
                "flows": flows,
                "env": { "API_TOKEN": { "value": "tok-8c1f-secret", "secret": true } },
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(r.json()["env"], json!({ "API_TOKEN": { "secret": true } }));
    t.wait_running(&id, 1).await;
    let r = t.get("vault", "/token").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "tok-8c1f-secret"));
    let r = t
        .api("GET", &format!("/api/v1/instances/{id}"), Value::Null)
        .await;
    assert!(!r.body.contains("tok-8c1f"), "{}", r.body);
    // Tandem's own files hold it sealed only (the database, its journal).
    for entry in std::fs::read_dir(&t.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("tok-8c1f"),
                "{} holds the secret",
                path.display()
            );
        }
    }
}
