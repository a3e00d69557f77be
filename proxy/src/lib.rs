//! Tandem's data plane: the HTTP ingress proxy in front of Node-RED replicas, and the MQTT
//! proxy between the replicas of HA instances and the broker.
//!
//! Every request to every instance passes through here. The proxy finds the instance by host
//! name, refuses the editor on HA instances, picks a healthy replica (least in-flight, or a
//! consistent-hash cookie for affinity), retries where nothing was sent, and streams the answer
//! back, WebSocket upgrades included. It knows nothing of teams or databases: whoever owns the
//! routes publishes them as a list of [`InstanceSpec`]s.
//!
//! # Layout
//! - [`routes`]: the route table (one `ArcSwap` snapshot), host normalization, validation;
//!   [`routes::file`] reads and watches the TOML routes file of `tandem proxy`;
//!   [`routes::feed`] is the table a control plane sends a standalone proxy, and its cache file.
//! - [`control`]: a standalone proxy's link to its control plane: the route feed, the reports
//!   drains wait for, the editor gate's question.
//! - [`health`]: replica readiness, active probes, passive ejection with backoff.
//! - [`balance`]: choosing a replica.
//! - [`proxy`]: one request, phase by phase.
//! - [`h1`]: the HTTP/1.1 core: plain requests forwarded from one parse of their head, on the
//!   client connection's task; everything else goes to hyper and [`proxy`].
//! - [`activity`]: an instance's use (last request, open WebSockets, requests in flight) for
//!   instances that sleep when idle, and the [`activity::Waker`] of sleeping ones.
//! - [`access_log`]: one JSON line per request, buffered and written by a thread of its own
//!   every 50 ms; dropped and counted rather than waited for when the writer is behind.
//! - [`policy`]: the editor policy for HA instances, and the editor gate of the others.
//! - [`ticket`]: the editor ticket handoff: a console's ticket exchanged for a host-only
//!   session cookie on the instance's host (`GET /_tandem/editor-ticket`).
//! - [`credentials`]: Tandem's own credentials (bearer tokens, session cookie, admin secret):
//!   the one parser the control plane authenticates with and the proxy strips by.
//! - [`pool`]: upstream connections and their per-replica pool.
//! - [`body`]: request and response bodies (streamed, size-limited).
//! - [`tunnel`]: upgraded (WebSocket) connections.
//! - [`server`]: the proxy listeners (plain HTTP, HTTPS with HTTP/1.1 and HTTP/2 by ALPN, or a
//!   redirect to HTTPS) and the admin listener, graceful shutdown.
//! - [`tls`]: TLS termination: certificates by SNI, from files reloaded when they change and
//!   from instances' own (custom hostnames).
//! - [`mqtt`]: the MQTT proxy: per-replica listeners and a shared one that knows replicas by
//!   their credentials, client ids and shared subscriptions.
//! - [`metrics`]: counters and the Prometheus text format.
//! - [`config`]: proxy-wide settings.
//! - [`net`]: small socket helpers shared with the coordinator and the tests.

pub mod access_log;
pub mod activity;
pub mod balance;
pub mod body;
pub mod config;
pub mod control;
pub mod credentials;
pub(crate) mod h1;
pub mod health;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod policy;
pub(crate) mod pool;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod ticket;
pub mod tls;
pub(crate) mod tunnel;

pub use config::ProxyConfig;
pub use health::{EjectionPolicy, HealthConfig};
pub use metrics::ProxyStats;
pub use mqtt::{MqttConfig, MqttInstance, MqttProxy, MqttReplica};
pub use policy::{Access, EditorDecision, EditorGate, HttpAuth, TicketDecision, TicketHome};
pub use proxy::Proxy;
pub use routes::{InstanceSpec, ReplicaSpec, RouteError, RouteTable, Routes};
