//! The store: one sqlx `AnyPool` over SQLite (embedded default) or PostgreSQL.
//!
//! Every query is written once for both: `$n` placeholders in order, TEXT and BIGINT columns,
//! times in epoch milliseconds, JSON as text. The schema is embedded and applied at start.
//! Every change an API call makes runs in one transaction together with its audit entry, so a
//! request commits whole or not at all.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// The schema version this binary writes.
const SCHEMA_VERSION: i64 = 1;

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
    /// PostgreSQL database at `url`, and applies the schema.
    pub async fn open(data_dir: &Path, url: Option<&str>) -> anyhow::Result<Self> {
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
        store.migrate().await?;
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

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut tx = self.write().await?;
        for statement in include_str!("store/schema.sql").split(';') {
            let sql: String = statement
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            if !sql.trim().is_empty() {
                sqlx::query(&sql).execute(&mut *tx).await?;
            }
        }
        let version: Option<i64> = sqlx::query("SELECT version FROM schema_version")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r: AnyRow| r.get(0));
        match version {
            None => {
                sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *tx)
                    .await?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                anyhow::bail!("the database has schema version {v}, newer than this tandem ({SCHEMA_VERSION}); upgrade tandem")
            }
            Some(_) => {}
        }
        tx.commit().await?;
        Ok(())
    }
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
