//! The API's one error type and its one JSON shape: `{"error": {"code": "...", "message": "..."}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Everything an API call can fail with. Messages say what was wrong; 5xx details are logged,
/// never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (bad JSON, bad query).
    #[error("{0}")]
    BadRequest(String),
    /// No credentials, or credentials that are not valid.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller's role is too low.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown, or not visible to the caller.
    #[error("{0}")]
    NotFound(String),
    /// Duplicate or conflicting state.
    #[error("{0}")]
    Conflict(String),
    /// A field failed validation.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as a JSON path (`settings.httpNodeRoot`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The body is larger than the limit.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// Too many attempts (failed sign-ins); the answer carries `Retry-After`.
    #[error("{message}")]
    TooManyRequests {
        /// What was refused and why, for people.
        message: String,
        /// Seconds until an attempt may succeed again: the `Retry-After` header.
        retry_after_secs: u64,
    },
    /// Not now: no control plane leads yet (a takeover); the answer carries `Retry-After`.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of ours.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

/// Result of an API handler.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// A validation failure on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// For `map_err` on an insert: a unique-key violation becomes a 409 with `message`; any
    /// other error maps as usual.
    pub fn conflict_as(message: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Self {
        let message = message.into();
        move |e| match Self::from(e) {
            Self::Conflict(_) => Self::Conflict(message),
            other => other,
        }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return Self::Conflict("an object with that name already exists".into());
            }
            if db.is_foreign_key_violation() {
                return Self::Conflict("the object is still referenced by others".into());
            }
        }
        Self::Internal(e.into())
    }
}

/// The error body, for the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code: bad_request, unauthorized, forbidden, not_found, conflict, invalid, too_large, too_many_requests, unavailable, internal.
    pub code: String,
    /// What was wrong, for people.
    pub message: String,
    /// The field at fault, for `invalid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if let Self::Internal(e) = &self {
            tracing::error!(error = ?e, "internal error in API call");
        }
        let field = match &self {
            Self::Invalid { field, .. } => Some(field.clone()),
            _ => None,
        };
        let mut resp = (
            status,
            axum::Json(ErrorBody {
                error: ErrorDetail {
                    code: code.into(),
                    message: self.to_string(),
                    field,
                },
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Self::TooManyRequests {
            retry_after_secs, ..
        } = &self
        {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(*retry_after_secs),
            );
        }
        resp
    }
}

/// `axum::Json` with the API's own errors: malformed JSON is 400, a body that does not fit the
/// schema (unknown field, wrong type, missing field) is 422 with serde's message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| Self(v))
            .map_err(|r| json_rejection(r, crate::api::MAX_BODY_BYTES))
    }
}

/// A JSON body of a route that takes whole documents (flows, snapshots): like [`Json`], with
/// the platform's document limit (`tandem serve --max-document-mib`, default 16 MiB) rather
/// than 1 MiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Document<T>(pub T);

impl<T> FromRequest<crate::state::AppState> for Document<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(
        req: Request,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| Self(v))
            .map_err(|r| json_rejection(r, state.config.max_document_bytes))
    }
}

/// The API's error for a body axum could not take as JSON; `limit` is the route's body limit.
fn json_rejection(rejection: JsonRejection, limit: usize) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            // serde_path_to_error says "path.to.field: what is wrong".
            let msg = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.body_text());
            data_error(&msg)
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::BadRequest(format!(
            "the body is not valid JSON: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.body_text())
        )),
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::BadRequest("send the body as JSON with Content-Type: application/json".into())
        }
        JsonRejection::BytesRejection(e) => {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(limit)
            } else {
                ApiError::BadRequest(format!("cannot read the body: {}", e.body_text()))
            }
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// Names the field of a serde error ("path: message", or "missing field `x`" at `path`).
fn data_error(msg: &str) -> ApiError {
    let (path, rest) = match msg.split_once(": ") {
        Some((p, r)) if !p.contains(' ') => (p, r),
        _ => (".", msg),
    };
    let path = if path == "." { "" } else { path };
    if let Some(after) = rest.strip_prefix("missing field `") {
        if let Some((name, _)) = after.split_once('`') {
            let field = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            return ApiError::invalid(field, rest);
        }
    }
    ApiError::invalid(if path.is_empty() { "body" } else { path }, rest)
}

/// `axum::extract::Query` with the API's own errors: a query string that does not fit
/// (`limit=abc`, an unknown parameter) is 422 naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => Ok(Self(v)),
            Err(e) => {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let field = if path == "." {
                    message
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split_once('`'))
                        .map(|(f, _)| f.to_string())
                        .unwrap_or_else(|| "query".into())
                } else {
                    path
                };
                Err(ApiError::invalid(
                    field,
                    format!("bad query string: {message}"),
                ))
            }
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
