//! Tandem's coordinator: turns the control plane's desired state into running Node-RED replicas
//! through a driver, decides what happens to them from the driver's events, and publishes
//! their addresses and states to the data plane.
//!
//! # Layout
//! - [`spec`]: what is wanted of an instance: [`spec::DesiredState`], the process spec (a change
//!   needs new processes) and the flows (deployed live).
//! - [`replica`]: a replica's id, phase and exit reason.
//! - [`admin`]: a running replica's admin API: checks, deploys with their health gate, flow
//!   state; shared by the drivers.
//! - [`driver`]: the interface every driver implements: per instance, start, stop, fence,
//!   deploy and start or stop flows, with a stream of replica events.
//! - [`coordinator`]: desired state in, one worker per instance.
//! - [`worker`]: one instance's worker: restarts, rollouts, deploys, fencing and standby
//!   promotion, decided from events.
//! - [`restart`]: restart backoff and crash-loop detection for a replica.
//! - [`observed`]: what the workers see, read as status and metrics and published as routes.
//! - [`status`]: the observed state as the control plane reads it, and its handle on the
//!   coordinator.
//! - [`dataplane`]: the seam to the proxies: routes and replica states out, "drained" in.
//! - [`local`]: the local driver: stacks installed with npm, replicas as Node-RED processes.
//! - [`fake`]: a driver that records calls and lets tests script events.
//! - [`logs`]: per-instance logs, merged across replicas, each line tagged with its replica.
//! - [`sandbox`]: the Landlock sandbox a local replica runs in, applied by `tandem sandbox-exec`.

pub use tandem_proxy as proxy;

pub mod admin;
pub mod coordinator;
pub mod dataplane;
pub mod driver;
pub mod fake;
pub mod local;
pub mod logs;
pub(crate) mod observed;
pub mod replica;
pub mod restart;
pub mod sandbox;
pub mod spec;
pub mod status;
pub(crate) mod worker;

pub use coordinator::{Coordinator, CoordinatorConfig};

/// Whether a coordinator may act now: a leader's check of its own lease (see
/// [`Coordinator::set_fence`]).
pub type Fence = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;
