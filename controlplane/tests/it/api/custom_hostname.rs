//! Custom hostnames (issue 16), the control plane's side: who sets and reads them, the names
//! refused, uniqueness, certificates checked against the hostname, the key sealed and never
//! shown, and the desired state that routes the hostname with its certificate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use sqlx::Row;
use tandem_controlplane::desired::desired_instances;
use tandem_controlplane::state::ApiConfig;
use tandem_coordinator::spec::InstanceDesired;
use tandem_coordinator::status::{Coordination, ObservedStatus};
use tandem_proxy::tls::test_ca::TestCa;
use tandem_proxy::tls::PemKeyPair;

use super::support::{both_backends, Auth, Backend, Server, User};

/// The platform's base domain in these tests.
const BASE: &str = "tandem.test";

/// A coordinator that runs nothing and counts how often it is told the desired state changed.
#[derive(Default)]
struct Told(AtomicUsize);

impl Coordination for Told {
    fn status(&self, _instance_id: &str) -> ObservedStatus {
        ObservedStatus::unknown()
    }

    fn changed(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A team with an owner, a member and a viewer, an outsider with a team of their own, an
/// instance in each team and a second one in the first.
struct World {
    s: Server,
    told: Arc<Told>,
    owner: User,
    member: User,
    viewer: User,
    outsider: User,
    app: String,
    /// Id and name.
    one: (String, String),
    two: (String, String),
    /// The outsider's instance.
    theirs: String,
}

impl World {
    async fn new(b: Backend) -> Self {
        let told = Arc::new(Told::default());
        let config = ApiConfig {
            base_domain: BASE.into(),
            instances_port: Some(8080),
            ..ApiConfig::default()
        };
        let coordinator = told.clone();
        let s = Server::start_with(b, config, |state| {
            state.coordinator = coordinator;
        })
        .await;
        let owner = s.user("owner").await;
        let member = s.user("member").await;
        let viewer = s.user("viewer").await;
        let outsider = s.user("outsider").await;
        let team = s.team(&owner.auth).await;
        s.add_member(&owner.auth, &team, &member, "member").await;
        s.add_member(&owner.auth, &team, &viewer, "viewer").await;
        let app = s.application(&owner.auth, &team).await;
        let one = id_name(&s.instance(&owner.auth, &app, json!({})).await);
        let two = id_name(&s.instance(&owner.auth, &app, json!({})).await);
        let their_team = s.team(&outsider.auth).await;
        let their_app = s.application(&outsider.auth, &their_team).await;
        let theirs = id_name(&s.instance(&outsider.auth, &their_app, json!({})).await).0;
        Self {
            s,
            told,
            owner,
            member,
            viewer,
            outsider,
            app,
            one,
            two,
            theirs,
        }
    }

    fn told(&self) -> usize {
        self.told.0.load(Ordering::SeqCst)
    }

    /// PUT of `body` on instance `id`'s custom hostname, by `auth`.
    async fn put(&self, id: &str, auth: &Auth, body: Value) -> super::support::Resp {
        self.s.put(&path(id), auth, body).await
    }

    /// The desired state of instance `id`.
    async fn desired(&self, id: &str) -> InstanceDesired {
        let (desired, _) = desired_instances(&self.s.state).await.unwrap();
        desired.into_iter().find(|d| d.id == id).unwrap()
    }
}

fn id_name(i: &Value) -> (String, String) {
    (
        i["id"].as_str().unwrap().to_string(),
        i["name"].as_str().unwrap().to_string(),
    )
}

fn path(id: &str) -> String {
    format!("/api/v1/instances/{id}/custom-hostname")
}

fn with_pair(hostname: &str, pair: &PemKeyPair) -> Value {
    json!({ "hostname": hostname, "certificate": pair.certificate, "key": pair.key })
}

/// The base64 lines of a PEM key: what must never show anywhere.
fn key_lines(pair: &PemKeyPair) -> Vec<String> {
    pair.key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_string)
        .collect()
}

/// The `instance.custom-hostname` entries of `id`'s audit log, each as the values at two JSON
/// pointers of its body; and the whole answer, for messages.
async fn audited(
    s: &Server,
    id: &str,
    auth: &Auth,
    a: &str,
    b: &str,
) -> (Vec<(Value, Value)>, Value) {
    let log = s
        .get(
            &format!("/api/v1/instances/{id}/audit-log?event=instance.custom-hostname"),
            auth,
        )
        .await;
    let log = log.ok(200).clone();
    let entries = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let at = |p: &str| e["body"].pointer(p).cloned().unwrap_or(Value::Null);
            (at(a), at(b))
        })
        .collect();
    (entries, log)
}

#[track_caller]
fn assert_no_key(text: &str, pair: &PemKeyPair) {
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    for line in key_lines(pair) {
        assert!(!text.contains(&line), "the key shows in {text}");
    }
}

both_backends!(
    owners_set_it_and_the_team_reads_it,
    refused_names_name_the_hostname,
    hostnames_are_unique_on_the_platform,
    certificates_are_checked_and_keys_never_shown,
    the_desired_state_routes_the_hostname_with_its_certificate,
);

/// An owner sets a hostname (normalized) without a certificate; everyone in the team reads it,
/// as does the instance's view and its lists; members and viewers cannot write it (403), another
/// team's members see nothing (404), unknown instances are 404. Each write is audited and tells
/// the coordinator; DELETE removes it, and then GET and DELETE are 404.
async fn owners_set_it_and_the_team_reads_it(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (id, _) = &w.one;
    for auth in [&w.owner.auth, &w.viewer.auth] {
        let m = s.get(&path(id), auth).await.err(404).to_string();
        assert!(m.contains("no custom hostname"), "{m}");
    }
    let view = s
        .get(&format!("/api/v1/instances/{id}"), &w.viewer.auth)
        .await;
    assert_eq!(view.ok(200)["custom_hostname"], Value::Null);

    let told = w.told();
    let r = w
        .put(
            id,
            &w.owner.auth,
            json!({ "hostname": "Flows.Customer.ORG." }),
        )
        .await;
    let want = json!({
        "hostname": "flows.customer.org",
        "url": "http://flows.customer.org:8080",
        "has_certificate": false,
        "certificate_expires_at": null,
    });
    assert_eq!(r.ok(200), &want);
    assert_eq!(w.told(), told + 1, "the coordinator is told");
    for auth in [&w.owner.auth, &w.member.auth, &w.viewer.auth, &s.admin] {
        assert_eq!(s.get(&path(id), auth).await.ok(200), &want);
    }
    let view = s
        .get(&format!("/api/v1/instances/{id}"), &w.viewer.auth)
        .await;
    assert_eq!(view.ok(200)["custom_hostname"], "flows.customer.org");
    let listed = s
        .get(
            &format!("/api/v1/applications/{}/instances", w.app),
            &w.member.auth,
        )
        .await;
    let hostnames: Vec<(&str, &Value)> = listed.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap(), &i["custom_hostname"]))
        .collect();
    assert!(
        hostnames.contains(&(id.as_str(), &json!("flows.customer.org"))),
        "{hostnames:?}"
    );
    assert!(
        hostnames.contains(&(w.two.0.as_str(), &Value::Null)),
        "{hostnames:?}"
    );

    // The same again changes nothing and tells nobody.
    let told = w.told();
    w.put(
        id,
        &w.owner.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    assert_eq!(w.told(), told);

    // Members and viewers read, never write; outsiders and strangers see nothing.
    for auth in [&w.member.auth, &w.viewer.auth] {
        w.put(id, auth, json!({ "hostname": "mine.customer.org" }))
            .await
            .err(403);
        s.delete(&path(id), auth).await.err(403);
    }
    w.put(
        id,
        &w.outsider.auth,
        json!({ "hostname": "mine.customer.org" }),
    )
    .await
    .err(404);
    s.get(&path(id), &w.outsider.auth).await.err(404);
    s.delete(&path(id), &w.outsider.auth).await.err(404);
    s.get(&path(&w.theirs), &w.owner.auth).await.err(404);
    w.put(
        &w.theirs,
        &w.owner.auth,
        json!({ "hostname": "mine.customer.org" }),
    )
    .await
    .err(404);
    s.get(&path("no-such-instance"), &s.admin).await.err(404);
    w.put(
        "no-such-instance",
        &s.admin,
        json!({ "hostname": "x.customer.org" }),
    )
    .await
    .err(404);
    s.get(&path(id), &Auth::Anon).await.err(401);
    assert_eq!(s.get(&path(id), &w.owner.auth).await.ok(200), &want);

    // Bodies that do not fit.
    let bad = s
        .request(
            "PUT",
            &path(id),
            &w.owner.auth,
            Some("application/json"),
            b"{\"hostname\": ".to_vec(),
        )
        .await;
    bad.err(400);
    w.put(id, &w.owner.auth, json!({}))
        .await
        .invalid("hostname");
    w.put(id, &w.owner.auth, json!({ "hostname": 7 }))
        .await
        .invalid("hostname");
    w.put(
        id,
        &w.owner.auth,
        json!({ "hostname": "a.customer.org", "port": 443 }),
    )
    .await
    .err(422);

    // The platform admin, outside the team, may; a new hostname replaces the old.
    let r = w
        .put(id, &s.admin, json!({ "hostname": "www.customer.org" }))
        .await;
    assert_eq!(r.ok(200)["hostname"], "www.customer.org");

    // Removed: then none, for GET and DELETE alike.
    let told = w.told();
    s.delete(&path(id), &w.owner.auth).await.ok(204);
    assert_eq!(w.told(), told + 1);
    s.get(&path(id), &w.viewer.auth).await.err(404);
    s.delete(&path(id), &w.owner.auth).await.err(404);
    let view = s
        .get(&format!("/api/v1/instances/{id}"), &w.owner.auth)
        .await;
    assert_eq!(view.ok(200)["custom_hostname"], Value::Null);

    let (changes, log) = audited(s, id, &w.owner.auth, "/before/hostname", "/after/hostname").await;
    assert_eq!(changes.len(), 3, "{log}");
    for change in [
        (Value::Null, json!("flows.customer.org")),
        (json!("flows.customer.org"), json!("www.customer.org")),
        (json!("www.customer.org"), Value::Null),
    ] {
        assert!(changes.contains(&change), "{change:?} in {log}");
    }
}

/// Every name that cannot be a custom hostname is a 422 naming `hostname`, and nothing is
/// stored.
async fn refused_names_name_the_hostname(b: Backend) {
    let w = World::new(b).await;
    let (id, name) = &w.one;
    let own_host = format!("{name}.{BASE}");
    let too_long = format!("{}.org", vec!["a".repeat(63); 4].join("."));
    let long_label = format!("{}.customer.org", "a".repeat(64));
    let refused: Vec<(&str, &str)> = vec![
        (&own_host, "Tandem's own"),
        ("other.tandem.test", "Tandem's own"),
        ("a.b.Tandem.Test.", "Tandem's own"),
        (BASE, "Tandem's own"),
        ("192.0.2.10", "IP address"),
        ("10.1", "IP address"),
        ("2001:db8::1", "IP address"),
        ("[2001:db8::1]", "IP address"),
        ("localhost", "localhost"),
        ("flows.localhost", "localhost"),
        ("intranet", "no dot"),
        ("*.customer.org", "wildcard"),
        ("flows.customer.org:8443", "port"),
        ("https://flows.customer.org/", "URL"),
        (&too_long, "DNS name"),
        (&long_label, "DNS name"),
        ("-flows.customer.org", "DNS name"),
        ("flows_1.customer.org", "DNS name"),
        ("flows..customer.org", "DNS name"),
        ("", "DNS name"),
    ];
    for (hostname, says) in refused {
        let r = w
            .put(id, &w.owner.auth, json!({ "hostname": hostname }))
            .await;
        let m = r.invalid("hostname");
        assert!(m.contains(says), "{hostname:?}: {m}");
    }
    w.s.get(&path(id), &w.owner.auth).await.err(404);
    // Names near the base domain that are not under it are fine.
    w.put(id, &w.owner.auth, json!({ "hostname": "tandem.test.org" }))
        .await
        .ok(200);
    w.put(id, &w.owner.auth, json!({ "hostname": "mytandem.test" }))
        .await
        .ok(200);
}

/// A hostname belongs to one instance on the whole platform, whatever its case: another
/// instance, in the team or outside it, gets a 409 until the first lets it go.
async fn hostnames_are_unique_on_the_platform(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (one, _) = &w.one;
    let (two, _) = &w.two;
    w.put(
        one,
        &w.owner.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    for (id, auth, hostname) in [
        (two, &w.owner.auth, "flows.customer.org"),
        (two, &w.owner.auth, "FLOWS.customer.org."),
        (&w.theirs, &w.outsider.auth, "flows.customer.org"),
    ] {
        let told = w.told();
        let m = w
            .put(id, auth, json!({ "hostname": hostname }))
            .await
            .err(409)
            .to_string();
        assert!(m.contains("unique on the platform"), "{m}");
        assert_eq!(w.told(), told);
        s.get(&path(id), auth).await.err(404);
    }
    // Its own again is no conflict.
    w.put(
        one,
        &w.owner.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    // Once the first moves on, another may take it.
    w.put(
        one,
        &w.owner.auth,
        json!({ "hostname": "flows2.customer.org" }),
    )
    .await
    .ok(200);
    w.put(
        &w.theirs,
        &w.outsider.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    w.put(
        two,
        &w.owner.auth,
        json!({ "hostname": "flows2.customer.org" }),
    )
    .await
    .err(409);
    // Deleting an instance frees its hostname.
    s.delete(&format!("/api/v1/instances/{one}"), &w.owner.auth)
        .await
        .ok(204);
    w.put(
        two,
        &w.owner.auth,
        json!({ "hostname": "flows2.customer.org" }),
    )
    .await
    .ok(200);
    let pool = s.db().await;
    let mut left: Vec<(String, String)> =
        sqlx::query("SELECT instance_id, hostname FROM custom_hostnames")
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    left.sort();
    let mut want = vec![
        (two.clone(), "flows2.customer.org".to_string()),
        (w.theirs.clone(), "flows.customer.org".to_string()),
    ];
    want.sort();
    assert_eq!(left, want);
    pool.close().await;
}

/// A certificate must cover the hostname and come with its key; a refusal names the field at
/// fault. The key is stored sealed and shows in no answer and no audit entry. The same hostname
/// sent again without a certificate keeps it; a new hostname without one drops it.
async fn certificates_are_checked_and_keys_never_shown(b: Backend) {
    let w = World::new(b).await;
    let s = &w.s;
    let (id, _) = &w.one;
    let ca = TestCa::new();
    let pair = ca.issue(&["flows.customer.org"]);
    // Valid until 2031-05-17, midnight UTC.
    let other = ca.issue_until(&["flows.customer.org"], (2031, 5, 17));
    let elsewhere = ca.issue(&["shop.customer.org"]);
    let hostname = "flows.customer.org";

    // Refusals, each naming its field; nothing is stored.
    let refusals = [
        (
            with_pair(hostname, &elsewhere),
            "certificate",
            "does not cover",
        ),
        (
            json!({ "hostname": hostname, "certificate": pair.certificate, "key": other.key }),
            "key",
            "does not fit",
        ),
        (
            json!({ "hostname": hostname, "certificate": pair.certificate }),
            "key",
            "required",
        ),
        (
            json!({ "hostname": hostname, "key": pair.key }),
            "certificate",
            "required",
        ),
        (
            json!({ "hostname": hostname, "certificate": "not a certificate", "key": pair.key }),
            "certificate",
            "PEM",
        ),
        (
            json!({ "hostname": hostname, "certificate": pair.certificate, "key": "not a key" }),
            "key",
            "private key",
        ),
        (
            json!({ "hostname": hostname, "certificate": format!("{}{}", pair.certificate, " ".repeat(64 * 1024)), "key": pair.key }),
            "certificate",
            "64 KiB",
        ),
        (
            json!({ "hostname": hostname, "certificate": pair.certificate, "key": format!("{}{}", pair.key, "\n".repeat(64 * 1024)) }),
            "key",
            "64 KiB",
        ),
    ];
    for (body, field, says) in refusals {
        let r = w.put(id, &w.owner.auth, body).await;
        let m = r.invalid(field);
        assert!(m.contains(says), "{field}: {m}");
        assert_no_key(&r.text, &pair);
        assert_no_key(&r.text, &other);
    }
    s.get(&path(id), &w.owner.auth).await.err(404);

    // Set with its certificate.
    let r = w.put(id, &w.owner.auth, with_pair(hostname, &pair)).await;
    assert_eq!(r.ok(200)["has_certificate"], true);
    // rcgen's default validity ends 4096-01-01.
    assert_eq!(r.ok(200)["certificate_expires_at"], 67_090_118_400_000i64);
    assert_no_key(&r.text, &pair);
    for auth in [&w.owner.auth, &w.member.auth, &w.viewer.auth, &s.admin] {
        let r = s.get(&path(id), auth).await;
        assert_eq!(r.ok(200)["has_certificate"], true);
        assert_eq!(r.ok(200)["certificate_expires_at"], 67_090_118_400_000i64);
        assert_no_key(&r.text, &pair);
        let view = s.get(&format!("/api/v1/instances/{id}"), auth).await;
        assert_no_key(&view.text, &pair);
    }
    // Sealed in the store: neither the key nor a line of it.
    let pool = s.db().await;
    let (certificate, sealed): (String, String) =
        sqlx::query("SELECT certificate, key_sealed FROM custom_hostnames WHERE instance_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
    pool.close().await;
    assert_eq!(certificate, pair.certificate);
    assert_no_key(&sealed, &pair);
    assert!(sealed.bytes().all(|b| b.is_ascii_hexdigit()), "{sealed}");

    // The same hostname again, without a certificate: kept. With another: replaced.
    let r = w
        .put(
            id,
            &w.owner.auth,
            json!({ "hostname": "Flows.Customer.org" }),
        )
        .await;
    assert_eq!(r.ok(200)["has_certificate"], true);
    assert_eq!(w.desired(id).await.certificate.as_ref(), Some(&pair));
    let r = w.put(id, &w.owner.auth, with_pair(hostname, &other)).await;
    assert_eq!(r.ok(200)["certificate_expires_at"], 1_936_742_400_000i64);
    assert_eq!(w.desired(id).await.certificate.as_ref(), Some(&other));
    // A wildcard certificate covers the names under it.
    let wildcard = ca.issue(&["*.customer.org"]);
    let r = w
        .put(id, &w.owner.auth, with_pair("api.customer.org", &wildcard))
        .await;
    assert_eq!(r.ok(200)["has_certificate"], true);
    // A new hostname without a certificate drops the old one, which does not cover it.
    let r = w
        .put(id, &w.owner.auth, json!({ "hostname": "flows.other.org" }))
        .await;
    assert_eq!(
        r.ok(200),
        &json!({ "hostname": "flows.other.org", "url": "http://flows.other.org:8080", "has_certificate": false, "certificate_expires_at": null })
    );
    let pool = s.db().await;
    let row: (Option<String>, Option<String>) =
        sqlx::query("SELECT certificate, key_sealed FROM custom_hostnames WHERE instance_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
    pool.close().await;
    assert_eq!(row, (None, None));

    // No audit entry holds a key, for the instance or the platform.
    for url in [
        format!("/api/v1/instances/{id}/audit-log"),
        "/api/v1/audit-log".to_string(),
    ] {
        let log = s.get(&url, &s.admin).await;
        log.ok(200);
        for p in [&pair, &other, &wildcard] {
            assert_no_key(&log.text, p);
        }
    }
    let (certified, log) = audited(
        s,
        id,
        &w.owner.auth,
        "/after/hostname",
        "/after/has_certificate",
    )
    .await;
    assert_eq!(certified.len(), 4, "{log}");
    assert!(certified.contains(&(json!("flows.other.org"), json!(false))));
    assert!(certified.contains(&(json!("api.customer.org"), json!(true))));
}

/// The desired state routes the hostname next to the instance's own host, with the certificate
/// and its key opened; after DELETE, neither.
async fn the_desired_state_routes_the_hostname_with_its_certificate(b: Backend) {
    let w = World::new(b).await;
    let (id, name) = &w.one;
    let own = format!("{name}.{BASE}");
    let d = w.desired(id).await;
    assert_eq!(d.hosts, std::slice::from_ref(&own));
    assert_eq!(d.certificate, None);

    w.put(
        id,
        &w.owner.auth,
        json!({ "hostname": "flows.customer.org" }),
    )
    .await
    .ok(200);
    let d = w.desired(id).await;
    assert_eq!(d.hosts, [own.clone(), "flows.customer.org".to_string()]);
    assert_eq!(d.certificate, None);

    let ca = TestCa::new();
    let pair = ca.issue(&["flows.customer.org"]);
    w.put(id, &w.owner.auth, with_pair("flows.customer.org", &pair))
        .await
        .ok(200);
    let d = w.desired(id).await;
    assert_eq!(d.hosts, [own.clone(), "flows.customer.org".to_string()]);
    assert_eq!(d.certificate.as_ref(), Some(&pair));
    // Only that instance.
    let two = w.desired(&w.two.0).await;
    assert_eq!(two.hosts.len(), 1);
    assert_eq!(two.certificate, None);

    w.s.delete(&path(id), &w.owner.auth).await.ok(204);
    let d = w.desired(id).await;
    assert_eq!(d.hosts, [own]);
    assert_eq!(d.certificate, None);
    let pool = w.s.db().await;
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM custom_hostnames")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    pool.close().await;
    assert_eq!(n, 0);
}
