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

use crate::drivers::{AnyDriver, DriverKind};
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
        leadership: crate::leader::Leadership::always("local"),
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
        // Instances' URLs (and the console's editor links) name the in-process proxy's port,
        // its HTTPS one when it serves HTTPS; with `--no-proxy` the standalone proxies' is not
        // known here.
        instances_port: match args.tls.https_addr() {
            Some(https) => (!args.no_proxy && https.port() != 0).then_some(https.port()),
            None => {
                (!args.no_proxy && args.http_listen.port() != 0).then_some(args.http_listen.port())
            }
        },
        instances_https: !args.no_proxy && args.tls.https_addr().is_some(),
        max_ha_replicas: args.max_ha_replicas,
        max_document_bytes: (args.max_document_mib as usize) << 20,
        storage_base: Some(match &args.storage_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!(
                "http://{}",
                std::net::SocketAddr::new(storage_ip, api_addr.port())
            ),
        }),
        ..ApiConfig::default()
    };
    let state = state_with_key(
        &args.data_dir,
        args.database_url.as_deref(),
        config,
        args.platform_key_file.as_deref(),
    )
    .await?;
    if let Some(path) = bootstrap(&state, &args.data_dir).await? {
        tracing::info!(path = %path.display(), "first start: created user admin; its API token is in this file (read it once, keep it safe)");
    }
    if args.no_proxy && (args.tls.https_addr().is_some() || args.tls.https_redirect) {
        anyhow::bail!("HTTPS is served by the in-process proxy, which --no-proxy turns off; give the standalone proxies (tandem proxy) --tls-cert and --tls-key instead");
    }
    // The coordinator runs the instances' replicas and publishes them into the proxy's routes.
    let routes = Arc::new(Routes::new());
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
    let https = crate::proxy_cmd::Https::bind(&args.tls, &routes).await?;
    let redirect = crate::proxy_cmd::redirect_port(&args.tls, https.as_ref())?;
    let http_addr = match &http {
        Some(h) => h.local_addr()?.to_string(),
        None => "none (--no-proxy)".into(),
    };
    let https_addr = crate::proxy_cmd::Https::address(https.as_ref());
    tracing::info!(api = %api.local_addr()?, http = %http_addr, metrics = %metrics.local_addr()?, data_dir = %args.data_dir.display(), base_domain = %args.base_domain, https = %https_addr, https_redirect = redirect.is_some(), "tandem serving");

    // On a cluster, the driver and the leader's Lease share one client.
    let cluster = match args.driver {
        DriverKind::Local => None,
        DriverKind::Kubernetes => Some(kube_client(&args).await?),
    };
    let driver = Arc::new(match &cluster {
        None => AnyDriver::Local(local_driver(&args)?.with_warm_runtimes(args.warm_runtimes)),
        Some((client, namespace)) => {
            AnyDriver::Kubernetes(kube_driver(&args, client.clone(), namespace)?)
        }
    });
    // The in-process proxy (unless `--no-proxy`) and the standalone proxies' route feed.
    let plane: Arc<dyn tandem_coordinator::dataplane::DataPlane> =
        Arc::new(crate::route_feed::FeedDataPlane {
            local: (!args.no_proxy)
                .then(|| tandem_coordinator::dataplane::InProcess(routes.clone())),
            feed: state.feed.clone(),
        });
    let logbook = Arc::new(LogBook::default());
    let coordinator_config = CoordinatorConfig {
        policy: RestartPolicy {
            base: std::time::Duration::from_millis(args.restart_backoff_ms.max(1)),
            max_quick_crashes: args.crash_loop_restarts.max(1),
            ..RestartPolicy::default()
        },
        drain_timeout: std::time::Duration::from_millis(args.drain_timeout_ms),
        ..CoordinatorConfig::default()
    };
    // One leader among the control planes on the database runs the coordinator; the others
    // forward the API to it.
    let id = args.control_plane_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "tandem".into());
        format!("{host}:{api_addr}")
    });
    let advertise = args
        .advertise_address
        .clone()
        .unwrap_or_else(|| std::net::SocketAddr::new(storage_ip, api_addr.port()).to_string());
    let mut state = state;
    let lease = match &cluster {
        None => crate::leader::LeaseBackend::Database,
        Some((client, namespace)) => crate::leader::LeaseBackend::Kubernetes(Arc::new(
            tandem_kube::lease::KubeLease::new(client.clone(), namespace),
        )),
    };
    state.leadership = crate::leader::elect(
        state.store.clone(),
        lease,
        id.clone(),
        advertise,
        crate::leader::LeaseConfig {
            ttl: std::time::Duration::from_millis(args.lease_ttl_ms.max(300)),
        },
    );
    // The API answers once it knows whether it leads (or forwards to whom).
    state
        .leadership
        .known(std::time::Duration::from_millis(args.lease_ttl_ms.max(300)))
        .await;
    let switch = Arc::new(crate::leader::Switch::default());
    state.coordinator = switch.clone();
    let stats = Arc::new(ProxyStats::default());
    state.more_metrics = Some(Arc::new({
        let (routes, stats) = (routes.clone(), stats.clone());
        move || tandem_proxy::metrics::render(&routes.load(), &stats)
    }));
    let proxy = Arc::new(
        Proxy::new(
            routes.clone(),
            ProxyConfig {
                hold_timeout: std::time::Duration::from_millis(args.hold_timeout_ms),
                ..ProxyConfig::default()
            },
            stats.clone(),
        )
        .with_editor_gate(Arc::new(crate::editor_gate::TeamEditorGate(state.clone())))
        .with_waker(Arc::new(crate::sleep::StoreWaker::new(state.clone()))),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || crate::stopped(stop_rx.clone());
    let mqtt_config = match &args.mqtt_upstream {
        Some(upstream) => Some(crate::mqtt_wiring::mqtt_config(
            upstream,
            args.mqtt_tls,
            args.mqtt_ca_file.as_deref(),
            args.mqtt_listen,
        )?),
        None if args.mqtt_listen.is_some() => anyhow::bail!("--mqtt-listen needs --mqtt-upstream"),
        None => None,
    };
    let lead_task = tokio::spawn(lead(
        Leading {
            state: state.clone(),
            switch: switch.clone(),
            driver: driver.clone(),
            plane,
            logbook,
            config: coordinator_config,
            mqtt: mqtt_config,
            mqtt_proxy_address: args.mqtt_proxy_address.clone(),
            data_dir: args.data_dir.clone(),
            stats: stats.clone(),
            routes: (!args.no_proxy).then(|| routes.clone()),
            http_addr: http_addr.clone(),
        },
        stop_rx.clone(),
    ));
    // The listener is bound, but requests are taken only once the first table is in (or after
    // a few seconds, for a platform with no instance): meanwhile connections wait in the
    // listener's queue rather than get 404 for hosts the table does not have yet.
    let mut first_table = routes.swaps();
    let https_proxy = proxy.clone();
    let proxy_task = http.map(|http| {
        let stop = stopped();
        let mut first_table = first_table.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                first_table.wait_for(|n| *n > 0),
            )
            .await;
            let _ = crate::proxy_cmd::spawn_plain(http, proxy, redirect, stop).await;
        })
    });
    let https_task = match https {
        Some(https) => Some(https.spawn(
            https_proxy,
            std::time::Duration::from_secs(2),
            async move {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    first_table.wait_for(|n| *n > 0),
                )
                .await;
            },
            stopped(),
            stopped(),
        )?),
        None => None,
    };
    // Idle instances with `sleep_after_s` go to sleep; the in-process proxy sees their use.
    let sleeper = (!args.no_proxy).then(|| {
        tokio::spawn(crate::sleep::run(
            state.clone(),
            routes.clone(),
            stats.clone(),
            stopped(),
        ))
    });
    let metrics_task = tokio::spawn({
        let (stop, app) = (stopped(), crate::metrics_app(state.clone()));
        async move { axum::serve(metrics, app).with_graceful_shutdown(stop).await }
    });
    let feed = state.feed.clone();
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
    // Route feeds are endless: they end now, the proxies reconnect to the next Tandem.
    feed.close();
    let _ = lead_task.await;
    if let Some(task) = sleeper {
        let _ = task.await;
    }
    // Warm runtimes given to no instance end with Tandem; replicas keep running.
    if let AnyDriver::Local(local) = &*driver {
        local.close_warm_runtimes();
    }
    if let Some(task) = proxy_task {
        let _ = task.await;
    }
    if let Some(task) = https_task {
        let _ = task.await;
    }
    // Other long requests (log streams, requests forwarded to the leader) get a while, not
    // for ever.
    match tokio::time::timeout(std::time::Duration::from_secs(10), api_task).await {
        Ok(done) => done??,
        Err(_) => tracing::warn!("API requests still open after 10 s; stopping anyway"),
    }
    metrics_task.await??;
    if args.stop_replicas_on_exit {
        tracing::info!("stopping every replica");
        switch.stop_all().await;
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

/// The local driver of `--driver local` (the default).
fn local_driver(args: &ServeArgs) -> anyhow::Result<LocalDriver> {
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
    driver.npm = npm_options(args)?;
    driver.liveness = tandem_coordinator::driver::Liveness {
        interval: std::time::Duration::from_millis(args.liveness_check_ms.max(10)),
        hang_after: std::time::Duration::from_millis(args.hang_after_ms.max(50)),
    };
    Ok(driver)
}

/// The cluster of `--driver kubernetes` (the in-cluster configuration, else the kubeconfig's)
/// and the namespace Tandem works in.
async fn kube_client(args: &ServeArgs) -> anyhow::Result<(kube::Client, String)> {
    let config = kube::Config::infer()
        .await
        .context("--driver kubernetes: no in-cluster configuration and no usable kubeconfig")?;
    let namespace = args
        .kube_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("--driver kubernetes: a client")?;
    Ok((client, namespace))
}

/// The Kubernetes driver of `--driver kubernetes`.
fn kube_driver(
    args: &ServeArgs,
    client: kube::Client,
    namespace: &str,
) -> anyhow::Result<tandem_kube::KubeDriver> {
    let mut driver = tandem_kube::KubeDriver::new(client, namespace);
    driver.image = args.kube_image.clone();
    driver.npm = npm_options(args)?;
    if driver.npm.userconfig.is_some() {
        anyhow::bail!(
            "--npm-token-file is not taken into pods: with --driver kubernetes, modules come from a registry the pods reach without a token"
        );
    }
    Ok(driver)
}

/// What a control plane needs to run the coordinator while it leads.
struct Leading {
    state: AppState,
    switch: Arc<crate::leader::Switch>,
    driver: Arc<AnyDriver>,
    plane: Arc<dyn tandem_coordinator::dataplane::DataPlane>,
    logbook: Arc<LogBook>,
    config: CoordinatorConfig,
    mqtt: Option<tandem_proxy::MqttConfig>,
    /// `--mqtt-proxy-address`: the standalone proxies run the MQTT proxy.
    mqtt_proxy_address: Option<String>,
    data_dir: std::path::PathBuf,
    stats: Arc<ProxyStats>,
    /// The in-process proxy's routes; `None` with `--no-proxy`.
    routes: Option<Arc<Routes>>,
    /// Where the in-process proxy listens, for the leader's view of it.
    http_addr: String,
}

/// A follower's in-process proxy takes the leader's route feed, with the control planes' own
/// token (derived from the platform key they share), and reports its requests in flight, which
/// the leader's drains wait for.
fn follow_leader(
    l: &Leading,
    address: &str,
    routes: Arc<Routes>,
) -> Option<Vec<tokio::task::JoinHandle<()>>> {
    let link = tandem_proxy::control::ControlPlane::new(
        &format!("http://{address}"),
        &crate::api::proxies::control_plane_token(&l.state.key),
        &l.state.leadership.id,
        &l.http_addr,
        routes,
        l.stats.clone(),
        None,
    );
    match link {
        Ok(link) => {
            let link = Arc::new(link);
            tracing::info!(leader = %address, "the in-process proxy follows the leader's routes");
            Some(vec![
                tokio::spawn(link.clone().follow()),
                tokio::spawn(link.report()),
            ])
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the leader's routes");
            None
        }
    }
}

/// Runs a coordinator for every term this control plane leads, until `stop`: each one checks
/// the lease before every action, and is abandoned (its replicas left running) when the
/// leadership goes.
async fn lead(l: Leading, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut role = l.state.leadership.watch();
    loop {
        // Wait to lead. Meanwhile the in-process proxy follows the leader's route feed, as a
        // standalone proxy would, so this control plane's own listener serves every instance.
        let mut following: Option<(String, Vec<tokio::task::JoinHandle<()>>)> = None;
        while !l.state.leadership.may_act() {
            let leader = l.state.leadership.leader_address();
            if following.as_ref().map(|(a, _)| a) != leader.as_ref() {
                if let Some((_, tasks)) = following.take() {
                    tasks.iter().for_each(|t| t.abort());
                }
                if let (Some(address), Some(routes)) = (leader, &l.routes) {
                    following =
                        follow_leader(&l, &address, routes.clone()).map(|tasks| (address, tasks));
                }
            }
            tokio::select! {
                _ = role.changed() => {}
                _ = stop.changed() => {
                    if let Some((_, tasks)) = following.take() {
                        tasks.iter().for_each(|t| t.abort());
                    }
                    return;
                }
            }
        }
        if let Some((_, tasks)) = following.take() {
            tasks.iter().for_each(|t| t.abort());
        }
        let coordinator = Coordinator::new(
            l.driver.clone(),
            l.plane.clone(),
            l.logbook.clone(),
            l.config,
        );
        let leadership = l.state.leadership.clone();
        coordinator.set_fence(Arc::new(move || leadership.may_act()));
        l.switch.set(Some(coordinator.clone()));
        // Deploys under way when the last leader stopped are rolled back before anything runs.
        if let Err(e) = crate::deployments::recover(&l.state).await {
            tracing::error!(error = %e, "cannot recover the deploys under way");
        }
        let mode = match (&l.mqtt_proxy_address, &l.mqtt) {
            (Some(address), _) => Some(crate::mqtt_wiring::MqttMode::Feed {
                address: address.clone(),
                feed: l.state.feed.clone(),
            }),
            (None, Some(c)) if c.shared_listen.is_some() => {
                Some(crate::mqtt_wiring::MqttMode::Shared)
            }
            (None, Some(_)) => Some(crate::mqtt_wiring::MqttMode::Listeners),
            (None, None) => None,
        };
        let mqtt = match mode {
            Some(mode) => match crate::mqtt_wiring::MqttWiring::new(
                mode,
                l.mqtt.clone(),
                l.stats.clone(),
                l.state.key.clone(),
                &l.data_dir,
            ) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(error = %e, "cannot set up the MQTT proxy");
                    None
                }
            },
            None => None,
        };
        let (end_tx, end_rx) = tokio::sync::watch::channel(false);
        let reconcile = tokio::spawn(crate::desired::run(
            l.state.clone(),
            coordinator.clone(),
            mqtt,
            crate::stopped(end_rx),
        ));
        // Lead until another holds the lease (or none is known) or Tandem stops. A renewal
        // that comes late only pauses the coordinator's actions (its fence), it does not end
        // the term.
        let term = match l.state.leadership.role() {
            crate::leader::Role::Leader { term, .. } => term,
            _ => 0,
        };
        let stopping = loop {
            let same = matches!(
                l.state.leadership.role(),
                crate::leader::Role::Leader { term: t, .. } if t == term
            );
            if !same {
                break false;
            }
            tokio::select! {
                _ = role.changed() => {}
                _ = stop.changed() => break true,
            }
        };
        let _ = end_tx.send(true);
        if stopping {
            let _ = reconcile.await;
            return;
        }
        tracing::warn!(
            "no longer leading: the coordinator is abandoned, its replicas keep running"
        );
        reconcile.abort();
        coordinator.abandon();
        l.switch.set(None);
    }
}
