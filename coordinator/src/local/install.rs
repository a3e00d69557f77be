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
        // In the staging directory too: npm rewrites its command line, and an install that
        // outlives a killed Tandem is then still known by its working directory.
        .current_dir(&staging)
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

/// How modules are installed: `tandem serve --npm-registry`, `--npm-token-file`,
/// `--npm-allow-install-scripts`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NpmOptions {
    /// The registry to install from; npm's default when `None`.
    pub registry: Option<String>,
    /// Let packages run their install scripts. Off by default: those scripts run on Tandem's
    /// machine, as Tandem's user, outside any replica's sandbox.
    pub allow_install_scripts: bool,
    /// npm's user configuration holding the registry's token ([`write_userconfig`]), passed as
    /// `--userconfig`: never in npm's arguments, Tandem's environment or the stacks directory,
    /// which replicas can read.
    pub userconfig: Option<PathBuf>,
}

/// npm's default registry.
pub const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org/";

/// Why a registry and its token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry is not an `http://` or `https://` URL.
    #[error("the npm registry must be an http:// or https:// URL, not {0:?}")]
    NotHttp(String),
    /// The token is empty or not one line of printable characters.
    #[error("the npm token file must hold one line: the registry's token")]
    BadToken,
    /// The configuration could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Writes `<dir>/npmrc`, npm's user configuration with `token` for `registry` (npm's default
/// when `None`), readable by Tandem's user only (the directory 0700, the file 0600); returns its
/// path, for [`NpmOptions::userconfig`]. npm sends the token to that registry alone (its
/// "nerf dart" key, `//host[:port]/path/`), and prints it nowhere.
pub fn write_userconfig(
    dir: &Path,
    registry: Option<&str>,
    token: &str,
) -> Result<PathBuf, RegistryError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let registry = registry.unwrap_or(DEFAULT_REGISTRY);
    let rest = registry
        .strip_prefix("https://")
        .or_else(|| registry.strip_prefix("http://"))
        .filter(|r| !r.is_empty() && !r.starts_with('/'))
        .filter(|r| r.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| RegistryError::NotHttp(registry.to_owned()))?;
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RegistryError::BadToken);
    }
    let key = if rest.ends_with('/') {
        format!("//{rest}")
    } else {
        format!("//{rest}/")
    };
    let fail = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Write { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail(dir))?;
    let path = dir.join("npmrc");
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(fail(&path))?;
    file.write_all(format!("{key}:_authToken={token}\n").as_bytes())
        .map_err(fail(&path))?;
    Ok(path)
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
    // In `staging` by its package.json, not `--prefix`, which would move npm's global
    // configuration (a CA file, a proxy) under the prefix too.
    let mut cmd = Command::new("npm");
    cmd.args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&staging);
    if !npm.allow_install_scripts {
        cmd.arg("--ignore-scripts");
    }
    if let Some(r) = &npm.registry {
        cmd.arg("--registry").arg(r);
    }
    if let Some(c) = &npm.userconfig {
        cmd.arg("--userconfig").arg(c);
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
