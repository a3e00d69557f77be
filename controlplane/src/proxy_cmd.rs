//! `tandem proxy`: the data plane alone, fed by a routes file or by a control plane's route
//! feed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_proxy::control::ControlPlane;
use tandem_proxy::routes::file;
use tandem_proxy::tls::{Certificates, TlsFiles};
use tandem_proxy::{MqttConfig, MqttProxy, Proxy, ProxyConfig, ProxyStats, Routes};

use crate::cli::{ProxyArgs, TlsArgs};

impl ProxyArgs {
    /// The proxy settings these flags describe.
    pub fn config(&self) -> ProxyConfig {
        ProxyConfig {
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms),
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            hold_timeout: Duration::from_millis(self.hold_timeout_ms),
            max_body_bytes: self.max_body_bytes,
            max_attempts: self.max_attempts.max(1),
            replica_header: self.replica_header,
            access_log: self.access_log,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            ..ProxyConfig::default()
        }
    }
}

/// Runs `tandem proxy` until SIGTERM or Ctrl-C, fed by its routes file or its control plane.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    match (&args.routes, &args.control_plane) {
        (Some(file), None) => run_with_file(file.clone(), &args).await,
        (None, Some(url)) => run_with_control_plane(url.clone(), &args).await,
        _ => anyhow::bail!("give either --routes or --control-plane"),
    }
}

/// `tandem proxy --control-plane URL --token-file F`: the routes come from the control plane's
/// feed (the cache file first, if there is one, so a proxy started during an outage serves); the
/// editor of non-HA instances is opened through the control plane's gate. With `--mqtt-listen`,
/// the MQTT proxy's shared listener takes the replicas' logins, their token hashes coming with
/// the feed (`tandem serve --mqtt-proxy-address`).
async fn run_with_control_plane(url: String, args: &ProxyArgs) -> anyhow::Result<()> {
    let token_file = args
        .token_file
        .as_ref()
        .context("--control-plane needs --token-file")?;
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read the proxy token file {}", token_file.display()))?;
    if !token
        .trim()
        .starts_with(crate::api::proxies::PROXY_TOKEN_PREFIX)
    {
        anyhow::bail!(
            "{} does not hold a proxy token (tdp_...; POST /api/v1/proxy-tokens)",
            token_file.display()
        );
    }
    let routes = Arc::new(Routes::new());
    let stats = Arc::new(ProxyStats::default());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let https = Https::bind(&args.tls, &routes).await?;
    let redirect = redirect_port(&args.tls, https.as_ref())?;
    let address = listener.local_addr()?.to_string();
    let id = args.proxy_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "proxy".into());
        format!("{host}:{address}")
    });
    let link = Arc::new(ControlPlane::new(
        &url,
        &token,
        &id,
        &address,
        routes.clone(),
        stats.clone(),
        Some(args.cache_file.clone()),
    )?);
    match link.load_cache() {
        Ok(Some(generation)) => {
            tracing::info!(cache = %args.cache_file.display(), generation, "serving the cached routes until the control plane answers")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the route cache is unusable; waiting for the control plane")
        }
    }
    let proxy = Arc::new(
        Proxy::new(routes, args.config(), stats.clone())
            .with_editor_gate(Arc::new(tandem_proxy::control::RemoteEditorGate::new(
                link.clone(),
            )))
            .with_waker(Arc::new(tandem_proxy::control::RemoteWaker::new(
                link.clone(),
            ))),
    );
    let metrics_addr = args.metrics_addr();
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (metrics)"))?;
    let https_addr = Https::address(https.as_ref());
    tracing::info!(listen = %address, https = %https_addr, https_redirect = redirect.is_some(), metrics = %metrics.local_addr()?, control_plane = %url, id = %id, "tandem proxy serving");
    let mqtt = match (&args.mqtt_listen, &args.mqtt_upstream) {
        (Some(listen), Some(upstream)) => {
            let config = crate::mqtt_wiring::mqtt_config(
                upstream,
                args.mqtt_tls,
                args.mqtt_ca_file.as_deref(),
                Some(*listen),
            )?;
            let mqtt = Arc::new(MqttProxy::new(config, stats.clone())?);
            // Bound now, so that a listener that cannot be had fails the start.
            mqtt.set_instances(&[]).await?;
            tracing::info!(mqtt_listen = ?mqtt.shared_listener().await, %upstream, "MQTT proxy: shared listener");
            Some(mqtt)
        }
        _ => None,
    };
    let mqtt_follow = mqtt
        .clone()
        .map(|m| tokio::spawn(link.clone().follow_mqtt(m)));
    let feed = tokio::spawn(link.clone().follow());
    let reports = tokio::spawn(link.report());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || crate::stopped(stop_rx.clone());
    let metrics = tokio::spawn(tandem_proxy::server::serve_admin(
        metrics,
        proxy.clone(),
        stopped(),
    ));
    let https = spawn_https(https, &proxy, args, stopped)?;
    let server = spawn_plain(listener, proxy, redirect, stopped());
    crate::shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(h) = https {
        let _ = h.await;
    }
    let _ = metrics.await;
    feed.abort();
    reports.abort();
    if let Some(task) = mqtt_follow {
        task.abort();
    }
    if let Some(mqtt) = mqtt {
        mqtt.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// `tandem proxy --routes F`. The routes file must load at start (its MQTT listeners
/// included); later broken versions are reported and leave the current routes and MQTT
/// listeners serving.
async fn run_with_file(path: std::path::PathBuf, args: &ProxyArgs) -> anyhow::Result<()> {
    let routes = Arc::new(Routes::new());
    let stats = Arc::new(ProxyStats::default());
    // Replaced by the file's [mqtt] section; without one, no MQTT listener is bound.
    let mqtt = Arc::new(MqttProxy::new(
        MqttConfig::new("127.0.0.1:1883"),
        stats.clone(),
    )?);
    let https = Https::bind(&args.tls, &routes).await?;
    let file_tls = https.as_ref().map(|h| {
        Arc::new(file::FileTls {
            certificates: h.certificates.clone(),
            default: args.tls.default_files(),
        })
    });
    let n = file::load_with_mqtt(&path, &routes, &mqtt, file_tls.as_deref()).await?;
    stats.record_reload(true);
    let mqtt_listeners = mqtt.listeners().await.len();
    let proxy = Arc::new(Proxy::new(routes.clone(), args.config(), stats.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let redirect = redirect_port(&args.tls, https.as_ref())?;
    let metrics_addr = args.metrics_addr();
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (metrics)"))?;
    let https_addr = Https::address(https.as_ref());
    tracing::info!(listen = %listener.local_addr()?, https = %https_addr, https_redirect = redirect.is_some(), metrics = %metrics.local_addr()?, routes = %path.display(), instances = n, mqtt_listeners, "tandem proxy serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || crate::stopped(stop_rx.clone());
    let watcher = tokio::spawn(file::watch_with_mqtt(
        path,
        routes,
        mqtt.clone(),
        file_tls,
        stats,
        Duration::from_millis(args.reload_poll_ms.max(10)),
        stopped(),
    ));
    let metrics = tokio::spawn(tandem_proxy::server::serve_admin(
        metrics,
        proxy.clone(),
        stopped(),
    ));
    let https = spawn_https(https, &proxy, args, stopped)?;
    let server = spawn_plain(listener, proxy, redirect, stopped());

    crate::shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(h) = https {
        let _ = h.await;
    }
    let _ = metrics.await;
    let _ = watcher.await;
    // MQTT connections are long-lived: close them, the replicas reconnect.
    mqtt.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// A proxy's HTTPS listener, bound, with the certificates it serves.
pub(crate) struct Https {
    /// The listener.
    pub listener: tokio::net::TcpListener,
    /// The certificates, by SNI: the files' and the instances' own.
    pub certificates: Arc<Certificates>,
}

impl Https {
    /// Binds the HTTPS listener when `tls` asks for one, with the default certificate of the
    /// flags (more may come from a routes file's `[tls]`, applied later).
    pub(crate) async fn bind(tls: &TlsArgs, routes: &Arc<Routes>) -> anyhow::Result<Option<Self>> {
        let Some(addr) = tls.https_addr() else {
            return Ok(None);
        };
        let files = TlsFiles {
            default: tls.default_files(),
            hosts: Vec::new(),
        };
        let certificates = Arc::new(Certificates::new(files, Some(routes.clone()))?);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (HTTPS)"))?;
        Ok(Some(Self {
            listener,
            certificates,
        }))
    }

    /// The listener's address for the start-up log line, `none` without HTTPS.
    pub(crate) fn address(https: Option<&Self>) -> String {
        https
            .and_then(|h| h.listener.local_addr().ok())
            .map_or_else(|| "none".into(), |a| a.to_string())
    }

    /// Serves `proxy` on HTTPS once `start` resolves and until `stopped`, checking the
    /// certificate files every `poll`. Fails at once when no certificate file was given at all.
    pub(crate) fn spawn(
        self,
        proxy: Arc<Proxy>,
        poll: Duration,
        start: impl std::future::Future<Output = ()> + Send + 'static,
        stopped: impl std::future::Future<Output = ()> + Send + 'static,
        watcher_stopped: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        if !self.certificates.has_files() {
            anyhow::bail!("the HTTPS listener has no certificate: give --tls-cert and --tls-key (or, with --routes, a [tls] section)");
        }
        let config = self.certificates.server_config()?;
        self.certificates.report_to(proxy.stats().clone());
        tokio::spawn(self.certificates.watch(poll, watcher_stopped));
        Ok(tokio::spawn(async move {
            start.await;
            tandem_proxy::server::serve_tls(self.listener, proxy, config, stopped).await
        }))
    }
}

/// Serves the plain listener: the proxy, or with `--https-redirect` a redirect to the HTTPS
/// listener's port.
pub(crate) fn spawn_plain(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    https_redirect: Option<u16>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    match https_redirect {
        Some(port) => {
            let header_timeout = proxy.config().header_timeout;
            tokio::spawn(tandem_proxy::server::serve_redirect(
                listener,
                port,
                header_timeout,
                stopped,
            ))
        }
        None => tokio::spawn(tandem_proxy::server::serve(listener, proxy, stopped)),
    }
}

/// Serves `https`, when there is a listener, at once; its certificate files are checked every
/// `--reload-poll-ms`.
fn spawn_https<F>(
    https: Option<Https>,
    proxy: &Arc<Proxy>,
    args: &ProxyArgs,
    stopped: impl Fn() -> F,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    https
        .map(|h| {
            let poll = Duration::from_millis(args.reload_poll_ms.max(10));
            h.spawn(
                proxy.clone(),
                poll,
                std::future::ready(()),
                stopped(),
                stopped(),
            )
        })
        .transpose()
}

/// The HTTPS port the plain listener redirects to, with `--https-redirect`.
pub(crate) fn redirect_port(tls: &TlsArgs, https: Option<&Https>) -> anyhow::Result<Option<u16>> {
    match (tls.https_redirect, https) {
        (false, _) => Ok(None),
        (true, None) => anyhow::bail!(
            "--https-redirect needs HTTPS: give --tls-cert and --tls-key, or --https-listen"
        ),
        (true, Some(h)) => Ok(Some(h.listener.local_addr()?.port())),
    }
}
