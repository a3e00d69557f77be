//! End-to-end tests: a real `tandem serve` running real Node-RED replicas, driven through its
//! API and reached through its proxy. The Node-RED stack is installed once per machine into
//! `$TANDEM_TEST_STACKS/stacks` (default `$TMPDIR/tandem-test-stacks/stacks`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod backup;
mod console;
mod console_pages;
mod dashboard;
mod deploys;
mod editor_ticket;
mod ha;
mod hang;
mod harness;
mod http_auth;
mod leader;
mod lifecycle;
mod modules;
mod monitoring;
mod mqtt;
mod security;
mod sleep;
mod standalone;
mod tls;
mod warm;
mod webdriver;
