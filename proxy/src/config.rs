//! Settings of the HTTP proxy that are not per instance.

use std::time::Duration;

use crate::health::EjectionPolicy;

/// Proxy settings. Every field has a default suited to Node-RED behind the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Time to open a TCP connection to a replica. Default 1 s.
    pub connect_timeout: Duration,
    /// Time from sending a request to receiving the replica's response head; past it the client
    /// gets 504. Default 60 s.
    pub upstream_timeout: Duration,
    /// Time a client has to send a complete request head, from the moment the connection opens
    /// or goes idle after a response. Closes slowloris clients and idle keep-alive connections.
    /// Default 10 s.
    pub header_timeout: Duration,
    /// An upgraded (WebSocket) connection with no bytes either way for this long is closed.
    /// Default 300 s; Node-RED's editor pings every 15 s.
    pub idle_timeout: Duration,
    /// Largest request body accepted, in bytes; larger ones get 413. Default 10 MiB.
    pub max_body_bytes: u64,
    /// Replicas tried for one request (the first included). Default 3.
    pub max_attempts: u32,
    /// Add `X-Tandem-Replica: <replica id>` to responses. Default on.
    pub replica_header: bool,
    /// Write one access log line per request ([`crate::access_log`]). Default on.
    pub access_log: bool,
    /// Passive ejection backoff after connect failures.
    pub ejection: EjectionPolicy,
    /// Idle upstream connections older than this are not reused. Default 4 s, below Node.js's
    /// 5 s keep-alive timeout so the proxy never writes into a socket Node.js is closing.
    pub pool_idle_timeout: Duration,
    /// On shutdown, time given to in-flight requests before connections are closed. Default 10 s.
    pub shutdown_grace: Duration,
    /// Longest wait of a request for a ready replica of an instance that expects one
    /// ([`crate::routes::InstanceSpec::hold`]); then 503. Default 5 s.
    pub hold_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_body_bytes: 10 * 1024 * 1024,
            max_attempts: 3,
            replica_header: true,
            access_log: true,
            ejection: EjectionPolicy::default(),
            pool_idle_timeout: Duration::from_secs(4),
            shutdown_grace: Duration::from_secs(10),
            hold_timeout: Duration::from_secs(5),
        }
    }
}
