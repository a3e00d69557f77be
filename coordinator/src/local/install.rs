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

/// How modules are installed: `tandem serve --npm-registry`, `--npm-allow-install-scripts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NpmOptions {
    /// The registry to install from; npm's default when `None`.
    pub registry: Option<String>,
    /// Let packages run their install scripts. Off by default: those scripts run on Tandem's
    /// machine, as Tandem's user, outside any replica's sandbox.
    pub allow_install_scripts: bool,
}

/// Where `spec`'s module set is installed: one directory per module set, Node-RED version and
/// Node.js version, shared by every replica and instance with the same three; `None` without
/// modules.
pub(crate) fn modules_dir(stacks: &Path, spec: &crate::spec::ProcessSpec) -> Option<PathBuf> {
    if spec.modules.is_empty() {
        return None;
    }
    let key = serde_json::json!({
        "modules": spec.modules,
        "node-red": spec.nodered_version,
        "node": spec.node_version,
    });
    let hash = crate::spec::fnv(key.to_string().as_bytes());
    Some(stacks.join(format!("modules-{hash:016x}")))
}

/// Installs `spec`'s modules with npm into [`modules_dir`], once per set (a set installed before
/// is used as it is); returns each module's installed version. npm's output goes to `log`
/// (`src: npm`).
pub(crate) async fn install_modules(
    stacks: &Path,
    spec: &crate::spec::ProcessSpec,
    npm: &NpmOptions,
    log: &InstanceLog,
) -> Result<std::collections::BTreeMap<String, String>, DriverError> {
    let Some(dir) = modules_dir(stacks, spec) else {
        return Ok(Default::default());
    };
    let installed = |dir: PathBuf| async move {
        let mut out = std::collections::BTreeMap::new();
        for name in spec.modules.keys() {
            out.insert(name.clone(), installed_version(&dir, name).await?);
        }
        Some(out)
    };
    if let Some(v) = installed(dir.clone()).await {
        return Ok(v);
    }
    static INSTALLS: Mutex<()> = Mutex::const_new(());
    let _guard = INSTALLS.lock().await;
    if let Some(v) = installed(dir.clone()).await {
        return Ok(v);
    }
    let wanted: Vec<String> = spec
        .modules
        .iter()
        .map(|(name, version)| format!("{name}@{version}"))
        .collect();
    let fail = |output: String| DriverError::Install {
        package: "modules".into(),
        version: wanted.join(" "),
        output,
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = stacks.join(format!(".{name}-{}", std::process::id()));
    let _ = tokio::fs::remove_dir_all(&staging).await;
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(DriverError::io(format!(
            "cannot create {}",
            staging.display()
        )))?;
    // A package.json of its own, so npm installs here and not in a parent directory.
    tokio::fs::write(
        staging.join("package.json"),
        r#"{"name":"tandem-modules","private":true}"#,
    )
    .await
    .map_err(DriverError::io(format!(
        "cannot write in {}",
        staging.display()
    )))?;
    log.note("info", format!("installing {} with npm", wanted.join(" ")));
    let mut cmd = Command::new("npm");
    cmd.args([
        "install",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        "--prefix",
    ])
    .arg(&staging);
    if !npm.allow_install_scripts {
        cmd.arg("--ignore-scripts");
    }
    if let Some(r) = &npm.registry {
        cmd.arg("--registry").arg(r);
    }
    // Packages after `--`: never read as options.
    let out = cmd
        .arg("--")
        .args(&wanted)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
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
    if !out.status.success() || installed(staging.clone()).await.is_none() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        let lines: Vec<&str> = text.lines().collect();
        return Err(fail(lines[lines.len().saturating_sub(20)..].join("\n")));
    }
    if tokio::fs::rename(&staging, &dir).await.is_err() {
        let _ = tokio::fs::remove_dir_all(&staging).await;
    }
    let versions = installed(dir.clone())
        .await
        .ok_or_else(|| fail(format!("cannot move it into {}", dir.display())))?;
    log.note("info", format!("installed modules {versions:?}"));
    Ok(versions)
}

/// Makes `<user_dir>/node_modules` hold exactly `spec`'s modules, each a link into the shared
/// install `modules` ([`modules_dir`]), and `<user_dir>/package.json` list them: Node-RED then
/// loads them as the user's own, and its palette manager shows them and can remove them. What a
/// palette installed before (`.palette`, other links) is dropped: the store's list, installed in
/// the cache, is what runs from now on.
pub(crate) async fn link_modules(
    user_dir: &Path,
    spec: &crate::spec::ProcessSpec,
    modules: Option<&Path>,
) -> Result<(), DriverError> {
    let cannot = |what: &Path| DriverError::io(format!("cannot prepare {}", what.display()));
    let node_modules = user_dir.join("node_modules");
    for dir in [node_modules.clone(), user_dir.join(".palette")] {
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(cannot(&dir)(e)),
            _ => {}
        }
    }
    if let Some(modules) = modules {
        for name in spec.modules.keys() {
            let link = node_modules.join(name);
            if let Some(parent) = link.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(cannot(parent))?;
            }
            tokio::fs::symlink(modules.join("node_modules").join(name), &link)
                .await
                .map_err(cannot(&link))?;
        }
    }
    let package = serde_json::json!({
        "name": "tandem-replica",
        "private": true,
        "dependencies": spec.modules,
    });
    let path = user_dir.join("package.json");
    tokio::fs::write(&path, package.to_string())
        .await
        .map_err(cannot(&path))
}
