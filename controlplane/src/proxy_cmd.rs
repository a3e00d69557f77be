//! `tandem proxy`: the data plane alone, fed by a routes file.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tandem_proxy::routes::file;
use tandem_proxy::{MqttConfig, MqttProxy, Proxy, ProxyConfig, ProxyStats, Routes};

use crate::cli::ProxyArgs;

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

/// Runs `tandem proxy` until SIGTERM or Ctrl-C. The routes file must load at start (its MQTT
/// listeners included); later broken versions are reported and leave the current routes and
/// MQTT listeners serving.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let routes = Arc::new(Routes::new());
    let stats = Arc::new(ProxyStats::default());
    // Replaced by the file's [mqtt] section; without one, no MQTT listener is bound.
    let mqtt = Arc::new(MqttProxy::new(
        MqttConfig::new("127.0.0.1:1883"),
        stats.clone(),
    )?);
    let n = file::load_with_mqtt(&args.routes, &routes, &mqtt).await?;
    stats.record_reload(true);
    let mqtt_listeners = mqtt.listeners().await.len();
    let proxy = Arc::new(Proxy::new(routes.clone(), args.config(), stats.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_addr = args.metrics_addr();
    let metrics = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {metrics_addr} (metrics)"))?;
    tracing::info!(listen = %listener.local_addr()?, metrics = %metrics.local_addr()?, routes = %args.routes.display(), instances = n, mqtt_listeners, "tandem proxy serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = || crate::stopped(stop_rx.clone());
    let watcher = tokio::spawn(file::watch_with_mqtt(
        args.routes.clone(),
        routes,
        mqtt.clone(),
        stats,
        Duration::from_millis(args.reload_poll_ms.max(10)),
        stopped(),
    ));
    let metrics = tokio::spawn(tandem_proxy::server::serve_admin(
        metrics,
        proxy.clone(),
        stopped(),
    ));
    let server = tokio::spawn(tandem_proxy::server::serve(listener, proxy, stopped()));

    crate::shutdown_signal().await;
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = metrics.await;
    let _ = watcher.await;
    // MQTT connections are long-lived: close them, the replicas reconnect.
    mqtt.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
