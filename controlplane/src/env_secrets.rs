//! Secret environment variables of instances: written as `{"value": "...", "secret": true}`,
//! sealed in the store, shown to nobody (`{"secret": true}`, without a value, to every role),
//! and given to the replicas like any other variable.
//!
//! A secret is sealed with XChaCha20-Poly1305 under a key derived from the platform key and
//! the instance id ([`PlatformKey::seal`]), with the variable's name as associated
//! data: a sealed value copied into another variable or instance does not open. Stored as
//! `{"secret": true, "sealed": "<hex of nonce and ciphertext>"}` in the instance's `env` column,
//! next to plain variables stored as strings, so rows written before secrets existed read as
//! they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::secrets::PlatformKey;

/// The purpose secret variables' keys are derived for.
const PURPOSE: &str = "env-secrets";

/// A variable as a request writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EnvInput {
    /// A plain value.
    Plain(String),
    /// `{"value": "...", "secret": true}`; `{"secret": true}` alone keeps the secret stored
    /// under that name (so what a `GET` returns can be sent back unchanged).
    Entry(EnvEntry),
}

/// The object form of [`EnvInput`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvEntry {
    /// The value; absent to keep a stored secret.
    pub value: Option<String>,
    /// Sealed in the store and never shown.
    #[serde(default)]
    pub secret: bool,
}

/// A variable as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvStored {
    /// A plain value.
    Plain(String),
    /// A sealed secret.
    Secret {
        /// Always true.
        secret: bool,
        /// Hex of the 24-byte nonce and the ciphertext.
        sealed: String,
    },
}

/// A variable as the API shows it (and an exported snapshot holds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EnvShown {
    /// A plain value.
    Plain(String),
    /// A secret: that it exists, never its value.
    Secret {
        /// Always true.
        secret: bool,
    },
}

/// Reads an `env` column: a JSON object of strings and sealed secrets.
pub fn parse_stored(text: &str) -> BTreeMap<String, EnvStored> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Seals `value` of variable `name` of instance `instance_id`.
pub fn seal(key: &PlatformKey, instance_id: &str, name: &str, value: &str) -> ApiResult<String> {
    key.seal(PURPOSE, instance_id, name, value)
        .map_err(|e| ApiError::Internal(e.context(format!("cannot seal env.{name}"))))
}

/// Opens a sealed value; `None` when it does not open (another instance's, another name's, or
/// damaged).
pub fn open(key: &PlatformKey, instance_id: &str, name: &str, sealed: &str) -> Option<String> {
    key.open(PURPOSE, instance_id, name, sealed)
}

/// The variables to store for `input`, given what is stored now: values of new secrets are
/// sealed; `{"secret": true}` without a value keeps the stored secret. Errors name the variable.
pub fn resolve(
    key: &PlatformKey,
    instance_id: &str,
    input: &BTreeMap<String, EnvInput>,
    stored: &BTreeMap<String, EnvStored>,
) -> ApiResult<BTreeMap<String, EnvStored>> {
    let mut out = BTreeMap::new();
    for (name, v) in input {
        let field = format!("env.{name}");
        let kept = match v {
            EnvInput::Plain(value) => EnvStored::Plain(value.clone()),
            EnvInput::Entry(EnvEntry {
                value: Some(value),
                secret: false,
            }) => EnvStored::Plain(value.clone()),
            EnvInput::Entry(EnvEntry {
                value: None,
                secret: false,
            }) => return Err(ApiError::invalid(field, "a value is required unless the variable is a secret kept as stored (`{\"secret\": true}`)")),
            EnvInput::Entry(EnvEntry { secret: true, .. })
                if name == crate::node_env::MQTT_EXCLUDE =>
            {
                return Err(ApiError::invalid(
                    field,
                    "configures Tandem's MQTT proxy and cannot be a secret",
                ))
            }
            EnvInput::Entry(EnvEntry {
                value: Some(value),
                secret: true,
            }) => EnvStored::Secret {
                secret: true,
                sealed: seal(key, instance_id, name, value)?,
            },
            EnvInput::Entry(EnvEntry {
                value: None,
                secret: true,
            }) => match stored.get(name) {
                Some(s @ EnvStored::Secret { .. }) => s.clone(),
                _ => {
                    return Err(ApiError::invalid(
                        field,
                        "is not a stored secret: give its value to make it one",
                    ))
                }
            },
        };
        out.insert(name.clone(), kept);
    }
    Ok(out)
}

/// The values, secrets opened, for the rules' checks and for the replicas. A secret that does
/// not open (a damaged row) is left out, with a warning.
pub fn reveal(
    key: &PlatformKey,
    instance_id: &str,
    stored: &BTreeMap<String, EnvStored>,
) -> BTreeMap<String, String> {
    stored
        .iter()
        .filter_map(|(name, v)| match v {
            EnvStored::Plain(value) => Some((name.clone(), value.clone())),
            EnvStored::Secret { sealed, .. } => {
                let value = open(key, instance_id, name, sealed);
                if value.is_none() {
                    tracing::warn!(instance = %instance_id, variable = %name, "a secret variable does not open; left out");
                }
                value.map(|v| (name.clone(), v))
            }
        })
        .collect()
}

/// What the API shows of `vars` (plain values), the names in `secrets` masked.
pub fn shown(
    vars: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, EnvStored>,
) -> BTreeMap<String, EnvShown> {
    vars.iter()
        .map(|(name, value)| {
            let v = match secrets.get(name) {
                Some(EnvStored::Secret { .. }) => EnvShown::Secret { secret: true },
                _ => EnvShown::Plain(value.clone()),
            };
            (name.clone(), v)
        })
        .collect()
}

/// What the API shows of stored variables: plain values, and secrets as `{"secret": true}`.
pub fn shown_stored(stored: &BTreeMap<String, EnvStored>) -> BTreeMap<String, EnvShown> {
    stored
        .iter()
        .map(|(name, v)| {
            let v = match v {
                EnvStored::Plain(value) => EnvShown::Plain(value.clone()),
                EnvStored::Secret { .. } => EnvShown::Secret { secret: true },
            };
            (name.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_for_its_instance_and_name() {
        let key = PlatformKey::from_bytes([7; 32]);
        let sealed = seal(&key, "i1", "TOKEN", "s3cr3t").unwrap_or_default();
        assert!(!sealed.contains("s3cr3t"));
        assert_eq!(
            open(&key, "i1", "TOKEN", &sealed).as_deref(),
            Some("s3cr3t")
        );
        assert_eq!(open(&key, "i2", "TOKEN", &sealed), None);
        assert_eq!(open(&key, "i1", "OTHER", &sealed), None);
        assert_eq!(
            open(&PlatformKey::from_bytes([8; 32]), "i1", "TOKEN", &sealed),
            None
        );
        assert_eq!(open(&key, "i1", "TOKEN", "zz"), None);
        // Two seals of one value differ (a fresh nonce each time).
        assert_ne!(
            seal(&key, "i1", "TOKEN", "s3cr3t").unwrap_or_default(),
            sealed
        );
    }

    #[test]
    fn a_secret_sent_back_without_its_value_keeps_the_stored_one() {
        let key = PlatformKey::from_bytes([1; 32]);
        let first: BTreeMap<String, EnvInput> = serde_json::from_value(serde_json::json!({
            "A": "plain", "T": {"value": "v1", "secret": true}
        }))
        .unwrap_or_default();
        let stored = resolve(&key, "i", &first, &BTreeMap::new()).unwrap_or_default();
        let again: BTreeMap<String, EnvInput> =
            serde_json::from_value(serde_json::json!({"A": "plain", "T": {"secret": true}}))
                .unwrap_or_default();
        let kept = resolve(&key, "i", &again, &stored).unwrap_or_default();
        assert_eq!(kept, stored);
        assert_eq!(reveal(&key, "i", &kept)["T"], "v1");
        assert_eq!(
            serde_json::to_value(shown_stored(&kept)).unwrap_or_default(),
            serde_json::json!({"A": "plain", "T": {"secret": true}})
        );
        // No stored secret to keep, or a value missing: refused, naming the variable.
        let nothing = resolve(&key, "i", &again, &BTreeMap::new());
        assert!(matches!(nothing, Err(ApiError::Invalid { ref field, .. }) if field == "env.T"));
        let bare: BTreeMap<String, EnvInput> =
            serde_json::from_value(serde_json::json!({"B": {}})).unwrap_or_default();
        assert!(resolve(&key, "i", &bare, &stored).is_err());
    }
}
