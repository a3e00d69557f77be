//! `tandem serve`: the control plane's API and the ingress proxy in one process.
//!
//! On first start (no users in the store) it creates the platform admin `admin`, writes a
//! one-time admin token to `<data-dir>/admin-token` (mode 0600) and says where on the console,
//! and adds a default stack so instances can be created at once.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use sqlx::Row;
use tandem_coordinator::local::{LocalDriver, SandboxLauncher};
use tandem_coordinator::logs::LogBook;
use tandem_coordinator::restart::RestartPolicy;
use tandem_coordinator::status::NotObserved;
use tandem_coordinator::{Coordinator, CoordinatorConfig};
use tandem_proxy::{Proxy, ProxyConfig, ProxyStats, Routes};

use crate::api::stacks::{self, StackBody};
use crate::api::users;
use crate::auth::throttle::LoginThrottle;
use crate::auth::{Caller, Credential};
use crate::cli::ServeArgs;
use crate::secrets::PlatformKey;
use crate::state::{ApiConfig, AppState};
use crate::store::Store;

/// Node-RED version of the stack created at first start.
pub const DEFAULT_NODERED: &str = "4.1.2";

/// Opens the store and builds the API state.
pub async fn state(
    data_dir: &Path,
    database_url: Option<&str>,
    config: ApiConfig,
) -> anyhow::Result<AppState> {
    state_with_key(data_dir, database_url, config, None).await
}

/// [`state`] with the platform key from `key_file` (`--platform-key-file`) rather than
/// `<data_dir>/secret-key`. Either way the key must match the database's (see
/// [`PlatformKey::check_against`]).
pub async fn state_with_key(
    data_dir: &Path,
    database_url: Option<&str>,
    config: ApiConfig,
    key_file: Option<&Path>,
) -> anyhow::Result<AppState> {
    secure_data_dir(data_dir, database_url.is_none())?;
    let store = Store::open(data_dir, database_url)
        .await
        .with_context(|| match database_url {
            Some(_) => "cannot open the PostgreSQL database".to_string(),
            None => format!("cannot open the store in {}", data_dir.display()),
        })?;
    let key = match key_file {
        Some(f) => PlatformKey::load(f)?,
        None => PlatformKey::load_or_create(data_dir)?,
    };
    key.check_against(&store).await?;
    Ok(AppState {
        key,
        store,
        coordinator: Arc::new(NotObserved),
        metrics: Arc::default(),
        more_metrics: None,
        login_throttle: Arc::new(LoginThrottle::new(config.login_limits.clone())),
        config: Arc::new(config),
        feed: Arc::default(),
    })
}

/// First start: the admin user, its token in `<data_dir>/admin-token`, a default stack.
/// Returns the token path when it bootstrapped.
pub async fn bootstrap(
    state: &AppState,
    data_dir: &Path,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let users: i64 = sqlx::query("SELECT COUNT(*) FROM users")
        .fetch_one(&state.store.pool)
        .await?
        .get(0);
    if users > 0 {
        return Ok(None);
    }
    let admin = users::insert_user(state, None, "admin", None, None, true)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the admin user: {e}"))?;
    let caller = Caller {
        id: admin.id,
        username: admin.username,
        admin: true,
        via: Credential::Internal,
    };
    let token = users::issue_token(state, &caller, "first-start admin token", None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot issue the admin token: {e}"))?;
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("admin-token");
    write_private(&path, &format!("{}\n", token.token_value))?;
    let stacks: i64 = sqlx::query("SELECT COUNT(*) FROM stacks")
        .fetch_one(&state.store.pool)
        .await?
        .get(0);
    if stacks == 0 {
        let body = StackBody {
            name: format!("node-red-{}", DEFAULT_NODERED.replace('.', "-")),
            nodered_version: DEFAULT_NODERED.into(),
            node_version: None,
            memory_mb: Some(512),
            replaced_by: None,
        };
        stacks::insert(state, Some(&caller), body)
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the default stack: {e}"))?;
    }
    Ok(Some(path))
}

/// Makes the data directory private to Tandem's OS user: the directory 0700, the files in it
/// (the database and its WAL, the admin token, the platform key) 0600. Data directories made by
/// older versions (0755 and 0644) are tightened at every start. SQLite gives the WAL and shared
/// memory files the database file's mode, so the database is created 0600 before SQLite opens
/// it.
pub fn secure_data_dir(data_dir: &Path, sqlite: bool) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let private = |path: &Path, mode: u32| -> anyhow::Result<()> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot make {} private", path.display()))
        };
        private(data_dir, 0o700)?;
        if sqlite {
            let db = data_dir.join("tandem.db");
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&db)
                .with_context(|| format!("cannot create {}", db.display()))?;
        }
        for entry in std::fs::read_dir(data_dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_file() {
                private(&entry.path(), 0o600)?;
            } else if kind.is_dir() && entry.file_name() == "instances" {
                private(&entry.path(), 0o700)?;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = sqlite;
        std::fs::create_dir_all(data_dir)?;
    }
    Ok(())
}

/// Writes `text` to `path` readable by the owner only.
pub(crate) fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Runs `tandem serve` until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let api = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on {} (API)", args.api_listen))?;
    // Replicas reach the storage API on the API's own port, over loopback when it listens on
    // every address.
    let api_addr = api.local_addr()?;
    let storage_ip = if api_addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        api_addr.ip()
    };
    let config = ApiConfig {
        base_domain: args.base_domain.clone(),
        max_ha_replicas: args.max_ha_replicas,
        max_document_bytes: (args.max_document_mib as usize) << 20,
        storage_base: Some(format!(
            "http://{}",
            std::net::SocketAddr::new(storage_ip, api_addr.port())
        )),
        ..ApiConfig::default()
    };
    let state = state_with_key(
        &args.data_dir,
        args.database_url.as_deref(),
        config,
        args.platform_key_file.as_deref(),
    )
    .await?;
    // Deploys under way when Tandem stopped are rolled back before anything runs.
    crate::deployments::recover(&state).await?;
    if let Some(path) = bootstrap(&state, &args.data_dir).await? {
        tracing::info!(path = %path.display(), "first start: created user admin; its API token is in this file (read it once, keep it safe)");
    }
    // With `--no-proxy`, standalone proxies serve the instances.
    let http = match args.no_proxy {
        true => None,
        false => Some(
            tokio::net::TcpListener::bind(args.http_listen)
                .await
                .with_context(|| format!("cannot listen on {} (instances)", args.http_listen))?,
        ),
    };
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} (metrics)", args.metrics_listen))?;
    let http_addr = match &http {
        Some(h) => h.local_addr()?.to_string(),
        None => "none (--no-proxy)".into(),
    };
    tracing::info!(api = %api.local_addr()?, http = %http_addr, metrics = %metrics.local_addr()?, data_dir = %args.data_dir.display(), base_domain = %args.base_domain, "tandem serving");

    // The coordinator runs the instances' replicas and publishes them into the proxy's routes.
    let routes = Arc::new(Routes::new());
    let mut driver = LocalDriver::new(&args.data_dir);
    if let Some(dir) = &args.stacks_dir {
        driver.stacks_dir = dir.clone();
    }
    // Every replica runs in a Landlock sandbox through `tandem sandbox-exec`.
    let mut driver = driver.with_sandbox(SandboxLauncher {
        exe: std::env::current_exe()
            .context("cannot find the tandem binary to sandbox replicas with")?,
        required: args.require_isolation,
    });
    driver.ready_timeout = std::time::Duration::from_millis(args.ready_timeout_ms.max(1));
    driver.stop_grace = std::time::Duration::from_millis(args.stop_grace_ms);
    driver.npm = npm_options(&args)?;
    driver.liveness = tandem_coordinator::driver::Liveness {
        interval: std::time::Duration::from_millis(args.liveness_check_ms.max(10)),
        hang_after: std::time::Duration::from_millis(args.hang_after_ms.max(50)),
    };
    let coordinator = Coordinator::new(
        Arc::new(driver),
        // The in-process proxy (unless `--no-proxy`) and the standalone proxies' route feed.
        Arc::new(crate::route_feed::FeedDataPlane {
            local: (!args.no_proxy)
                .then(|| tandem_coordinator::dataplane::InProcess(routes.clone())),
            feed: state.feed.clone(),
        }),
        Arc::new(LogBook::default()),
        CoordinatorConfig {
            policy: RestartPolicy {
                base: std::time::Duration::from_millis(args.restart_backoff_ms.max(1)),
                max_quick_crashes: args.crash_loop_restarts.max(1),
                ..RestartPolicy::default()
            },
            drain_timeout: std::time::Duration::from_millis(args.drain_timeout_ms),
            ..CoordinatorConfig::default()
        },
    );
    let mut state = state;
    state.coordinator = coordinator.clone();
    let stats = Arc::new(ProxyStats::default());
    state.more_metrics = Some(Arc::new({
        let (routes, stats) = (routes.clone(), stats.clone());
        move || tandem_proxy::metrics::render(&routes.load(), &stats)
    }));
    let proxy = Arc::new(
        Proxy::new(
            routes,
            ProxyConfig {
                hold_timeout: std::time::Duration::from_millis(args.hold_timeout_ms),
                ..ProxyConfig::default()
            },
            stats.clone(),
        )
        .with_editor_gate(Arc::new(crate::editor_gate::TeamEditorGate(state.clone()))),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || crate::stopped(stop_rx.clone());
    let mqtt = match &args.mqtt_upstream {
        Some(upstream) => {
            let mut config = tandem_proxy::MqttConfig::new(upstream.as_str());
            if args.mqtt_tls {
                config.tls = Some(
                    tandem_proxy::mqtt::tls::UpstreamTls::new(args.mqtt_ca_file.clone())
                        .map_err(|e| anyhow::anyhow!("--mqtt-tls: {e}"))?,
                );
            } else if args.mqtt_ca_file.is_some() {
                anyhow::bail!("--mqtt-ca-file needs --mqtt-tls");
            }
            Some(crate::mqtt_wiring::MqttWiring::new(
                &args.data_dir,
                config,
                stats.clone(),
            )?)
        }
        None => None,
    };
    let reconcile_task = tokio::spawn(crate::desired::run(
        state.clone(),
        coordinator.clone(),
        mqtt,
        stopped(),
    ));
    let proxy_task =
        http.map(|http| tokio::spawn(tandem_proxy::server::serve(http, proxy, stopped())));
    let metrics_task = tokio::spawn({
        let (stop, app) = (stopped(), crate::metrics_app(state.clone()));
        async move { axum::serve(metrics, app).with_graceful_shutdown(stop).await }
    });
    let api_task = tokio::spawn({
        let stop = stopped();
        async move {
            axum::serve(
                api,
                crate::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(stop)
            .await
        }
    });
    crate::shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = reconcile_task.await;
    if let Some(task) = proxy_task {
        let _ = task.await;
    }
    api_task.await??;
    metrics_task.await??;
    if args.stop_replicas_on_exit {
        tracing::info!("stopping every replica");
        coordinator.stop_all().await;
    } else {
        tracing::info!("replicas keep running; the next tandem serve adopts them");
    }
    Ok(())
}

/// How instances' modules are installed: the registry, its token in a private npm
/// configuration (`<data dir>/npm/npmrc`), install scripts.
fn npm_options(args: &ServeArgs) -> anyhow::Result<tandem_coordinator::local::NpmOptions> {
    let userconfig = match &args.npm_token_file {
        Some(file) => {
            let token = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the npm token file {}", file.display()))?;
            let path = tandem_coordinator::local::write_userconfig(
                &args.data_dir.join("npm"),
                args.npm_registry.as_deref(),
                &token,
            )
            .with_context(|| format!("--npm-token-file {}", file.display()))?;
            Some(path)
        }
        None => None,
    };
    Ok(tandem_coordinator::local::NpmOptions {
        registry: args.npm_registry.clone(),
        allow_install_scripts: args.npm_allow_install_scripts,
        userconfig,
    })
}
