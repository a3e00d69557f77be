//! An instance's custom hostname (issue 16): a host of the owner's own domain, routed like the
//! instance's `<name>.<base domain>`, with a certificate the proxies' HTTPS listeners serve for
//! it when one is uploaded. The rules and the sealing of the key are
//! [`crate::custom_hostname`]'s; every change here republishes the routes
//! (`state.coordinator.changed()`), so it reaches every proxy.
//!
//! - `GET /api/v1/instances/{id}/custom-hostname`: viewers.
//! - `PUT`, `DELETE`: owners (and platform admins).
//!
//! The private key is stored sealed and never shown: no answer, log line or audit entry holds
//! it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tandem_proxy::tls::{PemKeyPair, TlsError};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::instances::{host_url, load_for};
use crate::audit::{self, Subject};
use crate::auth::Caller;
use crate::custom_hostname::{check_hostname, seal_key, MAX_PEM_BYTES};
use crate::error::{ApiError, ApiResult, Json};
use crate::roles::Action;
use crate::state::AppState;
use crate::store::now_ms;

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(
        get_custom_hostname,
        put_custom_hostname,
        delete_custom_hostname
    ))
}

/// An instance's custom hostname.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CustomHostname {
    /// The host, lower-case, without a trailing dot. Point its DNS at the proxies.
    #[schema(example = "flows.example.org")]
    pub hostname: String,
    /// Where the instance is served on it: `http(s)://<hostname>`, with the port when it is not
    /// the scheme's own, as the instance's own `url`.
    pub url: String,
    /// Whether a certificate (and its key) is stored: the proxies' HTTPS listeners serve it for
    /// the hostname. Without one they serve their own certificates, which do not cover it.
    pub has_certificate: bool,
    /// When its certificate stops being valid (the leaf's `notAfter`), epoch ms; null without
    /// a certificate. Renew it before then: clients refuse an expired one.
    pub certificate_expires_at: Option<i64>,
}

/// A custom hostname to set, with its certificate.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCustomHostname {
    /// A DNS name of your own domain (`flows.example.org`): at least one dot, labels of 1 to 63
    /// of a-z, 0-9 and '-'; not an IP address, not `localhost`, not the platform's base domain
    /// or under it; no port, no wildcard. Unique on the platform.
    #[schema(example = "flows.example.org")]
    pub hostname: String,
    /// PEM certificate chain, leaf first, covering the hostname; at most 64 KiB. With `key`.
    pub certificate: Option<String>,
    /// Its PEM private key (PKCS#8, PKCS#1 or SEC1); at most 64 KiB. With `certificate`.
    /// Stored sealed, never shown.
    pub key: Option<String>,
}

impl std::fmt::Debug for SetCustomHostname {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetCustomHostname")
            .field("hostname", &self.hostname)
            .field("certificate", &self.certificate.as_ref().map(String::len))
            .field("key", &self.key.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

/// What the store holds of an instance's custom hostname, the key still sealed.
struct Stored {
    hostname: String,
    certificate: Option<String>,
    key_sealed: Option<String>,
}

impl Stored {
    fn has_certificate(&self) -> bool {
        self.certificate.is_some() && self.key_sealed.is_some()
    }

    /// What the audit log keeps of it: the hostname and whether it has a certificate.
    fn audited(&self) -> serde_json::Value {
        json!({ "hostname": self.hostname, "has_certificate": self.has_certificate() })
    }
}

async fn stored<'e, E>(executor: E, instance_id: &str) -> ApiResult<Option<Stored>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query(
        "SELECT hostname, certificate, key_sealed FROM custom_hostnames WHERE instance_id = $1",
    )
    .bind(instance_id)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|r| Stored {
        hostname: r.get(0),
        certificate: r.get(1),
        key_sealed: r.get(2),
    }))
}

fn view(state: &AppState, s: &Stored) -> CustomHostname {
    CustomHostname {
        url: host_url(&state.config, &s.hostname),
        has_certificate: s.has_certificate(),
        certificate_expires_at: s
            .certificate
            .as_deref()
            .filter(|_| s.has_certificate())
            .and_then(|pem| tandem_proxy::tls::expiry::pem_not_after(pem.as_bytes()))
            .and_then(|secs| i64::try_from(secs).ok())
            .map(|secs| secs.saturating_mul(1000)),
        hostname: s.hostname.clone(),
    }
}

fn none_set(name: &str) -> ApiError {
    ApiError::NotFound(format!("instance {name} has no custom hostname"))
}

/// The field a certificate's refusal is about: the key's own errors are the key's; the rest
/// (no certificate, bad PEM, a certificate for another name) the certificate's.
fn tls_field(e: &TlsError) -> &'static str {
    match e {
        TlsError::BadKey(_) | TlsError::Mismatch(_) => "key",
        _ => "certificate",
    }
}

/// The instance's custom hostname (viewers); 404 when it has none.
#[utoipa::path(get, path = "/api/v1/instances/{id}/custom-hostname", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = CustomHostname), (status = 404, body = crate::error::ErrorBody)))]
async fn get_custom_hostname(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<CustomHostname>> {
    let instance = load_for(&state, &caller, &id, Action::Read).await?;
    let s = stored(&state.store.pool, &id)
        .await?
        .ok_or_else(|| none_set(&instance.name))?;
    Ok(Json(view(&state, &s)))
}

/// Sets the instance's custom hostname, with a certificate and key for it or without (owners).
///
/// `certificate` and `key` go together and must cover the hostname. Without them, the same
/// hostname keeps the certificate stored for it, and a new hostname drops it (it would not
/// cover the new name): to remove only the certificate, delete the hostname and set it again.
/// A hostname another instance has is a 409.
#[utoipa::path(put, path = "/api/v1/instances/{id}/custom-hostname", tag = "instances", params(("id" = String, Path, description = "Instance id")), request_body = SetCustomHostname,
    responses((status = 200, body = CustomHostname), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 422, body = crate::error::ErrorBody)))]
async fn put_custom_hostname(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<SetCustomHostname>,
) -> ApiResult<Json<CustomHostname>> {
    let instance = load_for(&state, &caller, &id, Action::ManageCustomHostname).await?;
    let hostname = check_hostname(&body.hostname, &state.config.base_domain)
        .map_err(|e| ApiError::invalid("hostname", e.to_string()))?;
    let pair = match (body.certificate, body.key) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(ApiError::invalid(
                "key",
                "is required with a certificate: give the certificate's private key (PEM)",
            ))
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "certificate",
                "is required with a key: give the certificate chain (PEM) the key belongs to",
            ))
        }
        (Some(certificate), Some(key)) => {
            for (field, pem) in [("certificate", &certificate), ("key", &key)] {
                if pem.len() > MAX_PEM_BYTES {
                    return Err(ApiError::invalid(
                        field,
                        format!("is larger than {} KiB", MAX_PEM_BYTES / 1024),
                    ));
                }
            }
            let pair = PemKeyPair { certificate, key };
            tandem_proxy::tls::check(&pair, &hostname)
                .map_err(|e| ApiError::invalid(tls_field(&e), e.to_string()))?;
            Some(pair)
        }
    };

    let mut tx = state.store.write().await?;
    let before = stored(&mut *tx, &id).await?;
    let after = match pair {
        Some(p) => Stored {
            key_sealed: Some(seal_key(&state.key, &id, &hostname, &p.key)?),
            certificate: Some(p.certificate),
            hostname,
        },
        None => match &before {
            Some(b) if b.hostname == hostname => Stored {
                hostname,
                certificate: b.certificate.clone(),
                key_sealed: b.key_sealed.clone(),
            },
            _ => Stored {
                hostname,
                certificate: None,
                key_sealed: None,
            },
        },
    };
    // The same hostname again, without a certificate: nothing to write.
    let unchanged = before.as_ref().is_some_and(|b| {
        b.hostname == after.hostname
            && b.certificate == after.certificate
            && b.key_sealed == after.key_sealed
    });
    if !unchanged {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO custom_hostnames (instance_id, hostname, certificate, key_sealed, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (instance_id) DO UPDATE SET hostname = excluded.hostname, certificate = excluded.certificate, key_sealed = excluded.key_sealed, updated_at = excluded.updated_at",
        )
        .bind(&id)
        .bind(&after.hostname)
        .bind(after.certificate.clone())
        .bind(after.key_sealed.clone())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::conflict_as(format!(
            "{} is another instance's custom hostname; custom hostnames are unique on the platform",
            after.hostname
        )))?;
        audit::record(
            &mut tx,
            Some(&caller),
            "instance.custom-hostname",
            Subject::instance(&instance.team_id, &id),
            json!({
                "before": before.as_ref().map(Stored::audited),
                "after": after.audited(),
            }),
        )
        .await?;
        tx.commit().await?;
        state.coordinator.changed();
    }
    Ok(Json(view(&state, &after)))
}

/// Removes the instance's custom hostname and its certificate (owners); 404 when it has none.
#[utoipa::path(delete, path = "/api/v1/instances/{id}/custom-hostname", tag = "instances", params(("id" = String, Path, description = "Instance id")),
    responses((status = 204), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
async fn delete_custom_hostname(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let instance = load_for(&state, &caller, &id, Action::ManageCustomHostname).await?;
    let mut tx = state.store.write().await?;
    let before = stored(&mut *tx, &id)
        .await?
        .ok_or_else(|| none_set(&instance.name))?;
    sqlx::query("DELETE FROM custom_hostnames WHERE instance_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        Some(&caller),
        "instance.custom-hostname",
        Subject::instance(&instance.team_id, &id),
        json!({ "before": before.audited(), "after": null }),
    )
    .await?;
    tx.commit().await?;
    state.coordinator.changed();
    Ok(StatusCode::NO_CONTENT)
}
