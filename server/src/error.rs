//! HTTP errors: the engine's typed errors and malformed requests as JSON bodies
//! `{"error": {"code", "message"}}`. Storage details are logged, never sent to clients.
//!
//! Every code an answer can carry is an [`ErrorCode`], with the one status it comes with: the
//! engine's ([`soloist::Error::CODES`]) and the server's own. The OpenAPI description lists
//! them from here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use soloist::Error;

/// Declares [`ErrorCode`]: each code's variant, wire name, status and meaning, once.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])+ $variant:ident = $code:literal, $status:ident;)+) => {
        /// The `code` of an error body: a stable name for what went wrong. Each code comes with
        /// one HTTP status.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl ErrorCode {
            /// Every code, in the order the description lists them.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            /// The wire name, e.g. `"not_found"`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)+
                }
            }

            /// The HTTP status an answer with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)+
                }
            }

            /// What the code means, for humans.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => concat!($($doc),+).trim_ascii(),)+
                }
            }

            /// The code with this wire name.
            pub fn from_name(name: &str) -> Option<ErrorCode> {
                match name {
                    $($code => Some(ErrorCode::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// The session does not exist, was deleted, or belongs to another user (the answer is the
    /// same, so that session ids cannot be probed); or no route has this path.
    NotFound = "not_found", NOT_FOUND;
    /// The session belongs to another user (only when the server reveals foreign sessions).
    Forbidden = "forbidden", FORBIDDEN;
    /// The user has as many sessions as they may have (`--max-sessions-per-user`).
    QuotaExceeded = "quota_exceeded", FORBIDDEN;
    /// A field, a header, a path segment or a query parameter is invalid, or the body is not
    /// the JSON the route takes.
    InvalidInput = "invalid_input", BAD_REQUEST;
    /// A field, the whole command or the request body is over a configured limit.
    TooLarge = "too_large", PAYLOAD_TOO_LARGE;
    /// Another writer kept changing the session; nothing was applied and a retry may succeed.
    Conflict = "conflict", CONFLICT;
    /// The session id is taken (ids are never reused).
    SessionIdTaken = "session_id_taken", CONFLICT;
    /// A message id already stored in the session came with a different message.
    MessageIdReused = "message_id_reused", CONFLICT;
    /// The session has no message with this id.
    MessageNotFound = "message_not_found", NOT_FOUND;
    /// The message is not a draft in progress.
    MessageFinished = "message_finished", CONFLICT;
    /// The delta starts past the end of the draft.
    OffsetGap = "offset_gap", CONFLICT;
    /// The delta differs from the draft's content at its offset.
    OffsetConflict = "offset_conflict", CONFLICT;
    /// The draft was already finished in another way.
    FinishConflict = "finish_conflict", CONFLICT;
    /// An assistant reply is already streaming in the session.
    TurnInProgress = "turn_in_progress", CONFLICT;
    /// A `tool` message answers a tool call that no assistant message of the session made.
    UnknownToolCall = "unknown_tool_call", CONFLICT;
    /// A `tool` message answers a tool call that was answered already.
    ToolCallAnswered = "tool_call_answered", CONFLICT;
    /// `If-Match` named another version than the session's: nothing was applied.
    PreconditionFailed = "precondition_failed", PRECONDITION_FAILED;
    /// The `Idempotency-Key` was used before with a different request: nothing was applied.
    IdempotencyKeyReused = "idempotency_key_reused", CONFLICT;
    /// The session's mailbox stayed full; retry after `Retry-After` seconds.
    Overloaded = "overloaded", TOO_MANY_REQUESTS;
    /// The server is shutting down (or draining) and takes no new commands.
    ShuttingDown = "shutting_down", SERVICE_UNAVAILABLE;
    /// The session's actor failed before answering; the command may or may not have been
    /// applied: retry with the same message ids.
    ActorFailed = "actor_failed", SERVICE_UNAVAILABLE;
    /// The command did not complete in time; it may still be applied: retry with the same
    /// message ids.
    Timeout = "timeout", SERVICE_UNAVAILABLE;
    /// The process that owns the session stopped answering mid-command: retry with the same
    /// message ids.
    OwnerUnreachable = "owner_unreachable", SERVICE_UNAVAILABLE;
    /// The database failed or could not be reached: retry with the same message ids.
    Storage = "storage", SERVICE_UNAVAILABLE;
    /// No `x-user-id` header, or an empty one.
    Unauthenticated = "unauthenticated", UNAUTHORIZED;
    /// The user sent more requests than the per-user rate limit allows; retry after
    /// `Retry-After` seconds.
    RateLimited = "rate_limited", TOO_MANY_REQUESTS;
    /// The request body is not JSON (`content-type: application/json`).
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE;
    /// The request body arrived too slowly.
    BodyTimeout = "body_timeout", REQUEST_TIMEOUT;
    /// Too many large request bodies, or large answers, are in flight; retry after
    /// `Retry-After` seconds.
    Busy = "busy", SERVICE_UNAVAILABLE;
    /// The route does not take this method.
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED;
    /// The server failed on this request (a bug); it was not applied unless a retry says
    /// otherwise.
    Internal = "internal", INTERNAL_SERVER_ERROR;
    /// The request head could not be parsed (answered before any route).
    InvalidRequest = "invalid_request", BAD_REQUEST;
    /// The request URI is too long (answered before any route).
    UriTooLong = "uri_too_long", URI_TOO_LONG;
    /// The request head is too large or has too many fields (answered before any route).
    HeadersTooLarge = "headers_too_large", REQUEST_HEADER_FIELDS_TOO_LARGE;
    /// Every connection has requests in flight: the connection is answered and closed (before
    /// any route); retry after `Retry-After` seconds.
    TooManyConnections = "too_many_connections", SERVICE_UNAVAILABLE;
}

/// The body of every error answer.
// `ApiError::body` writes it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// What went wrong.
    pub error: ErrorDetail<'a>,
}

/// The `error` of an error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// A stable code; clients branch on it.
    #[schema(value_type = ErrorCode)]
    pub code: &'a str,
    /// For humans; its wording may change.
    pub message: &'a str,
}

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
    /// The same error with another message (e.g. naming where in the request it is).
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// An error with a stable code (which sets the status) and a message for humans.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: code.status(),
            code: code.as_str(),
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
        ApiError::new(ErrorCode::NotFound, "no such route")
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body: an [`ErrorBody`].
    pub fn body(&self) -> Value {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        };
        // Two strings always serialize.
        serde_json::to_value(body).unwrap_or(Value::Null)
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
        ApiError {
            status,
            code: error.code(),
            message,
            retry_after: None,
        }
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

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_engine_code_is_an_error_code_with_the_same_status() {
        for (code, status) in soloist::Error::CODES {
            let listed = ErrorCode::from_name(code)
                .unwrap_or_else(|| panic!("the engine's code {code:?} is not an ErrorCode"));
            assert_eq!(listed.status().as_u16(), status, "{code}");
        }
    }

    #[test]
    fn codes_are_unique_snake_case_and_explained() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(*code));
            assert!(
                code.as_str()
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte == b'_'),
                "{code:?}"
            );
            assert!(
                code.meaning().ends_with('.'),
                "{code:?}: {}",
                code.meaning()
            );
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
