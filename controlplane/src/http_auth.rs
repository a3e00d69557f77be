//! Access control for flows' HTTP endpoints: the mode each instance asks of the proxy, and the
//! check of its `tdh_` bearer tokens. The API that sets them is [`crate::api::http_auth`]; the
//! proxy's gate (`editor_gate`) asks [`token_allows`] before Node-RED sees a request; the mode
//! travels in the route table.
//!
//! Only the SHA-256 of a token is stored (`http_tokens.hash`), as for personal tokens: a copy of
//! the database opens no instance.

use sqlx::Row;

use crate::auth::hash_secret;
use crate::state::AppState;
use crate::store::now_ms;

/// The prefix of instances' HTTP tokens (`tdh_`), apart from users' `tdm_` and proxies' tokens:
/// one look at a header tells which kind it holds. Its owner is the proxy's credential parser,
/// which strips these tokens before a flow sees them.
pub use tandem_proxy::credentials::HTTP_TOKEN_PREFIX;

/// Use of a token is recorded at most this often, in ms: a write per request would cost more
/// than the request.
const LAST_USED_EVERY_MS: i64 = 60_000;

/// Who may call an instance's HTTP endpoints (its flows' `http in` nodes, dashboards): the
/// proxy's own type, which the route table carries. `/admin` keeps its own rules whatever the
/// mode.
pub use tandem_proxy::HttpAuth as HttpAuthMode;

/// Whether `token` (the bearer token of a request, without `Bearer `) is one of the HTTP tokens
/// of the instance named `instance_name`, unrevoked and unexpired. Records the token's use at
/// most once a minute. Any other token (a user's `tdm_`, another instance's) is `false`.
pub async fn token_allows(
    state: &AppState,
    instance_name: &str,
    token: &str,
) -> Result<bool, sqlx::Error> {
    if !token.starts_with(HTTP_TOKEN_PREFIX) {
        return Ok(false);
    }
    let row = sqlx::query(
        "SELECT t.id, t.expires_at, t.last_used_at FROM http_tokens t JOIN instances i ON i.id = t.instance_id WHERE t.hash = $1 AND i.name = $2",
    )
    .bind(hash_secret(token))
    .bind(instance_name)
    .fetch_optional(&state.store.pool)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let now = now_ms();
    let expires: Option<i64> = row.get(1);
    if expires.is_some_and(|e| e <= now) {
        return Ok(false);
    }
    let last: Option<i64> = row.get(2);
    if last.is_none_or(|l| now - l > LAST_USED_EVERY_MS) {
        let id: String = row.get(0);
        sqlx::query("UPDATE http_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&state.store.pool)
            .await?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::HttpAuthMode;

    #[test]
    fn modes_round_trip_and_unknown_stored_ones_stay_closed() {
        for m in [
            HttpAuthMode::None,
            HttpAuthMode::Tokens,
            HttpAuthMode::Members,
        ] {
            assert_eq!(HttpAuthMode::parse(m.as_str()), Some(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
        }
        assert_eq!(HttpAuthMode::parse("open"), None);
        assert_eq!(HttpAuthMode::from_stored("future"), HttpAuthMode::Members);
    }
}
