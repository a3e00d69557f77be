//! Tests of the `tandem` binary as a user runs it, and of the control plane's API over HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod migrations;
mod mqtt_wiring;
mod proxy_cmd;
mod sandbox;
mod serve_cmd;
