//! Small socket helpers, shared by the proxy, the coordinator and every crate's tests.

/// A free TCP port on 127.0.0.1: bound, read and released. Whoever binds it next may find it
/// taken in the meantime, so callers that can bind port 0 themselves should; this is for
/// processes that must be told their port before they start (Node-RED, Mosquitto, PostgreSQL).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
