//! Control-plane API benchmark: with 10,000 instances in 100 teams, p50 and p99 of listing a
//! team's instances, reading one instance and creating one, on SQLite and on PostgreSQL in the
//! same run, printed side by side. Requests go through real HTTP on one keep-alive connection.
//!
//! `cargo run --release -p tandem-benches --bin api` (PostgreSQL from Debian's `postgresql`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tandem_controlplane::serve_cmd;
use tandem_controlplane::state::{ApiConfig, AppState};
use tandem_controlplane::store::{new_id, now_ms};

const TEAMS: usize = 100;
const PER_TEAM: usize = 100;
const READS: usize = 1000;
const CREATES: usize = 300;

struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: String,
}

impl Client {
    async fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "bench")
            .header("authorization", format!("Bearer {}", self.token));
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        self.send.ready().await.unwrap();
        let resp = self
            .send
            .send_request(req.body(Full::new(bytes)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

/// Seeds teams, one application each, and instances, straight into the store.
async fn seed(
    state: &AppState,
    admin_id: &str,
    stack_id: &str,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut teams, mut apps, mut instances) = (Vec::new(), Vec::new(), Vec::new());
    let mut tx = state.store.write().await.unwrap();
    let now = now_ms();
    for t in 0..TEAMS {
        let team = new_id();
        sqlx::query("INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4)")
            .bind(&team)
            .bind(format!("Team {t}"))
            .bind(format!("team-{t}"))
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO members (team_id, user_id, role) VALUES ($1, $2, 'owner')")
            .bind(&team)
            .bind(admin_id)
            .execute(&mut *tx)
            .await
            .unwrap();
        let app = new_id();
        sqlx::query("INSERT INTO applications (id, team_id, name, description, created_at) VALUES ($1, $2, 'main', '', $3)")
            .bind(&app)
            .bind(&team)
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
        for i in 0..PER_TEAM {
            let id = new_id();
            sqlx::query(
                "INSERT INTO instances (id, name, team_id, application_id, stack_id, template_id, settings, env, flows, ha_replicas, ha_mode, desired_state, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, NULL, '{}', '{\"A\":\"1\"}', '[]', NULL, NULL, 'running', $6, $7)",
            )
            .bind(&id)
            .bind(format!("i-{t}-{i}"))
            .bind(&team)
            .bind(&app)
            .bind(stack_id)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
            instances.push(id);
        }
        teams.push(team);
        apps.push(app);
    }
    tx.commit().await.unwrap();
    (teams, apps, instances)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// p50 and p99 in milliseconds of each measured call.
async fn measure(label: &str, url: Option<&str>) -> Vec<(String, f64, f64)> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-api-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = serve_cmd::state(&dir, url, ApiConfig::default())
        .await
        .unwrap();
    let token_path = serve_cmd::bootstrap(&state, &dir).await.unwrap().unwrap();
    let token = std::fs::read_to_string(token_path)
        .unwrap()
        .trim()
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tandem_controlplane::app(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut c = Client { send, token };
    let (_, me) = c.call("GET", "/api/v1/user", None).await;
    let (_, stacks) = c.call("GET", "/api/v1/stacks", None).await;
    let stack = stacks["items"][0]["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    let (teams, apps, instances) = seed(&state, me["id"].as_str().unwrap(), &stack).await;
    eprintln!(
        "{label}: seeded {} instances in {TEAMS} teams in {:.1?}",
        instances.len(),
        t0.elapsed()
    );

    let mut out = Vec::new();
    let mut run = |name: &str, mut times: Vec<Duration>| {
        times.sort();
        out.push((
            name.to_string(),
            percentile(&times, 0.5),
            percentile(&times, 0.99),
        ));
    };
    // Warm-up.
    for i in 0..100 {
        c.call(
            "GET",
            &format!("/api/v1/instances/{}", instances[i * 97 % instances.len()]),
            None,
        )
        .await;
    }
    let mut times = Vec::with_capacity(READS);
    for i in 0..READS {
        let team = &teams[fastrand_index(i, teams.len())];
        let start = Instant::now();
        let (status, page) = c
            .call(
                "GET",
                &format!("/api/v1/teams/{team}/instances?limit=50"),
                None,
            )
            .await;
        times.push(start.elapsed());
        assert_eq!(status, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), 50);
    }
    run("list a team's instances (page of 50)", times);
    let mut times = Vec::with_capacity(READS);
    for i in 0..READS {
        let id = &instances[fastrand_index(i, instances.len())];
        let start = Instant::now();
        let (status, _) = c
            .call("GET", &format!("/api/v1/instances/{id}"), None)
            .await;
        times.push(start.elapsed());
        assert_eq!(status, 200);
    }
    run("read one instance", times);
    let mut times = Vec::with_capacity(CREATES);
    for i in 0..CREATES {
        let app = &apps[i % apps.len()];
        let body = json!({ "name": format!("new-{i}"), "application_id": app, "stack_id": stack });
        let start = Instant::now();
        let (status, _) = c.call("POST", "/api/v1/instances", Some(body)).await;
        times.push(start.elapsed());
        assert_eq!(status, 201);
    }
    run("create one instance", times);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A spread of indexes without a random-number crate: multiplicative hashing of the step.
fn fastrand_index(i: usize, len: usize) -> usize {
    (i.wrapping_mul(2_654_435_761) >> 3) % len
}

#[tokio::main]
async fn main() {
    let sqlite = measure("sqlite", None).await;
    let pg = tandem_controlplane::scratch_pg::start().await.unwrap();
    let url = pg.create_database().await.unwrap();
    let postgres = measure("postgres", Some(&url)).await;
    println!(
        "\nControl-plane API, {} instances in {TEAMS} teams, one keep-alive connection, ms",
        TEAMS * PER_TEAM
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>10}",
        "call", "SQLite p50", "SQLite p99", "PG p50", "PG p99"
    );
    for ((name, s50, s99), (_, p50, p99)) in sqlite.iter().zip(&postgres) {
        println!("{name:<40} {s50:>10.3} {s99:>10.3} {p50:>10.3} {p99:>10.3}");
    }
}
