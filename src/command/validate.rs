//! Checks shared by the commands: identifiers, texts, JSON fields, messages, page sizes.

use uuid::Uuid;

use crate::config::Limits;
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::{Content, MessageStatus, NewMessage, RawJson, Role};

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

/// An assistant message's `tool_calls`, in the chat format's shape: a JSON array (within the
/// JSON limits) of at least one call, each an object with a non-empty string `id` (what the
/// `tool` message that answers it names, unique in the array, at most a text's bytes) and a
/// string `type`; a call of type `function` carries a `function` object with a string
/// `name`. Other fields pass as they are.
pub(crate) fn check_tool_calls(field: &str, value: &RawJson, limits: &Limits) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Call<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        function: Option<&'a serde_json::value::RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Function<'a> {
        #[serde(borrow)]
        name: Option<std::borrow::Cow<'a, str>>,
    }
    check_json(field, value, false, limits)?;
    let calls: Vec<Call<'_>> = serde_json::from_str(value.get()).map_err(|_| {
        Error::invalid(
            field,
            "each tool call must be an object with a string \"id\" and \"type\"",
        )
    })?;
    if calls.is_empty() {
        return Err(Error::invalid(field, "must hold at least one tool call"));
    }
    let mut ids = std::collections::HashSet::with_capacity(calls.len());
    for (index, call) in calls.iter().enumerate() {
        let at = |name: &str| format!("{field}[{index}].{name}");
        let id = call.id.as_deref().unwrap_or_default();
        if id.is_empty() {
            return Err(Error::invalid(at("id"), "a tool call needs a non-empty id"));
        }
        check_len(at("id"), id.len(), limits.max_text_bytes)?;
        if !ids.insert(id) {
            return Err(Error::invalid(at("id"), "the same id appears twice"));
        }
        let Some(kind) = call.kind.as_deref() else {
            return Err(Error::invalid(at("type"), "a tool call needs a type"));
        };
        if kind == "function" {
            let named = call
                .function
                .and_then(|function| serde_json::from_str::<Function<'_>>(function.get()).ok())
                .is_some_and(|function| function.name.is_some());
            if !named {
                return Err(Error::invalid(
                    at("function"),
                    "a function call carries a function object with a string name",
                ));
            }
        }
    }
    Ok(())
}

/// A session's title and metadata, as create and update take them.
pub(crate) fn check_title_and_metadata(
    title: &Option<String>,
    metadata: &Option<RawJson>,
    limits: &Limits,
) -> Result<()> {
    check_text("title", title, limits.max_text_bytes)?;
    match metadata {
        Some(metadata) => check_json("metadata", metadata, true, limits),
        None => Ok(()),
    }
}

/// Tokens one command may add to a session's counter (a finish's `usage`, or `add_usage`,
/// whose deltas are `u32`): 4,294,967,295.
pub const MAX_USAGE_DELTA: i64 = u32::MAX as i64;

/// What a session's token counter may reach: 2^53 - 1, a number every JSON reader holds
/// exactly. Sums are checked against it before they are staged, so a counter can neither
/// overflow nor be stored as anything but an integer.
pub const MAX_USAGE_TOTAL: i64 = (1 << 53) - 1;

/// Token counts of `field`: each from 0 to `max`.
pub(crate) fn check_usage(field: &str, usage: &crate::model::Usage, max: i64) -> Result<()> {
    for (name, count) in [
        ("prompt_tokens", usage.prompt_tokens),
        ("completion_tokens", usage.completion_tokens),
    ] {
        if !(0..=max).contains(&count) {
            return Err(Error::invalid(
                format!("{field}.{name}"),
                format!("must be 0 to {max}"),
            ));
        }
    }
    Ok(())
}

/// The longest time to live a session may have: 100 years, in seconds.
pub const MAX_TTL_SECONDS: i64 = 100 * 365 * 24 * 3600;

/// A session's time to live in seconds: 0 (never expires) to [`MAX_TTL_SECONDS`].
pub(crate) fn check_ttl(ttl_seconds: Option<i64>) -> Result<()> {
    match ttl_seconds {
        Some(ttl) if !(0..=MAX_TTL_SECONDS).contains(&ttl) => Err(Error::invalid(
            "ttl_seconds",
            format!("must be 0 (never expires) to {MAX_TTL_SECONDS} seconds"),
        )),
        _ => Ok(()),
    }
}

/// The messages of one append.
pub(crate) fn check_messages(messages: &[NewMessage], limits: &Limits) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    check_len("messages", messages.len(), limits.max_messages_per_append)?;
    let mut ids = std::collections::HashSet::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        if let Some(id) = message.id {
            if !ids.insert(id) {
                return Err(Error::invalid(
                    format!("messages[{index}].id"),
                    "the same message id appears twice in one append",
                ));
            }
        }
        check_message(index, message, limits)?;
    }
    Ok(())
}

/// One message of an import, at `index`, checked as the commands that could have stored it
/// would check it: a completed message with a body, or a draft's start, exactly as an append;
/// a draft that ended (a completed one with nothing to show, or one cut short or aborted) as
/// the append of its start and then its finish (tool calls and a refusal come with the finish).
pub(crate) fn check_imported(index: usize, message: &NewMessage, limits: &Limits) -> Result<()> {
    let has_body = message.content.is_some()
        || message.tool_calls.is_some()
        || message.function_call.is_some()
        || message.refusal.is_some();
    let status = message.status.unwrap_or_default();
    match status {
        MessageStatus::InProgress => check_message(index, message, limits),
        MessageStatus::Completed if has_body || message.role != Role::Assistant => {
            check_message(index, message, limits)
        }
        _ if message.role != Role::Assistant => Err(Error::invalid(
            format!("messages[{index}].status"),
            format!(
                "only a draft (an assistant message) ends {}",
                status.as_str()
            ),
        )),
        _ => {
            let start = NewMessage {
                tool_calls: None,
                refusal: None,
                status: Some(MessageStatus::InProgress),
                ..message.clone()
            };
            check_message(index, &start, limits)?;
            let field = |name: &str| format!("messages[{index}].{name}");
            if let Some(value) = &message.tool_calls {
                check_tool_calls(&field("tool_calls"), value, limits)?;
            }
            check_text(
                &field("refusal"),
                &message.refusal,
                limits.max_content_bytes,
            )
        }
    }
}

fn check_message(index: usize, message: &NewMessage, limits: &Limits) -> Result<()> {
    let field = |name: &str| format!("messages[{index}].{name}");
    // Content is stored as bytes, so any text round-trips, NUL included.
    if let Some(content) = &message.content {
        check_len(field("content"), content.len(), limits.max_content_bytes)?;
        if let Content::Parts(parts) = content {
            check_parts(&field("content"), message.role, parts, limits)?;
        }
    }
    if let Some(metadata) = &message.metadata {
        check_json(&field("metadata"), metadata, true, limits)?;
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
        check_tool_calls(&field("tool_calls"), value, limits)?;
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
    match message.status {
        None | Some(MessageStatus::Completed) => {}
        Some(MessageStatus::InProgress) => return check_draft(index, message),
        Some(other) => {
            return Err(Error::invalid(
                field("status"),
                format!(
                    "a message is appended completed or in_progress (a draft), not {}",
                    other.as_str()
                ),
            ));
        }
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
    Ok(())
}

/// A draft's start: an assistant message, with text content (or none yet); what only the end
/// knows (tool calls, a refusal) comes with its finish.
fn check_draft(index: usize, message: &NewMessage) -> Result<()> {
    let field = |name: &str| format!("messages[{index}].{name}");
    if message.role != Role::Assistant {
        return Err(Error::invalid(
            field("status"),
            "only an assistant message streams as a draft",
        ));
    }
    if matches!(message.content, Some(Content::Parts(_))) {
        return Err(Error::invalid(
            field("content"),
            "a draft's content is text, which its deltas extend",
        ));
    }
    if message.tool_calls.is_some() || message.function_call.is_some() || message.refusal.is_some()
    {
        return Err(Error::invalid(
            field("status"),
            "a draft's tool calls and refusal come with its finish",
        ));
    }
    if message.id == Some(Uuid::nil()) {
        return Err(Error::invalid(
            field("id"),
            "the nil UUID is not a message id",
        ));
    }
    Ok(())
}

/// One part of a message's content, read without building a tree: its type, and the field
/// each type must carry (unknown fields are allowed, as the format may grow).
#[derive(Deserialize)]
struct Part<'a> {
    #[serde(rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<&'a RawValue>,
    #[serde(default, borrow)]
    image_url: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input_audio: Option<&'a RawValue>,
    #[serde(default, borrow)]
    file: Option<&'a RawValue>,
    #[serde(default, borrow)]
    refusal: Option<&'a RawValue>,
}

/// The part types each role may send, as the OpenAI chat format has them.
fn part_types(role: Role) -> &'static [&'static str] {
    match role {
        Role::User => &["text", "image_url", "input_audio", "file"],
        Role::Assistant => &["text", "refusal"],
        Role::System | Role::Tool | Role::Function => &["text"],
    }
}

/// Checks a content's array of parts: each an object whose `type` the role may send, carrying
/// that type's field (`text` and `refusal` a string; `image_url`, `input_audio` and `file` an
/// object); at least one part; nested no deeper than JSON fields may be.
fn check_parts(field: &str, role: Role, parts: &RawJson, limits: &Limits) -> Result<()> {
    if parts.depth() > limits.max_json_depth {
        return Err(Error::invalid(
            field,
            format!("nested deeper than {} levels", limits.max_json_depth),
        ));
    }
    let parsed: Vec<Part<'_>> = serde_json::from_str(parts.get()).map_err(|error| {
        Error::invalid(
            field,
            format!("each part must be an object with a \"type\": {error}"),
        )
    })?;
    if parsed.is_empty() {
        return Err(Error::invalid(field, "an array of parts must not be empty"));
    }
    let allowed = part_types(role);
    for (index, part) in parsed.iter().enumerate() {
        let kind = part.kind.as_ref();
        if !allowed.contains(&kind) {
            return Err(Error::invalid(
                format!("{field}[{index}].type"),
                format!(
                    "{} messages send parts of type {}, not {kind:?}",
                    role.as_str(),
                    allowed.join(", ")
                ),
            ));
        }
        let (value, want) = match kind {
            "text" => (part.text, '"'),
            "refusal" => (part.refusal, '"'),
            "image_url" => (part.image_url, '{'),
            "input_audio" => (part.input_audio, '{'),
            _ => (part.file, '{'),
        };
        if !value.is_some_and(|value| value.get().starts_with(want)) {
            let shape = if want == '"' { "a string" } else { "an object" };
            return Err(Error::invalid(
                format!("{field}[{index}].{kind}"),
                format!("a part of type {kind} carries {kind}, {shape}"),
            ));
        }
    }
    Ok(())
}

/// A page size: the caller's, or `default`, at most [`Limits::max_page_size`].
pub(crate) fn validate_page(limit: Option<usize>, default: usize, limits: &Limits) -> usize {
    limit.unwrap_or(default).min(limits.max_page_size)
}
