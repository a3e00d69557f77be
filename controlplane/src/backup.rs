//! `tandem backup --to F` and `tandem restore --from F`: the store and the platform key in one
//! file. Losing the key loses every credential (flows' credentials and secret variables are
//! encrypted with secrets derived from it), so they are kept together.
//!
//! The backup is a SQLite database, consistent while Tandem runs (`VACUUM INTO`, SQLite's online
//! copy of a live database), with the key in its `platform_meta` table (`backup_platform_key`),
//! written 0600. A restore puts the database into an empty data directory, moves the key out of
//! it into `secret-key` (0600), and `tandem serve` takes it from there. With PostgreSQL, back up
//! with `pg_dump` and keep the platform key file beside it (see the README).

use std::path::Path;

use anyhow::Context;
use sqlx::{ConnectOptions as _, Connection as _, Row as _};

use crate::secrets::PlatformKey;
use crate::store::Store;

/// The `platform_meta` row a backup carries the key in.
const KEY_ROW: &str = "backup_platform_key";

/// Writes a backup of the SQLite store in `data_dir` and its platform key (from `key_file`, or
/// `<data_dir>/secret-key`) to `to`, whole or not at all.
pub async fn backup(data_dir: &Path, key_file: Option<&Path>, to: &Path) -> anyhow::Result<()> {
    let key = match key_file {
        Some(f) => PlatformKey::load(f)?,
        None => PlatformKey::load(&data_dir.join("secret-key"))?,
    };
    if !data_dir.join("tandem.db").exists() {
        anyhow::bail!("no SQLite store in {}", data_dir.display());
    }
    let store = Store::open(data_dir, None).await?;
    key.check_against(&store).await?;
    let tmp = to.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    let target = tmp
        .to_str()
        .context("the backup path is not UTF-8")?
        .replace('\'', "''");
    sqlx::query(&format!("VACUUM INTO '{target}'"))
        .execute(&store.pool)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    set_private(&tmp)?;
    let mut c = sqlite(&tmp, false).await?;
    sqlx::query("INSERT INTO platform_meta (name, value) VALUES ($1, $2)")
        .bind(KEY_ROW)
        .bind(key.to_hex())
        .execute(&mut c)
        .await?;
    c.close().await?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot write {}", to.display()))?;
    Ok(())
}

/// Restores a backup into `data_dir`, which must hold no store and no key yet.
pub async fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<()> {
    for existing in ["tandem.db", "secret-key"] {
        if data_dir.join(existing).exists() {
            anyhow::bail!(
                "{} already holds {existing}: restore into an empty data directory",
                data_dir.display()
            );
        }
    }
    std::fs::create_dir_all(data_dir)?;
    crate::serve_cmd::secure_data_dir(data_dir, true)?;
    let db = data_dir.join("tandem.db");
    let tmp = data_dir.join("tandem.db.restoring");
    std::fs::copy(from, &tmp).with_context(|| format!("cannot read {}", from.display()))?;
    set_private(&tmp)?;
    let mut c = sqlite(&tmp, false)
        .await
        .with_context(|| format!("{} is not a Tandem backup", from.display()))?;
    let key: Option<String> = sqlx::query("SELECT value FROM platform_meta WHERE name = $1")
        .bind(KEY_ROW)
        .fetch_optional(&mut c)
        .await
        .with_context(|| format!("{} is not a Tandem backup", from.display()))?
        .map(|r| r.get(0));
    let Some(key) = key else {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!(
            "{} holds no platform key: not a Tandem backup",
            from.display()
        );
    };
    sqlx::query("DELETE FROM platform_meta WHERE name = $1")
        .bind(KEY_ROW)
        .execute(&mut c)
        .await?;
    c.close().await?;
    crate::serve_cmd::write_private(&data_dir.join("secret-key"), &format!("{key}\n"))?;
    std::fs::rename(&tmp, &db)?;
    Ok(())
}

async fn sqlite(path: &Path, create: bool) -> anyhow::Result<sqlx::SqliteConnection> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(create);
    Ok(opts.connect().await?)
}

fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}
