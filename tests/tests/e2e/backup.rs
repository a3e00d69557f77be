//! Issue 13's backups: `tandem backup` of a running Tandem and `tandem restore` into a fresh data
//! directory; there the instance serves its flows with working credentials (a node's encrypted
//! credentials and a secret variable), which only the platform key in the backup opens.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Tandem;

/// An HTTP server that answers every request with the `Authorization` header it got.
pub(crate) async fn echo_authorization() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&got);
                let auth = text
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                            .map(|(_, v)| v.trim().to_string())
                    })
                    .unwrap_or_default();
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{auth}",
                            auth.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

/// `GET /cred` calls the echo server with basic auth from the node's credentials; `GET /env`
/// answers the secret variable `TOKEN`.
pub(crate) fn flows(port: u16) -> Value {
    json!([
        { "id": "t1", "type": "tab", "label": "Vault" },
        { "id": "in", "type": "http in", "z": "t1", "url": "/cred", "method": "get", "wires": [["req"]] },
        { "id": "req", "type": "http request", "z": "t1", "method": "GET", "ret": "txt", "url": format!("http://127.0.0.1:{port}/"), "authType": "basic", "credentials": { "user": "u", "password": "p" }, "wires": [["out"]] },
        { "id": "ein", "type": "http in", "z": "t1", "url": "/env", "method": "get", "wires": [["fn"]] },
        { "id": "fn", "type": "function", "z": "t1", "func": "msg.payload = env.get('TOKEN'); return msg;", "wires": [["out"]] },
        { "id": "out", "type": "http response", "z": "t1", "statusCode": "", "headers": {}, "wires": [] }
    ])
}

async fn answers(t: &Tandem, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = t.get("vault", path).await.ok();
        if r.as_ref()
            .is_some_and(|r| r.status == 200 && r.body == want)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} answers {r:?}, not {want}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem-under-test"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_fresh_data_dir_serves_the_flows_with_their_credentials() {
    let port = echo_authorization().await;
    let mut t = Tandem::start("backup").await;
    let (app, _) = t.team_and_app("Vault").await;
    let stack = t.stack().await;
    let r = t
        .api(
            "POST",
            "/api/v1/instances",
            json!({
                "name": "vault",
                "application_id": app,
                "stack_id": stack,
                "flows": flows(port),
                "env": { "TOKEN": { "value": "s3cret", "secret": true } },
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    t.wait_running(&id, 1).await;
    // "u:p" in base64.
    answers(&t, "/cred", "Basic dTpw").await;
    answers(&t, "/env", "s3cret").await;

    // Backed up while it runs.
    let backup = t.dir.parent().unwrap().join("tandem.backup");
    let data = t.dir.to_str().unwrap().to_string();
    let out = tandem(&[
        "backup",
        "--to",
        backup.to_str().unwrap(),
        "--data-dir",
        &data,
    ]);
    assert!(out.status.success(), "{out:?}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds the platform key");
    }
    t.stop();

    // Restored into a fresh directory: not over an existing store.
    let out = tandem(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        &data,
    ]);
    assert!(!out.status.success(), "restored over a store: {out:?}");
    let fresh = t.dir.parent().unwrap().join("restored");
    let out = tandem(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        fresh.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    // The admin's token is in the store; the harness reads it from the file.
    std::fs::copy(t.dir.join("admin-token"), fresh.join("admin-token")).unwrap();
    let restored = Tandem::start_in(&fresh, true).await;
    restored.wait_running(&id, 1).await;
    answers(&restored, "/cred", "Basic dTpw").await;
    answers(&restored, "/env", "s3cret").await;

    // Another platform key than the database's is refused, naming the problem.
    drop(restored);
    let other_key = t.dir.parent().unwrap().join("other-key");
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let again = t.dir.parent().unwrap().join("again");
    let out = tandem(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data-dir",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem-under-test"))
        .args(["serve", "--data-dir", again.to_str().unwrap()])
        .arg("--platform-key-file")
        .arg(&other_key)
        .args([
            "--api-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("platform key does not match"), "{stderr}");
}
