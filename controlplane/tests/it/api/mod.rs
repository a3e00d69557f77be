//! The control plane's REST API through real HTTP, each scenario on SQLite and on PostgreSQL.
//!
//! Every test starts its own server (`tandem_controlplane::app`) on a free port, bootstrapped as
//! `tandem serve` does on first start, over a fresh SQLite file or a fresh database on the
//! PostgreSQL server the test binary starts once ([`support`]).

mod accounts;
mod affinity;
mod audit;
mod auth;
mod auth_attacks;
mod config_rules;
mod custom_hostname;
mod editor_tickets;
mod http_auth;
mod instances;
mod lists;
mod matrix;
mod metrics_labels;
mod modules;
mod ops;
mod proxies;
mod races;
mod secret_env;
mod snapshots;
pub(crate) mod support;
mod validation;
