//! The rows the store reads and writes, each mapped in one place: a written row lists its
//! table's columns once (the SQL of every dialect is rendered from that list) next to the values
//! it binds, and a read row is a record decoded by column name and checked into the engine's
//! own types.

use std::sync::Arc;

use uuid::Uuid;

use super::{KeyRow, NewSessionRow, SessionWrite};
use crate::error::StorageError;
use crate::idempotency::KeyRecord;
use crate::model::{
    Content, Message, MessageStatus, RawJson, Role, SessionInfo, Usage, from_micros,
};

/// The SQL type of a written column: PostgreSQL types the arrays it unnests by it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SqlType {
    /// A UUID (a BLOB on SQLite).
    Uuid,
    /// A 64-bit integer.
    Int,
    /// A boolean (an integer on SQLite).
    Bool,
    /// Text, or NULL.
    Text,
    /// Bytes, or NULL.
    Bytes,
}

/// One value of a written row, of its column's [`SqlType`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// Of a [`SqlType::Uuid`] column.
    Uuid(Uuid),
    /// Of a [`SqlType::Int`] column.
    Int(i64),
    /// Of a [`SqlType::Bool`] column.
    Bool(bool),
    /// Of a [`SqlType::Text`] column.
    Text(Option<&'a str>),
    /// Of a [`SqlType::Bytes`] column.
    Bytes(Option<&'a [u8]>),
}

/// A row a flush writes (or an item of a list it binds): the columns, and the values in the
/// same order.
pub(crate) trait WriteRow {
    /// `(name, type)` of each column.
    const COLUMNS: &'static [(&'static str, SqlType)];

    /// The values, one per column of [`Self::COLUMNS`].
    fn values(&self) -> impl IntoIterator<Item = Value<'_>>;
}

/// The names of `columns`, comma-separated, for a column list.
pub(crate) fn names(columns: &[(&str, SqlType)]) -> String {
    let names: Vec<&str> = columns.iter().map(|&(name, _)| name).collect();
    names.join(", ")
}

/// An id (of a session or a message) as the item of a list (`IN (...)`, `= ANY(...)`).
impl WriteRow for Uuid {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[("id", SqlType::Uuid)];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        [Value::Uuid(*self)]
    }
}

/// An idempotency key as the item of a list.
impl WriteRow for String {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[("key", SqlType::Text)];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        [Value::Text(Some(self.as_str()))]
    }
}

/// A message row to insert.
pub(crate) struct MessageRow<'a> {
    /// The message's session.
    pub session_id: Uuid,
    /// The message, as the session actor staged (and cached) it.
    pub message: &'a Message,
    /// The message's `created_at` (microseconds): the commit time of the write that staged
    /// it, or the time an import gives.
    pub created_at: i64,
}

impl<'a> MessageRow<'a> {
    /// The message rows of `write`.
    pub fn of(write: &'a SessionWrite) -> impl Iterator<Item = MessageRow<'a>> {
        write.rows.iter().map(|message| MessageRow {
            session_id: write.session_id.into(),
            message,
            created_at: message.created_at.timestamp_micros(),
        })
    }
}

/// The columns of `messages`. Past `session_id` they are what [`MessageRecord`] reads back.
impl WriteRow for MessageRow<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("session_id", SqlType::Uuid),
        ("seq", SqlType::Int),
        ("message_id", SqlType::Uuid),
        ("role", SqlType::Text),
        ("content", SqlType::Bytes),
        ("name", SqlType::Text),
        ("tool_calls", SqlType::Text),
        ("tool_call_id", SqlType::Text),
        ("function_call", SqlType::Text),
        ("refusal", SqlType::Text),
        ("content_parts", SqlType::Text),
        ("metadata", SqlType::Text),
        ("status", SqlType::Text),
        ("created_at", SqlType::Int),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        let message = self.message;
        // A text goes in `content`, parts in `content_parts`.
        let (text, parts) = match &message.content {
            Some(Content::Text(text)) => (Some(text.as_bytes()), None),
            Some(Content::Parts(parts)) => (None, Some(parts.get())),
            None => (None, None),
        };
        [
            Value::Uuid(self.session_id),
            Value::Int(message.seq),
            Value::Uuid(message.id),
            Value::Text(Some(message.role.as_str())),
            // BYTEA on PostgreSQL, so that any UTF-8 text (NUL included) round-trips.
            Value::Bytes(text),
            Value::Text(message.name.as_deref()),
            Value::Text(message.tool_calls.as_ref().map(RawJson::get)),
            Value::Text(message.tool_call_id.as_deref()),
            Value::Text(message.function_call.as_ref().map(RawJson::get)),
            Value::Text(message.refusal.as_deref()),
            Value::Text(parts),
            Value::Text(message.metadata.as_ref().map(RawJson::get)),
            Value::Text(Some(message.status.as_str())),
            Value::Int(self.created_at),
        ]
    }
}

/// The columns a message is read from.
pub(crate) fn message_columns() -> String {
    names(&MessageRow::COLUMNS[1..])
}

/// A message row as stored (the columns of [`message_columns`]).
#[derive(sqlx::FromRow)]
pub(crate) struct MessageRecord {
    seq: i64,
    message_id: Uuid,
    role: String,
    content: Option<Vec<u8>>,
    name: Option<String>,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
    function_call: Option<String>,
    refusal: Option<String>,
    content_parts: Option<String>,
    metadata: Option<String>,
    status: String,
    created_at: i64,
}

/// A stored value the engine cannot read back.
fn corrupt(what: &str, error: impl std::fmt::Display) -> StorageError {
    StorageError::msg(format!("stored {what} is unreadable: {error}"))
}

/// Checks stored JSON text.
fn parse_json(what: &str, text: Option<String>) -> Result<Option<RawJson>, StorageError> {
    text.map(|text| RawJson::from_stored(text).ok_or_else(|| corrupt(what, "not JSON")))
        .transpose()
}

impl TryFrom<MessageRecord> for Message {
    type Error = StorageError;

    fn try_from(record: MessageRecord) -> Result<Self, StorageError> {
        Ok(Message {
            seq: record.seq,
            id: record.message_id,
            role: record
                .role
                .parse::<Role>()
                .map_err(|error| corrupt("role", error))?,
            content: match parse_json("content_parts", record.content_parts)? {
                Some(parts) => Some(Content::Parts(parts)),
                None => record
                    .content
                    .map(String::from_utf8)
                    .transpose()
                    .map_err(|error| corrupt("content", error))?
                    .map(Content::Text),
            },
            name: record.name,
            tool_calls: parse_json("tool_calls", record.tool_calls)?,
            tool_call_id: record.tool_call_id,
            function_call: parse_json("function_call", record.function_call)?,
            refusal: record.refusal,
            metadata: parse_json("metadata", record.metadata)?,
            status: record
                .status
                .parse::<MessageStatus>()
                .map_err(|error| corrupt("status", error))?,
            created_at: from_micros(record.created_at),
        })
    }
}

/// Checks stored messages into the engine's type.
pub(crate) fn into_messages(records: Vec<MessageRecord>) -> Result<Vec<Message>, StorageError> {
    records.into_iter().map(Message::try_from).collect()
}

/// Text appended to a draft by one flush: the deltas the batch accepted for it, together.
#[derive(Clone, Debug)]
pub(crate) struct ChunkRow {
    /// The draft's sequence.
    pub seq: i64,
    /// Bytes of the draft's content before this chunk.
    pub offset: i64,
    /// The text.
    pub content: String,
}

/// A chunk row of one session's write, to insert.
pub(crate) struct ChunkInsert<'a> {
    pub session_id: Uuid,
    pub chunk: &'a ChunkRow,
}

impl<'a> ChunkInsert<'a> {
    /// The chunk rows of `write`.
    pub fn of(write: &'a SessionWrite) -> impl Iterator<Item = ChunkInsert<'a>> {
        write.chunks.iter().map(|chunk| ChunkInsert {
            session_id: write.session_id.into(),
            chunk,
        })
    }
}

impl WriteRow for ChunkInsert<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("session_id", SqlType::Uuid),
        ("seq", SqlType::Int),
        ("byte_offset", SqlType::Int),
        ("content", SqlType::Bytes),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        [
            Value::Uuid(self.session_id),
            Value::Int(self.chunk.seq),
            Value::Int(self.chunk.offset),
            Value::Bytes(Some(self.chunk.content.as_bytes())),
        ]
    }
}

/// A draft a flush finishes: its status, its whole content (the chunks compacted into the
/// message row, and deleted), and what the finish adds.
#[derive(Clone, Debug)]
pub(crate) struct FinishRow {
    /// The draft's sequence.
    pub seq: i64,
    /// Its message, as finished.
    pub message: Arc<Message>,
}

/// A finish of one session's write, to apply.
pub(crate) struct FinishUpdate<'a> {
    pub session_id: Uuid,
    pub finish: &'a FinishRow,
}

impl<'a> FinishUpdate<'a> {
    /// The finishes of `write`.
    pub fn of(write: &'a SessionWrite) -> impl Iterator<Item = FinishUpdate<'a>> {
        write.finishes.iter().map(|finish| FinishUpdate {
            session_id: write.session_id.into(),
            finish,
        })
    }
}

impl WriteRow for FinishUpdate<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("session_id", SqlType::Uuid),
        ("seq", SqlType::Int),
        ("status", SqlType::Text),
        ("content", SqlType::Bytes),
        ("tool_calls", SqlType::Text),
        ("refusal", SqlType::Text),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        let message = &self.finish.message;
        [
            Value::Uuid(self.session_id),
            Value::Int(self.finish.seq),
            Value::Text(Some(message.status.as_str())),
            Value::Bytes(message.text().map(str::as_bytes)),
            Value::Text(message.tool_calls.as_ref().map(RawJson::get)),
            Value::Text(message.refusal.as_deref()),
        ]
    }
}

/// A stored message's tool calls (the columns of `older_tool_messages`).
#[derive(sqlx::FromRow)]
pub(crate) struct ToolMessageRecord {
    seq: i64,
    role: String,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
}

impl TryFrom<ToolMessageRecord> for super::ToolMessage {
    type Error = StorageError;

    fn try_from(record: ToolMessageRecord) -> Result<Self, StorageError> {
        Ok(super::ToolMessage {
            seq: record.seq,
            role: record
                .role
                .parse::<Role>()
                .map_err(|error| corrupt("role", error))?,
            tool_calls: parse_json("tool_calls", record.tool_calls)?,
            tool_call_id: record.tool_call_id,
        })
    }
}

/// A stored chunk of a draft.
#[derive(sqlx::FromRow)]
pub(crate) struct ChunkRecord {
    pub seq: i64,
    pub byte_offset: i64,
    pub content: Vec<u8>,
}

/// Adds the stored chunks of `messages`' drafts to their content, in order; a chunk that does
/// not start where the content ends is corrupt.
pub(crate) fn with_chunks(
    messages: &mut [Message],
    chunks: Vec<ChunkRecord>,
) -> Result<(), StorageError> {
    for chunk in chunks {
        let Some(message) = messages.iter_mut().find(|message| {
            message.seq == chunk.seq && message.status == MessageStatus::InProgress
        }) else {
            continue;
        };
        let text = String::from_utf8(chunk.content).map_err(|error| corrupt("chunk", error))?;
        let content = message
            .content
            .get_or_insert_with(|| Content::Text(String::new()));
        let Content::Text(content) = content else {
            return Err(corrupt("chunk", "a draft with parts"));
        };
        if usize::try_from(chunk.byte_offset).ok() != Some(content.len()) {
            return Err(corrupt("chunk", "a gap in a draft's chunks"));
        }
        content.push_str(&text);
    }
    Ok(())
}

/// The row of a session a flush creates.
pub(crate) struct NewSession<'a>(&'a SessionWrite, &'a NewSessionRow);

impl<'a> NewSession<'a> {
    /// The row `write` creates, if it creates its session.
    pub fn of(write: &'a SessionWrite) -> Option<Self> {
        write
            .create
            .as_ref()
            .map(|create| NewSession(write, create))
    }
}

impl WriteRow for NewSession<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("id", SqlType::Uuid),
        ("user_id", SqlType::Text),
        ("title", SqlType::Text),
        ("metadata", SqlType::Text),
        ("created_at", SqlType::Int),
        ("updated_at", SqlType::Int),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        let NewSession(write, create) = self;
        [
            Value::Uuid(write.session_id.into()),
            Value::Text(Some(create.user_id.as_str())),
            Value::Text(create.title.as_deref()),
            Value::Text(Some(create.metadata.as_str())),
            Value::Int(write.now),
            Value::Int(write.now),
        ]
    }
}

/// What one write changes in its session's row (the `u` of the statements that update
/// sessions), with what it expects to find there.
pub(crate) struct SessionChange<'a>(pub &'a SessionWrite);

impl WriteRow for SessionChange<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("id", SqlType::Uuid),
        ("expected", SqlType::Int),
        ("epoch", SqlType::Int),
        ("at", SqlType::Int),
        ("title", SqlType::Text),
        ("metadata", SqlType::Text),
        ("prompt", SqlType::Int),
        ("completion", SqlType::Int),
        ("added", SqlType::Int),
        ("del", SqlType::Bool),
        ("erase", SqlType::Bool),
        ("ttl", SqlType::Int),
        ("claim", SqlType::Int),
        ("steps", SqlType::Int),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        let write = self.0;
        [
            Value::Uuid(write.session_id.into()),
            Value::Int(write.expected_version),
            Value::Int(write.epoch),
            Value::Int(write.now),
            Value::Text(write.title.as_deref()),
            Value::Text(write.metadata.as_deref()),
            Value::Int(write.usage.prompt_tokens),
            Value::Int(write.usage.completion_tokens),
            Value::Int(write.rows.len() as i64),
            Value::Bool(write.delete),
            Value::Bool(write.erase),
            // -1: unchanged, 0: no expiry, else seconds (see `session_update`).
            Value::Int(match write.ttl {
                None => -1,
                Some(ttl) => ttl.unwrap_or(0),
            }),
            // A number, so that both dialects add it to the epoch as it is.
            Value::Int(i64::from(write.claim)),
            Value::Int(write.steps),
        ]
    }
}

/// Which idempotency records of a session are expired: those created before `cutoff`.
pub(crate) struct ExpiredKeys<'a>(pub &'a SessionWrite);

impl WriteRow for ExpiredKeys<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] =
        &[("session_id", SqlType::Uuid), ("cutoff", SqlType::Int)];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        [
            Value::Uuid(self.0.session_id.into()),
            Value::Int(self.0.keys_expire_before),
        ]
    }
}

/// An idempotency record to insert.
pub(crate) struct KeyInsert<'a> {
    /// The write that stores the record.
    pub write: &'a SessionWrite,
    /// The record.
    pub key: &'a KeyRow,
}

/// The columns of `idempotency_keys`. Past `session_id` they are what [`KeyRecordRow`] reads
/// back.
impl WriteRow for KeyInsert<'_> {
    const COLUMNS: &'static [(&'static str, SqlType)] = &[
        ("session_id", SqlType::Uuid),
        ("key", SqlType::Text),
        ("user_id", SqlType::Text),
        ("fingerprint", SqlType::Bytes),
        ("response", SqlType::Text),
        ("created_at", SqlType::Int),
    ];

    fn values(&self) -> impl IntoIterator<Item = Value<'_>> {
        [
            Value::Uuid(self.write.session_id.into()),
            Value::Text(Some(self.key.key.as_str())),
            Value::Text(Some(self.key.user_id.as_str())),
            Value::Bytes(Some(self.key.fingerprint.as_slice())),
            Value::Text(Some(self.key.response.as_str())),
            Value::Int(self.write.now),
        ]
    }
}

/// The columns an idempotency record is read from.
pub(crate) fn key_columns() -> String {
    names(&KeyInsert::COLUMNS[1..])
}

/// An idempotency record as stored (the columns of [`key_columns`]).
#[derive(sqlx::FromRow)]
pub(crate) struct KeyRecordRow {
    key: String,
    user_id: String,
    fingerprint: Vec<u8>,
    response: String,
    created_at: i64,
}

impl KeyRecordRow {
    /// The record, by its key.
    pub fn into_record(self) -> (String, KeyRecord) {
        let record = KeyRecord {
            user_id: self.user_id,
            fingerprint: self.fingerprint,
            response: self.response,
            created_at: self.created_at,
        };
        (self.key, record)
    }
}

/// The columns [`SessionRecord`] reads.
/// The token counters are read through a cast: a counter that a release before the bounds
/// on usage let SQLite turn into a REAL reads as the largest integer (and an erase resets it)
/// instead of failing every read of the session and of its owner's list.
pub(crate) const SESSION_COLUMNS: &str = "id, user_id, title, metadata, \
     CAST(prompt_tokens AS BIGINT) AS prompt_tokens, \
     CAST(completion_tokens AS BIGINT) AS completion_tokens, message_count, version, created_at, updated_at, \
     (deleted_at IS NOT NULL) AS deleted, epoch, ttl_seconds, expires_at";

/// A session row as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRecord {
    id: Uuid,
    user_id: String,
    title: Option<String>,
    metadata: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    message_count: i64,
    version: i64,
    created_at: i64,
    updated_at: i64,
    deleted: bool,
    epoch: i64,
    ttl_seconds: Option<i64>,
    expires_at: Option<i64>,
}

impl SessionRecord {
    /// The session's info, whether it is deleted, and its ownership epoch.
    pub fn into_info(self) -> Result<(SessionInfo, bool, i64), StorageError> {
        let metadata =
            RawJson::from_stored(self.metadata).ok_or_else(|| corrupt("metadata", "not JSON"))?;
        Ok((
            SessionInfo {
                id: self.id.into(),
                user_id: self.user_id,
                title: self.title,
                metadata,
                usage: Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                },
                message_count: self.message_count,
                version: self.version,
                created_at: from_micros(self.created_at),
                updated_at: from_micros(self.updated_at),
                ttl_seconds: self.ttl_seconds,
                expires_at: self.expires_at.map(from_micros),
            },
            self.deleted,
            self.epoch,
        ))
    }
}

/// Bytes of message payload (content, texts, JSON) `messages` carry.
pub(crate) fn payload_bytes<'a>(messages: impl IntoIterator<Item = &'a Arc<Message>>) -> usize {
    messages
        .into_iter()
        .map(|message| message.payload_bytes())
        .sum()
}
