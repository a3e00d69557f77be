//! Tandem's coordinator: turns the control plane's desired state into running Node-RED replicas
//! through a driver, supervises them, and publishes their addresses and health to the proxy.
//!
//! # Layout
//! - [`status`]: the observed state of instances, as the control plane reads it.
//!
//! The reconciler and the local driver are the subject of issue 4; the dependency direction
//! `controlplane → coordinator → proxy` is fixed from the first commit.

pub use tandem_proxy as proxy;

pub mod status;
