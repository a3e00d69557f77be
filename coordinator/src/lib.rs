//! Tandem's coordinator: turns the control plane's desired state into running Node-RED replicas
//! through a driver, supervises them, and publishes their addresses and health to the proxy.
//!
//! # Layout
//! - [`status`]: the observed state of instances, as the control plane reads it.
//! - [`driver`]: the interface every driver implements (start, stop a replica).
//! - [`local`]: the local driver: stacks installed with npm, replicas as Node-RED processes.
//! - [`restart`]: restart backoff and crash-loop detection for a replica.
//! - [`supervise`]: keeping one replica alive with a driver and that policy.
//!
//! Still to come (issue 4): the reconciler over all instances, HA routing into
//! the proxy, log capture and `tandem serve` wiring.

pub use tandem_proxy as proxy;

pub mod driver;
pub mod local;
pub mod logs;
pub mod restart;
pub mod status;
pub mod supervise;
