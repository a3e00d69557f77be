//! Tandem's coordinator: turns the control plane's desired state into running Node-RED replicas
//! through a driver, supervises them, and publishes their addresses and health to the proxy.
//!
//! # Layout
//! - [`status`]: the observed state of instances and the control plane's handle on the
//!   coordinator.
//! - [`reconcile`]: the coordinator: desired state in, supervised replicas and routes out.
//! - [`driver`]: the interface every driver implements (start, stop, check a replica...).
//! - [`local`]: the local driver: stacks installed with npm, replicas as Node-RED processes.
//! - [`restart`]: restart backoff and crash-loop detection for a replica.
//! - [`supervise`]: keeping one replica alive with a driver and that policy.
//! - [`logs`]: per-instance logs, merged across replicas, each line tagged with its replica.
//! - [`sandbox`]: the Landlock sandbox a local replica runs in, applied by `tandem sandbox-exec`.

pub use tandem_proxy as proxy;

pub mod driver;
pub mod local;
pub mod logs;
pub mod reconcile;
pub mod restart;
pub mod sandbox;
pub mod status;
pub mod supervise;
