//! What every API handler shares.

use std::sync::Arc;
use std::time::Duration;

use tandem_coordinator::status::Coordination;

use crate::auth::throttle::{LoginLimits, LoginThrottle};
use crate::store::Store;

/// Settings of the API that are not per request.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Instances are served at `<name>.<base_domain>`.
    pub base_domain: String,
    /// The port instances' URLs name (`http://<name>.<base_domain>:<port>`): the in-process
    /// proxy's (`--http-listen`) in `tandem serve`. `None` (the default, and with `--no-proxy`)
    /// for the scheme's own, 80, as behind a load balancer.
    pub instances_port: Option<u16>,
    /// Instances are served on HTTPS (`tandem serve --tls-cert`): their URLs say `https`, and
    /// `instances_port` is the HTTPS listener's.
    pub instances_https: bool,
    /// Largest HA replica count a user may ask for.
    pub max_ha_replicas: u32,
    /// Lifetime of a sign-in session, in milliseconds.
    pub session_ttl_ms: i64,
    /// Limits on failed sign-ins (see [`crate::auth::throttle`]).
    pub login_limits: LoginLimits,
    /// How often an open log stream checks that its caller may still read the instance.
    /// Default 5 s.
    pub stream_recheck: Duration,
    /// Largest body of the routes that take whole documents (flows, snapshot imports, the
    /// replicas' storage API). Default 16 MiB; other routes take 1 MiB.
    pub max_document_bytes: usize,
    /// Where replicas reach the storage API (`http://127.0.0.1:<api port>`); `None` when the API
    /// does not serve replicas (then they keep their flows in their userDir).
    pub storage_base: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            base_domain: "localhost".into(),
            instances_port: None,
            instances_https: false,
            max_ha_replicas: 8,
            session_ttl_ms: 7 * 24 * 3600 * 1000,
            login_limits: LoginLimits::default(),
            stream_recheck: Duration::from_secs(5),
            max_document_bytes: 16 << 20,
            storage_base: None,
        }
    }
}

/// Shared state of the API.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Settings.
    pub config: Arc<ApiConfig>,
    /// The coordinator: observed state and logs of instances; told when desired state changes.
    pub coordinator: Arc<dyn Coordination>,
    /// Request counters for `/metrics`.
    pub metrics: Arc<crate::metrics::ApiMetrics>,
    /// More of `/metrics` (the proxy's series in `tandem serve`).
    pub more_metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Failed sign-ins by user and address, limited by `config.login_limits`.
    pub login_throttle: Arc<LoginThrottle>,
    /// The platform key: instance secrets derive from it, secret variables are sealed with it.
    pub key: crate::secrets::PlatformKey,
    /// The route feed of standalone proxies.
    pub feed: Arc<crate::route_feed::RouteFeed>,
    /// Whether this control plane leads (runs the coordinator); a follower forwards the API to
    /// the leader.
    pub leadership: crate::leader::Leadership,
}
