//! Stacks: Node-RED (and the Node.js runtime a stack asks for) installed with npm, once per
//! version, into `<stacks>/<package>-<version>/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::Mutex;

use crate::driver::DriverError;
use crate::logs::InstanceLog;

/// Longest an `npm install` may take.
const NPM_TIMEOUT: Duration = Duration::from_secs(600);

/// `npm install <package>@<version>` into `<stacks_dir>/<package>-<version>`, once; returns
/// that directory. The install's output goes to `log`.
pub(crate) async fn install_package(
    stacks: &Path,
    package: &str,
    version: &str,
    log: &InstanceLog,
) -> Result<PathBuf, DriverError> {
    let fail = |output: String| DriverError::Install {
        package: package.into(),
        version: version.into(),
        output,
    };
    let valid = !version.is_empty()
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !valid {
        return Err(fail("not a version".into()));
    }
    let dir = stacks.join(format!("{package}-{version}"));
    // Installed stacks do not wait for installs of others.
    if installed_version(&dir, package).await.as_deref() == Some(version) {
        return Ok(dir);
    }
    // One install at a time in this process, whichever driver asks.
    static INSTALLS: Mutex<()> = Mutex::const_new(());
    let _guard = INSTALLS.lock().await;
    if installed_version(&dir, package).await.as_deref() == Some(version) {
        return Ok(dir);
    }
    // Install beside the target and rename it into place, so a stack directory is either
    // complete or absent, whoever else installs the same version at the same time.
    let staging = stacks.join(format!(".{package}-{version}-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&staging).await;
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(DriverError::io(format!(
            "cannot create {}",
            staging.display()
        )))?;
    tracing::info!(%package, %version, dir = %dir.display(), "installing with npm");
    log.note("info", format!("installing {package} {version} with npm"));
    let out = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(&staging)
        .arg(format!("{package}@{version}"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // A hung npm must not hold every other install forever.
    let out = match tokio::time::timeout(NPM_TIMEOUT, out).await {
        Ok(out) => out.map_err(DriverError::io("cannot run npm (is Node.js installed?)"))?,
        Err(_) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(fail(format!("npm did not finish within {NPM_TIMEOUT:?}")));
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        log.push_line("npm", line);
    }
    if !out.status.success()
        || installed_version(&staging, package).await.as_deref() != Some(version)
    {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let lines: Vec<&str> = text.lines().collect();
        return Err(fail(lines[lines.len().saturating_sub(20)..].join("\n")));
    }
    if tokio::fs::rename(&staging, &dir).await.is_err() {
        // Someone else finished first; theirs is as good as ours.
        let _ = tokio::fs::remove_dir_all(&staging).await;
        if installed_version(&dir, package).await.as_deref() != Some(version) {
            return Err(fail(format!("cannot move it into {}", dir.display())));
        }
    }
    log.note("info", format!("installed {package} {version}"));
    Ok(dir)
}

async fn installed_version(dir: &Path, package: &str) -> Option<String> {
    let text =
        tokio::fs::read_to_string(dir.join("node_modules").join(package).join("package.json"))
            .await
            .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("version")?.as_str().map(str::to_owned)
}
