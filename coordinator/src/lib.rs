//! Tandem's coordinator: turns the control plane's desired state into running Node-RED replicas
//! through a driver, supervises them, and publishes their addresses and health to the proxy.
//!
//! # Layout
//! Nothing yet: the coordinator and its local driver are the subject of issue 4. The crate exists
//! now so that the dependency direction `controlplane → coordinator → proxy` is fixed from the
//! first commit.

pub use tandem_proxy as proxy;
