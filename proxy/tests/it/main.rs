//! Integration tests of the HTTP proxy with real upstream servers, a real WebSocket server and
//! real clients on 127.0.0.1, and of the MQTT proxy with a real Mosquitto and real MQTT clients.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod core;
mod credentials;
mod errors;
mod failover;
mod metrics;
mod mqtt;
mod mqtt_shared;
mod policy;
mod reload;
mod routing;
mod sleep;
mod ticket;
mod tls;
mod transport;
