use std::sync::Arc;
use std::time::Duration;

use tandem_proxy::routes::file;
use tandem_proxy::Routes;

use crate::support::*;

fn routes_text(replicas: &[std::net::SocketAddr], extra: usize) -> String {
    let list: Vec<String> = replicas.iter().map(|a| format!("\"{a}\"")).collect();
    let mut s = format!(
        "[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"]\nreplicas = [{}]\nhealth_check = false\n",
        list.join(", ")
    );
    for i in 0..extra {
        s.push_str(&format!(
            "\n[[instance]]\nname = \"extra{i}\"\nhosts = [\"extra{i}.localhost\"]\nreplicas = [\"{}\"]\nhealth_check = false\n",
            replicas[0]
        ));
    }
    s
}

/// Writes a file the way editors do: a new file renamed over the old one.
fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_routes_file_changes_under_load_with_no_failed_request() {
    let ups = [
        Upstream::start("u0").await,
        Upstream::start("u1").await,
        Upstream::start("u2").await,
    ];
    let dir = temp_dir("reload");
    let path = dir.path().join("routes.toml");
    write(&path, &routes_text(&[ups[0].addr, ups[1].addr], 0));
    let routes = Arc::new(Routes::new());
    file::load(&path, &routes).unwrap();
    let proxy = TestProxy::start_with(routes.clone(), test_config()).await;
    let watcher = tokio::spawn(file::watch(
        path.clone(),
        routes.clone(),
        proxy.stats.clone(),
        Duration::from_millis(20),
        std::future::pending(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let mut stop = stop_rx.clone();
        let addr = proxy.addr;
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            let (mut ok, mut bad) = (0, Vec::new());
            while !*stop.borrow_and_update() {
                match client.get("orders.localhost", "/").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => bad.push(format!("{} {}", r.status, r.body)),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        }));
    }
    // Twenty rewrites: replicas swapped in and out, other instances added and removed.
    let sets = [
        vec![ups[0].addr, ups[1].addr],
        vec![ups[1].addr, ups[2].addr],
        vec![ups[2].addr],
        vec![ups[0].addr, ups[1].addr, ups[2].addr],
    ];
    for i in 0..20 {
        write(&path, &routes_text(&sets[i % sets.len()], i % 3 * 50));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let _ = stop_tx.send(true);
    let mut total = 0;
    for w in workers {
        let (ok, bad) = w.await.unwrap();
        assert!(bad.is_empty(), "no failed request: {bad:?}");
        total += ok;
    }
    assert!(total > 100, "the load ran: {total}");
    let generation = routes.load().generation();
    assert!(
        generation >= 10,
        "the file was reloaded many times: generation {generation}"
    );
    assert!(ups.iter().all(|u| u.hits() > 0));
    watcher.abort();
}

#[tokio::test]
async fn a_broken_routes_file_keeps_the_current_routes_and_is_reported() {
    let u = Upstream::start("u0").await;
    let dir = temp_dir("broken");
    let path = dir.path().join("routes.toml");
    write(&path, &routes_text(&[u.addr], 0));
    let routes = Arc::new(Routes::new());
    file::load(&path, &routes).unwrap();
    let proxy = TestProxy::start_with(routes.clone(), test_config()).await;
    proxy.stats.record_reload(true);
    let watcher = tokio::spawn(file::watch(
        path.clone(),
        routes.clone(),
        proxy.stats.clone(),
        Duration::from_millis(20),
        std::future::pending(),
    ));

    for broken in [
        "[[instance]]\nname = \"orders\"\nhosts = [\"orders.localhost\"\n".to_string(),
        "[[instance]]\nname = \"Orders!\"\nhosts = [\"orders.localhost\"]\nreplicas = []\n"
            .to_string(),
    ] {
        write(&path, &broken);
        let reported = eventually(Duration::from_secs(3), || {
            let p = &proxy;
            async move { p.metric("tandem_proxy_route_last_reload_success").await == Some(0.0) }
        })
        .await;
        assert!(reported, "the failed reload shows in the metrics");
        assert_eq!(
            get(proxy.addr, "orders.localhost", "/").await.unwrap().body,
            "u0",
            "the old routes keep serving"
        );
        // Repair it so the next broken version is a change again.
        write(&path, &routes_text(&[u.addr], 0));
        assert!(
            eventually(Duration::from_secs(3), || {
                let p = &proxy;
                async move { p.metric("tandem_proxy_route_last_reload_success").await == Some(1.0) }
            })
            .await
        );
    }
    let m = proxy.metrics().await;
    assert!(
        m.contains("tandem_proxy_route_reloads_total{result=\"error\"} 2"),
        "{m}"
    );
    let err = file::load(&path.with_extension("missing"), &routes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read routes file"), "{err}");
    watcher.abort();
}
