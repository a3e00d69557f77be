//! Upgrades of the store, each on a SQLite file and on PostgreSQL: a database made by tandem 0.1,
//! before migrations, keeps every row when the store opens it and records migration 1 as
//! applied; a later migration then runs on it; a fresh database runs every migration and ends
//! with the same schema; opening again changes nothing.
//!
//! A schema change adds its migration and an upgrade test here: a database at the previous
//! migration, with rows in every table, opened by the new store, keeps every row.

use std::path::Path;

use sha2::{Digest, Sha384};
use sqlx::any::AnyRow;
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, Connection, Row};
use tandem_controlplane::store::{Store, MIGRATOR};

use crate::api::support::{both_backends, pg_database, Backend, TempDir};

/// Tandem 0.1's schema: its `controlplane/src/store/schema.sql`, byte for byte. The code no
/// longer has it; this is what databases in the field were made with.
const V0_1_SCHEMA: &str = include_str!("migrations/v0.1-schema.sql");

/// A row or more in every table of that schema.
const V0_1_ROWS: &str = include_str!("migrations/v0.1-rows.sql");

/// Rows in every table migrations 2 to 12 added, over [`V0_1_ROWS`].
const V12_ROWS: &str = include_str!("migrations/v12-rows.sql");

/// Rows in every table migration 13 added, over [`V12_ROWS`].
const V13_ROWS: &str = include_str!("migrations/v13-rows.sql");

/// Migration 1, whose checksum an adopted database must hold.
const MIGRATION_1: &str = include_str!("../../migrations/0001_initial_schema.sql");

/// Every table of 0.1, with the rows it holds once [`V0_1_ROWS`] is in (`schema_version`: the
/// one 0.1 wrote).
const V0_1_TABLES: [(&str, usize); 11] = [
    ("applications", 1),
    ("audit", 2),
    ("instances", 2),
    ("members", 2),
    ("schema_version", 1),
    ("sessions", 1),
    ("stacks", 2),
    ("teams", 1),
    ("templates", 1),
    ("tokens", 2),
    ("users", 2),
];

both_backends!(
    v0_1_database_keeps_every_row,
    later_migration_runs_after_adoption,
    fresh_database_runs_every_migration,
    migration_13_keeps_every_row,
    migration_14_keeps_every_row,
);

/// Made by 0.1 with rows everywhere, then opened by this store, twice: every row is still there,
/// migration 1 is recorded (not run: its `CREATE TABLE`s would fail on the tables there), and
/// the store writes.
async fn v0_1_database_keeps_every_row(backend: Backend) {
    let db = Db::new(backend).await;
    make_v0_1(&db).await;
    let before = {
        let mut c = db.connect().await;
        let before = dump(&mut c, &[]).await;
        c.close().await.unwrap();
        before
    };
    let counts: Vec<(&str, usize)> = before.iter().map(|(t, rows)| (*t, rows.len())).collect();
    assert_eq!(counts, V0_1_TABLES, "the fixture fills every table");

    let store = db.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    let after = dump(&mut c, &[]).await;
    assert_eq!(
        old_columns(&after, &before),
        before,
        "rows after the upgrade"
    );
    // Migration 2 added `instances.protected`, false for every instance there.
    let protected: Vec<i64> = column(&mut c, "SELECT protected FROM instances").await;
    assert_eq!(protected, [0, 0]);
    // Migration 3: no credentials in the store yet, and the flows still in the replicas' own
    // files, for their first replica of this version to hand over.
    let flows: Vec<(String, i64)> =
        sqlx::query("SELECT credentials, flows_in_store FROM instances")
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(flows, [("{}".to_string(), 0), ("{}".to_string(), 0)]);
    // Migration 4: affinity as the default (on in balanced mode).
    let affinity: Vec<Option<i64>> = column(&mut c, "SELECT ha_affinity FROM instances").await;
    assert_eq!(affinity, [None, None]);
    let modules: Vec<String> = column(&mut c, "SELECT modules FROM instances").await;
    assert_eq!(modules, ["{}", "{}"]);
    // Migration 5: templates give no modules.
    let templates: Vec<String> = column(&mut c, "SELECT modules FROM templates").await;
    assert_eq!(templates, ["{}"]);
    // Migrations 6 and 7: no proxy token yet, and no platform key checked yet (the first
    // `tandem serve` of the new version records its key's check). Migration 10: no editor
    // ticket yet. Migration 11: no HTTP token yet. Migration 13: no custom hostname yet.
    for table in [
        "proxy_tokens",
        "platform_meta",
        "editor_tickets",
        "http_tokens",
        "custom_hostnames",
    ] {
        let n: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&mut *c)
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    // Migration 11: every instance's HTTP endpoints open, as before.
    let http_auth: Vec<String> = column(&mut c, "SELECT http_auth FROM instances").await;
    assert_eq!(http_auth, ["none", "none"]);
    // Migration 14: every instance with sleep off, and awake.
    let sleep: Vec<(Option<i64>, Option<i64>)> =
        sqlx::query("SELECT sleep_after_s, asleep_since FROM instances")
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(sleep, [(None, None), (None, None)]);
    // Migration 9: every user enabled.
    let disabled: Vec<i64> = column(&mut c, "SELECT disabled FROM users").await;
    assert!(
        !disabled.is_empty() && disabled.iter().all(|d| *d == 0),
        "{disabled:?}"
    );
    // Migration 8: the coordinator's lease, held by nobody.
    let lease: (String, i64) =
        sqlx::query("SELECT holder, term FROM leases WHERE name = 'coordinator'")
            .fetch_one(&mut *c)
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
    assert_eq!(lease, (String::new(), 0));
    let recorded = recorded(&mut c).await;
    assert_eq!(
        recorded[0],
        migration_1(),
        "migration 1 recorded as applied"
    );
    assert_eq!(
        recorded.iter().map(|m| m.0).collect::<Vec<_>>(),
        MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>(),
        "the later migrations ran"
    );
    assert_eq!(tables(&mut c, backend).await, all_tables());
    drop(c);
    drop(store);

    // Again: adopted once, checked against its checksum from now on.
    let store = db.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    assert_eq!(dump(&mut c, &[]).await, after, "rows after a second open");
    assert_eq!(self::recorded(&mut c).await, recorded);
    drop(c);

    let mut tx = store.write().await.unwrap();
    sqlx::query("INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4)")
        .bind("0193a1b2c3d4ffff00000000")
        .bind("After")
        .bind("after")
        .bind(1_733_000_000_000_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let teams: i64 = sqlx::query("SELECT COUNT(*) FROM teams")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(teams, 2);

    // Migration 10: an editor ticket of 0.1's user on 0.1's instance goes with the instance.
    let (user, instance) = ("0193a1b2c3d40001a1b2c3d5", "0193a1b2c3d4000aa1b2c3de");
    sqlx::query(
        "INSERT INTO editor_tickets (hash, user_id, instance_id, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind("ticket-hash")
    .bind(user)
    .bind(instance)
    .bind(1_733_000_060_000_i64)
    .execute(&store.pool)
    .await
    .unwrap();
    // Migration 12: a ticket made before it leads to the editor.
    let home: String = sqlx::query("SELECT home FROM editor_tickets WHERE hash = $1")
        .bind("ticket-hash")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(home, "editor");
    // Migration 11: so does an HTTP token of that instance.
    sqlx::query(
        "INSERT INTO http_tokens (id, instance_id, name, hash, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind("0193a1b2c3d4ffff000000ff")
    .bind(instance)
    .bind("sensor")
    .bind("http-token-hash")
    .bind(1_733_000_000_000_i64)
    .bind(user)
    .execute(&store.pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(instance)
        .execute(&store.pool)
        .await
        .unwrap();
    let tickets: i64 = sqlx::query("SELECT COUNT(*) FROM editor_tickets")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(tickets, 0, "a deleted instance's tickets go with it");
    let http_tokens: i64 = sqlx::query("SELECT COUNT(*) FROM http_tokens")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        http_tokens, 0,
        "a deleted instance's HTTP tokens go with it"
    );
}

/// After adoption, a migration past the last one runs (and is recorded), and a binary without
/// it refuses the database with a message that says why.
async fn later_migration_runs_after_adoption(backend: Backend) {
    let db = Db::new(backend).await;
    make_v0_1(&db).await;
    let before = {
        let mut c = db.connect().await;
        let before = dump(&mut c, &["teams"]).await;
        c.close().await.unwrap();
        before
    };

    // This binary's migrations, and one past the last.
    let dir = TempDir::new("tandem-migrations");
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(&ours).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let next = MIGRATOR.iter().map(|m| m.version).max().unwrap() + 1;
    let extra = "ALTER TABLE teams ADD COLUMN note TEXT NOT NULL DEFAULT '';\n";
    std::fs::write(dir.path().join(format!("{next:04}_team_note.sql")), extra).unwrap();
    let migrator = Migrator::new(dir.path().to_path_buf()).await.unwrap();

    let store = Store::open_with_migrations(db.dir.path(), db.url.as_deref(), &migrator)
        .await
        .unwrap();
    let mut c = store.pool.acquire().await.unwrap();
    let after = dump(&mut c, &["teams"]).await;
    assert_eq!(old_columns(&after, &before), before);
    let teams: Vec<(String, String)> = sqlx::query("SELECT slug, note FROM teams")
        .fetch_all(&mut *c)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(teams, [("units".to_string(), String::new())]);
    let versions: Vec<i64> = recorded(&mut c).await.iter().map(|m| m.0).collect();
    let mut expected: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    expected.push(next);
    assert_eq!(versions, expected);
    assert_eq!(recorded(&mut c).await[0], migration_1());
    drop(c);
    drop(store);

    let err = Store::open(db.dir.path(), db.url.as_deref())
        .await
        .expect_err("a binary without the last migration must refuse the database");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!("migration {next}")) && err.contains("newer tandem"),
        "{err}"
    );
}

/// A fresh database runs every migration of this binary, and its schema is the one an adopted
/// 0.1 database has: adoption is only sound if the two are the same.
async fn fresh_database_runs_every_migration(backend: Backend) {
    let fresh = Db::new(backend).await;
    let store = fresh.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    let recorded = recorded(&mut c).await;
    let versions: Vec<i64> = recorded.iter().map(|m| m.0).collect();
    let expected: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    assert_eq!(recorded[0], migration_1());
    assert_eq!(tables(&mut c, backend).await, all_tables());
    let rows = dump(&mut c, &[]).await;
    for (table, rows) in &rows {
        let want = usize::from(*table == "schema_version");
        assert_eq!(rows.len(), want, "{table}");
    }
    let version = rows.iter().find(|(t, _)| *t == "schema_version").unwrap();
    assert_eq!(version.1, [vec![Val::Int(1)]], "schema_version");
    let fresh_schema = schema(&mut c, backend).await;
    drop(c);
    drop(store);

    // Opening again runs nothing and changes nothing.
    let store = fresh.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    assert_eq!(self::recorded(&mut c).await, recorded);
    assert_eq!(dump(&mut c, &[]).await, rows);
    drop(c);

    let old = Db::new(backend).await;
    make_v0_1(&old).await;
    let store = old.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    assert_eq!(schema(&mut c, backend).await, fresh_schema);
}

/// Migration 13 (custom hostnames) on a database at migration 12 with rows in every table:
/// every row is kept, and the new table holds one hostname per instance, unique on the
/// platform, gone with its instance.
async fn migration_13_keeps_every_row(backend: Backend) {
    let db = Db::new(backend).await;
    let (store, c) = upgraded(&db, backend, 12, &[V12_ROWS], |names| {
        assert!(!names.contains(&"custom_hostnames".to_string()))
    })
    .await;
    drop(c);

    // One hostname per instance, unique on the platform, gone with its instance.
    let (orders, line_2) = ("0193a1b2c3d40009a1b2c3dd", "0193a1b2c3d4000aa1b2c3de");
    let insert = |instance: &'static str, hostname: &'static str| {
        sqlx::query(
            "INSERT INTO custom_hostnames (instance_id, hostname, certificate, key_sealed, created_at, updated_at) VALUES ($1, $2, NULL, NULL, $3, $3)",
        )
        .bind(instance)
        .bind(hostname)
        .bind(1_734_000_000_000_i64)
    };
    insert(line_2, "flows.example.org")
        .execute(&store.pool)
        .await
        .unwrap();
    insert(orders, "orders.example.org")
        .execute(&store.pool)
        .await
        .unwrap();
    for (instance, hostname) in [(orders, "flows.example.org"), (line_2, "other.example.org")] {
        let err = insert(instance, hostname)
            .execute(&store.pool)
            .await
            .expect_err("one hostname per instance, unique on the platform");
        let unique = err
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation());
        assert!(unique, "{err}");
    }
    sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(line_2)
        .execute(&store.pool)
        .await
        .unwrap();
    let left: Vec<String> = sqlx::query("SELECT hostname FROM custom_hostnames")
        .fetch_all(&store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["orders.example.org"]);
}

/// Migration 14 (sleep and wake) on a database at migration 13 with rows in every table:
/// every row is kept, every instance has sleep off and is awake, and the sleeper's columns take
/// its writes.
async fn migration_14_keeps_every_row(backend: Backend) {
    let db = Db::new(backend).await;
    let (_store, mut c) = upgraded(&db, backend, 13, &[V12_ROWS, V13_ROWS], |_| {}).await;
    async fn sleep(c: &mut AnyConnection) -> Vec<(Option<i64>, Option<i64>)> {
        sqlx::query("SELECT sleep_after_s, asleep_since FROM instances ORDER BY id")
            .fetch_all(c)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }
    assert_eq!(sleep(&mut c).await, [(None, None), (None, None)]);

    // Sleep on, then asleep, as the API and the sleeper write them.
    let line_2 = "0193a1b2c3d4000aa1b2c3de";
    sqlx::query("UPDATE instances SET sleep_after_s = $1, asleep_since = $2 WHERE id = $3")
        .bind(900_i64)
        .bind(1_735_000_000_000_i64)
        .bind(line_2)
        .execute(&mut *c)
        .await
        .unwrap();
    assert_eq!(
        sleep(&mut c).await,
        [(None, None), (Some(900), Some(1_735_000_000_000))]
    );
}

/// Control planes of a cluster start together on one PostgreSQL database: on a fresh one and on
/// one made by 0.1, each migrates or adopts once, and every one of them starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_control_planes_start_together() {
    let fresh = Db::new(Backend::Postgres).await;
    let old = Db::new(Backend::Postgres).await;
    make_v0_1(&old).await;
    for db in [&fresh, &old] {
        let opens = (0..4).map(|_| db.open());
        let stores = futures_util::future::join_all(opens).await;
        let mut c = stores[0].pool.acquire().await.unwrap();
        let recorded = recorded(&mut c).await;
        assert_eq!(recorded[0], migration_1());
        assert_eq!(
            recorded.iter().map(|m| m.0).collect::<Vec<_>>(),
            MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
        );
        let version: Vec<Vec<Val>> = sqlx::query("SELECT version FROM schema_version")
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .iter()
            .map(vals)
            .collect();
        assert_eq!(version, [vec![Val::Int(1)]]);
    }
}

// ---------------------------------------------------------------------------------------------
// Support.

/// Where a test's database lives: a SQLite file in `dir`, or the PostgreSQL database at `url`.
struct Db {
    dir: TempDir,
    url: Option<String>,
}

impl Db {
    async fn new(backend: Backend) -> Self {
        let dir = TempDir::new("tandem-migrate");
        let url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(pg_database().await),
        };
        Self { dir, url }
    }

    /// The store, opened as `tandem serve` opens it.
    async fn open(&self) -> Store {
        Store::open(self.dir.path(), self.url.as_deref())
            .await
            .unwrap()
    }

    /// A connection of its own, past the store and its migrations.
    async fn connect(&self) -> AnyConnection {
        sqlx::any::install_default_drivers();
        let url = match &self.url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                sqlite_file(self.dir.path()).display()
            ),
        };
        AnyConnection::connect(&url).await.unwrap()
    }
}

fn sqlite_file(dir: &Path) -> std::path::PathBuf {
    dir.join("tandem.db")
}

/// The database tandem 0.1's `Store::open` made, made as it made it: WAL on SQLite, then in one
/// transaction its schema, split on `;` with `--` lines dropped, and version 1. Then the rows.
async fn make_v0_1(db: &Db) {
    let mut c = db.connect().await;
    if db.url.is_none() {
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let mut tx = c.begin().await.unwrap();
    for statement in V0_1_SCHEMA.split(';') {
        let sql: String = statement
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        if !sql.trim().is_empty() {
            sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        }
    }
    sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
        .bind(1_i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::raw_sql(V0_1_ROWS).execute(&mut c).await.unwrap();
    c.close().await.unwrap();
}

/// A database [`at_migration`] `last` with `fixtures` (`check` looks at its tables first),
/// opened by this binary: every row is kept, every migration recorded, every table there. The
/// store and a connection to it.
async fn upgraded(
    db: &Db,
    backend: Backend,
    last: i64,
    fixtures: &[&str],
    check: impl FnOnce(&[String]),
) -> (Store, sqlx::pool::PoolConnection<sqlx::Any>) {
    let (names, before) = at_migration(db, backend, last, fixtures).await;
    check(&names);
    for (table, rows) in &before {
        assert!(!rows.is_empty(), "the fixture fills {table}");
    }

    let store = db.open().await;
    let mut c = store.pool.acquire().await.unwrap();
    let after = dump_all(&mut c, &names).await;
    assert_eq!(
        old_columns(&after, &before),
        before,
        "rows after the upgrade"
    );
    assert_eq!(
        recorded(&mut c)
            .await
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    assert_eq!(tables(&mut c, backend).await, all_tables());
    (store, c)
}

/// A database made by 0.1 (with its rows), brought to migration `last` by this binary's
/// migrations up to it, then given the rows of `fixtures`: the tables but the migrations'
/// record, and their rows.
async fn at_migration(
    db: &Db,
    backend: Backend,
    last: i64,
    fixtures: &[&str],
) -> (Vec<String>, Vec<(String, Vec<Vec<Val>>)>) {
    make_v0_1(db).await;
    let dir = TempDir::new("tandem-migrations");
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(&ours).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(&path, dir.path().join(name)).unwrap();
        }
    }
    let migrator = Migrator::new(dir.path().to_path_buf()).await.unwrap();
    assert_eq!(migrator.iter().map(|m| m.version).max(), Some(last));
    let store = Store::open_with_migrations(db.dir.path(), db.url.as_deref(), &migrator)
        .await
        .unwrap();
    drop(store);
    let mut c = db.connect().await;
    for rows in fixtures {
        sqlx::raw_sql(rows).execute(&mut c).await.unwrap();
    }
    let names: Vec<String> = tables(&mut c, backend)
        .await
        .into_iter()
        .filter(|t| t != "_sqlx_migrations")
        .collect();
    let rows = dump_all(&mut c, &names).await;
    c.close().await.unwrap();
    (names, rows)
}

/// One value of a row: every column of the schema is TEXT or BIGINT.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    Null,
    Int(i64),
    Text(String),
}

fn val(row: &AnyRow, i: usize) -> Val {
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return v.map_or(Val::Null, Val::Int);
    }
    row.try_get::<Option<String>, _>(i)
        .unwrap()
        .map_or(Val::Null, Val::Text)
}

fn vals(row: &AnyRow) -> Vec<Val> {
    (0..row.len()).map(|i| val(row, i)).collect()
}

/// Every row of every 0.1 table but those in `skip`, sorted, by table.
async fn dump(c: &mut AnyConnection, skip: &[&str]) -> Vec<(&'static str, Vec<Vec<Val>>)> {
    let mut out = Vec::new();
    for (table, _) in V0_1_TABLES {
        if skip.contains(&table) {
            continue;
        }
        let mut rows: Vec<Vec<Val>> = sqlx::query(&format!("SELECT * FROM {table}"))
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .iter()
            .map(vals)
            .collect();
        rows.sort();
        out.push((table, rows));
    }
    out
}

/// Every row of each of `tables`, sorted, by table.
async fn dump_all(c: &mut AnyConnection, tables: &[String]) -> Vec<(String, Vec<Vec<Val>>)> {
    let mut out = Vec::new();
    for table in tables {
        let mut rows: Vec<Vec<Val>> = sqlx::query(&format!("SELECT * FROM {table}"))
            .fetch_all(&mut *c)
            .await
            .unwrap()
            .iter()
            .map(vals)
            .collect();
        rows.sort();
        out.push((table.clone(), rows));
    }
    out
}

/// `after` cut to the columns of `before`'s rows: later migrations add columns at the end of
/// a table, so what was written before them is each row's beginning.
fn old_columns<T: Clone>(
    after: &[(T, Vec<Vec<Val>>)],
    before: &[(T, Vec<Vec<Val>>)],
) -> Vec<(T, Vec<Vec<Val>>)> {
    after
        .iter()
        .zip(before)
        .map(|((table, rows), (_, old))| {
            let width = old.first().map_or(0, Vec::len);
            let mut rows: Vec<Vec<Val>> = rows
                .iter()
                .map(|r| r[..width.min(r.len())].to_vec())
                .collect();
            rows.sort();
            (table.clone(), rows)
        })
        .collect()
}

/// What `_sqlx_migrations` holds: version, description, success, checksum.
type Recorded = (i64, String, bool, Vec<u8>);

/// Migration 1 as it must be recorded: the checksum is SHA-384 of the file, as sqlx checks it.
fn migration_1() -> Recorded {
    let checksum = Sha384::digest(MIGRATION_1.as_bytes()).to_vec();
    (1, "initial schema".to_string(), true, checksum)
}

/// The first column of every row `sql` selects.
async fn column<T>(c: &mut AnyConnection, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    sqlx::query(sql)
        .fetch_all(&mut *c)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn recorded(c: &mut AnyConnection) -> Vec<Recorded> {
    // The Any driver reads no SQLite BOOLEAN: `success` comes as a number.
    sqlx::query(
        "SELECT version, description, CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT), \
                checksum \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get::<i64, _>(2) == 1, r.get(3)))
    .collect()
}

/// Tables the migrations after 0.1 added.
const LATER_TABLES: [&str; 12] = [
    "control_planes",
    "custom_hostnames",
    "deployments",
    "editor_tickets",
    "http_tokens",
    "leases",
    "library_entries",
    "pipeline_stages",
    "pipelines",
    "platform_meta",
    "proxy_tokens",
    "snapshots",
];

/// The tables an up-to-date database has: 0.1's, the later migrations' and the migrations'
/// record.
fn all_tables() -> Vec<String> {
    let mut all: Vec<String> = V0_1_TABLES.iter().map(|(t, _)| t.to_string()).collect();
    all.extend(LATER_TABLES.iter().map(|t| t.to_string()));
    all.push("_sqlx_migrations".to_string());
    all.sort();
    all
}

async fn tables(c: &mut AnyConnection, backend: Backend) -> Vec<String> {
    let sql = match backend {
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table'",
        Backend::Postgres => {
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema()"
        }
    };
    let mut names: Vec<String> = sqlx::query(sql)
        .fetch_all(&mut *c)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

/// The schema but `_sqlx_migrations`: tables, columns, indexes and constraints, as the database
/// describes them.
async fn schema(c: &mut AnyConnection, backend: Backend) -> Vec<Vec<Val>> {
    let sql = match backend {
        // SQLite keeps each object's `CREATE` statement, with `IF NOT EXISTS` taken out.
        Backend::Sqlite => {
            "SELECT type, name, tbl_name, sql FROM sqlite_master \
             WHERE tbl_name <> '_sqlx_migrations'"
        }
        Backend::Postgres => {
            "SELECT 'column', table_name::text, column_name::text, \
                    data_type::text || ' ' || is_nullable::text || ' ' \
                    || COALESCE(column_default::text, '') \
             FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name <> '_sqlx_migrations' \
             UNION ALL \
             SELECT 'index', tablename::text, indexname::text, indexdef \
             FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename <> '_sqlx_migrations' \
             UNION ALL \
             SELECT 'constraint', conrelid::regclass::text, conname::text, \
                    pg_get_constraintdef(oid) \
             FROM pg_constraint \
             WHERE connamespace = current_schema()::regnamespace \
               AND conrelid::regclass::text <> '_sqlx_migrations'"
        }
    };
    let mut rows: Vec<Vec<Val>> = sqlx::query(sql)
        .fetch_all(&mut *c)
        .await
        .unwrap()
        .iter()
        .map(vals)
        .collect();
    rows.sort();
    assert!(rows.len() > 20, "the schema is described: {rows:?}");
    rows
}
