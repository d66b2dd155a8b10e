//! The one public error type. Each variant maps to one HTTP status class, and no variant carries
//! a driver type in its public fields: storage failures are wrapped so callers see what happened,
//! not which library noticed it.

use std::sync::Arc;
use std::time::Duration;

/// `Result` with soloist's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a soloist command can fail with.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The session does not exist, was deleted, or (by default) belongs to another user: the
    /// answer is the same so that session ids cannot be probed. HTTP 404.
    #[error("session not found")]
    NotFound,
    /// The session belongs to another user. Only returned when
    /// [`EngineConfig::hide_foreign_sessions`](crate::EngineConfig::hide_foreign_sessions) is
    /// off. HTTP 403.
    #[error("session belongs to another user")]
    Forbidden,
    /// A field of the command is invalid. HTTP 400.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field, as a path such as `messages[2].role`.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// A field or the whole command is over a configured limit. HTTP 413.
    #[error("{field} is too large: {size} > limit {limit}")]
    TooLarge {
        /// The offending field, as a path such as `messages[0].content`.
        field: String,
        /// Its size (bytes or items, as the limit states).
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Another writer kept changing the session and the engine gave up after its bounded
    /// retries. Nothing of the command was applied; retrying it may succeed. HTTP 409.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A create named a session id that is taken: by another user's session, live or deleted
    /// (the answer is the same for both, so it tells nothing about that session), or by a
    /// deleted session of the caller (ids are never reused). Or an import named a session of
    /// the caller's that does not hold the messages it brings. Retrying cannot succeed. HTTP
    /// 409.
    #[error("the session id is taken")]
    SessionIdTaken,
    /// A message id that is already stored in the session (or sent earlier in the same
    /// request) came with a different message. Re-sending the same message is fine (it returns
    /// the original sequence); reusing its id for other content is a client bug, refused whole.
    /// HTTP 409.
    #[error("message id {id} is already used by a different message in this session")]
    MessageIdReused {
        /// The reused id.
        id: uuid::Uuid,
    },
    /// A delta or a finish named a message the session does not have. HTTP 404.
    #[error("the session has no message with this id")]
    MessageNotFound,
    /// A delta named a message that is not a draft in progress: finished, or never one. HTTP
    /// 409.
    #[error("the message is {}, not a draft in progress", status.as_str())]
    MessageFinished {
        /// The message's status.
        status: crate::model::MessageStatus,
    },
    /// A delta's offset is past the end of the draft's content: text before it is missing.
    /// Nothing was applied. HTTP 409.
    #[error("the delta starts past the end of the draft, which is {length} bytes long")]
    OffsetGap {
        /// The draft's length in bytes.
        length: u64,
    },
    /// A delta's text differs from what the draft already holds at its offset. Nothing was
    /// applied. HTTP 409.
    #[error(
        "the delta differs from the draft's content at its offset (the draft is {length} bytes long)"
    )]
    OffsetConflict {
        /// The draft's length in bytes.
        length: u64,
    },
    /// The draft was finished already, in another way. HTTP 409.
    #[error("the message was already finished as {}", status.as_str())]
    FinishConflict {
        /// How it was finished.
        status: crate::model::MessageStatus,
    },
    /// The session already has an assistant draft in progress; one turn streams at a time.
    /// HTTP 409.
    #[error("an assistant reply is already streaming in this session (message {id})")]
    TurnInProgress {
        /// The draft in progress.
        id: uuid::Uuid,
    },
    /// A `tool` message answers a tool call that no earlier assistant message of the session
    /// made. Nothing was applied. HTTP 409.
    #[error("no assistant message of this session made tool call {id:?}")]
    UnknownToolCall {
        /// The `tool_call_id`.
        id: String,
    },
    /// A `tool` message answers a tool call that was answered already. Nothing was applied.
    /// HTTP 409.
    #[error("tool call {id:?} was answered already")]
    ToolCallAnswered {
        /// The `tool_call_id`.
        id: String,
    },
    /// The user has as many sessions as they may have
    /// ([`EngineConfig::max_sessions_per_user`](crate::EngineConfig::max_sessions_per_user)):
    /// a create or an import of a new session is refused until some are deleted. HTTP 403.
    #[error("the user has {limit} sessions, the most allowed; delete some to create more")]
    QuotaExceeded {
        /// Sessions a user may have.
        limit: u64,
    },
    /// The command was conditional on the session's version (`If-Match`) and the session is at
    /// another one: it changed since the caller read it. Nothing was applied. HTTP 412.
    #[error("the session is at version {current}, not the one the command was conditional on")]
    PreconditionFailed {
        /// The session's current version (its ETag).
        current: i64,
    },
    /// An idempotency key was used before on this session with a different command (another
    /// body, route or session field): nothing was applied. HTTP 409.
    #[error("the idempotency key was already used for a different request")]
    IdempotencyKeyReused,
    /// The session's mailbox stayed full past the configured send timeout. HTTP 429/503.
    #[error("overloaded: the session's mailbox stayed full for {0:?}")]
    Overloaded(Duration),
    /// The engine is shutting down and takes no new commands. HTTP 503.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The actor handling the command failed (it panicked) before answering; the command may or
    /// may not have been applied, so retry with the same message ids. HTTP 503.
    #[error("the session actor failed while handling the command; retry with the same message ids")]
    ActorFailed,
    /// The command did not complete within
    /// [`EngineConfig::command_timeout`](crate::EngineConfig::command_timeout) (typically: the
    /// database is unreachable). It was not acknowledged but may still be applied, so retry with
    /// the same message ids: a retry returns the original sequences. HTTP 503.
    #[error("the command did not complete within {0:?}; retry with the same message ids")]
    Timeout(Duration),
    /// The command was sent on to the process that owns its session, and that process stopped
    /// answering before the command's outcome was known (it was killed or cut off mid-command).
    /// It may or may not have been applied, so retry with the same message ids. HTTP 503.
    #[error("the session's owner process stopped answering ({0}); retry with the same message ids")]
    OwnerUnreachable(String),
    /// The database failed or could not be reached. The command was not acknowledged; retrying
    /// with the same message ids is safe (when the engine could not tell whether a write
    /// committed, a retry with the same ids returns the stored sequences). HTTP 503.
    #[error("storage error: {0}")]
    Storage(#[source] StorageError),
}

/// A database failure, kept opaque so that driver types do not become part of soloist's API.
/// The driver error stays reachable through [`std::error::Error::source`].
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    message: String,
    /// The database's error code (SQLSTATE on PostgreSQL, the extended result code on SQLite).
    code: Option<String>,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl StorageError {
    /// A storage error with a message and no underlying cause.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// The database's error code, if the database reported one (SQLSTATE on PostgreSQL, the
    /// extended result code on SQLite).
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(error: sqlx::Error) -> Self {
        let code = error
            .as_database_error()
            .and_then(|database| database.code())
            .map(|code| code.into_owned());
        Self {
            message: error.to_string(),
            code,
            source: Some(Arc::new(error)),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StorageError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self {
            message: format!("migration failed: {error}"),
            code: None,
            source: Some(Arc::new(error)),
        }
    }
}

impl From<StorageError> for Error {
    fn from(error: StorageError) -> Self {
        Error::Storage(error)
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status a server should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::NotFound | Error::MessageNotFound => 404,
            Error::Forbidden | Error::QuotaExceeded { .. } => 403,
            Error::InvalidInput { .. } => 400,
            Error::TooLarge { .. } => 413,
            Error::Conflict(_)
            | Error::SessionIdTaken
            | Error::MessageIdReused { .. }
            | Error::IdempotencyKeyReused
            | Error::MessageFinished { .. }
            | Error::OffsetGap { .. }
            | Error::OffsetConflict { .. }
            | Error::FinishConflict { .. }
            | Error::TurnInProgress { .. }
            | Error::UnknownToolCall { .. }
            | Error::ToolCallAnswered { .. } => 409,
            Error::PreconditionFailed { .. } => 412,
            Error::Overloaded(_) => 429,
            Error::ShuttingDown
            | Error::ActorFailed
            | Error::Timeout(_)
            | Error::OwnerUnreachable(_)
            | Error::Storage(_) => 503,
        }
    }

    /// A short stable code for the error, e.g. for a JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound => "not_found",
            Error::Forbidden => "forbidden",
            Error::QuotaExceeded { .. } => "quota_exceeded",
            Error::InvalidInput { .. } => "invalid_input",
            Error::TooLarge { .. } => "too_large",
            Error::Conflict(_) => "conflict",
            Error::SessionIdTaken => "session_id_taken",
            Error::MessageIdReused { .. } => "message_id_reused",
            Error::IdempotencyKeyReused => "idempotency_key_reused",
            Error::MessageNotFound => "message_not_found",
            Error::MessageFinished { .. } => "message_finished",
            Error::OffsetGap { .. } => "offset_gap",
            Error::OffsetConflict { .. } => "offset_conflict",
            Error::FinishConflict { .. } => "finish_conflict",
            Error::TurnInProgress { .. } => "turn_in_progress",
            Error::UnknownToolCall { .. } => "unknown_tool_call",
            Error::ToolCallAnswered { .. } => "tool_call_answered",
            Error::PreconditionFailed { .. } => "precondition_failed",
            Error::Overloaded(_) => "overloaded",
            Error::ShuttingDown => "shutting_down",
            Error::ActorFailed => "actor_failed",
            Error::Timeout(_) => "timeout",
            Error::OwnerUnreachable(_) => "owner_unreachable",
            Error::Storage(_) => "storage",
        }
    }

    /// Every code [`Error::code`] returns, with the status [`Error::http_status`] gives it: what a
    /// server documents as its error codes.
    pub const CODES: [(&'static str, u16); 24] = [
        ("not_found", 404),
        ("forbidden", 403),
        ("quota_exceeded", 403),
        ("invalid_input", 400),
        ("too_large", 413),
        ("conflict", 409),
        ("session_id_taken", 409),
        ("message_id_reused", 409),
        ("message_not_found", 404),
        ("message_finished", 409),
        ("offset_gap", 409),
        ("offset_conflict", 409),
        ("finish_conflict", 409),
        ("turn_in_progress", 409),
        ("unknown_tool_call", 409),
        ("tool_call_answered", 409),
        ("precondition_failed", 412),
        ("idempotency_key_reused", 409),
        ("overloaded", 429),
        ("shutting_down", 503),
        ("actor_failed", 503),
        ("timeout", 503),
        ("owner_unreachable", 503),
        ("storage", 503),
    ];

    /// Whether retrying the same command (with the same message ids) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Conflict(_)
                | Error::Overloaded(_)
                | Error::ActorFailed
                | Error::Timeout(_)
                | Error::OwnerUnreachable(_)
                | Error::Storage(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Error, StorageError};
    use crate::model::MessageStatus;

    /// One error of each variant. The match has no wildcard, so a new variant does not compile
    /// until it is added here (and so checked against [`Error::CODES`] below).
    fn one_of_each() -> Vec<Error> {
        let all = vec![
            Error::NotFound,
            Error::Forbidden,
            Error::QuotaExceeded { limit: 1 },
            Error::invalid("field", "reason"),
            Error::TooLarge {
                field: "field".into(),
                size: 2,
                limit: 1,
            },
            Error::Conflict("busy".into()),
            Error::SessionIdTaken,
            Error::MessageIdReused {
                id: uuid::Uuid::nil(),
            },
            Error::MessageNotFound,
            Error::MessageFinished {
                status: MessageStatus::Completed,
            },
            Error::OffsetGap { length: 1 },
            Error::OffsetConflict { length: 1 },
            Error::FinishConflict {
                status: MessageStatus::Aborted,
            },
            Error::TurnInProgress {
                id: uuid::Uuid::nil(),
            },
            Error::UnknownToolCall { id: "c".into() },
            Error::ToolCallAnswered { id: "c".into() },
            Error::PreconditionFailed { current: 1 },
            Error::IdempotencyKeyReused,
            Error::Overloaded(Duration::from_millis(1)),
            Error::ShuttingDown,
            Error::ActorFailed,
            Error::Timeout(Duration::from_millis(1)),
            Error::OwnerUnreachable("gone".into()),
            Error::Storage(StorageError::msg("down")),
        ];
        for error in &all {
            match error {
                Error::NotFound
                | Error::Forbidden
                | Error::QuotaExceeded { .. }
                | Error::InvalidInput { .. }
                | Error::TooLarge { .. }
                | Error::Conflict(_)
                | Error::SessionIdTaken
                | Error::MessageIdReused { .. }
                | Error::MessageNotFound
                | Error::MessageFinished { .. }
                | Error::OffsetGap { .. }
                | Error::OffsetConflict { .. }
                | Error::FinishConflict { .. }
                | Error::TurnInProgress { .. }
                | Error::UnknownToolCall { .. }
                | Error::ToolCallAnswered { .. }
                | Error::PreconditionFailed { .. }
                | Error::IdempotencyKeyReused
                | Error::Overloaded(_)
                | Error::ShuttingDown
                | Error::ActorFailed
                | Error::Timeout(_)
                | Error::OwnerUnreachable(_)
                | Error::Storage(_) => {}
            }
        }
        all
    }

    #[test]
    fn codes_lists_every_code_with_its_status_once() {
        let errors = one_of_each();
        let listed: Vec<(&str, u16)> = errors
            .iter()
            .map(|error| (error.code(), error.http_status()))
            .collect();
        assert_eq!(
            listed,
            Error::CODES.to_vec(),
            "Error::CODES must list each variant's code and status, in declaration order"
        );
        let mut codes: Vec<&str> = listed.iter().map(|(code, _)| *code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(
            codes.len(),
            Error::CODES.len(),
            "each code names one variant"
        );
    }
}
