//! Issue 17's warm runtimes, with real Node-RED in a real `tandem serve --warm-runtimes 2`: an
//! instance created while runtimes are warm starts on one and serves its flows with its own
//! variables and decrypted credentials; a neighbour from the same pool sees none of it; an HA
//! instance draws two runtimes; with the pool drained a replica starts cold and says why.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backup::{echo_authorization, flows as vault_flows};
use crate::harness::{hello_flows, Tandem};
use crate::security::probe_flows;

/// Waits until the pool has booted `n` runtimes in all for HA replicas (`ha`) or for the
/// others (its log line, one per runtime).
async fn warm_runtimes_booted(t: &Tandem, ha: bool, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let key = format!("ha={ha}");
    loop {
        let log = std::fs::read_to_string(t.dir.join("tandem.log")).unwrap_or_default();
        let booted = log
            .lines()
            .filter(|l| l.contains("a warm runtime is ready") && l.contains(&key))
            .count();
        if booted >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} warm runtimes never booted\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How each replica of `id` started, by slot, once all `n` run.
async fn starts(t: &Tandem, id: &str, n: u64) -> Vec<Value> {
    let status = t.wait_running(id, n).await;
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["start"].clone())
        .collect()
}

/// `GET path` of `instance` until it answers 200 with `want`; the time it took.
async fn answers(t: &Tandem, instance: &str, path: &str, want: &str) -> Duration {
    let start = Instant::now();
    loop {
        let r = t.get(instance, path).await.ok();
        if r.as_ref()
            .is_some_and(|r| r.status == 200 && r.body == want)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{instance}{path} answers {r:?}, not {want}\n{}",
            t.tail_log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create(t: &Tandem, body: Value) -> String {
    let r = t.api("POST", "/api/v1/instances", body).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_start_on_warm_runtimes_apart_from_each_other_and_cold_when_the_pool_is_dry() {
    let port = echo_authorization().await;
    let t = Tandem::start_with("warm", &["--warm-runtimes", "2"]).await;
    let (app, _) = t.team_and_app("warm").await;
    let stack = t.stack().await;

    // The first replica of a stack finds no runtime warm, says so, and warms the pool up.
    let first = t.instance(&app, "first", hello_flows(), 1).await;
    let s = starts(&t, &first, 1).await;
    assert_eq!(s[0]["kind"], "cold", "{s:?}");
    assert!(
        s[0]["reason"].as_str().unwrap().contains("no warm runtime"),
        "{s:?}"
    );
    warm_runtimes_booted(&t, false, 2).await;

    // On a warm runtime: its variables and credentials are its own.
    let vault = create(
        &t,
        json!({
            "name": "vault", "application_id": app, "stack_id": stack, "flows": vault_flows(port),
            "env": { "TOKEN": { "value": "s3cret", "secret": true } },
        }),
    )
    .await;
    let took = answers(&t, "vault", "/env", "s3cret").await;
    eprintln!("create to first 200 on a warm runtime: {took:?}");
    assert_eq!(starts(&t, &vault, 1).await[0]["kind"], "warm");
    // "u:p" in base64: the node's credentials decrypted with the instance's secret.
    answers(&t, "vault", "/cred", "Basic dTpw").await;

    // A neighbour from the same pool: none of Tandem's secrets, not the vault's variable, not
    // the vault's files (the runtime directory its userDir links to).
    let probe = t.instance(&app, "probe", probe_flows(), 1).await;
    assert_eq!(starts(&t, &probe, 1).await[0]["kind"], "warm");
    let env = t.get("probe", "/env").await.unwrap();
    assert_eq!(
        env.json(),
        json!({ "admin": null, "credentials": null, "database": null, "data_dir": null }),
        "{}",
        env.body
    );
    let vault_dir = std::fs::canonicalize(t.dir.join("instances/vault/r0")).unwrap();
    assert!(vault_dir.starts_with(t.dir.join("pool")), "{vault_dir:?}");
    for file in [".config.runtime.json", "settings.js", "replica.json"] {
        let path = vault_dir.join(file);
        assert!(path.exists(), "{path:?}");
        let r = t
            .get("probe", &format!("/read?path={}", path.display()))
            .await
            .unwrap();
        assert!(r.body.contains("\"ok\":false"), "{file}: {}", r.body);
    }

    // HA replicas run without the editor: their own runtimes, warmed once a first HA replica
    // of the stack started; a second HA instance then draws two.
    let first_pair = t.instance(&app, "pair", hello_flows(), 2).await;
    starts(&t, &first_pair, 2).await;
    warm_runtimes_booted(&t, true, 2).await;
    let ha = t.instance(&app, "pair2", hello_flows(), 2).await;
    let s = starts(&t, &ha, 2).await;
    assert_eq!(
        s,
        vec![json!({ "kind": "warm" }), json!({ "kind": "warm" })]
    );
    answers(&t, "pair2", "/hello", "hello").await;

    // The pool drained: three instances at once from two warm runtimes. Every one serves;
    // those the pool could not serve started cold, and say why.
    warm_runtimes_booted(&t, false, 4).await;
    let mut ids = Vec::new();
    for name in ["dry1", "dry2", "dry3"] {
        ids.push(t.instance(&app, name, hello_flows(), 1).await);
    }
    let mut kinds = Vec::new();
    for (id, name) in ids.iter().zip(["dry1", "dry2", "dry3"]) {
        let s = starts(&t, id, 1).await;
        answers(&t, name, "/hello", "hello").await;
        if s[0]["kind"] == "cold" {
            assert!(
                s[0]["reason"].as_str().unwrap().contains("no warm runtime"),
                "{s:?}"
            );
        }
        kinds.push(s[0]["kind"].as_str().unwrap().to_owned());
    }
    assert!(
        kinds.iter().filter(|k| *k == "warm").count() <= 2,
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "cold"), "{kinds:?}");

    // An instance with settings of its own starts cold, and says why.
    let own = create(
        &t,
        json!({ "name": "own", "application_id": app, "stack_id": stack, "flows": hello_flows(),
                "settings": { "httpNodeCors": { "origin": "*" } } }),
    )
    .await;
    let s = starts(&t, &own, 1).await;
    assert_eq!(s[0]["kind"], "cold", "{s:?}");
    assert!(
        s[0]["reason"].as_str().unwrap().contains("settings"),
        "{s:?}"
    );
}
