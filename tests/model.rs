//! Model-based property test: random sequences of commands (valid and invalid, by the owner and
//! by an intruder) run against a real engine and against a plain in-memory model written from
//! the documented semantics. Every reply must match the model's: values on success, the error
//! kind on failure.
//!
//! Most cases run on in-memory SQLite (fast); fewer run on an SQLite file and on PostgreSQL,
//! where the sequences may also restart the engine on the same database. Each case picks one of
//! three tunings so that reads cross the boundary between the cached tail and the database,
//! and so that actors passivate and reload between commands.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};
use soloist::uuid::Uuid;
use soloist::{
    AddUsage, AppendMessages, CreateSession, DeleteSession, Engine, EngineConfig, Error,
    GetSession, Limits, ListSessions, Message, NewMessage, RawJson, Role, SessionCursor, SessionId,
    SessionInfo, SessionPage, UpdateSession, Usage,
};
use soloist_testkit::{Backend, TestDb};

type Timestamp = chrono::DateTime<chrono::Utc>;

/// `USERS[0]` owns what it creates; `USERS[1]` is mostly an intruder (but owns what it creates
/// first).
const USERS: [&str; 2] = ["owner", "intruder"];
/// Session ids per case.
const SESSIONS: usize = 3;
/// Client message ids per case, shared by every session so that ids get re-sent to the same
/// session (idempotency) and reused in other sessions (where they are new).
const ID_POOL: usize = 6;
/// The page size a read without a limit asks for (documented default).
const DEFAULT_MESSAGE_PAGE: usize = 100;
/// The page size a listing without a limit asks for (documented default).
const DEFAULT_SESSION_PAGE: usize = 50;

/// `max_content_bytes`: content and refusals.
const CONTENT: usize = 16;
/// `max_text_bytes`: titles, names, tool call ids.
const SHORT: usize = 12;

/// Small limits, so that random input is often over them.
fn limits() -> Limits {
    Limits {
        max_content_bytes: CONTENT,
        max_messages_per_append: 3,
        max_json_bytes: 64,
        max_text_bytes: SHORT,
        max_page_size: 4,
        // Deeper than anything generated: nesting is checked by the unit tests of `RawJson`.
        max_json_depth: 100,
    }
}

/// The engine configurations a case can run with.
#[derive(Clone, Copy, Debug)]
enum Tuning {
    /// Three cached messages per session: longer sessions read older pages from the database,
    /// and re-sent ids outside the tail are caught by the database's unique constraint.
    TinyCache,
    /// Nothing cached; foreign sessions answer `Forbidden` instead of `NotFound`.
    NoCacheForbidden,
    /// Actors passivate after 1 ms idle and at most one is live: nearly every command reloads.
    Churn,
}

fn config_for(db: &TestDb, tuning: Tuning) -> EngineConfig {
    let mut config = EngineConfig {
        limits: limits(),
        ..db.config()
    };
    match tuning {
        Tuning::TinyCache => config.cached_messages = 3,
        Tuning::NoCacheForbidden => {
            config.cached_messages = 0;
            config.hide_foreign_sessions = false;
        }
        Tuning::Churn => {
            config.cached_messages = 2;
            config.idle_timeout = Duration::from_millis(1);
            config.max_live_sessions = Some(1);
        }
    }
    config
}

// ---------------------------------------------------------------------------------------------
// Generated input
// ---------------------------------------------------------------------------------------------

/// A string of `len` characters from one alphabet; the multi-byte alphabets make a short string
/// long in bytes, which is what the limits count.
#[derive(Clone, Debug)]
struct Text {
    len: usize,
    alphabet: u8,
    salt: usize,
}

impl Text {
    fn render(&self) -> String {
        const ASCII: &[char] = &['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k'];
        const TWO_BYTES: &[char] = &['é', 'ß', 'ü', 'ñ', 'ø'];
        const FOUR_BYTES: &[char] = &['🦀', '🎈', '𝄞'];
        let alphabet = match self.alphabet {
            0 => ASCII,
            1 => TWO_BYTES,
            _ => FOUR_BYTES,
        };
        (0..self.len)
            .map(|index| alphabet[(self.salt + index) % alphabet.len()])
            .collect()
    }
}

/// Text of at most `max_bytes` bytes (characters of 1, 2 or 4 bytes).
fn text_within(max_bytes: usize) -> impl Strategy<Value = Text> {
    (
        prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        0usize..64,
    )
        .prop_flat_map(move |(alphabet, salt)| {
            let width = [1, 2, 4][usize::from(alphabet)];
            (0..=max_bytes / width).prop_map(move |len| Text {
                len,
                alphabet,
                salt,
            })
        })
}

/// Text of more than `max_bytes` bytes, though often of fewer characters.
fn text_over(max_bytes: usize) -> impl Strategy<Value = Text> {
    (
        prop_oneof![Just(0u8), Just(1u8), Just(2u8)],
        0usize..64,
        0usize..3,
    )
        .prop_map(move |(alphabet, salt, extra)| {
            let width = [1, 2, 4][usize::from(alphabet)];
            Text {
                len: max_bytes / width + 1 + extra,
                alphabet,
                salt,
            }
        })
}

/// Text that is usually within `max_bytes`, sometimes over it.
fn text_mostly_within(max_bytes: usize) -> impl Strategy<Value = Text> {
    prop_oneof![
        6 => text_within(max_bytes),
        1 => text_over(max_bytes),
    ]
}

/// Session metadata as sent.
#[derive(Clone, Debug)]
enum Meta {
    Absent,
    Object(u8),
    /// An object over `max_json_bytes`.
    Big,
    /// Not an object.
    Array,
    /// Not an object.
    Text,
}

impl Meta {
    fn value(&self) -> Option<Value> {
        match self {
            Meta::Absent => None,
            Meta::Object(n) => Some(json!({"n": n, "tag": "model"})),
            Meta::Big => Some(json!({"blob": "x".repeat(70)})),
            Meta::Array => Some(json!([1, 2])),
            Meta::Text => Some(json!("metadata")),
        }
    }
}

fn meta() -> impl Strategy<Value = Meta> {
    prop_oneof![
        6 => Just(Meta::Absent),
        6 => any::<u8>().prop_map(Meta::Object),
        1 => Just(Meta::Big),
        1 => Just(Meta::Array),
        1 => Just(Meta::Text),
    ]
}

/// Which message id a message carries.
#[derive(Clone, Debug)]
enum IdSpec {
    /// None: the engine generates one.
    Generated,
    /// One of the case's pool of client ids.
    Pool(usize),
    /// The nil UUID, which is refused.
    Nil,
}

/// The shape of a message, valid or not.
#[derive(Clone, Debug)]
enum Body {
    /// A plain text message (system, user or assistant).
    Text(Role, Text),
    /// A tool result answering `call{n}`.
    ToolResult(u8, Text),
    /// Invalid: a tool message without `tool_call_id`.
    ToolWithoutCallId(Text),
    /// An assistant message calling `n` tools (over `max_json_bytes` from 6 calls on).
    ToolCalls(u8),
    /// Invalid: `tool_calls` is an object, not an array.
    ToolCallsNotArray,
    /// Invalid: a user message with `tool_calls`.
    UserWithToolCalls(Text),
    /// A function result; its name may be over `max_text_bytes`.
    FunctionResult(Text),
    /// An assistant message with a legacy function call.
    FunctionCall(u8),
    /// An assistant refusal.
    Refusal(Text),
    /// Invalid: no content, tool calls, function call nor refusal.
    Blank(Role),
}

#[derive(Clone, Debug)]
struct Msg {
    body: Body,
    id: IdSpec,
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        1 => Just(Role::System),
        3 => Just(Role::User),
        3 => Just(Role::Assistant)
    ]
}

fn valid_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        12 => (role(), text_within(CONTENT)).prop_map(|(role, text)| Body::Text(role, text)),
        2 => (0u8..20, text_within(CONTENT)).prop_map(|(call, text)| Body::ToolResult(call, text)),
        2 => (0u8..6).prop_map(Body::ToolCalls),
        1 => text_within(SHORT - 1).prop_map(Body::FunctionResult),
        1 => any::<u8>().prop_map(Body::FunctionCall),
        1 => text_within(CONTENT).prop_map(Body::Refusal),
    ]
}

fn invalid_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (role(), text_over(CONTENT)).prop_map(|(role, text)| Body::Text(role, text)),
        text_within(CONTENT).prop_map(Body::ToolWithoutCallId),
        (6u8..9).prop_map(Body::ToolCalls),
        Just(Body::ToolCallsNotArray),
        text_within(CONTENT).prop_map(Body::UserWithToolCalls),
        text_over(SHORT).prop_map(Body::FunctionResult),
        text_over(CONTENT).prop_map(Body::Refusal),
        role().prop_map(Body::Blank),
    ]
}

/// A client id or none; never the refused nil id.
fn valid_id() -> impl Strategy<Value = IdSpec> {
    prop_oneof![Just(IdSpec::Generated), (0..ID_POOL).prop_map(IdSpec::Pool),]
}

fn valid_msg() -> impl Strategy<Value = Msg> {
    (valid_body(), valid_id()).prop_map(|(body, id)| Msg { body, id })
}

/// A message that is usually valid; else its body or its id is refused.
fn any_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        6 => valid_msg(),
        2 => (invalid_body(), valid_id()).prop_map(|(body, id)| Msg { body, id }),
        1 => valid_body().prop_map(|body| Msg { body, id: IdSpec::Nil }),
    ]
}

/// Messages for one append: mostly 1..=3 valid ones; else up to 4 (over the limit of 3) that
/// may include invalid ones, or none at all.
fn messages() -> impl Strategy<Value = Vec<Msg>> {
    prop_oneof![
        10 => vec(valid_msg(), 1..=3),
        4 => vec(any_msg(), 1..=4),
        1 => Just(Vec::new()),
    ]
}

fn build_message(msg: &Msg, pool: &[Uuid]) -> NewMessage {
    let id = match msg.id {
        IdSpec::Generated => None,
        IdSpec::Pool(index) => Some(pool[index]),
        IdSpec::Nil => Some(Uuid::nil()),
    };
    let base = NewMessage {
        id,
        ..NewMessage::default()
    };
    let tool_calls = |n: u8| {
        Value::Array(
            (0..n)
                .map(|index| json!({"id": format!("c{index}")}))
                .collect(),
        )
    };
    match &msg.body {
        Body::Text(role, text) => NewMessage {
            role: *role,
            content: Some(text.render()),
            ..base
        },
        Body::ToolResult(call, text) => NewMessage {
            role: Role::Tool,
            content: Some(text.render()),
            tool_call_id: Some(format!("call{call}")),
            ..base
        },
        Body::ToolWithoutCallId(text) => NewMessage {
            role: Role::Tool,
            content: Some(text.render()),
            ..base
        },
        Body::ToolCalls(n) => NewMessage {
            role: Role::Assistant,
            tool_calls: Some(tool_calls(*n).into()),
            ..base
        },
        Body::ToolCallsNotArray => NewMessage {
            role: Role::Assistant,
            tool_calls: Some(json!({"id": "c0"}).into()),
            ..base
        },
        Body::UserWithToolCalls(text) => NewMessage {
            role: Role::User,
            content: Some(text.render()),
            tool_calls: Some(tool_calls(1).into()),
            ..base
        },
        Body::FunctionResult(name) => NewMessage {
            role: Role::Function,
            content: Some("42".into()),
            name: Some(format!("f{}", name.render())),
            ..base
        },
        Body::FunctionCall(n) => NewMessage {
            role: Role::Assistant,
            function_call: Some(json!({"name": "f", "arguments": format!("{n}")}).into()),
            ..base
        },
        Body::Refusal(text) => NewMessage {
            role: Role::Assistant,
            refusal: Some(text.render()),
            ..base
        },
        Body::Blank(role) => NewMessage {
            role: *role,
            ..base
        },
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        session: usize,
        user: usize,
        title: Option<Text>,
        metadata: Meta,
    },
    Append {
        session: usize,
        user: usize,
        messages: Vec<Msg>,
    },
    Get {
        session: usize,
        user: usize,
        after_seq: Option<i64>,
        limit: Option<usize>,
    },
    Update {
        session: usize,
        user: usize,
        title: Option<Text>,
        metadata: Meta,
    },
    AddUsage {
        session: usize,
        user: usize,
        prompt: u32,
        completion: u32,
    },
    Delete {
        session: usize,
        user: usize,
    },
    List {
        user: usize,
        limit: Option<usize>,
    },
    /// Shut the engine down and start a new one on the same database (a no-op in memory).
    Restart,
}

fn user() -> impl Strategy<Value = usize> {
    prop_oneof![5 => Just(0usize), 1 => Just(1usize)]
}

/// Session 0 gets most commands, so that it grows past the cached tail and the page size.
fn session() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 2 => Just(1usize), 1 => Just(2usize)]
}

fn title() -> impl Strategy<Value = Option<Text>> {
    proptest::option::of(text_mostly_within(SHORT))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (session(), user(), title(), meta()).prop_map(
            |(session, user, title, metadata)| Op::Create { session, user, title, metadata }
        ),
        10 => (session(), user(), messages())
            .prop_map(|(session, user, messages)| Op::Append { session, user, messages }),
        5 => (
            session(),
            user(),
            proptest::option::weighted(0.8, -3i64..16),
            proptest::option::weighted(0.8, 0usize..6),
        )
            .prop_map(|(session, user, after_seq, limit)| Op::Get {
                session,
                user,
                after_seq,
                limit
            }),
        1 => (session(), user(), title(), meta()).prop_map(
            |(session, user, title, metadata)| Op::Update { session, user, title, metadata }
        ),
        1 => (session(), user(), 0u32..3, 0u32..1000).prop_map(
            |(session, user, prompt, completion)| Op::AddUsage {
                session,
                user,
                prompt,
                completion
            }
        ),
        1 => (session(), user()).prop_map(|(session, user)| Op::Delete { session, user }),
        1 => (user(), proptest::option::weighted(0.8, 0usize..6))
            .prop_map(|(user, limit)| Op::List { user, limit }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    tuning: Tuning,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            Just(Tuning::TinyCache),
            Just(Tuning::NoCacheForbidden),
            Just(Tuning::Churn)
        ],
        // Usually session 0 is created first, by its owner; the rest is random.
        proptest::option::weighted(0.75, Just(())),
        vec(op(), 1..40),
    )
        .prop_map(|(tuning, create_first, mut ops)| {
            if create_first.is_some() {
                let create = Op::Create {
                    session: 0,
                    user: 0,
                    title: None,
                    metadata: Meta::Absent,
                };
                ops.insert(0, create);
            }
            Case { tuning, ops }
        })
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// The error kinds the model predicts; a failed command must fail with one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NotFound,
    Forbidden,
    InvalidInput,
    TooLarge,
    Conflict,
    MessageIdReused,
    /// Anything else (storage, shutdown, actor failure...): never expected here.
    Other,
}

fn kind(error: &Error) -> Kind {
    match error {
        Error::NotFound => Kind::NotFound,
        Error::Forbidden => Kind::Forbidden,
        Error::InvalidInput { .. } => Kind::InvalidInput,
        Error::TooLarge { .. } => Kind::TooLarge,
        Error::Conflict(_) => Kind::Conflict,
        Error::MessageIdReused { .. } => Kind::MessageIdReused,
        _ => Kind::Other,
    }
}

/// What the model predicts: a value, or the error kinds any of which is a correct refusal
/// (a command with several faults may be refused for any of them).
type Expected<T> = Result<T, Vec<Kind>>;

#[derive(Debug)]
struct ModelMessage {
    /// The client id; a generated one is learned from the first read that returns it.
    id: Option<Uuid>,
    message: NewMessage,
    /// Learned from the first read; must never change afterwards.
    created_at: Option<Timestamp>,
}

#[derive(Debug)]
struct ModelSession {
    owner: usize,
    title: Option<String>,
    metadata: RawJson,
    usage: Usage,
    messages: Vec<ModelMessage>,
    /// Client message id → sequence.
    ids: HashMap<Uuid, i64>,
    /// Bumped by every committed write.
    version: i64,
    deleted: bool,
    created_at: Option<Timestamp>,
    /// `updated_at` as first seen at each version: one version, one timestamp.
    updated_at: HashMap<i64, Timestamp>,
}

#[derive(Debug)]
struct Model {
    sessions: HashMap<SessionId, ModelSession>,
    hide_foreign: bool,
    limits: Limits,
}

fn len_fault(text: &Option<String>, limit: usize) -> Option<Kind> {
    text.as_ref()
        .filter(|text| text.len() > limit)
        .map(|_| Kind::TooLarge)
}

fn json_faults(value: &Option<RawJson>, want_object: bool, limit: usize) -> Vec<Kind> {
    match value {
        None => Vec::new(),
        Some(value) if want_object && !value.is_object() => vec![Kind::InvalidInput],
        Some(value) if !want_object && !value.is_array() => vec![Kind::InvalidInput],
        Some(value) => {
            // Measured as sent.
            let size = value.get().len();
            if size > limit {
                vec![Kind::TooLarge]
            } else {
                Vec::new()
            }
        }
    }
}

impl Model {
    fn new(hide_foreign: bool, limits: Limits) -> Self {
        Self {
            sessions: HashMap::new(),
            hide_foreign,
            limits,
        }
    }

    /// Faults of a message, from the documented rules.
    fn message_faults(&self, message: &NewMessage) -> Vec<Kind> {
        let limits = &self.limits;
        let mut faults: Vec<Kind> = [
            len_fault(&message.content, limits.max_content_bytes),
            len_fault(&message.refusal, limits.max_content_bytes),
            len_fault(&message.name, limits.max_text_bytes),
            len_fault(&message.tool_call_id, limits.max_text_bytes),
        ]
        .into_iter()
        .flatten()
        .collect();
        faults.extend(json_faults(
            &message.tool_calls,
            false,
            limits.max_json_bytes,
        ));
        faults.extend(json_faults(
            &message.function_call,
            true,
            limits.max_json_bytes,
        ));
        if message.role == Role::Tool && message.tool_call_id.is_none() {
            faults.push(Kind::InvalidInput);
        }
        if message.role != Role::Assistant
            && (message.tool_calls.is_some() || message.function_call.is_some())
        {
            faults.push(Kind::InvalidInput);
        }
        if message.content.is_none()
            && message.tool_calls.is_none()
            && message.function_call.is_none()
            && message.refusal.is_none()
        {
            faults.push(Kind::InvalidInput);
        }
        if message.id == Some(Uuid::nil()) {
            faults.push(Kind::InvalidInput);
        }
        faults
    }

    fn session_field_faults(
        &self,
        title: &Option<String>,
        metadata: &Option<RawJson>,
    ) -> Vec<Kind> {
        let mut faults: Vec<Kind> = len_fault(title, self.limits.max_text_bytes)
            .into_iter()
            .collect();
        faults.extend(json_faults(metadata, true, self.limits.max_json_bytes));
        faults
    }

    /// The session, if `user` may use it.
    fn access(&mut self, id: SessionId, user: usize) -> Expected<&mut ModelSession> {
        let hide_foreign = self.hide_foreign;
        match self.sessions.get_mut(&id) {
            None => Err(vec![Kind::NotFound]),
            Some(session) if session.deleted => Err(vec![Kind::NotFound]),
            Some(session) if session.owner != user => Err(vec![if hide_foreign {
                Kind::NotFound
            } else {
                Kind::Forbidden
            }]),
            Some(session) => Ok(session),
        }
    }

    /// Returns the `created` flag.
    fn create(
        &mut self,
        id: SessionId,
        user: usize,
        title: Option<String>,
        metadata: Option<RawJson>,
    ) -> Expected<bool> {
        let faults = self.session_field_faults(&title, &metadata);
        if !faults.is_empty() {
            return Err(faults);
        }
        match self.sessions.get(&id) {
            Some(session) if session.deleted => Err(vec![Kind::Conflict]),
            Some(session) if session.owner != user => Err(vec![Kind::Conflict]),
            Some(_) => Ok(false),
            None => {
                self.sessions.insert(
                    id,
                    ModelSession {
                        owner: user,
                        title,
                        metadata: metadata.unwrap_or_else(RawJson::empty_object),
                        usage: Usage::default(),
                        messages: Vec::new(),
                        ids: HashMap::new(),
                        version: 1,
                        deleted: false,
                        created_at: None,
                        updated_at: HashMap::new(),
                    },
                );
                Ok(true)
            }
        }
    }

    /// Returns the sequences.
    fn append(
        &mut self,
        id: SessionId,
        user: usize,
        messages: &[NewMessage],
    ) -> Expected<Vec<i64>> {
        let mut faults = Vec::new();
        if messages.is_empty() {
            faults.push(Kind::InvalidInput);
        }
        if messages.len() > self.limits.max_messages_per_append {
            faults.push(Kind::TooLarge);
        }
        for message in messages {
            faults.extend(self.message_faults(message));
        }
        let mut sent = HashSet::new();
        if messages
            .iter()
            .filter_map(|message| message.id)
            .any(|id| !sent.insert(id))
        {
            faults.push(Kind::InvalidInput);
        }
        if !faults.is_empty() {
            return Err(faults);
        }
        let session = self.access(id, user)?;
        // An id stored with other content refuses the whole append; the same message again
        // is a resend.
        for message in messages {
            if let Some(&seq) = message.id.and_then(|id| session.ids.get(&id)) {
                if session.messages[seq as usize].message != *message {
                    return Err(vec![Kind::MessageIdReused]);
                }
            }
        }
        let mut sequences = Vec::new();
        let mut added = false;
        for message in messages {
            if let Some(&seq) = message.id.and_then(|id| session.ids.get(&id)) {
                sequences.push(seq);
                continue;
            }
            let seq = session.messages.len() as i64;
            if let Some(id) = message.id {
                session.ids.insert(id, seq);
            }
            session.messages.push(ModelMessage {
                id: message.id,
                message: message.clone(),
                created_at: None,
            });
            sequences.push(seq);
            added = true;
        }
        if added {
            session.version += 1;
        }
        Ok(sequences)
    }

    /// Returns the indexes of the page's messages and its `next_after_seq`.
    fn get(
        &mut self,
        id: SessionId,
        user: usize,
        after_seq: Option<i64>,
        limit: Option<usize>,
    ) -> Expected<(std::ops::Range<usize>, Option<i64>)> {
        let max_page = self.limits.max_page_size;
        let session = self.access(id, user)?;
        let count = session.messages.len();
        let limit = limit.unwrap_or(DEFAULT_MESSAGE_PAGE).min(max_page);
        let start = usize::try_from(after_seq.unwrap_or(-1).saturating_add(1)).unwrap_or(0);
        if limit == 0 || start >= count {
            return Ok((0..0, None));
        }
        let end = (start + limit).min(count);
        let next = (end < count).then_some(end as i64 - 1);
        Ok((start..end, next))
    }

    fn update(
        &mut self,
        id: SessionId,
        user: usize,
        title: Option<String>,
        metadata: Option<RawJson>,
    ) -> Expected<()> {
        let faults = self.session_field_faults(&title, &metadata);
        if !faults.is_empty() {
            return Err(faults);
        }
        let session = self.access(id, user)?;
        let changed = title.is_some() || metadata.is_some();
        if let Some(title) = title {
            session.title = Some(title);
        }
        if let Some(metadata) = metadata {
            session.metadata = metadata;
        }
        if changed {
            session.version += 1;
        }
        Ok(())
    }

    fn add_usage(
        &mut self,
        id: SessionId,
        user: usize,
        prompt: u32,
        completion: u32,
    ) -> Expected<()> {
        let session = self.access(id, user)?;
        session.usage.prompt_tokens += i64::from(prompt);
        session.usage.completion_tokens += i64::from(completion);
        if prompt > 0 || completion > 0 {
            session.version += 1;
        }
        Ok(())
    }

    fn delete(&mut self, id: SessionId, user: usize) -> Expected<()> {
        let session = self.access(id, user)?;
        session.deleted = true;
        session.version += 1;
        Ok(())
    }

    /// The user's live sessions, newest first (creation times as observed).
    fn listed(&self, user: usize) -> Vec<SessionId> {
        let mut listed: Vec<(Option<Timestamp>, SessionId)> = self
            .sessions
            .iter()
            .filter(|(_, session)| session.owner == user && !session.deleted)
            .map(|(id, session)| (session.created_at, *id))
            .collect();
        listed.sort_by(|a, b| b.cmp(a));
        listed.into_iter().map(|(_, id)| id).collect()
    }

    /// Compares a session's metadata as the engine reported it with the model's.
    fn check_info(&mut self, info: &SessionInfo) -> Result<(), String> {
        let Some(session) = self.sessions.get_mut(&info.id) else {
            return Err(format!(
                "the engine reported a session the model lacks: {info:?}"
            ));
        };
        let expected = (
            USERS[session.owner],
            &session.title,
            &session.metadata,
            session.usage,
            session.messages.len() as i64,
            session.version,
        );
        let actual = (
            info.user_id.as_str(),
            &info.title,
            &info.metadata,
            info.usage,
            info.message_count,
            info.version,
        );
        if expected != actual {
            return Err(format!(
                "session info (user, title, metadata, usage, message_count, version): \
                 engine {actual:?}, model {expected:?}"
            ));
        }
        match session.created_at {
            None => session.created_at = Some(info.created_at),
            Some(created_at) if created_at != info.created_at => {
                return Err(format!(
                    "created_at changed from {created_at} to {}",
                    info.created_at
                ));
            }
            Some(_) => {}
        }
        let updated_at = *session
            .updated_at
            .entry(info.version)
            .or_insert(info.updated_at);
        if updated_at != info.updated_at {
            return Err(format!(
                "version {} has two updated_at: {updated_at} and {}",
                info.version, info.updated_at
            ));
        }
        if info.updated_at < info.created_at {
            return Err(format!("updated_at before created_at: {info:?}"));
        }
        Ok(())
    }

    /// Compares a page's messages with the model's `range` of the session.
    fn check_messages(
        &mut self,
        id: SessionId,
        actual: &[std::sync::Arc<Message>],
        range: std::ops::Range<usize>,
    ) -> Result<(), String> {
        let session = self
            .sessions
            .get_mut(&id)
            .ok_or_else(|| "page of a session the model lacks".to_owned())?;
        let expected = &mut session.messages[range.clone()];
        let seqs: Vec<i64> = actual.iter().map(|message| message.seq).collect();
        let expected_seqs: Vec<i64> = range.clone().map(|seq| seq as i64).collect();
        if seqs != expected_seqs {
            return Err(format!(
                "page sequences: engine {seqs:?}, model {expected_seqs:?}"
            ));
        }
        for (model, actual) in expected.iter_mut().zip(actual) {
            let wanted = &model.message;
            let fields = (
                actual.role,
                &actual.content,
                &actual.name,
                &actual.tool_calls,
                &actual.tool_call_id,
                &actual.function_call,
                &actual.refusal,
            );
            let model_fields = (
                wanted.role,
                &wanted.content,
                &wanted.name,
                &wanted.tool_calls,
                &wanted.tool_call_id,
                &wanted.function_call,
                &wanted.refusal,
            );
            if fields != model_fields {
                return Err(format!(
                    "message {}: engine {fields:?}, model {model_fields:?}",
                    actual.seq
                ));
            }
            match model.id {
                None => model.id = Some(actual.id),
                Some(id) if id != actual.id => {
                    return Err(format!(
                        "message {} has id {}, model {id}",
                        actual.seq, actual.id
                    ));
                }
                Some(_) => {}
            }
            match model.created_at {
                None => model.created_at = Some(actual.created_at),
                Some(created_at) if created_at != actual.created_at => {
                    return Err(format!(
                        "message {} created_at changed from {created_at} to {}",
                        actual.seq, actual.created_at
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

/// Pairs the engine's answer with the model's prediction: both values, both refusals of an
/// expected kind, or a mismatch.
fn pair<T: Debug, M: Debug>(
    actual: &soloist::Result<T>,
    expected: Expected<M>,
) -> Result<Option<(&T, M)>, String> {
    match (actual, expected) {
        (Ok(actual), Ok(expected)) => Ok(Some((actual, expected))),
        (Err(error), Err(kinds)) if kinds.contains(&kind(error)) => Ok(None),
        (actual, expected) => Err(format!(
            "engine answered {actual:?}, model expected {expected:?}"
        )),
    }
}

struct Run<'a> {
    db: &'a TestDb,
    config: EngineConfig,
    engine: Engine,
    ids: Vec<SessionId>,
    pool: Vec<Uuid>,
    model: Model,
}

impl Run<'_> {
    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Create {
                session,
                user,
                title,
                metadata,
            } => {
                let id = self.ids[*session];
                let title = title.as_ref().map(Text::render);
                let metadata = metadata.value().map(RawJson::from);
                let actual = self
                    .engine
                    .create_session(CreateSession {
                        user_id: USERS[*user].into(),
                        session_id: Some(id),
                        title: title.clone(),
                        metadata: metadata.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.create(id, *user, title, metadata);
                if let Some((created, expected)) = pair(&actual, expected)? {
                    if created.created != expected {
                        return Err(format!(
                            "created flag {}, model {expected}",
                            created.created
                        ));
                    }
                    if created.session.id != id {
                        return Err(format!("created {} for {id}", created.session.id));
                    }
                    self.model.check_info(&created.session)?;
                }
            }
            Op::Append {
                session,
                user,
                messages,
            } => {
                let id = self.ids[*session];
                let messages: Vec<NewMessage> = messages
                    .iter()
                    .map(|msg| build_message(msg, &self.pool))
                    .collect();
                let actual = self
                    .engine
                    .append(AppendMessages {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        messages: messages.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.append(id, *user, &messages);
                if let Some((appended, expected)) = pair(&actual, expected)?
                    && appended.sequences != expected
                {
                    return Err(format!(
                        "sequences {:?}, model {expected:?}",
                        appended.sequences
                    ));
                }
            }
            Op::Get {
                session,
                user,
                after_seq,
                limit,
            } => {
                let id = self.ids[*session];
                let actual = self.get(id, *user, *after_seq, *limit).await;
                let expected = self.model.get(id, *user, *after_seq, *limit);
                if let Some((page, (range, next))) = pair(&actual, expected)? {
                    self.check_page(id, page, range, next)?;
                }
            }
            Op::Update {
                session,
                user,
                title,
                metadata,
            } => {
                let id = self.ids[*session];
                let title = title.as_ref().map(Text::render);
                let metadata = metadata.value().map(RawJson::from);
                let actual = self
                    .engine
                    .update_session(UpdateSession {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        title: title.clone(),
                        metadata: metadata.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.update(id, *user, title, metadata);
                if let Some((info, ())) = pair(&actual, expected)? {
                    self.model.check_info(info)?;
                }
            }
            Op::AddUsage {
                session,
                user,
                prompt,
                completion,
            } => {
                let id = self.ids[*session];
                let actual = self
                    .engine
                    .add_usage(AddUsage {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        prompt_tokens: *prompt,
                        completion_tokens: *completion,
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.add_usage(id, *user, *prompt, *completion);
                if let Some((usage, ())) = pair(&actual, expected)? {
                    let model = self.model.sessions[&id].usage;
                    if *usage != model {
                        return Err(format!("usage totals {usage:?}, model {model:?}"));
                    }
                }
            }
            Op::Delete { session, user } => {
                let id = self.ids[*session];
                let actual = self
                    .engine
                    .delete_session(DeleteSession {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        ..Default::default()
                    })
                    .await;
                pair(&actual, self.model.delete(id, *user))?;
            }
            Op::List { user, limit } => self.check_listing(*user, *limit).await?,
            Op::Restart => {
                if self.db.shareable() {
                    self.engine.shutdown().await;
                    self.engine = Engine::start(self.config.clone())
                        .await
                        .map_err(|error| format!("restart: {error:?}"))?;
                }
            }
        }
        Ok(())
    }

    async fn get(
        &self,
        id: SessionId,
        user: usize,
        after_seq: Option<i64>,
        limit: Option<usize>,
    ) -> soloist::Result<SessionPage> {
        self.engine
            .get_session(GetSession {
                user_id: USERS[user].into(),
                session_id: id,
                after_seq,
                limit,
                fresh: false,
            })
            .await
    }

    fn check_page(
        &mut self,
        id: SessionId,
        page: &SessionPage,
        range: std::ops::Range<usize>,
        next: Option<i64>,
    ) -> Result<(), String> {
        if page.session.id != id {
            return Err(format!("page of {} for {id}", page.session.id));
        }
        self.model.check_info(&page.session)?;
        self.model.check_messages(id, &page.messages, range)?;
        if page.next_after_seq != next {
            return Err(format!(
                "next_after_seq {:?}, model {next:?}",
                page.next_after_seq
            ));
        }
        Ok(())
    }

    /// Walks the user's listing page by page and compares it with the model.
    async fn check_listing(&mut self, user: usize, limit: Option<usize>) -> Result<(), String> {
        let page_size = limit
            .unwrap_or(DEFAULT_SESSION_PAGE)
            .min(self.model.limits.max_page_size);
        let expected = self.model.listed(user);
        let mut listed = Vec::new();
        let mut before: Option<SessionCursor> = None;
        for _ in 0..=SESSIONS + 1 {
            let page = self
                .engine
                .list_sessions(ListSessions {
                    user_id: USERS[user].into(),
                    before,
                    limit,
                })
                .await
                .map_err(|error| format!("list_sessions: {error:?}"))?;
            if page.sessions.len() > page_size {
                return Err(format!(
                    "listing page of {} over its size {page_size}",
                    page.sessions.len()
                ));
            }
            for info in &page.sessions {
                self.model.check_info(info)?;
                listed.push(info.id);
            }
            let remaining = expected.len() > listed.len();
            match page.next_before {
                // A full page may or may not carry a cursor when nothing is left after it; a
                // short page is the last, and a page with more after it must have one.
                Some(_) if page.sessions.len() < page_size || page_size == 0 => {
                    return Err(format!(
                        "a cursor after a short listing page: {page:?} (page size {page_size})"
                    ));
                }
                None if remaining && page_size > 0 => {
                    return Err(format!(
                        "no cursor although {} sessions are listed of {}",
                        listed.len(),
                        expected.len()
                    ));
                }
                Some(cursor) => before = Some(cursor),
                None => break,
            }
        }
        let expected = if page_size == 0 { Vec::new() } else { expected };
        if listed != expected {
            return Err(format!(
                "listing of {}: engine {listed:?}, model {expected:?}",
                USERS[user]
            ));
        }
        Ok(())
    }

    /// Reads every session in full, as each user, and compares with the model.
    async fn check_everything(&mut self) -> Result<(), String> {
        for index in 0..SESSIONS {
            let id = self.ids[index];
            for user in 0..USERS.len() {
                let mut after_seq = None;
                for _ in 0..100 {
                    let actual = self.get(id, user, after_seq, None).await;
                    let expected = self.model.get(id, user, after_seq, None);
                    let Some((page, (range, next))) = pair(&actual, expected)? else {
                        break;
                    };
                    self.check_page(id, page, range, next)?;
                    match next {
                        Some(next) => after_seq = Some(next),
                        None => break,
                    }
                }
            }
        }
        for user in 0..USERS.len() {
            self.check_listing(user, None).await?;
        }
        Ok(())
    }
}

async fn run_case(db: &TestDb, case: &Case) -> Result<(), String> {
    let config = config_for(db, case.tuning);
    let engine = Engine::start(config.clone())
        .await
        .map_err(|error| format!("start: {error:?}"))?;
    let mut run = Run {
        db,
        model: Model::new(config.hide_foreign_sessions, config.limits.clone()),
        config,
        engine,
        ids: (0..SESSIONS).map(|_| Uuid::now_v7()).collect(),
        pool: (0..ID_POOL).map(|_| Uuid::new_v4()).collect(),
    };
    let mut outcome = Ok(());
    for (index, op) in case.ops.iter().enumerate() {
        if let Err(error) = run.step(op).await {
            outcome = Err(format!("step {index} {op:?}: {error}"));
            break;
        }
    }
    if outcome.is_ok() {
        outcome = run
            .check_everything()
            .await
            .map_err(|error| format!("final check: {error}"));
    }
    if outcome.is_ok() && db.shareable() {
        // Everything acknowledged is in the database: a new engine reads the same.
        run.engine.shutdown().await;
        run.engine = Engine::start(run.config.clone())
            .await
            .map_err(|error| format!("restart: {error:?}"))?;
        outcome = run
            .check_everything()
            .await
            .map_err(|error| format!("final check after a restart: {error}"));
    }
    let restarts = run.engine.stats().restarts;
    if outcome.is_ok() && restarts > 0 {
        outcome = Err(format!("{restarts} session actors panicked"));
    }
    run.engine.shutdown().await;
    outcome
}

fn run(backend: Backend, case: &Case) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| TestCaseError::fail(format!("runtime: {error}")))?;
    runtime.block_on(async {
        let db = TestDb::new(backend)
            .await
            .map_err(|error| TestCaseError::fail(format!("database: {error}")))?;
        let Some(db) = db else {
            // PostgreSQL is not running outside CI: skipped (with a message) by TestDb.
            return Ok(());
        };
        run_case(&db, case).await.map_err(TestCaseError::fail)
    })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]
    #[test]
    fn engine_matches_model_on_sqlite_memory(case in case()) {
        run(Backend::SqliteMemory, &case)?;
    }
}

proptest! {
    #![proptest_config(config(48))]
    #[test]
    fn engine_matches_model_on_sqlite_file(case in case()) {
        run(Backend::SqliteFile, &case)?;
    }
}

proptest! {
    #![proptest_config(config(48))]
    #[test]
    fn engine_matches_model_on_postgres(case in case()) {
        run(Backend::Postgres, &case)?;
    }
}
