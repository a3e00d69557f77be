//! The coordinator's decisions on the fake driver (paused time), and the local driver with real
//! Node-RED processes (installed with npm on first use and kept in a cache directory between
//! runs: `TANDEM_TEST_STACKS`, default `<tmp>/tandem-test-stacks`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod local;
mod scenarios;
