//! HTTP errors: the engine's typed errors and malformed requests as JSON bodies
//! `{"error": {"code", "message"}}`. Storage details are logged, never sent to clients.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use soloist::Error;

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds for `Retry-After` on a 429 or 503 (1 unless said otherwise).
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, a stable code and a message for humans.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry in `seconds`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The `Retry-After` seconds set with [`Self::with_retry_after`].
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// What a path that leads nowhere gets (and the peers' protocol, to anyone without the
    /// cluster secret).
    pub fn unknown_route() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let status =
            StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let message = match &error {
            // The cause is for the operator's log, not for the client.
            Error::Storage(storage) => {
                tracing::warn!(error = %storage, "storage error answered with 503");
                "the database is unavailable; retry with the same message ids".to_owned()
            }
            other => other.to_string(),
        };
        ApiError::new(status, error.code(), message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::record_error(self.code);
        let mut response = (self.status, Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.headers_mut().insert(
                "retry-after",
                axum::http::HeaderValue::from(self.retry_after.unwrap_or(1)),
            );
        }
        response
    }
}
