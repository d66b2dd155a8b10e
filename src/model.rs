//! The chat data model: OpenAI-compatible messages and session metadata.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::error::Error;

/// Identifies a session: a UUID (a UUIDv7 when the engine chooses it), in a type of its own so
/// that a session id and a message id cannot be swapped in a call. Not a secret: every command
/// is checked against the session's owner. As JSON and in the database, the plain UUID.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct SessionId(Uuid);

impl SessionId {
    /// A new session id (UUIDv7: time-ordered, 74 random bits).
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The session id that is this UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl From<Uuid> for SessionId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl From<SessionId> for Uuid {
    fn from(id: SessionId) -> Self {
        id.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SessionId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, uuid::Error> {
        text.parse().map(Self)
    }
}

/// A JSON value kept as the exact text it was sent as: numbers keep every digit, keys keep their
/// order (and duplicates), and nothing is ever parsed into a tree. Parsing into
/// [`serde_json::Value`] costs tens of bytes per element (a 50 MB array of zeros took 1.7 GiB),
/// so metadata and tool calls travel as text from the request body to the database and back; they
/// are validated (well-formed, nesting at most 128 deep) while being read, without allocating.
///
/// Serializes as the JSON it holds, not as a string. Cheap to clone.
#[derive(Clone)]
pub struct RawJson(Arc<RawValue>);

impl RawJson {
    /// Checks that `text` is one well-formed JSON value (surrounding whitespace is dropped).
    pub fn parse(text: impl Into<String>) -> Result<Self, Error> {
        RawValue::from_string(text.into())
            .map(|raw| RawJson(Arc::from(raw)))
            .map_err(|error| Error::invalid("json", error.to_string()))
    }

    /// Serializes a value.
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serializes; `null` is only the type's answer to the impossible.
        let raw =
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned());
        RawJson(Arc::from(raw))
    }

    /// `{}`.
    pub fn empty_object() -> Self {
        Self::from_value(&Value::Object(serde_json::Map::new()))
    }

    /// The JSON text, exactly as received.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parses the text into a [`Value`] (numbers beyond `f64` lose precision, duplicate keys
    /// keep the last).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }

    /// Whether the value is a JSON object.
    pub fn is_object(&self) -> bool {
        self.get().starts_with('{')
    }

    /// Whether the value is a JSON array.
    pub fn is_array(&self) -> bool {
        self.get().starts_with('[')
    }

    /// The deepest nesting of arrays and objects. Parsing the text into a [`Value`] recurses
    /// once per level, so a reader with a recursion limit (serde_json's is 128) cannot read a
    /// value nested deeper than its limit; [`Limits::max_json_depth`](crate::Limits) keeps
    /// stored values well under it.
    pub fn depth(&self) -> usize {
        let (mut depth, mut deepest) = (0usize, 0usize);
        let (mut in_string, mut escaped) = (false, false);
        for byte in self.get().bytes() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    /// Builds from text that is known to be valid JSON (the engine's own stored text); `None`
    /// if it is not.
    pub(crate) fn from_stored(text: String) -> Option<Self> {
        RawValue::from_string(text)
            .ok()
            .map(|raw| RawJson(Arc::from(raw)))
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// Equal when the texts are equal: `{"a":1}` and `{"a": 1}` differ, as stored.
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawJson {}

/// Compares the parsed value, for tests and callers that built a [`Value`].
impl PartialEq<Value> for RawJson {
    fn eq(&self, other: &Value) -> bool {
        &self.to_value() == other
    }
}

impl From<Value> for RawJson {
    fn from(value: Value) -> Self {
        RawJson::from_value(&value)
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|raw| RawJson(Arc::from(raw)))
    }
}

/// The author of a chat message, as in the OpenAI chat format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The human end user.
    #[default]
    User,
    /// The model.
    Assistant,
    /// The result of a tool call; carries `tool_call_id`.
    Tool,
    /// The result of a legacy function call; carries `name`.
    Function,
}

impl Role {
    /// The role's wire name (`"user"`, ...), as stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => Role::Function,
            other => {
                return Err(Error::invalid(
                    "role",
                    format!(
                        "unknown role {other:?}; expected system, user, assistant, tool or function"
                    ),
                ));
            }
        })
    }
}

/// Declares the fields a client chooses for a message once, for [`NewMessage`] (what is sent),
/// [`Message`] (what is stored: the same, plus `seq`, `id` and `created_at`) and
/// [`ImportedMessage`] (a stored message read back by an import), with the one comparison and
/// the conversions between them. (`#[serde(flatten)]` would say the same
/// without a macro, but a flattened struct is buffered by serde, which cannot hold the raw JSON
/// fields, and it cannot deny unknown fields.) Every field but `role` is optional.
///
/// Each field names, after `as`, the schema its JSON has in the OpenAPI description (feature
/// `openapi`): optional in both types, `null` accepted in a [`NewMessage`], never sent as `null`
/// in a [`Message`] (an absent value is left out).
macro_rules! message_types {
    ($($(#[doc = $doc:literal])* $field:ident: $type:ty as [$($schema:tt)+],)*) => {
        /// A message to append. `id` is the idempotency key: sending the same id again returns
        /// the sequence the message got the first time instead of storing it twice.
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(deny_unknown_fields)]
        pub struct NewMessage {
            /// Client-supplied message id (idempotency key); generated (UUIDv7) when absent.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub id: Option<Uuid>,
            /// Who wrote the message.
            pub role: Role,
            $(
                $(#[doc = $doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                #[cfg_attr(feature = "openapi", schema(value_type = Option<$($schema)+>))]
                pub $field: Option<$type>,
            )*
            /// `in_progress` starts a draft: an assistant reply that takes its sequence now and
            /// grows by deltas until it is finished. Default `completed`.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<MessageStatus>,
        }

        /// A stored message: what was appended, plus its place in the session.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub struct Message {
            /// Position in the session: 0, 1, 2, ... without gaps.
            pub seq: i64,
            /// The message id (idempotency key).
            pub id: Uuid,
            /// Who wrote the message.
            pub role: Role,
            $(
                $(#[doc = $doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                #[cfg_attr(feature = "openapi", schema(value_type = $($schema)+))]
                pub $field: Option<$type>,
            )*
            /// Where the message stands: `completed`, or a draft `in_progress` (its content so
            /// far), or a draft that ended `incomplete` or `aborted`.
            #[serde(default)]
            #[cfg_attr(feature = "openapi", schema(required = true))]
            pub status: MessageStatus,
            /// When the message was stored.
            pub created_at: DateTime<Utc>,
        }

        impl Message {
            /// The content's text, if it is a text.
            pub fn text(&self) -> Option<&str> {
                self.content.as_ref().and_then(Content::as_text)
            }

            /// Whether `message` is this one sent again: every field the client chose is the
            /// same (the id aside, which the caller matched already).
            pub fn is_resend_of(&self, message: &NewMessage) -> bool {
                if message.status == Some(MessageStatus::InProgress) {
                    // A draft's start sent again: the draft may have grown, or ended, since.
                    return self.role == message.role
                        && self.name == message.name
                        && self.metadata == message.metadata
                        && match (self.text(), message.text()) {
                            (Some(stored), Some(sent)) => stored.starts_with(sent),
                            (_, None) => true,
                            (None, Some(_)) => false,
                        };
                }
                self.status == message.status.unwrap_or_default()
                    && self.role == message.role $(&& self.$field == message.$field)*
            }

            /// `message` as stored at `seq` under `id`.
            pub(crate) fn stored(
                seq: i64,
                id: Uuid,
                message: &NewMessage,
                created_at: DateTime<Utc>,
            ) -> Self {
                Self {
                    seq,
                    id,
                    role: message.role,
                    $($field: message.$field.clone(),)*
                    status: message.status.unwrap_or_default(),
                    created_at,
                }
            }
        }

        /// A message of an import: a stored message as an export writes it (a [`Message`]'s
        /// fields; `seq` and `created_at` may be left out), read back in. Unknown fields are
        /// refused, as in an append. `id` is required: an import is idempotent by its ids.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ImportedMessage {
            /// The message's position in the file, 0, 1, 2...: checked when present.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub seq: Option<i64>,
            /// The message id, kept.
            pub id: Uuid,
            /// Who wrote the message.
            pub role: Role,
            $(
                $(#[doc = $doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$type>,
            )*
            /// `completed` (the default), a draft `in_progress` (imported `incomplete`: nobody
            /// streams into an imported session), or a draft that ended `incomplete` or
            /// `aborted`.
            #[serde(default)]
            pub status: MessageStatus,
            /// When the message was first stored, kept (to the microsecond); the import's time
            /// when absent.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub created_at: Option<DateTime<Utc>>,
        }

        impl ImportedMessage {
            /// The message as an append would send it (its id, fields and status).
            pub(crate) fn to_new(&self) -> NewMessage {
                NewMessage {
                    id: Some(self.id),
                    role: self.role,
                    $($field: self.$field.clone(),)*
                    status: Some(self.status),
                }
            }

            /// The message as stored at `seq`, created at `created_at` unless it says when.
            pub(crate) fn stored(&self, seq: i64, created_at: DateTime<Utc>) -> Message {
                Message {
                    seq,
                    id: self.id,
                    role: self.role,
                    $($field: self.$field.clone(),)*
                    status: self.status,
                    created_at: self.created_at.unwrap_or(created_at),
                }
            }
        }

        /// A stored message as an import takes it back.
        impl From<Message> for ImportedMessage {
            fn from(message: Message) -> Self {
                Self {
                    seq: Some(message.seq),
                    id: message.id,
                    role: message.role,
                    $($field: message.$field,)*
                    status: message.status,
                    created_at: Some(message.created_at),
                }
            }
        }
    };
}

message_types! {
    /// The text, or typed parts. May be absent for an assistant message that only calls
    /// tools.
    content: Content as [Content],
    /// Participant or function name.
    name: String as [String],
    /// Tool calls made by an assistant message (a JSON array).
    tool_calls: RawJson as [Vec<Value>],
    /// The tool call a `tool` message answers.
    tool_call_id: String as [String],
    /// A legacy function call made by an assistant message (a JSON object).
    function_call: RawJson as [Object],
    /// The model's refusal text.
    refusal: String as [String],
    /// The client's own data about the message (a JSON object), stored and returned as sent.
    metadata: RawJson as [Object],
}

/// Where a message stands. Every message is `completed` but a draft: an assistant reply
/// appended `in_progress`, which grows by deltas until it is finished `completed`,
/// `incomplete` (cut short: the stream broke, or nobody finished it in time) or `aborted`
/// (stopped on purpose).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MessageStatus {
    /// Whole.
    #[default]
    Completed,
    /// A draft still streaming.
    InProgress,
    /// A draft cut short.
    Incomplete,
    /// A draft stopped on purpose.
    Aborted,
}

impl MessageStatus {
    /// The status's wire name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Completed => "completed",
            MessageStatus::InProgress => "in_progress",
            MessageStatus::Incomplete => "incomplete",
            MessageStatus::Aborted => "aborted",
        }
    }
}

impl FromStr for MessageStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "completed" => MessageStatus::Completed,
            "in_progress" => MessageStatus::InProgress,
            "incomplete" => MessageStatus::Incomplete,
            "aborted" => MessageStatus::Aborted,
            other => {
                return Err(Error::invalid(
                    "status",
                    format!(
                        "unknown status {other:?}; expected completed, in_progress, incomplete \
                         or aborted"
                    ),
                ));
            }
        })
    }
}

/// A message's content, as the OpenAI chat format has it: a text, or an array of typed parts
/// (`text`, `image_url`, `input_audio`, `file`, `refusal`), which is kept as the exact JSON text
/// it was sent as. As JSON, the string or the array itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A text.
    Text(String),
    /// An array of parts, as sent.
    Parts(RawJson),
}

impl Content {
    /// The text, if the content is a text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Content::Text(text) => Some(text),
            Content::Parts(_) => None,
        }
    }

    /// Bytes of the text, or of the parts' JSON.
    pub fn len(&self) -> usize {
        match self {
            Content::Text(text) => text.len(),
            Content::Parts(parts) => parts.get().len(),
        }
    }

    /// Whether the text (or the parts' JSON) is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<String> for Content {
    fn from(text: String) -> Self {
        Content::Text(text)
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Self {
        Content::Text(text.to_owned())
    }
}

impl PartialEq<str> for Content {
    fn eq(&self, other: &str) -> bool {
        self.as_text() == Some(other)
    }
}

impl PartialEq<&str> for Content {
    fn eq(&self, other: &&str) -> bool {
        self.as_text() == Some(*other)
    }
}

impl Serialize for Content {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Content::Text(text) => serializer.serialize_str(text),
            Content::Parts(parts) => parts.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let raw = RawJson::deserialize(deserializer)?;
        if raw.is_array() {
            return Ok(Content::Parts(raw));
        }
        // A string without escapes is its text between the quotes: no second parse.
        let text = raw.get();
        if let Some(inner) = text
            .strip_prefix('"')
            .and_then(|text| text.strip_suffix('"'))
        {
            if !inner.contains('\\') {
                return Ok(Content::Text(inner.to_owned()));
            }
        }
        serde_json::from_str::<String>(text)
            .map(Content::Text)
            .map_err(|_| D::Error::custom("content must be a string or an array of parts"))
    }
}

impl NewMessage {
    /// A message with `role` and text `content`, and nothing else.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Content::Text(content.into())),
            ..Self::default()
        }
    }

    /// The content's text, if it is a text.
    pub fn text(&self) -> Option<&str> {
        self.content.as_ref().and_then(Content::as_text)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// Sets the idempotency key.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }
}

impl Message {
    /// Bytes of payload (content, texts, JSON) the message carries.
    pub(crate) fn payload_bytes(&self) -> usize {
        let text = |text: &Option<String>| text.as_ref().map_or(0, String::len);
        let json = |json: &Option<RawJson>| json.as_ref().map_or(0, |json| json.get().len());
        self.content.as_ref().map_or(0, Content::len)
            + json(&self.metadata)
            + text(&self.name)
            + json(&self.tool_calls)
            + text(&self.tool_call_id)
            + json(&self.function_call)
            + text(&self.refusal)
    }
}

/// The ids of the tool calls in an assistant message's `tool_calls` (an array of objects
/// with an `"id"`; entries without one cannot be answered, and are left out).
pub(crate) fn tool_call_ids(tool_calls: &RawJson) -> Vec<String> {
    #[derive(Deserialize)]
    struct Call<'a> {
        #[serde(default, borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Vec<Call<'_>>>(tool_calls.get())
        .map(|calls| {
            calls
                .into_iter()
                .filter_map(|call| call.id.map(std::borrow::Cow::into_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A tool call an assistant message of the session made that no `tool` message has answered
/// yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingToolCall {
    /// The call's id, which the answer names as its `tool_call_id`.
    pub id: String,
    /// The sequence of the assistant message that made it.
    pub seq: i64,
}

/// Token usage counters of a session; they only move by deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: i64,
    /// Completion (output) tokens.
    pub completion_tokens: i64,
}

/// A session's metadata: everything but its messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session id.
    pub id: SessionId,
    /// The owner; every command must carry it.
    pub user_id: String,
    /// Optional title.
    pub title: Option<String>,
    /// Free JSON metadata (always an object).
    pub metadata: RawJson,
    /// Token usage totals.
    pub usage: Usage,
    /// Number of messages, which is also the next sequence.
    pub message_count: i64,
    /// Bumped by every committed write; lets a reader tell whether it is current.
    pub version: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Time of the last committed write.
    pub updated_at: DateTime<Utc>,
    /// The session expires this many seconds after its last write (`None`: never); expired,
    /// it is erased by the engine's purge (see [`EngineConfig::purge_interval`]).
    ///
    /// [`EngineConfig::purge_interval`]: crate::EngineConfig::purge_interval
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
    /// When it expires: [`Self::updated_at`] plus [`Self::ttl_seconds`].
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl SessionInfo {
    /// Whether the session has expired (its time to live ran out since its last write): it is
    /// then gone, as a deleted one is, until the purge erases it.
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|expires| expires <= Utc::now())
    }

    /// Records a write committed at `now` (microseconds): the last write, and the expiry it
    /// pushes back.
    pub(crate) fn touched(&mut self, now: i64) {
        self.updated_at = from_micros(now);
        self.expires_at = expiry(now, self.ttl_seconds);
    }
}

/// When a session written at `now` (microseconds) with this time to live expires.
pub(crate) fn expiry(now: i64, ttl_seconds: Option<i64>) -> Option<DateTime<Utc>> {
    ttl_seconds.map(|ttl| from_micros(now.saturating_add(ttl.saturating_mul(1_000_000))))
}

/// A process registered in the database: one of the processes that share it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The process's id: the owner it writes into the sessions it takes over.
    pub id: Uuid,
    /// Where its peers reach it ([`EngineConfig::advertise_url`](crate::EngineConfig::advertise_url)).
    pub address: String,
    /// When it registered.
    pub started_at: DateTime<Utc>,
    /// Its latest heartbeat.
    pub heartbeat_at: DateTime<Utc>,
}

/// Converts stored microseconds since the Unix epoch to a timestamp.
pub(crate) fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// The current time in microseconds since the Unix epoch, the unit timestamps are stored in.
pub(crate) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::{Content, RawJson};

    #[test]
    fn content_reads_texts_with_and_without_escapes_and_parts_as_sent() {
        let read = |json: &str| serde_json::from_str::<Content>(json).expect("content");
        assert_eq!(read(r#""plain text""#), Content::Text("plain text".into()));
        assert_eq!(
            read(r#""say \"hi\"\n""#),
            Content::Text("say \"hi\"\n".into())
        );
        assert_eq!(read(r#""caf\u00e9""#), Content::Text("café".into()));
        assert_eq!(read(r#""""#), Content::Text(String::new()));
        let parts = r#"[{"type":"text", "text":"a"}]"#;
        assert_eq!(
            read(parts),
            Content::Parts(RawJson::parse(parts).expect("json"))
        );
        assert!(serde_json::from_str::<Content>("5").is_err());
    }

    fn depth(text: &str) -> usize {
        RawJson::parse(text).expect("valid JSON").depth()
    }

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert_eq!(depth("1"), 0);
        assert_eq!(depth(r#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(depth(r#"["[[[[", "\"[", "{{"]"#), 1);
        assert_eq!(depth(r#"["\\", [1]]"#), 2);
        assert_eq!(
            depth(&format!("{}{}", "[".repeat(500), "]".repeat(500))),
            500
        );
    }

    #[test]
    fn text_is_kept_as_sent() {
        let text = r#"{"big":18446744073709551616,"dup":1,"dup":2,"f":1.50}"#;
        let json = RawJson::parse(format!("  {text} ")).expect("valid JSON");
        assert_eq!(json.get(), text);
        assert!(json.is_object());
        assert!(RawJson::parse("{").is_err());
    }
}
