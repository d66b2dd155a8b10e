//! Request and response bodies of the JSON API. Field names are the wire names.
#![allow(missing_docs)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use soloist::{
    Delta, Message, MessageStatus, NewMessage, OnBusy, PendingToolCall, RawJson, SessionCursor,
    SessionId, SessionInfo, SessionList, SessionPage, Usage,
};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorCode};

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Refused when present: session ids are the server's to choose (see `create_session`).
    /// Read only to answer with a clear error instead of "unknown field".
    #[schema(ignore)]
    pub id: Option<serde::de::IgnoredAny>,
    /// Optional title.
    pub title: Option<String>,
    /// The client's own data about the session (a JSON object), stored and returned as sent;
    /// `{}` when absent.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<RawJson>,
    /// Seconds the session lives after its last write (0: never expires); absent: the
    /// server's `--session-ttl`.
    pub ttl_seconds: Option<i64>,
}

/// A session without its messages, as every route shows it (create, update, list, export, and
/// with its messages, get). Its version is the answer's `ETag` header.
// The engine's `SessionInfo` names the id `id` and carries the version, which the API sends as
// the `ETag` header instead.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionSummary {
    /// The session id.
    pub session_id: SessionId,
    /// The owner.
    pub user_id: String,
    /// The title (`null` when it has none).
    #[schema(required = true)]
    pub title: Option<String>,
    /// The client's own data (a JSON object), as sent.
    #[schema(value_type = Object)]
    pub metadata: RawJson,
    /// Token usage totals.
    pub usage: Usage,
    /// Number of messages, which is also the next message's sequence.
    pub message_count: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last write.
    pub updated_at: DateTime<Utc>,
    /// Seconds the session lives after its last write; `null`: it never expires.
    #[schema(required = true)]
    pub ttl_seconds: Option<i64>,
    /// When it expires unless written again; `null`: never.
    #[schema(required = true)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl From<SessionInfo> for SessionSummary {
    fn from(info: SessionInfo) -> Self {
        Self {
            session_id: info.id,
            user_id: info.user_id,
            title: info.title,
            metadata: info.metadata,
            usage: info.usage,
            message_count: info.message_count,
            created_at: info.created_at,
            updated_at: info.updated_at,
            ttl_seconds: info.ttl_seconds,
            expires_at: info.expires_at,
        }
    }
}

/// `POST /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// The messages, stored in this order at consecutive sequences.
    pub messages: Vec<NewMessage>,
    /// What a draft started here does while another streams.
    #[serde(default)]
    pub on_busy: OnBusy,
}

/// `GET /v1/sessions/{id}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Messages after this sequence (the `next_after_seq` of the previous page); from the
    /// first when absent.
    pub after_seq: Option<i64>,
    /// At most this many messages (default 100, at most the server's `--max-page-size`,
    /// 1,000 by default); 0 answers the session without messages.
    pub limit: Option<usize>,
    /// Check the stored version first, so that writes made through other server processes
    /// sharing the database are seen.
    pub fresh: Option<bool>,
}

/// `GET /v1/sessions/{id}`: the session and a page of its messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPageBody {
    #[serde(flatten)]
    pub session: SessionSummary,
    /// The page's messages, in sequence order.
    // Serialized as stored: `Message` is the wire shape.
    #[schema(value_type = Vec<Message>)]
    pub messages: Vec<Arc<Message>>,
    /// Pass as `after_seq` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = i64)]
    pub next_after_seq: Option<i64>,
    /// Tool calls still waiting for their answer.
    pub pending_tool_calls: Vec<PendingToolCall>,
}

impl From<SessionPage> for SessionPageBody {
    fn from(page: SessionPage) -> Self {
        Self {
            session: page.session.into(),
            messages: page.messages,
            next_after_seq: page.next_after_seq,
            pending_tool_calls: page.pending_tool_calls,
        }
    }
}

/// `GET /v1/sessions` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many sessions (default 50, at most the server's `--max-page-size`).
    pub limit: Option<usize>,
    /// A `next_before` cursor from the previous page.
    pub before: Option<String>,
}

/// `GET /v1/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionListBody {
    /// The sessions, newest first.
    pub sessions: Vec<SessionSummary>,
    /// Pass as `before` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub next_before: Option<String>,
}

impl From<SessionList> for SessionListBody {
    fn from(list: SessionList) -> Self {
        Self {
            sessions: list
                .sessions
                .into_iter()
                .map(SessionSummary::from)
                .collect(),
            next_before: list
                .next_before
                .map(|cursor| format!("{}_{}", cursor.created_at_micros, cursor.id)),
        }
    }
}

/// Parses a `next_before` cursor (`<micros>_<uuid>`).
pub fn parse_cursor(text: &str) -> Result<SessionCursor, ApiError> {
    let invalid = || {
        ApiError::new(
            ErrorCode::InvalidInput,
            "invalid `before` cursor: pass the `next_before` of the previous page",
        )
    };
    let (micros, id) = text.split_once('_').ok_or_else(invalid)?;
    Ok(SessionCursor {
        created_at_micros: micros.parse().map_err(|_| invalid())?,
        id: id.parse().map_err(|_| invalid())?,
    })
}

/// `PATCH /v1/sessions/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// The new title; unchanged when absent.
    pub title: Option<String>,
    /// The new metadata (a JSON object), replacing the old whole; unchanged when absent.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<RawJson>,
    /// A new time to live, from this write (0: never expires).
    pub ttl_seconds: Option<i64>,
}

/// `DELETE /v1/sessions/{id}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Erase the title, metadata, usage and idempotency records too (the messages go with any
    /// delete); allowed on a session already deleted.
    #[serde(default)]
    pub erase: bool,
}

/// `DELETE /v1/users/me/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErasedBody {
    /// Sessions erased by this call (0 when there was nothing left to erase).
    pub erased: u64,
    /// Whether sessions are left to erase: a call erases at most 1,000; call again.
    pub more: bool,
}

/// `POST /v1/sessions/{id}/usage`: tokens to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageDeltaBody {
    /// Prompt (input) tokens to add.
    pub prompt_tokens: u32,
    /// Completion (output) tokens to add.
    pub completion_tokens: u32,
}

/// `POST /v1/sessions/{id}/messages/{message_id}/deltas`: one delta (`offset` and
/// `content`), or several (`deltas`), not both.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeltasBody {
    /// One delta: bytes of the draft's content before `content` (UTF-8).
    pub offset: Option<u64>,
    /// One delta: the text.
    pub content: Option<String>,
    /// Several deltas, applied in order.
    pub deltas: Option<Vec<Delta>>,
}

impl DeltasBody {
    /// The deltas, in order; the body must give one or a list, not both.
    pub fn into_deltas(self) -> Result<Vec<Delta>, soloist::Error> {
        match (self.offset, self.content, self.deltas) {
            (Some(offset), Some(content), None) => Ok(vec![Delta { offset, content }]),
            (None, None, Some(deltas)) => Ok(deltas),
            _ => Err(soloist::Error::invalid(
                "deltas",
                "send {\"offset\", \"content\"} or {\"deltas\": [...]}",
            )),
        }
    }
}

/// `POST /v1/sessions/{id}/messages/{message_id}/finish`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishBody {
    /// How the draft ends: `completed`, `incomplete` or `aborted`.
    pub status: MessageStatus,
    /// Tool calls the reply made (a JSON array).
    #[schema(value_type = Option<Vec<Value>>)]
    pub tool_calls: Option<RawJson>,
    /// The model's refusal text.
    pub refusal: Option<String>,
    /// Tokens to add to the session's usage, in the same commit.
    pub usage: Option<Usage>,
}

/// `GET /v1/sessions/{id}/events` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Start after this sequence (-1, the default: from the first message). A
    /// `Last-Event-ID` header takes precedence.
    pub after_seq: Option<i64>,
}

impl crate::body::BodyKind for CreateBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.session_bytes
    }
}

impl crate::body::BodyKind for UpdateBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.session_bytes
    }
}

impl crate::body::BodyKind for AppendBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.append_bytes
    }
}

impl crate::body::BodyKind for DeltasBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.append_bytes
    }
}

impl crate::body::BodyKind for FinishBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.append_bytes
    }
}

impl crate::body::BodyKind for UsageDeltaBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.small_bytes
    }
}
