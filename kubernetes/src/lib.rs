//! Tandem's Kubernetes driver (`tandem serve --driver kubernetes`): each replica of an instance
//! a pod that Tandem manages itself, watched, with its log followed; and the leader's Lease.
//!
//! # Layout
//! - [`objects`]: the pod, ConfigMap and Secret of a replica, and the labels that mark them as
//!   Tandem's.
//! - [`observe`]: what a pod's status says about its replica.
//! - [`driver`]: the driver: starts, adopts, stops and fences pods; watches them; follows their
//!   logs; calls their admin API.
//! - [`lease`]: the leader's `coordination.k8s.io` Lease.

pub mod driver;
pub mod lease;
pub mod objects;
pub mod observe;

pub use driver::{KubeDriver, KubeInstance};
