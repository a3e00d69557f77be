//! Issue 12's dashboards in HA, in a real browser: Node-RED Dashboard 2.0 installed from npm
//! through the instance's module list, its pages opened in headless Chromium through Tandem's
//! proxy. A page keeps a socket.io session with one replica, so it must stay there (cookie
//! affinity), move once when that replica dies, and, for MQTT, every replica must get what the
//! dashboards show (`TANDEM_MQTT_EXCLUDE`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_proxy::proxy::AFFINITY_COOKIE;

use crate::harness::{hello_flows, kill9, Tandem};
use crate::mqtt::Mosquitto;
use crate::webdriver::{Chromedriver, Session};

/// The Dashboard 2.0 release the tests install.
const DASHBOARD: (&str, &str) = ("@flowfuse/node-red-dashboard", "1.31.0");

/// Dashboard 2.0's config nodes (as its editor writes them, fields from the package's own node
/// definitions): the dashboard at `/dashboard`, one theme, one page, one group (`e2e-ui-group`).
/// Ids no other field holds as a value: Node-RED takes any config node's string equal to a node
/// id for a reference (`"headerContent": "page"` with a page of id `page` is a cycle, and the
/// flows do not start).
fn dashboard_config() -> Vec<Value> {
    vec![
        json!({ "id": "e2e-ui-base", "type": "ui-base", "name": "Tandem", "path": "/dashboard", "appIcon": "",
            "includeClientData": true, "acceptsClientConfig": ["ui-notification", "ui-control"],
            "showPathInSidebar": false, "headerContent": "page", "navigationStyle": "default",
            "titleBarStyle": "default", "showReconnectNotification": true, "notificationDisplayTime": 1,
            "showDisconnectNotification": true, "allowInstall": false }),
        json!({ "id": "e2e-ui-theme", "type": "ui-theme", "name": "Default",
            "colors": { "surface": "#fcfcfd", "primary": "#0d74ce", "bgPage": "#f9f9fb", "groupBg": "#ffffff", "groupOutline": "#d9d9e0" },
            "sizes": { "density": "default", "pagePadding": "12px", "groupGap": "12px", "groupBorderRadius": "4px", "widgetGap": "12px" } }),
        json!({ "id": "e2e-ui-page", "type": "ui-page", "name": "Live", "ui": "e2e-ui-base", "path": "/live", "icon": "home",
            "layout": "grid", "theme": "e2e-ui-theme", "order": 1, "className": "", "visible": "true", "disabled": "false",
            "breakpoints": [
                { "name": "Default", "px": 0, "cols": 3 }, { "name": "Tablet", "px": 576, "cols": 6 },
                { "name": "Small Desktop", "px": 768, "cols": 9 }, { "name": "Desktop", "px": 1024, "cols": 12 }
            ] }),
        json!({ "id": "e2e-ui-group", "type": "ui-group", "name": "Values", "page": "e2e-ui-page", "width": 6, "height": 1,
            "order": 1, "showTitle": true, "className": "", "visible": "true", "disabled": "false", "groupType": "default" }),
    ]
}

/// A `ui-text` widget of `group` showing `msg.payload`.
fn text_widget(id: &str) -> Value {
    json!({ "id": id, "type": "ui-text", "z": "t1", "group": "e2e-ui-group", "order": 1, "width": 0, "height": 0,
        "name": "", "label": "", "format": "{{msg.payload}}", "layout": "row-spread", "style": false,
        "font": "", "fontSize": 16, "color": "#717171", "wrapText": true, "className": "",
        "value": "payload", "valueType": "msg", "wires": [] })
}

/// Every half second, `LIVE[<boot> <n>]` on the dashboard: `n` counts up, `<boot>` is a random
/// id each replica draws when its flows start and logs as `boot <id>` (tagged with the
/// replica), since a replica's environment names nothing that tells it from the others.
fn live_flows() -> Value {
    let mut flows = vec![json!({ "id": "t1", "type": "tab", "label": "Live" })];
    flows.extend(dashboard_config());
    flows.extend([
        json!({ "id": "e2e-tick", "type": "inject", "z": "t1", "props": [{ "p": "payload" }], "payload": "",
            "payloadType": "date", "repeat": "0.5", "once": true, "onceDelay": "0.5", "topic": "",
            "wires": [["e2e-count"]] }),
        json!({ "id": "e2e-count", "type": "function", "z": "t1", "outputs": 1,
            "initialize": "context.set('boot', Date.now().toString(36) + Math.random().toString(36).slice(2, 8));\nnode.warn('boot ' + context.get('boot'));",
            "func": "const n = (context.get('n') || 0) + 1;\ncontext.set('n', n);\nmsg.payload = 'LIVE[' + context.get('boot') + ' ' + n + ']';\nreturn msg;",
            "wires": [["e2e-live"]] }),
        text_widget("e2e-live"),
    ]);
    Value::Array(flows)
}

/// Every message on `dash/readings` (through the replica's own listener of Tandem's MQTT
/// proxy) appended to a history the dashboard shows as `SEEN[<payload> <payload> ...]`.
fn mqtt_flows() -> Value {
    let mut flows = vec![json!({ "id": "t1", "type": "tab", "label": "Readings" })];
    flows.extend(dashboard_config());
    flows.extend([
        json!({ "id": "e2e-broker", "type": "mqtt-broker", "name": "broker", "broker": "${TANDEM_MQTT_URL}",
            "clientid": "dashboard", "protocolVersion": "4", "keepalive": "60", "cleansession": true }),
        json!({ "id": "e2e-mqtt-in", "type": "mqtt in", "z": "t1", "topic": "dash/readings", "qos": "1",
            "datatype": "utf8", "broker": "e2e-broker", "wires": [["e2e-history"]] }),
        json!({ "id": "e2e-history", "type": "function", "z": "t1", "outputs": 1,
            "func": "const seen = context.get('seen') || [];\nseen.push(String(msg.payload));\nwhile (seen.length > 200) seen.shift();\ncontext.set('seen', seen);\nmsg.payload = 'SEEN[' + seen.join(' ') + ']';\nreturn msg;",
            "wires": [["e2e-seen"]] }),
        text_widget("e2e-seen"),
    ]);
    Value::Array(flows)
}

/// Issue 12: a dashboard on a 2-replica instance shows live values on every load (the page's
/// socket.io session stays on the replica its cookie names, so no socket.io request is refused),
/// and the open page shows live values again from the other replica once its own is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_2_0_shows_live_values_on_every_load_of_a_two_replica_instance_and_survives_its_replica_s_death(
) {
    let t = Tandem::start("dashboard-live").await;
    let (app, _) = t.team_and_app("Dashboards").await;
    let id = t.instance(&app, "dash", hello_flows(), 2).await;
    t.wait_running(&id, 2).await;
    install_dashboard(&t, &id).await;
    deploy_flows(&t, &id, live_flows()).await;
    let boots = wait_boots(&t, &id, &["dash-r0", "dash-r1"]).await;

    let driver = Chromedriver::start().await;
    let origin = format!("http://dash.localhost:{}", t.http.port());
    let url = format!("{origin}/dashboard/");
    let mut loads: BTreeMap<String, u32> = BTreeMap::new();
    let mut page = None;
    for load in 0..10 {
        let session = driver.session().await;
        // A fresh browser is balanced: the last two loads go to a replica no load reached yet,
        // if there is one, so that both replicas serve a page whatever the balancer drew.
        let unseen = ["dash-r0", "dash-r1"]
            .into_iter()
            .find(|r| !loads.contains_key(*r));
        if let Some(replica) = unseen.filter(|_| load >= 8) {
            pin(&session, &origin, replica).await;
        }
        session.goto(&url).await;
        let (boot, _) = live_values(&session, &boots, None, Duration::from_secs(30))
            .await
            .unwrap_or_else(|text| {
                panic!(
                    "load {load}: no live values in 30 s; the page shows {text:?}\n{}",
                    t.tail_log()
                )
            });
        let replica = session
            .cookie(AFFINITY_COOKIE)
            .await
            .expect("the proxy pins a browser with a cookie");
        assert_eq!(
            boots.get(&boot),
            Some(&replica),
            "load {load}: the page shows values of another replica than its cookie names"
        );
        *loads.entry(replica).or_default() += 1;
        page = Some(session);
    }
    println!("dashboard loads per replica: {loads:?}");
    assert_eq!(loads.len(), 2, "{loads:?}");

    // The proxy's access log, not its metrics: these count answers per status class and replica
    // only, while a socket.io session that lands on the wrong replica shows exactly as a 400 on
    // a `/dashboard/socket.io/` path (engine.io's "Session ID unknown"), which only the access
    // log (one line per request, with its path and status) tells from other 4xx.
    let statuses = socket_io_statuses(&t, "dash");
    println!("socket.io answers by status over 10 loads: {statuses:?}");
    assert!(
        statuses.values().sum::<u64>() >= 10,
        "no socket.io request in the access log: {statuses:?}"
    );
    assert_eq!(
        statuses.get(&400),
        None,
        "socket.io requests refused: {statuses:?}"
    );

    // The replica of the last page dies; the same page shows live values again, from the other.
    let page = page.unwrap();
    let home = page.cookie(AFFINITY_COOKIE).await.unwrap();
    let slot: usize = home.trim_start_matches("dash-r").parse().unwrap();
    let other = format!("dash-r{}", 1 - slot);
    let pid = t.status(&id).await["replicas"][slot]["pid"]
        .as_u64()
        .unwrap();
    kill9(pid);
    let killed = Instant::now();
    let (boot, _) = live_values(&page, &boots, Some(&other), Duration::from_secs(60))
        .await
        .unwrap_or_else(|text| {
            panic!(
                "no live values from {other} 60 s after {home} was killed; the page shows {text:?}\n{}",
                t.tail_log()
            )
        });
    println!(
        "live values again from {other} {:?} after {home} was killed",
        killed.elapsed()
    );
    assert_eq!(boots.get(&boot), Some(&other));
    assert_eq!(
        page.cookie(AFFINITY_COOKIE).await.as_deref(),
        Some(other.as_str()),
        "the page moved, and its cookie with it"
    );
}

/// Issue 12 with MQTT: each page sees what its replica receives, so a topic the dashboards show
/// is kept unshared (`TANDEM_MQTT_EXCLUDE`) and every replica, and every page, gets every
/// message. With the topic shared, each page would show about half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_widget_fed_from_mqtt_shows_every_message_on_both_replicas_pages() {
    let broker = Mosquitto::start();
    let upstream = broker.addr.to_string();
    let t = Tandem::start_with("dashboard-mqtt", &["--mqtt-upstream", &upstream]).await;
    let (app, _) = t.team_and_app("MqttDashboards").await;
    let r = t
        .api(
            "POST",
            "/api/v1/instances",
            json!({ "name": "mqdash", "application_id": app, "stack_id": t.stack().await,
                "flows": hello_flows(), "ha": { "replicas": 2 },
                "env": { "TANDEM_MQTT_EXCLUDE": "dash/#" } }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    t.wait_running(&id, 2).await;
    install_dashboard(&t, &id).await;
    deploy_flows(&t, &id, mqtt_flows()).await;

    // One page on each replica: the cookie set before the first load, and kept.
    let driver = Chromedriver::start().await;
    let origin = format!("http://mqdash.localhost:{}", t.http.port());
    let mut pages = Vec::new();
    for replica in ["mqdash-r0", "mqdash-r1"] {
        let session = driver.session().await;
        pin(&session, &origin, replica).await;
        session.goto(&format!("{origin}/dashboard/")).await;
        pages.push((replica, session));
    }

    // Until each page shows a message, published again every second: then both replicas are
    // subscribed and both pages connected, whatever their start took.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut k = 0;
    loop {
        publish(&broker, &[format!("ready-{k}")]);
        k += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut ready = true;
        for (_, page) in &pages {
            ready &= seen(&page.text().await)
                .iter()
                .any(|m| m.starts_with("ready-"));
        }
        if ready {
            break;
        }
        let mut shown = Vec::new();
        for (replica, page) in &pages {
            shown.push(format!("{replica}: {:?}", page.text().await));
        }
        assert!(
            Instant::now() < deadline,
            "no message reached both pages in 90 s: {shown:?}\n{}",
            t.tail_log()
        );
    }

    let n = 20;
    let messages: Vec<String> = (0..n).map(|i| format!("reading-{i}")).collect();
    publish(&broker, &messages);
    let want: BTreeSet<&str> = messages.iter().map(String::as_str).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (replica, page) in &pages {
        loop {
            let text = page.text().await;
            let shown = seen(&text);
            let missing: Vec<&&str> = want
                .iter()
                .filter(|m| !shown.iter().any(|s| s == *m))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page on {replica} misses {} of {n} messages {missing:?}; it shows {text:?}",
                missing.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(
            page.cookie(AFFINITY_COOKIE).await.as_deref(),
            Some(*replica),
            "the page stayed on its replica"
        );
    }
}

/// Puts Dashboard 2.0 in the instance's modules and waits for the deploy that installs it.
async fn install_dashboard(t: &Tandem, id: &str) {
    let (name, version) = DASHBOARD;
    let r = t
        .api(
            "PUT",
            &format!("/api/v1/instances/{id}/modules"),
            json!({ "modules": { name: version } }),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "succeeded", "{d}\n{}", t.tail_log());
}

/// Deploys `flows` to the instance and waits for the deploy's end.
async fn deploy_flows(t: &Tandem, id: &str, flows: Value) {
    let r = t
        .api("PUT", &format!("/api/v1/instances/{id}/flows"), flows)
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let d = deployment_end(t, r.json()["id"].as_str().unwrap()).await;
    assert_eq!(d["status"], "succeeded", "{d}\n{}", t.tail_log());
}

async fn deployment_end(t: &Tandem, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d = t
            .api("GET", &format!("/api/v1/deployments/{id}"), Value::Null)
            .await
            .json();
        if d["status"] != "running" {
            return d;
        }
        assert!(Instant::now() < deadline, "{d}\n{}", t.tail_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The boot ids the replicas logged (`boot <id>`), each with its replica, once every one of
/// `replicas` has logged one.
async fn wait_boots(t: &Tandem, id: &str, replicas: &[&str]) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut boots = BTreeMap::new();
        for e in t.logs(id, "limit=1000").await {
            if let Some(boot) = e["msg"].as_str().and_then(|m| m.strip_prefix("boot ")) {
                let src = e["src"].as_str().unwrap_or("?").to_string();
                boots.insert(boot.to_string(), src);
            }
        }
        if replicas.iter().all(|r| boots.values().any(|src| src == r)) {
            return boots;
        }
        assert!(
            Instant::now() < deadline,
            "no boot line from every replica in 60 s: {boots:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the page shows two different `LIVE[<boot> <n>]` values of one boot id known in
/// `boots` (of `replica`'s, when given): live values, not one stuck value. The boot id and the
/// last count, or what the page showed last.
async fn live_values(
    page: &Session,
    boots: &BTreeMap<String, String>,
    replica: Option<&str>,
    within: Duration,
) -> Result<(String, u64), String> {
    let deadline = Instant::now() + within;
    let mut first: Option<(String, u64)> = None;
    loop {
        let text = page.text().await;
        if let Some((boot, n)) = live(&text) {
            let wanted = boots
                .get(&boot)
                .is_some_and(|r| replica.is_none_or(|want| r == want));
            if wanted {
                match &first {
                    Some((b, m)) if *b == boot && *m != n => return Ok((boot, n)),
                    Some((b, _)) if *b == boot => {}
                    _ => first = Some((boot, n)),
                }
            }
        }
        if Instant::now() > deadline {
            return Err(text);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `LIVE[<boot> <n>]` a page shows.
fn live(text: &str) -> Option<(String, u64)> {
    let (_, rest) = text.split_once("LIVE[")?;
    let (inner, _) = rest.split_once(']')?;
    let (boot, n) = inner.split_once(' ')?;
    Some((boot.to_string(), n.trim().parse().ok()?))
}

/// The payloads of the `SEEN[...]` a page shows.
fn seen(text: &str) -> Vec<String> {
    text.split_once("SEEN[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(inner, _)| inner.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Pins a browser to `replica` as the proxy itself would have: its affinity cookie, set on the
/// instance's host before the dashboard's first request.
async fn pin(session: &Session, origin: &str, replica: &str) {
    // Any page of the host: cookies can only be set for the page the browser is on.
    session.goto(&format!("{origin}/tandem-e2e-pin")).await;
    session.delete_cookies().await;
    session.set_cookie(AFFINITY_COOKIE, replica).await;
}

/// The statuses of the instance's socket.io requests in the proxy's access log (`tandem serve`'s
/// output, target `tandem::access`), with their counts.
fn socket_io_statuses(t: &Tandem, instance: &str) -> BTreeMap<u16, u64> {
    let text = std::fs::read_to_string(t.dir.join("tandem.log")).unwrap_or_default();
    let mut statuses = BTreeMap::new();
    // One JSON line per request.
    for line in text.lines().filter(|l| l.contains("\"tandem::access\"")) {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if entry["instance"] == instance
            && entry["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/dashboard/socket.io"))
        {
            if let Some(status) = entry["status"].as_u64().and_then(|s| u16::try_from(s).ok()) {
                *statuses.entry(status).or_default() += 1;
            }
        }
    }
    statuses
}

/// Publishes each message on `dash/readings`, QoS 1, straight to the broker, as a device would.
fn publish(broker: &Mosquitto, messages: &[String]) {
    use std::io::Write;
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .args(["-q", "1", "-t", "dash/readings", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (apt-get install mosquitto-clients; .ci/run does)");
    {
        let mut stdin = publisher.stdin.take().unwrap();
        for m in messages {
            writeln!(stdin, "{m}").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success());
}
