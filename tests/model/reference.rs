//! The reference model: a plain in-memory account of sessions, messages, owners, idempotent
//! ids and versions, written from the documented semantics (not from the engine's code). For
//! each command it predicts the value the engine must answer, or the error kinds any of which
//! is a correct refusal.
//!
//! Drafts (streamed assistant replies) follow the documented rules: a draft takes its sequence
//! when it starts, grows by deltas idempotent by their byte offset, and ends once; one streams
//! at a time per session, unless a start interrupts it.

use std::collections::{HashMap, HashSet};

use soloist::uuid::Uuid;
use soloist::{
    Content, Error, Limits, Message, MessageStatus, NewMessage, OnBusy, PendingToolCall, RawJson,
    Role, SessionId, SessionInfo, Usage,
};

use crate::USERS;

type Timestamp = chrono::DateTime<chrono::Utc>;

/// The page size a read without a limit asks for (documented default).
const DEFAULT_MESSAGE_PAGE: usize = 100;

/// The error kinds the model predicts; a failed command must fail with one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    NotFound,
    Forbidden,
    InvalidInput,
    TooLarge,
    SessionIdTaken,
    MessageIdReused,
    UnknownToolCall,
    ToolCallAnswered,
    MessageNotFound,
    MessageFinished(MessageStatus),
    OffsetGap(u64),
    OffsetConflict(u64),
    FinishConflict(MessageStatus),
    TurnInProgress(Uuid),
    /// Anything else (storage, shutdown, actor failure...): never expected here.
    Other,
}

pub fn kind(error: &Error) -> Kind {
    match error {
        Error::NotFound => Kind::NotFound,
        Error::Forbidden => Kind::Forbidden,
        Error::InvalidInput { .. } => Kind::InvalidInput,
        Error::TooLarge { .. } => Kind::TooLarge,
        Error::SessionIdTaken => Kind::SessionIdTaken,
        Error::MessageIdReused { .. } => Kind::MessageIdReused,
        Error::UnknownToolCall { .. } => Kind::UnknownToolCall,
        Error::ToolCallAnswered { .. } => Kind::ToolCallAnswered,
        Error::MessageNotFound => Kind::MessageNotFound,
        Error::MessageFinished { status } => Kind::MessageFinished(*status),
        Error::OffsetGap { length } => Kind::OffsetGap(*length),
        Error::OffsetConflict { length } => Kind::OffsetConflict(*length),
        Error::FinishConflict { status } => Kind::FinishConflict(*status),
        Error::TurnInProgress { id } => Kind::TurnInProgress(*id),
        _ => Kind::Other,
    }
}

/// What the model predicts: a value, or the error kinds any of which is a correct refusal
/// (a command with several faults may be refused for any of them).
pub type Expected<T> = Result<T, Vec<Kind>>;

#[derive(Debug)]
struct ModelMessage {
    /// The client id; a generated one is learned from the first read that returns it.
    id: Option<Uuid>,
    /// As sent, then as it grew (content) and ended (status, tool calls).
    message: NewMessage,
    /// Learned from the first read; must never change afterwards.
    created_at: Option<Timestamp>,
}

#[derive(Debug)]
pub struct ModelSession {
    owner: usize,
    title: Option<String>,
    metadata: RawJson,
    pub usage: Usage,
    messages: Vec<ModelMessage>,
    /// Client message id → sequence.
    ids: HashMap<Uuid, i64>,
    /// Every tool call id an assistant message made → the message's sequence, and whether a
    /// tool message answered it.
    calls: HashMap<String, (i64, bool)>,
    /// Bumped by every committed write.
    version: i64,
    deleted: bool,
    /// Erased too: what a delete keeps is gone.
    erased: bool,
    created_at: Option<Timestamp>,
    /// `updated_at` as first seen at each version: one version, one timestamp.
    updated_at: HashMap<i64, Timestamp>,
}

#[derive(Debug)]
pub struct Model {
    pub sessions: HashMap<SessionId, ModelSession>,
    hide_foreign: bool,
    pub limits: Limits,
}

/// The ids of the tool calls an assistant message makes (entries with an `"id"`).
fn call_ids(message: &NewMessage) -> Vec<String> {
    let Some(tool_calls) = &message.tool_calls else {
        return Vec::new();
    };
    match tool_calls.to_value() {
        serde_json::Value::Array(calls) => calls
            .iter()
            .filter_map(|call| call.get("id").and_then(|id| id.as_str()).map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Records the tool calls `message` (at `seq`) makes, or the one it answers.
fn record_calls(calls: &mut HashMap<String, (i64, bool)>, seq: i64, message: &NewMessage) {
    match message.role {
        Role::Assistant => {
            for id in call_ids(message) {
                calls.entry(id).or_insert((seq, false));
            }
        }
        Role::Tool => {
            if let Some(call) = message
                .tool_call_id
                .as_ref()
                .and_then(|id| calls.get_mut(id))
            {
                call.1 = true;
            }
        }
        _ => {}
    }
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

/// What is wrong with the shape of `tool_calls`, if an array (else `json_faults` says): at
/// least one call, each an object with a non-empty string `id` (unique in the array) and a
/// string `type`; a `function` call's `function` an object with a string `name`.
fn tool_call_faults(value: &Option<RawJson>) -> Vec<Kind> {
    let Some(serde_json::Value::Array(calls)) = value.as_ref().map(RawJson::to_value) else {
        return Vec::new();
    };
    let mut ids = std::collections::HashSet::new();
    let well_formed = !calls.is_empty()
        && calls.iter().all(|call| {
            let id = call
                .get("id")
                .and_then(|id| id.as_str())
                .unwrap_or_default();
            let kind = call.get("type").and_then(|kind| kind.as_str());
            let named = call
                .get("function")
                .and_then(|function| function.get("name"))
                .is_some_and(|name| name.is_string());
            !id.is_empty()
                && ids.insert(id.to_owned())
                && kind.is_some()
                && (kind != Some("function") || named)
        });
    if well_formed {
        Vec::new()
    } else {
        vec![Kind::InvalidInput]
    }
}

/// Whether `sent` is the message `stored` sent again (its id matched already): every field the
/// client chose is the same; a draft's start matches its draft while the text sent is a prefix
/// of the draft's (it may have grown, or ended, since).
fn is_resend(stored: &NewMessage, sent: &NewMessage) -> bool {
    if sent.status == Some(MessageStatus::InProgress) {
        return stored.role == sent.role
            && stored.name == sent.name
            && stored.metadata == sent.metadata
            && match (stored.text(), sent.text()) {
                (Some(stored), Some(sent)) => stored.starts_with(sent),
                (_, None) => true,
                (None, Some(_)) => false,
            };
    }
    let status = |message: &NewMessage| message.status.unwrap_or_default();
    status(stored) == status(sent)
        && NewMessage {
            status: None,
            ..stored.clone()
        } == NewMessage {
            status: None,
            ..sent.clone()
        }
}

fn is_draft(message: &NewMessage) -> bool {
    message.status == Some(MessageStatus::InProgress)
}

impl ModelSession {
    /// The sequence of message `id`, as the engine finds it by id.
    fn find(&self, id: &Uuid) -> Option<usize> {
        self.ids.get(id).map(|&seq| seq as usize)
    }

    /// The draft in progress that stops (or is interrupted by) a new one, as the engine finds
    /// it.
    fn streaming(&self) -> Option<usize> {
        (0..self.messages.len()).find(|&seq| is_draft(&self.messages[seq].message))
    }

    /// Ends the draft at `seq` as `status`.
    fn end_draft(&mut self, seq: usize, status: MessageStatus) {
        self.messages[seq].message.status = Some(status);
        self.version += 1;
    }
}

impl Model {
    pub fn new(hide_foreign: bool, limits: Limits) -> Self {
        Self {
            sessions: HashMap::new(),
            hide_foreign,
            limits,
        }
    }

    /// The content so far of message `id` of `session`, if the session has it (for choosing
    /// deltas; not a prediction).
    pub fn text_of(&self, session: SessionId, id: &Uuid) -> Option<String> {
        let session = self.sessions.get(&session)?;
        let seq = *session.ids.get(id)? as usize;
        Some(
            session.messages[seq]
                .message
                .text()
                .unwrap_or_default()
                .to_owned(),
        )
    }

    /// Faults of a message, from the documented rules.
    fn message_faults(&self, message: &NewMessage) -> Vec<Kind> {
        let limits = &self.limits;
        let mut faults: Vec<Kind> = [
            message
                .content
                .as_ref()
                .filter(|content| content.len() > limits.max_content_bytes)
                .map(|_| Kind::TooLarge),
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
        faults.extend(tool_call_faults(&message.tool_calls));
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
        match message.status {
            None | Some(MessageStatus::Completed) => {}
            // A draft's start: an assistant's, its text (or none yet) and nothing else; what
            // only the end knows comes with the finish.
            Some(MessageStatus::InProgress) => {
                if message.role != Role::Assistant
                    || message.tool_calls.is_some()
                    || message.function_call.is_some()
                    || message.refusal.is_some()
                {
                    faults.push(Kind::InvalidInput);
                }
            }
            // Appended ended: only a draft ends, by its finish.
            Some(_) => faults.push(Kind::InvalidInput),
        }
        if !is_draft(message)
            && message.content.is_none()
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
    pub fn create(
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
            Some(session) if session.deleted => Err(vec![Kind::SessionIdTaken]),
            Some(session) if session.owner != user => Err(vec![Kind::SessionIdTaken]),
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
                        calls: HashMap::new(),
                        version: 1,
                        deleted: false,
                        erased: false,
                        created_at: None,
                        updated_at: HashMap::new(),
                    },
                );
                Ok(true)
            }
        }
    }

    /// Returns the sequences.
    pub fn append(
        &mut self,
        id: SessionId,
        user: usize,
        messages: &[NewMessage],
        on_busy: OnBusy,
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
        let stored = |message: &NewMessage| {
            message
                .id
                .and_then(|id| session.ids.get(&id))
                .map(|&seq| seq as usize)
        };
        let resend = |message: &NewMessage| {
            stored(message).is_some_and(|seq| is_resend(&session.messages[seq].message, message))
        };
        let reused = messages
            .iter()
            .any(|message| stored(message).is_some() && !resend(message));
        // What the engine stages as new: all but the resends it finds by their id. (One it
        // does not find is refused by the database once staged, and staged again as a resend.)
        let found = |message: &NewMessage| message.id.and_then(|id| session.find(&id)).is_some();
        let staged_new: Vec<&NewMessage> = messages
            .iter()
            .filter(|message| !(resend(message) && found(message)))
            .collect();
        // Tool results answer calls the session made and nobody answered; call ids are new;
        // one append starts at most one draft, and one streams at a time. (An engine that no
        // longer caches a reused id's message takes it for a new one, so these faults of the
        // others are as right a refusal as the reuse.)
        let mut calls: HashMap<String, bool> = session
            .calls
            .iter()
            .map(|(id, &(_, answered))| (id.clone(), answered))
            .collect();
        let mut staging_fault = None;
        for message in &staged_new {
            let fault = match message.role {
                Role::Assistant => call_ids(message)
                    .into_iter()
                    .find_map(|id| calls.insert(id, false).map(|_| Kind::InvalidInput)),
                Role::Tool => match message.tool_call_id.as_ref().map(|id| calls.get_mut(id)) {
                    Some(None) | None => Some(Kind::UnknownToolCall),
                    Some(Some(true)) => Some(Kind::ToolCallAnswered),
                    Some(Some(answered)) => {
                        *answered = true;
                        None
                    }
                },
                _ => None,
            };
            if fault.is_some() {
                staging_fault = fault;
                break;
            }
        }
        let new_drafts = staged_new
            .iter()
            .filter(|message| is_draft(message))
            .count();
        let streaming = session.streaming();
        if staging_fault.is_none() && new_drafts > 1 {
            staging_fault = Some(Kind::InvalidInput);
        }
        if let (None, 1, Some(seq), OnBusy::Refuse) =
            (staging_fault, new_drafts, streaming, on_busy)
        {
            let draft = session.messages[seq].id.unwrap_or_default();
            staging_fault = Some(Kind::TurnInProgress(draft));
        }
        if reused {
            let mut faults = vec![Kind::MessageIdReused];
            faults.extend(staging_fault);
            return Err(faults);
        }
        if let Some(fault) = staging_fault {
            return Err(vec![fault]);
        }
        let new: Vec<bool> = messages.iter().map(|message| !resend(message)).collect();
        let stored_at: Vec<Option<usize>> = messages.iter().map(stored).collect();
        let starts = messages
            .iter()
            .zip(&new)
            .any(|(message, &new)| new && is_draft(message));
        if let (true, Some(seq)) = (starts, streaming) {
            // Interrupted: finished incomplete first, in the same commit.
            session.end_draft(seq, MessageStatus::Incomplete);
        }
        let mut sequences = Vec::new();
        let mut added = false;
        for ((message, new), stored_at) in messages.iter().zip(new).zip(stored_at) {
            if !new {
                sequences.extend(stored_at.map(|seq| seq as i64));
                continue;
            }
            let seq = session.messages.len() as i64;
            if let Some(id) = message.id {
                session.ids.insert(id, seq);
            }
            record_calls(&mut session.calls, seq, message);
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

    /// Appends `deltas` (offset, text) to draft `message` in order, all or nothing; returns
    /// the draft's length.
    pub fn deltas(
        &mut self,
        id: SessionId,
        user: usize,
        message: &Uuid,
        deltas: &[(u64, String)],
    ) -> Expected<u64> {
        let bytes: usize = deltas.iter().map(|(_, text)| text.len()).sum();
        let max = self.limits.max_content_bytes;
        if deltas.is_empty() {
            return Err(vec![Kind::InvalidInput]);
        }
        if bytes > max {
            return Err(vec![Kind::TooLarge]);
        }
        let session = self.access(id, user)?;
        let seq = session
            .find(message)
            .ok_or_else(|| vec![Kind::MessageNotFound])?;
        let draft = &mut session.messages[seq].message;
        if !is_draft(draft) {
            return Err(vec![Kind::MessageFinished(
                draft.status.unwrap_or_default(),
            )]);
        }
        let before = draft.text().unwrap_or_default().to_owned();
        let mut content = before.clone();
        for (offset, text) in deltas {
            let length = before.len() as u64;
            let Some(start) = usize::try_from(*offset)
                .ok()
                .filter(|&start| start <= content.len())
            else {
                return Err(vec![Kind::OffsetGap(length)]);
            };
            // Text inside the draft must be the text there; a character cut in two never is.
            let overlap = (content.len() - start).min(text.len());
            if !content.is_char_boundary(start)
                || content.as_bytes()[start..start + overlap] != text.as_bytes()[..overlap]
            {
                return Err(vec![Kind::OffsetConflict(length)]);
            }
            content.push_str(&text[overlap..]);
            if content.len() > max {
                return Err(vec![Kind::TooLarge]);
            }
        }
        let length = content.len() as u64;
        if content.len() > before.len() {
            draft.content = Some(Content::Text(content));
            session.version += 1;
        }
        Ok(length)
    }

    /// Ends draft `message` as `status` (with `tool_calls`, adding `usage`); returns its
    /// sequence. A message that ended already answers as it is when ended the same way.
    pub fn finish(
        &mut self,
        id: SessionId,
        user: usize,
        message: &Uuid,
        status: MessageStatus,
        tool_calls: Option<RawJson>,
        usage: Option<Usage>,
    ) -> Expected<usize> {
        let mut faults = json_faults(&tool_calls, false, self.limits.max_json_bytes);
        faults.extend(tool_call_faults(&tool_calls));
        if status == MessageStatus::InProgress {
            faults.push(Kind::InvalidInput);
        }
        if !faults.is_empty() {
            return Err(faults);
        }
        let session = self.access(id, user)?;
        let seq = session
            .find(message)
            .ok_or_else(|| vec![Kind::MessageNotFound])?;
        let stored = &session.messages[seq].message;
        if stored.role != Role::Assistant {
            return Err(vec![Kind::MessageFinished(
                stored.status.unwrap_or_default(),
            )]);
        }
        if !is_draft(stored) {
            let ended = stored.status.unwrap_or_default();
            let same = ended == status && (tool_calls.is_none() || stored.tool_calls == tool_calls);
            return if same {
                Ok(seq)
            } else {
                Err(vec![Kind::FinishConflict(ended)])
            };
        }
        if let Some(tool_calls) = &tool_calls {
            let mut ids = HashSet::new();
            let ended = NewMessage {
                role: Role::Assistant,
                tool_calls: Some(tool_calls.clone()),
                ..NewMessage::default()
            };
            if call_ids(&ended)
                .into_iter()
                .any(|id| session.calls.contains_key(&id) || !ids.insert(id))
            {
                return Err(vec![Kind::InvalidInput]);
            }
            record_calls(&mut session.calls, seq as i64, &ended);
            session.messages[seq].message.tool_calls = Some(tool_calls.clone());
        }
        if let Some(usage) = usage {
            session.usage.prompt_tokens += usage.prompt_tokens;
            session.usage.completion_tokens += usage.completion_tokens;
        }
        session.end_draft(seq, status);
        Ok(seq)
    }

    /// Compares a finish's answer with the model's message at `seq`.
    pub fn check_finished(
        &mut self,
        id: SessionId,
        seq: usize,
        actual: &Message,
    ) -> Result<(), String> {
        if actual.seq != seq as i64 {
            return Err(format!("finished message at {}, model {seq}", actual.seq));
        }
        self.check_messages(
            id,
            std::slice::from_ref(&std::sync::Arc::new(actual.clone())),
            seq..seq + 1,
        )
    }

    /// The tool calls of the session that no tool message answered, as reads report them.
    pub fn pending_calls(&self, id: SessionId) -> Vec<PendingToolCall> {
        let Some(session) = self.sessions.get(&id) else {
            return Vec::new();
        };
        let mut pending: Vec<PendingToolCall> = session
            .calls
            .iter()
            .filter(|(_, (_, answered))| !answered)
            .map(|(id, &(seq, _))| PendingToolCall {
                id: id.clone(),
                seq,
            })
            .collect();
        pending.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
        pending
    }

    /// Returns the indexes of the page's messages and its `next_after_seq`.
    pub fn get(
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

    pub fn update(
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

    pub fn add_usage(
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

    pub fn delete(&mut self, id: SessionId, user: usize, erase: bool) -> Expected<()> {
        // Its owner may erase a deleted session: what the delete kept goes.
        let owner_erases_tombstone = erase
            && self
                .sessions
                .get(&id)
                .is_some_and(|session| session.deleted && session.owner == user);
        let session = if owner_erases_tombstone {
            self.sessions
                .get_mut(&id)
                .ok_or_else(|| vec![Kind::NotFound])?
        } else {
            self.access(id, user)?
        };
        session.deleted = true;
        session.version += 1;
        if erase {
            session.erased = true;
            session.title = None;
            session.metadata = RawJson::empty_object();
            session.usage = Usage::default();
        }
        Ok(())
    }

    /// Whether the session is deleted (`Some`), and erased.
    pub fn deleted(&self, id: SessionId) -> Option<bool> {
        self.sessions
            .get(&id)
            .filter(|session| session.deleted)
            .map(|session| session.erased)
    }

    /// The user's live sessions, newest first (creation times as observed).
    pub fn listed(&self, user: usize) -> Vec<SessionId> {
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
    pub fn check_info(&mut self, info: &SessionInfo) -> Result<(), String> {
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
    pub fn check_messages(
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
                actual.status,
                &actual.content,
                &actual.name,
                &actual.tool_calls,
                &actual.tool_call_id,
                &actual.function_call,
                &actual.refusal,
            );
            let model_fields = (
                wanted.role,
                wanted.status.unwrap_or_default(),
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
