//! Integration tests of the HTTP proxy with real upstream servers, a real WebSocket server and
//! real clients on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod errors;
mod failover;
mod policy;
mod reload;
mod routing;
mod transport;
