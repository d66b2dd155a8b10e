//! The message-passing API: commands are plain data (serde-friendly), each answered with a typed
//! [`Reply`] or an [`Error`]. Validation lives here so that a command is refused whole, before it
//! reaches its session or any SQL, if any part of it is invalid.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::model::{Message, NewMessage, RawJson, Role, SessionId, SessionInfo, Usage};

/// Every command the engine understands. As JSON, externally tagged:
/// `{"append_messages": {"user_id": ..., "session_id": ..., "messages": [...]}}` (an internal
/// tag would make serde buffer the command, which cannot hold the raw JSON fields).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Create a session.
    CreateSession(CreateSession),
    /// Append messages to a session.
    AppendMessages(AppendMessages),
    /// Read a session's metadata and a page of its messages.
    GetSession(GetSession),
    /// List a user's sessions, newest first.
    ListSessions(ListSessions),
    /// Change a session's title and/or metadata.
    UpdateSession(UpdateSession),
    /// Add token usage deltas.
    AddUsage(AddUsage),
    /// Delete a session and its messages.
    DeleteSession(DeleteSession),
}

impl Command {
    /// Parses a JSON command; a malformed one (unknown role, missing field...) is an
    /// [`Error::InvalidInput`].
    pub fn from_json(json: &str) -> Result<Command> {
        serde_json::from_str(json).map_err(|error| Error::invalid("command", error.to_string()))
    }
}

/// The answer to a [`Command`], one variant per command; externally tagged like [`Command`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Command::CreateSession`].
    SessionCreated(Created),
    /// Answer to [`Command::AppendMessages`].
    MessagesAppended(Appended),
    /// Answer to [`Command::GetSession`].
    Session(SessionPage),
    /// Answer to [`Command::ListSessions`].
    Sessions(SessionList),
    /// Answer to [`Command::UpdateSession`].
    SessionUpdated(SessionInfo),
    /// Answer to [`Command::AddUsage`]: the new totals.
    UsageAdded(Usage),
    /// Answer to [`Command::DeleteSession`].
    SessionDeleted,
}

/// Create a session. Idempotent on `session_id`: creating an existing session of the same user
/// returns it with `created == false`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateSession {
    /// The caller, who becomes the owner.
    pub user_id: String,
    /// The id to use; when absent, derived from the user and the idempotency key if there is
    /// one, else a new UUIDv7. An id taken by another user is a [`Error::Conflict`], so an
    /// application that lets untrusted users choose ids lets them learn which ids exist:
    /// derive them per user instead (as `soloist-server` does, which accepts no ids).
    #[serde(default)]
    pub session_id: Option<SessionId>,
    /// Optional title.
    #[serde(default)]
    pub title: Option<String>,
    /// Optional JSON object; `{}` when absent.
    #[serde(default)]
    pub metadata: Option<RawJson>,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer to [`CreateSession`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// The session as stored.
    pub session: SessionInfo,
    /// `false` when the session already existed (an idempotent repeat).
    pub created: bool,
}

/// Append 1..N messages; answered after the transaction holding them committed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppendMessages {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// The messages, stored in this order at consecutive sequences (unless some were stored
    /// before under the same ids).
    pub messages: Vec<NewMessage>,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`] and nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
}

/// The answer to [`AppendMessages`]: each message's sequence, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Sequence of each message.
    pub sequences: Vec<i64>,
}

/// Read a session: metadata, usage and the messages after `after_seq`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GetSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Only messages with `seq > after_seq` (all when absent).
    #[serde(default)]
    pub after_seq: Option<i64>,
    /// At most this many messages (default 100, capped by
    /// [`Limits::max_page_size`]); 0 returns metadata only.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Check the session's version in the database first, so that writes made through other
    /// processes are visible.
    #[serde(default)]
    pub fresh: bool,
}

/// The answer to [`GetSession`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionPage {
    /// Metadata and usage.
    pub session: SessionInfo,
    /// Messages in ascending `seq`.
    pub messages: Vec<Arc<Message>>,
    /// Pass as `after_seq` to read the next page; `None` when this page reached the end.
    pub next_after_seq: Option<i64>,
}

/// List a user's sessions, newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListSessions {
    /// Whose sessions.
    pub user_id: String,
    /// Only sessions older than this cursor (a `next_before` of a previous page).
    #[serde(default)]
    pub before: Option<SessionCursor>,
    /// At most this many (default 50, capped by [`Limits::max_page_size`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Position in a session listing: creation time and id of the last session of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCursor {
    /// Creation time in microseconds since the Unix epoch.
    pub created_at_micros: i64,
    /// Tie-breaker between sessions created in the same microsecond.
    pub id: SessionId,
}

/// The answer to [`ListSessions`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    /// Sessions, newest first.
    pub sessions: Vec<SessionInfo>,
    /// Cursor for the next page; `None` at the end.
    pub next_before: Option<SessionCursor>,
}

/// Change a session's title and/or metadata (last writer wins).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// New title, when present.
    #[serde(default)]
    pub title: Option<String>,
    /// New metadata object (replaces the old one), when present.
    #[serde(default)]
    pub metadata: Option<RawJson>,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`] and nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Add token usage; the counters move by these deltas in the database (`x = x + delta`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AddUsage {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Prompt tokens to add.
    pub prompt_tokens: u32,
    /// Completion tokens to add.
    pub completion_tokens: u32,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Delete a session and its messages. Later commands on it answer
/// [`Error::NotFound`], and its id cannot be reused.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeleteSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`] and nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Default page size of [`GetSession`].
pub const DEFAULT_MESSAGE_PAGE: usize = 100;
/// Default page size of [`ListSessions`].
pub const DEFAULT_SESSION_PAGE: usize = 50;

pub(crate) fn check_user(user_id: &str, limits: &Limits) -> Result<()> {
    if user_id.is_empty() {
        return Err(Error::invalid("user_id", "must not be empty"));
    }
    check_len("user_id", user_id.len(), limits.max_text_bytes)?;
    check_no_nul("user_id", user_id)
}

/// Identifiers and short texts are stored as SQL text, which (on PostgreSQL) cannot hold NUL;
/// message content is stored as bytes and may.
fn check_no_nul(field: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

fn check_len(field: impl Into<String>, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(Error::TooLarge {
            field: field.into(),
            size,
            limit,
        });
    }
    Ok(())
}

fn check_text(field: &str, text: &Option<String>, limit: usize) -> Result<()> {
    match text {
        Some(text) => {
            check_len(field, text.len(), limit)?;
            check_no_nul(field, text)
        }
        None => Ok(()),
    }
}

/// Checks a JSON field's shape and size (its text as sent, which is what is stored).
pub(crate) fn check_json(
    field: &str,
    value: &RawJson,
    want_object: bool,
    limits: &Limits,
) -> Result<()> {
    let shape_ok = if want_object {
        value.is_object()
    } else {
        value.is_array()
    };
    if !shape_ok {
        let shape = if want_object { "an object" } else { "an array" };
        return Err(Error::invalid(field, format!("must be a JSON {shape}")));
    }
    check_len(field, value.get().len(), limits.max_json_bytes)?;
    if value.depth() > limits.max_json_depth {
        return Err(Error::invalid(
            field,
            format!("nested deeper than {} levels", limits.max_json_depth),
        ));
    }
    Ok(())
}

/// A message that passed validation.
#[derive(Debug)]
pub(crate) struct ValidMessage {
    pub message: NewMessage,
}

pub(crate) fn validate_messages(
    messages: Vec<NewMessage>,
    limits: &Limits,
) -> Result<Vec<ValidMessage>> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    check_len("messages", messages.len(), limits.max_messages_per_append)?;
    let mut valid = Vec::with_capacity(messages.len());
    let mut ids = std::collections::HashSet::with_capacity(messages.len());
    for (index, message) in messages.into_iter().enumerate() {
        if let Some(id) = message.id {
            if !ids.insert(id) {
                return Err(Error::invalid(
                    format!("messages[{index}].id"),
                    "the same message id appears twice in one append",
                ));
            }
        }
        let field = |name: &str| format!("messages[{index}].{name}");
        // Content is stored as bytes, so any text round-trips, NUL included.
        if let Some(content) = &message.content {
            check_len(field("content"), content.len(), limits.max_content_bytes)?;
        }
        check_text(
            &field("refusal"),
            &message.refusal,
            limits.max_content_bytes,
        )?;
        check_text(&field("name"), &message.name, limits.max_text_bytes)?;
        check_text(
            &field("tool_call_id"),
            &message.tool_call_id,
            limits.max_text_bytes,
        )?;
        if let Some(value) = &message.tool_calls {
            check_json(&field("tool_calls"), value, false, limits)?;
        }
        if let Some(value) = &message.function_call {
            check_json(&field("function_call"), value, true, limits)?;
        }
        if message.role == Role::Tool && message.tool_call_id.is_none() {
            return Err(Error::invalid(
                field("tool_call_id"),
                "a tool message must say which tool call it answers",
            ));
        }
        if message.role != Role::Assistant
            && (message.tool_calls.is_some() || message.function_call.is_some())
        {
            return Err(Error::invalid(
                field("tool_calls"),
                "only assistant messages make tool or function calls",
            ));
        }
        if message.content.is_none()
            && message.tool_calls.is_none()
            && message.function_call.is_none()
            && message.refusal.is_none()
        {
            return Err(Error::invalid(
                field("content"),
                "a message needs content, tool_calls, function_call or refusal",
            ));
        }
        if message.id == Some(Uuid::nil()) {
            return Err(Error::invalid(
                field("id"),
                "the nil UUID is not a message id",
            ));
        }
        valid.push(ValidMessage { message });
    }
    Ok(valid)
}

pub(crate) fn validate_title(title: &Option<String>, limits: &Limits) -> Result<()> {
    check_text("title", title, limits.max_text_bytes)
}

pub(crate) fn validate_page(limit: Option<usize>, default: usize, limits: &Limits) -> usize {
    limit.unwrap_or(default).min(limits.max_page_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands and replies travel as JSON (idempotency records, and between processes): the
    /// raw JSON fields must survive the round trip exactly.
    #[test]
    fn commands_and_replies_round_trip_with_raw_json() {
        let metadata = RawJson::parse(r#"{"n":18446744073709551616,"k":"v"}"#).expect("json");
        let command = Command::CreateSession(CreateSession {
            user_id: "alice".into(),
            metadata: Some(metadata.clone()),
            idempotency_key: Some("k".into()),
            ..CreateSession::default()
        });
        let text = serde_json::to_string(&command).expect("serialize");
        let Command::CreateSession(back) = Command::from_json(&text).expect("parse") else {
            panic!("another command: {text}");
        };
        assert_eq!(back.metadata, Some(metadata.clone()));

        let info = SessionInfo {
            id: Uuid::nil(),
            user_id: "alice".into(),
            title: None,
            metadata: metadata.clone(),
            usage: Usage::default(),
            message_count: 0,
            version: 3,
            created_at: chrono::DateTime::UNIX_EPOCH,
            updated_at: chrono::DateTime::UNIX_EPOCH,
        };
        let reply = Reply::SessionUpdated(info.clone());
        let text = serde_json::to_string(&reply).expect("serialize");
        let Ok(Reply::SessionUpdated(back)) = serde_json::from_str::<Reply>(&text) else {
            panic!("not read back: {text}");
        };
        assert_eq!(back, info);
    }
}
