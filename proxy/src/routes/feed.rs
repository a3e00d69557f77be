//! The route feed's table: what a control plane sends a standalone proxy (`GET /api/v1/routes`,
//! server-sent events), and what the proxy keeps in its cache file to serve through a control
//! plane's outage.
//!
//! Every `table` event carries the whole table with its generation, which grows with every
//! change the control plane publishes. A proxy applies a table whose generation differs from the
//! one it has (a restarted control plane counts from 1 again), so a lost event costs nothing: the
//! next one carries everything.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{InstanceSpec, ReplicaSpec};
use crate::health::HealthConfig;

/// The whole table at one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedTable {
    /// Grows with every change published by the control plane that sent it.
    pub generation: u64,
    /// Every instance.
    pub instances: Vec<FeedInstance>,
    /// The MQTT identities of the running instances' replicas, for the proxy's shared MQTT
    /// listener (`tandem proxy --mqtt-listen`). Left out when empty, so proxies that predate it
    /// keep reading tables of control planes without MQTT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mqtt: Vec<FeedMqtt>,
}

/// One instance's MQTT: how the MQTT proxy treats its replicas' connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedMqtt {
    /// Its name.
    pub name: String,
    /// HA: client ids and subscriptions are rewritten.
    pub ha: bool,
    /// Topic filters whose subscriptions stay unshared.
    pub exclude: Vec<String>,
    /// Its replicas, by slot, each with the SHA-256 of its MQTT token (never the token).
    pub replicas: Vec<FeedMqttReplica>,
}

/// One replica's MQTT identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedMqttReplica {
    /// Its slot.
    pub slot: usize,
    /// Hex SHA-256 of its MQTT token.
    pub token_sha256: String,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedInstance {
    /// Its name.
    pub name: String,
    /// Its host names.
    pub hosts: Vec<String>,
    /// HA: the editor is blocked.
    pub ha: bool,
    /// Cookie affinity.
    pub affinity: bool,
    /// Requests wait for a replica expected to be ready soon.
    pub hold: bool,
    /// The admin secret the proxy adds to editor requests its gate lets through.
    pub editor_secret: String,
    /// Who may call its own endpoints; left out when anyone may (and so understood by proxies
    /// that predate it).
    #[serde(default, skip_serializing_if = "is_open")]
    pub http_auth: crate::HttpAuth,
    /// It sleeps: a request wakes it (through the control plane) and waits for a replica.
    /// Left out when awake.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub asleep: bool,
    /// Its own certificate and key (its custom hostname's), for the proxies' HTTPS listeners;
    /// left out when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<crate::tls::PemKeyPair>,
    /// Its replicas with an address, in slot order.
    pub replicas: Vec<FeedReplica>,
}

fn is_open(h: &crate::HttpAuth) -> bool {
    *h == crate::HttpAuth::None
}

/// One replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedReplica {
    /// Its id (`<instance>-r<slot>`).
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it takes requests.
    pub serving: Serving,
}

/// Whether a replica takes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serving {
    /// In rotation.
    Ready,
    /// Out of rotation for new requests; those in flight finish, and the proxy reports them.
    Draining,
    /// Out of rotation: starting, or hung.
    Unready,
}

impl FeedTable {
    /// What the MQTT proxy's shared listener takes: every replica reachable by its token only.
    pub fn mqtt_instances(&self) -> Vec<crate::mqtt::MqttInstance> {
        self.mqtt
            .iter()
            .map(|m| crate::mqtt::MqttInstance {
                name: m.name.clone(),
                ha: m.ha,
                exclude: m.exclude.clone(),
                replicas: m
                    .replicas
                    .iter()
                    .map(|r| crate::mqtt::MqttReplica {
                        slot: r.slot,
                        listen: None,
                        token_sha256: Some(r.token_sha256.clone()),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The specs to publish into [`super::Routes`].
    pub fn specs(&self) -> Vec<InstanceSpec> {
        self.instances
            .iter()
            .map(|i| InstanceSpec {
                name: i.name.clone(),
                hosts: i.hosts.clone(),
                ha: i.ha,
                editor_secret: Some(i.editor_secret.clone()),
                http_auth: i.http_auth,
                affinity: i.affinity,
                hold: i.hold,
                replicas: i
                    .replicas
                    .iter()
                    .map(|r| ReplicaSpec {
                        id: r.id.clone(),
                        addr: r.addr,
                        ready: r.serving == Serving::Ready,
                    })
                    .collect(),
                health: Some(HealthConfig::default()),
                certificate: i.certificate.clone(),
                asleep: i.asleep,
            })
            .collect()
    }

    /// Reads a cache file written by [`FeedTable::save`]; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, CacheError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::Io(path.display().to_string(), e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CacheError::Parse(path.display().to_string(), e.to_string()))
    }

    /// Writes the table to `path`, readable by its owner only (it holds admin secrets), whole or
    /// not at all: a temporary file beside it, renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), CacheError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let io = |e| CacheError::Io(path.display().to_string(), e);
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let text = serde_json::to_vec(self)
            .map_err(|e| CacheError::Parse(path.display().to_string(), e.to_string()))?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// Why the cache file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading or writing failed.
    #[error("route cache {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// It is not a table.
    #[error("route cache {0} is not a route table: {1}")]
    Parse(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_survives_its_cache_file_which_only_its_owner_reads() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.json");
        assert_eq!(FeedTable::load(&path).unwrap(), None);
        let table = FeedTable {
            generation: 7,
            instances: vec![FeedInstance {
                certificate: None,
                asleep: false,
                name: "a".into(),
                hosts: vec!["a.example.com".into()],
                ha: true,
                affinity: true,
                hold: false,
                editor_secret: "s".into(),
                http_auth: crate::HttpAuth::Tokens,
                replicas: vec![FeedReplica {
                    id: "a-r0".into(),
                    addr: "127.0.0.1:1880".parse().unwrap(),
                    serving: Serving::Draining,
                }],
            }],
            mqtt: Vec::new(),
        };
        table.save(&path).unwrap();
        table.save(&path).unwrap();
        assert_eq!(FeedTable::load(&path).unwrap(), Some(table.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let specs = table.specs();
        assert!(
            !specs[0].replicas[0].ready,
            "a draining replica takes no request"
        );
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(FeedTable::load(&path), Err(CacheError::Parse(..))));
    }
}
