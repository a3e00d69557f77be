//! The store: one sqlx `AnyPool` over SQLite (embedded default) or PostgreSQL.
//!
//! Every query is written once for both: `$n` placeholders in order, TEXT and BIGINT columns,
//! times in epoch milliseconds, JSON as text. Every change an API call makes runs in one
//! transaction together with its audit entry, so a request commits whole or not at all.
//!
//! # Migrations
//!
//! The schema is the migrations in `controlplane/migrations/`, embedded with `sqlx::migrate!` and
//! run by [`Store::open`] before anything else touches the database: each in its own
//! transaction, recorded in `_sqlx_migrations` with its checksum. On PostgreSQL an advisory lock
//! lets one control plane migrate while the others starting with it wait.
//!
//! A database made before migrations existed (tandem 0.1: its tables made with
//! `CREATE TABLE IF NOT EXISTS`, `schema_version` holding 1, no `_sqlx_migrations`) already has
//! the schema of migration 1. It is adopted: migration 1 is recorded as applied, with its
//! checksum, instead of run, and later migrations run as on any other database.
//!
//! To change the schema:
//! 1. Add `controlplane/migrations/<NNNN>_<what_it_does>.sql`, numbered one past the last (by
//!    hand, or with sqlx-cli's `sqlx migrate add --sequential <what_it_does>` in `controlplane/`).
//!    Never edit a migration once released: databases hold its checksum, and the store refuses
//!    to open one whose migration no longer matches it.
//! 2. Write it once for both backends, as the queries are. SQLite's `ALTER TABLE` adds, renames
//!    and drops columns but changes no constraint; a migration that must rebuild a table, or that
//!    needs different SQL per backend, splits the directory into `migrations/sqlite` and
//!    `migrations/postgres` (copy the existing files unchanged, so their checksums stay) with a
//!    migrator per backend.
//! 3. If tandem 0.1 could not work with the new schema, end the migration with
//!    `UPDATE schema_version SET version = <NNNN>;`: 0.1 refuses a database above version 1.
//!    Binaries with migrations refuse on their own a database that ran a migration they lack.
//! 4. Add an upgrade test to `controlplane/tests/it/migrations.rs`: a database at the previous
//!    migration with rows in every table, opened by the new store, keeps every row.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

/// This binary's migrations, from `controlplane/migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A file in the data directory.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Handle to the database.
#[derive(Debug, Clone)]
pub struct Store {
    /// The pool; queries go through it or through a transaction from it.
    pub pool: AnyPool,
    /// The backend in use.
    pub backend: Backend,
}

impl Store {
    /// Opens (creating if needed) the SQLite file `<data_dir>/tandem.db` in WAL mode, or the
    /// PostgreSQL database at `url`, and brings its schema up to date with [`MIGRATOR`].
    pub async fn open(data_dir: &Path, url: Option<&str>) -> anyhow::Result<Self> {
        Self::open_with_migrations(data_dir, url, &MIGRATOR).await
    }

    /// [`Store::open`] with `migrator` in place of this binary's migrations: upgrade tests use
    /// it to run a migration that comes after the last one released.
    pub async fn open_with_migrations(
        data_dir: &Path,
        url: Option<&str>,
        migrator: &Migrator,
    ) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let (pool, backend) = match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .connect(url)
                    .await?;
                (pool, Backend::Postgres)
            }
            Some(other) => anyhow::bail!(
                "unsupported database URL {other:?}: use postgres://… or leave it out for SQLite"
            ),
            None => {
                std::fs::create_dir_all(data_dir)?;
                let path = data_dir.join("tandem.db");
                // Create the file with WAL and foreign keys through the native driver, then use it
                // through the Any pool; per-connection pragmas are set in `after_connect`.
                let opts = sqlx::sqlite::SqliteConnectOptions::from_str(&format!(
                    "sqlite://{}",
                    path.display()
                ))?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
                {
                    use sqlx::ConnectOptions;
                    let mut c = opts.connect().await?;
                    sqlx::query("SELECT 1").execute(&mut c).await?;
                }
                let url = format!("sqlite://{}", path.display());
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("PRAGMA foreign_keys = ON")
                                .execute(&mut *conn)
                                .await?;
                            sqlx::query("PRAGMA busy_timeout = 5000")
                                .execute(&mut *conn)
                                .await?;
                            sqlx::query("PRAGMA synchronous = NORMAL")
                                .execute(&mut *conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                (pool, Backend::Sqlite)
            }
        };
        let store = Self { pool, backend };
        store.migrate(migrator).await?;
        Ok(store)
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout instead of one failing when
    /// its read turns into a write.
    pub async fn write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// Adopts a database from before migrations, then runs every migration it has not recorded.
    async fn migrate(&self, migrator: &Migrator) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        // PostgreSQL: the migrator's advisory lock, held across adoption too, so control planes
        // starting together neither both adopt nor both create `_sqlx_migrations`; the migrator
        // takes it again inside (advisory locks nest). SQLite: sqlx has no lock, and needs none:
        // one `tandem serve` owns the file, and adoption checks and records under one
        // `BEGIN IMMEDIATE`.
        conn.lock()
            .await
            .context("cannot take the migration lock")?;
        let migrated = async {
            self.adopt_v0_1(&mut conn, migrator).await?;
            migrator.run(&mut *conn).await.map_err(explain)
        }
        .await;
        match migrated {
            Ok(()) => conn.unlock().await?,
            // Closing the connection ends its session and with it any advisory lock still held.
            Err(_) => conn.close_on_drop(),
        }
        migrated
    }

    /// A database made by tandem 0.1 has migration 1's schema, made by the same statements with
    /// `IF NOT EXISTS`, and `schema_version` holding 1, but no `_sqlx_migrations`: record
    /// migration 1 as applied, with the checksum the migrator checks, rather than run it (its
    /// `CREATE TABLE`s would fail on the tables there). Anything else is left to the migrator.
    async fn adopt_v0_1(
        &self,
        conn: &mut AnyConnection,
        migrator: &Migrator,
    ) -> anyhow::Result<()> {
        let mut tx = match self.backend {
            Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => conn.begin().await?,
        };
        tx.ensure_migrations_table().await?;
        let recorded: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let exists_sql = match self.backend {
            Backend::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1"
            }
            Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = $1"
            }
        };
        let v0_1: i64 = sqlx::query(exists_sql)
            .bind("schema_version")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if recorded > 0 || v0_1 == 0 {
            tx.commit().await?;
            return Ok(());
        }
        let versions: Vec<i64> = sqlx::query("SELECT version FROM schema_version")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if versions != [1] {
            anyhow::bail!(
                "the database has no migration history and schema_version holds {versions:?}, \
                 not [1] as tandem 0.1 left it: this tandem does not know how to upgrade it; \
                 restore a backup made by tandem 0.1"
            );
        }
        let first = migrator
            .iter()
            .find(|m| m.version == 1 && !m.migration_type.is_down_migration())
            .context("migration 1 is missing: tandem 0.1's schema cannot be adopted")?;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, TRUE, $3, 0)",
        )
        .bind(first.version)
        .bind(first.description.as_ref())
        .bind(first.checksum.as_ref())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            migration = first.version,
            "adopted a database made by tandem 0.1: migration 1 recorded as applied"
        );
        Ok(())
    }
}

/// A migration error, with what to do about it.
fn explain(e: MigrateError) -> anyhow::Error {
    let hint = match &e {
        MigrateError::VersionMissing(v) => format!(
            "the database ran migration {v}, which this tandem does not have: a newer tandem \
             upgraded it, so run that version or a later one"
        ),
        MigrateError::VersionMismatch(v) => format!(
            "migration {v} of this tandem differs from the one the database ran: the migration \
             file was edited after it was released; build from the released file"
        ),
        _ => "cannot bring the database schema up to date".to_string(),
    };
    anyhow::Error::new(e).context(hint)
}

/// How many rows of `table` have `column = value`, inside a transaction (for "still in use"
/// checks that must see the same state as the write that follows).
pub async fn count_where(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    table: &str,
    column: &str,
    value: &str,
) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT COUNT(*) FROM {table} WHERE {column} = $1"))
        .bind(value)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.get(0))
}

/// Now, in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A new id: 12 hex digits of milliseconds, then 4 of a per-process counter and 8 random, so ids
/// sort by creation time and cursors over them are stable.
pub fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff;
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("{:012x}{n:04x}{}", now_ms(), hex(&r))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
