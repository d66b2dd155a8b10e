//! Request and response bodies of the JSON API. Field names are the wire names.
#![allow(missing_docs)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use soloist::{
    Delta, Message, MessageStatus, NewMessage, OnBusy, PendingToolCall, RawJson, SessionCursor,
    SessionId, SessionInfo, SessionList, SessionPage, Usage,
};

use crate::error::ApiError;

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Refused when present: session ids are the server's to choose (see `create_session`).
    /// Read only to answer with a clear error instead of "unknown field".
    pub id: Option<serde::de::IgnoredAny>,
    pub title: Option<String>,
    pub metadata: Option<RawJson>,
    /// Seconds the session lives after its last write (0: never expires); absent: the
    /// server's `--session-ttl`.
    pub ttl_seconds: Option<i64>,
}

/// A session without its messages, as every route shows it (create, update, list, and with its
/// messages, get). The engine's [`SessionInfo`] names the id `id` and carries the version,
/// which the API sends as the `ETag` header instead.
#[derive(Debug, Serialize)]
pub struct SessionSummary {
    pub session_id: SessionId,
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: RawJson,
    pub usage: Usage,
    pub message_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Seconds the session lives after its last write; `null`: it never expires.
    pub ttl_seconds: Option<i64>,
    /// When it expires unless written again; `null`: never.
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    pub messages: Vec<NewMessage>,
    /// What a draft started here does while another streams.
    #[serde(default)]
    pub on_busy: OnBusy,
}

/// `GET /v1/sessions/{id}` query.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub after_seq: Option<i64>,
    pub limit: Option<usize>,
    /// Check the stored version first (see writes made through other server processes).
    pub fresh: Option<bool>,
}

/// `GET /v1/sessions/{id}`: the session and a page of its messages.
#[derive(Debug, Serialize)]
pub struct SessionPageBody {
    #[serde(flatten)]
    pub session: SessionSummary,
    /// Serialized as stored: [`Message`] is the wire shape.
    pub messages: Vec<Arc<Message>>,
    /// Pass as `after_seq` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
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
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// A `next_before` cursor from the previous page.
    pub before: Option<String>,
}

/// `GET /v1/sessions`.
#[derive(Debug, Serialize)]
pub struct SessionListBody {
    pub sessions: Vec<SessionSummary>,
    /// Pass as `before` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
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
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_input",
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    pub title: Option<String>,
    pub metadata: Option<RawJson>,
    /// A new time to live, from this write (0: never expires).
    pub ttl_seconds: Option<i64>,
}

/// `DELETE /v1/sessions/{id}` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Erase the title, metadata, usage and idempotency records too (the messages go with any
    /// delete); allowed on a session already deleted.
    #[serde(default)]
    pub erase: bool,
}

/// `DELETE /v1/users/me/sessions`.
#[derive(Debug, Serialize)]
pub struct ErasedBody {
    /// Sessions erased by this call (0 when there was nothing left to erase).
    pub erased: u64,
}

/// `POST /v1/sessions/{id}/usage`: tokens to add.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageDeltaBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// `POST /v1/sessions/{id}/messages/{message_id}/deltas`: one delta (`offset` and
/// `content`), or several (`deltas`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltasBody {
    pub offset: Option<u64>,
    pub content: Option<String>,
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishBody {
    pub status: MessageStatus,
    pub tool_calls: Option<RawJson>,
    pub refusal: Option<String>,
    pub usage: Option<Usage>,
}

/// `GET /v1/sessions/{id}/events` query.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
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
