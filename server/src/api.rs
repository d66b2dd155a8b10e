//! Request and response bodies of the JSON API. Field names are the wire names.
#![allow(missing_docs)]

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use soloist::{
    Message, NewMessage, RawJson, SessionCursor, SessionId, SessionInfo, SessionList, SessionPage,
    Usage,
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
}

/// A session without its messages.
#[derive(Debug, Serialize)]
pub struct CreatedBody {
    pub session_id: SessionId,
    pub title: Option<String>,
    pub metadata: RawJson,
    pub usage: UsageBody,
    pub message_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<SessionInfo> for CreatedBody {
    fn from(info: SessionInfo) -> Self {
        Self {
            session_id: info.id,
            title: info.title,
            metadata: info.metadata,
            usage: info.usage.into(),
            message_count: info.message_count,
            created_at: info.created_at,
            updated_at: info.updated_at,
        }
    }
}

/// `POST /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    pub messages: Vec<NewMessage>,
}

/// The answer to an append, sent after the durable commit.
#[derive(Debug, Serialize)]
pub struct AppendedBody {
    pub sequences: Vec<i64>,
}

/// `GET /v1/sessions/{id}` query.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub after_seq: Option<i64>,
    pub limit: Option<usize>,
    /// Check the stored version first (see writes made through other server processes).
    pub fresh: Option<bool>,
}

/// `GET /v1/sessions/{id}`.
#[derive(Debug, Serialize)]
pub struct SessionBody {
    pub session_id: SessionId,
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: RawJson,
    pub usage: UsageBody,
    pub message_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Serialized as stored: [`Message`] is the wire shape.
    pub messages: Vec<Arc<Message>>,
    /// Pass as `after_seq` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<i64>,
}

impl From<SessionPage> for SessionBody {
    fn from(page: SessionPage) -> Self {
        let info = page.session;
        Self {
            session_id: info.id,
            user_id: info.user_id,
            title: info.title,
            metadata: info.metadata,
            usage: info.usage.into(),
            message_count: info.message_count,
            created_at: info.created_at,
            updated_at: info.updated_at,
            messages: page.messages,
            next_after_seq: page.next_after_seq,
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
    pub sessions: Vec<CreatedBody>,
    /// Pass as `before` for the next page; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

impl From<SessionList> for SessionListBody {
    fn from(list: SessionList) -> Self {
        Self {
            sessions: list.sessions.into_iter().map(CreatedBody::from).collect(),
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
}

/// `POST /v1/sessions/{id}/usage`: tokens to add.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageDeltaBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Token usage totals.
#[derive(Debug, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

impl From<Usage> for UsageBody {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }
    }
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

impl crate::body::BodyKind for UsageDeltaBody {
    fn limit(limits: &crate::BodyLimits) -> usize {
        limits.small_bytes
    }
}
