//! Generated input: random commands, valid and invalid, by the owner and by an intruder, and
//! the engine tuning of each case. Invalid input is generated on purpose (text over the small
//! limits, tool messages without a call id, metadata that is not an object, the nil id...), so
//! that the model's refusals are exercised as often as its values.
//!
//! Streamed replies too: drafts started (alone, or inside an append; refused while another
//! streams, or interrupting it), deltas (mostly at the draft's end, sometimes resending text it
//! holds, sometimes past its end or differing from it), finishes (each status, repeated, or
//! conflicting), aimed at recent drafts, at the pool's ids (other messages) or at unknown ids.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Value, json};
use soloist::uuid::Uuid;
use soloist::{MessageStatus, NewMessage, Role};

use crate::{CONTENT, ID_POOL, SHORT, Tuning};

/// A string of `len` characters from one alphabet; the multi-byte alphabets make a short string
/// long in bytes, which is what the limits count.
#[derive(Clone, Debug)]
pub struct Text {
    len: usize,
    alphabet: u8,
    salt: usize,
}

impl Text {
    pub fn render(&self) -> String {
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
pub enum Meta {
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
    pub fn value(&self) -> Option<Value> {
        match self {
            Meta::Absent => None,
            Meta::Object(n) => Some(json!({"n": n, "tag": "model"})),
            Meta::Big => Some(json!({"blob": "x".repeat(140)})),
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
pub enum IdSpec {
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
    /// A tool result answering `c{n}`: a call made earlier, answered already, or never made.
    ToolResult(u8, Text),
    /// Invalid: a tool message without `tool_call_id`.
    ToolWithoutCallId(Text),
    /// An assistant message calling `n` tools, `c{first}` on (over `max_json_bytes` from 6
    /// calls on; an id the session used already is refused).
    ToolCalls(u8, u8),
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
    /// A draft's start (an assistant reply in progress), with its text so far or none.
    Draft(Option<Text>),
    /// Invalid: a draft of another role than the assistant.
    DraftOf(Role, Text),
    /// Invalid: a draft that makes tool calls before its finish.
    DraftWithToolCalls(u8),
    /// Invalid: a message appended ended (incomplete or aborted), which only a finish does.
    Ended(MessageStatus, Text),
}

#[derive(Clone, Debug)]
pub struct Msg {
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
        2 => (0u8..16, text_within(CONTENT)).prop_map(|(call, text)| Body::ToolResult(call, text)),
        2 => (0u8..16, 0u8..6).prop_map(|(first, n)| Body::ToolCalls(first, n)),
        1 => text_within(SHORT - 1).prop_map(Body::FunctionResult),
        1 => any::<u8>().prop_map(Body::FunctionCall),
        1 => text_within(CONTENT).prop_map(Body::Refusal),
        1 => proptest::option::weighted(0.8, text_within(CONTENT)).prop_map(Body::Draft),
    ]
}

fn invalid_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (role(), text_over(CONTENT)).prop_map(|(role, text)| Body::Text(role, text)),
        text_within(CONTENT).prop_map(Body::ToolWithoutCallId),
        (0u8..16, 6u8..9).prop_map(|(first, n)| Body::ToolCalls(first, n)),
        Just(Body::ToolCallsNotArray),
        text_within(CONTENT).prop_map(Body::UserWithToolCalls),
        text_over(SHORT).prop_map(Body::FunctionResult),
        text_over(CONTENT).prop_map(Body::Refusal),
        role().prop_map(Body::Blank),
        (
            prop_oneof![Just(Role::User), Just(Role::System)],
            text_within(CONTENT)
        )
            .prop_map(|(role, text)| Body::DraftOf(role, text)),
        (0u8..16).prop_map(Body::DraftWithToolCalls),
        (
            prop_oneof![
                Just(MessageStatus::Incomplete),
                Just(MessageStatus::Aborted)
            ],
            text_within(CONTENT)
        )
            .prop_map(|(status, text)| Body::Ended(status, text)),
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

/// The JSON of `n` tool calls `c{first}`, `c{first + 1}`...
fn tool_calls_json(first: u8, n: u8) -> Value {
    Value::Array(
        (0..n)
            .map(|index| json!({"id": format!("c{}", u16::from(first) + u16::from(index)), "type": "t"}))
            .collect(),
    )
}

pub fn build_message(msg: &Msg, pool: &[Uuid]) -> NewMessage {
    let id = match msg.id {
        // A draft always gets its id from the client, which names it in deltas and finishes.
        IdSpec::Generated if matches!(msg.body, Body::Draft(_)) => Some(Uuid::now_v7()),
        IdSpec::Generated => None,
        IdSpec::Pool(index) => Some(pool[index]),
        IdSpec::Nil => Some(Uuid::nil()),
    };
    let base = NewMessage {
        id,
        ..NewMessage::default()
    };
    let tool_calls = tool_calls_json;
    match &msg.body {
        Body::Text(role, text) => NewMessage {
            role: *role,
            content: Some(text.render().into()),
            ..base
        },
        Body::ToolResult(call, text) => NewMessage {
            role: Role::Tool,
            content: Some(text.render().into()),
            tool_call_id: Some(format!("c{call}")),
            ..base
        },
        Body::ToolWithoutCallId(text) => NewMessage {
            role: Role::Tool,
            content: Some(text.render().into()),
            ..base
        },
        Body::ToolCalls(first, n) => NewMessage {
            role: Role::Assistant,
            tool_calls: Some(tool_calls(*first, *n).into()),
            ..base
        },
        Body::ToolCallsNotArray => NewMessage {
            role: Role::Assistant,
            tool_calls: Some(json!({"id": "c0"}).into()),
            ..base
        },
        Body::UserWithToolCalls(text) => NewMessage {
            role: Role::User,
            content: Some(text.render().into()),
            tool_calls: Some(tool_calls(0, 1).into()),
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
        Body::Draft(text) => NewMessage {
            role: Role::Assistant,
            content: text.as_ref().map(|text| text.render().into()),
            status: Some(MessageStatus::InProgress),
            ..base
        },
        Body::DraftOf(role, text) => NewMessage {
            role: *role,
            content: Some(text.render().into()),
            status: Some(MessageStatus::InProgress),
            ..base
        },
        Body::DraftWithToolCalls(first) => NewMessage {
            role: Role::Assistant,
            tool_calls: Some(tool_calls(*first, 1).into()),
            status: Some(MessageStatus::InProgress),
            ..base
        },
        Body::Ended(status, text) => NewMessage {
            role: Role::Assistant,
            content: Some(text.render().into()),
            status: Some(*status),
            ..base
        },
    }
}

/// Which draft a delta or a finish names.
#[derive(Clone, Debug)]
pub enum DraftRef {
    /// The id of the `n`-th most recent start of the case (whatever became of it).
    Recent(usize),
    /// One of the pool's ids: another message, a draft appended with it, or nothing.
    Pool(usize),
    /// An id no message has.
    Unknown,
}

fn draft_ref() -> impl Strategy<Value = DraftRef> {
    prop_oneof![
        10 => prop_oneof![3 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)]
            .prop_map(DraftRef::Recent),
        2 => (0..ID_POOL).prop_map(DraftRef::Pool),
        1 => Just(DraftRef::Unknown),
    ]
}

/// Where a delta goes in the draft's content as it is when the delta is sent.
#[derive(Clone, Debug)]
pub enum At {
    /// At its end: the next text.
    End,
    /// Its last `n` characters again, followed by the new text (a resend, or an overlap).
    Resend(u8),
    /// `1 + n` bytes past its end: a gap.
    Gap(u8),
    /// At its start, with text that differs there (unless the draft is still empty).
    Conflict,
    /// At byte `n` modulo its length plus one: anywhere, even inside a character.
    Inside(u8),
}

/// One delta of a command.
#[derive(Clone, Debug)]
pub struct DeltaSpec {
    pub at: At,
    pub text: Text,
}

fn delta() -> impl Strategy<Value = DeltaSpec> {
    let at = prop_oneof![
        10 => Just(At::End),
        3 => (0u8..4).prop_map(At::Resend),
        1 => (0u8..3).prop_map(At::Gap),
        1 => Just(At::Conflict),
        1 => (0u8..20).prop_map(At::Inside),
    ];
    // Tokens of a few bytes, which fill the small content limit in a few deltas; sometimes a
    // delta over the limit by itself.
    let text = prop_oneof![12 => text_within(6), 1 => text_over(CONTENT)];
    (at, text).prop_map(|(at, text)| DeltaSpec { at, text })
}

/// What a start sends.
#[derive(Clone, Debug)]
pub enum StartSpec {
    /// A new draft: its id (a fresh one, or the pool's) and its text so far.
    New(IdSpec, Option<Text>),
    /// The `n`-th most recent start of the case, sent again as it was.
    Again(usize),
}

/// A draft's start as sent, with a fresh id unless the pool gives one.
pub fn build_start(id: &IdSpec, text: &Option<Text>, pool: &[Uuid]) -> NewMessage {
    build_message(
        &Msg {
            body: Body::Draft(text.clone()),
            id: id.clone(),
        },
        pool,
    )
}

/// A finish's tool calls as sent.
pub fn finish_tool_calls(calls: Option<(u8, u8)>) -> Option<soloist::RawJson> {
    calls.map(|(first, n)| tool_calls_json(first, n).into())
}

#[derive(Clone, Debug)]
pub enum Op {
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
    /// A delete, or an erase (`erase`: also what a delete keeps; allowed on its owner's
    /// deleted session).
    Delete {
        session: usize,
        user: usize,
        erase: bool,
    },
    List {
        user: usize,
        limit: Option<usize>,
    },
    /// Shut the engine down and start a new one on the same database (a no-op in memory).
    Restart,
    /// Start a draft alone, refused while another streams or interrupting it.
    Start {
        session: usize,
        user: usize,
        start: StartSpec,
        interrupt: bool,
    },
    /// Append text to a draft: one delta, or two in one command (all or nothing).
    Deltas {
        session: usize,
        user: usize,
        draft: DraftRef,
        deltas: Vec<DeltaSpec>,
    },
    /// End a draft (`InProgress` is refused), with tool calls `c{first}`... and usage.
    Finish {
        session: usize,
        user: usize,
        draft: DraftRef,
        status: MessageStatus,
        tool_calls: Option<(u8, u8)>,
        usage: Option<(u32, u32)>,
    },
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
        1 => (session(), user(), any::<bool>())
            .prop_map(|(session, user, erase)| Op::Delete { session, user, erase }),
        1 => (user(), proptest::option::weighted(0.8, 0usize..6))
            .prop_map(|(user, limit)| Op::List { user, limit }),
        1 => Just(Op::Restart),
        2 => (session(), user(), start(), proptest::bool::weighted(0.3)).prop_map(
            |(session, user, start, interrupt)| Op::Start { session, user, start, interrupt }
        ),
        4 => (session(), user(), draft_ref(), vec(delta(), 1..=2), 0u8..6).prop_map(
            // Mostly one delta per command.
            |(session, user, draft, mut deltas, one)| {
                if one > 0 {
                    deltas.truncate(1);
                }
                Op::Deltas { session, user, draft, deltas }
            }
        ),
        2 => (
            session(),
            user(),
            draft_ref(),
            prop_oneof![
                4 => Just(MessageStatus::Completed),
                2 => Just(MessageStatus::Incomplete),
                2 => Just(MessageStatus::Aborted),
                1 => Just(MessageStatus::InProgress),
            ],
            proptest::option::weighted(0.2, (0u8..16, 0u8..6)),
            proptest::option::weighted(0.5, (0u32..3, 0u32..100)),
        )
            .prop_map(|(session, user, draft, status, tool_calls, usage)| Op::Finish {
                session,
                user,
                draft,
                status,
                tool_calls,
                usage,
            }),
    ]
}

fn start() -> impl Strategy<Value = StartSpec> {
    prop_oneof![
        6 => (
            prop_oneof![4 => Just(IdSpec::Generated), 1 => (0..ID_POOL).prop_map(IdSpec::Pool)],
            proptest::option::weighted(
                0.7,
                prop_oneof![8 => text_within(6), 1 => text_over(CONTENT)]
            ),
        )
            .prop_map(|(id, text)| StartSpec::New(id, text)),
        1 => (0usize..2).prop_map(StartSpec::Again),
    ]
}

#[derive(Clone, Debug)]
pub struct Case {
    pub tuning: Tuning,
    pub ops: Vec<Op>,
}

pub fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![
            Just(Tuning::TinyCache),
            Just(Tuning::NoCacheForbidden),
            Just(Tuning::Churn)
        ],
        // Usually session 0 is created first, by its owner; the rest is random.
        proptest::option::weighted(0.75, Just(())),
        // A quarter of the commands are about drafts: as many of the others as before.
        vec(op(), 1..53),
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
