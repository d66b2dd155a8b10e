//! Staging: a batch of write commands applied, in command order, to a copy of the session in
//! memory, giving one [`SessionWrite`] for the whole batch and each command's [`Decision`].
//! Pure: no database, no clock but the one passed in, so it is unit-tested on its own.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use super::protocol::{Decision, Pending, Write, each_write};
use super::state::{Call, SessionState, access, record_calls};
use crate::command::{MAX_USAGE_TOTAL, Reply, SessionCommand};
use crate::error::{Error, Result};
use crate::idempotency::Keyed;
use crate::model::{
    Content, Message, MessageStatus, NewMessage, RawJson, Role, SessionId, SessionInfo, Usage,
    expiry, from_micros, tool_call_ids,
};
use crate::store::{ChunkRow, FinishRow, KeyRow, NewSessionRow, SessionWrite};

/// How a draft ends: what [`Batch::finish`] applies.
#[derive(Clone, Debug)]
pub(crate) struct Finish {
    pub status: MessageStatus,
    pub tool_calls: Option<RawJson>,
    pub refusal: Option<String>,
    pub usage: Option<Usage>,
}

/// How a write command changes the staged session; its reply is what it answers once the
/// batch committed, an error refuses it (and changes nothing).
pub(crate) trait StageWrite: SessionCommand<Reply: Clone> {
    /// Stages the command on `batch`.
    fn stage(&self, batch: &mut Batch<'_>) -> Result<Self::Reply>;
}

/// The rules staging follows, from the engine's configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StageRules {
    /// Answer another user's commands as if the session did not exist.
    pub hide_foreign: bool,
    /// How long idempotency records count, in microseconds.
    pub key_retention: i64,
    /// Bytes a message's content may reach (a draft's, as its deltas arrive).
    pub max_content_bytes: usize,
    /// The time to live, in seconds, of a session created without one (`None`: never expires).
    pub default_ttl: Option<i64>,
}

/// What staging a batch gives: the write, and what to apply once it committed.
#[derive(Debug)]
pub(crate) struct Staged {
    pub write: SessionWrite,
    /// The session after the batch (the version is confirmed at commit).
    pub info: Option<SessionInfo>,
    pub deleted: bool,
    /// The new messages, for the cached tail and the subscribers.
    pub messages: Vec<Arc<Message>>,
    /// Drafts stored before the batch that it changed (grown or finished), as they are now.
    pub updated: Vec<Arc<Message>>,
    /// The tool calls the batch made or answered, as they are now.
    pub calls: HashMap<String, Call>,
}

/// Stages `writes` on `state` (`None`: not loaded, as after a failed write), deciding each
/// command. `known` holds messages found stored after a conflict (by id), which a resend
/// answers from.
pub(crate) fn stage(
    session_id: SessionId,
    state: Option<&SessionState>,
    writes: &mut [Write],
    known: &HashMap<Uuid, Arc<Message>>,
    rules: StageRules,
    now: i64,
) -> Staged {
    let info = state.and_then(|state| state.info.clone());
    let mut write = SessionWrite::new(session_id, info.as_ref().map_or(0, |i| i.version), now);
    if let Some(state) = state {
        write.epoch = state.epoch;
        write.claim = !state.owned;
    }
    write.keys_expire_before = now.saturating_sub(rules.key_retention);
    let mut batch = Batch {
        state,
        known,
        hide_foreign: rules.hide_foreign,
        max_content_bytes: rules.max_content_bytes,
        default_ttl: rules.default_ttl,
        now,
        base: write.expected_version,
        steps: 0,
        info,
        deleted: state.is_some_and(|state| state.deleted),
        write,
        pending: HashMap::new(),
        messages: Vec::new(),
        updated: HashMap::new(),
        calls: HashMap::new(),
    };
    for command in writes.iter_mut() {
        each_write!(command, pending => pending.stage(&mut batch));
    }
    let Batch {
        mut write,
        mut info,
        deleted,
        messages,
        updated,
        calls,
        mut steps,
        base,
        ..
    } = batch;
    // A write that only records keys (of commands that changed nothing) still moves the
    // version, as every committed write does.
    if !write.is_empty() {
        steps = steps.max(1);
    }
    write.steps = steps;
    if let (Some(info), true) = (info.as_mut(), steps > 0) {
        info.version = base + steps;
        info.updated_at = from_micros(now);
    }
    Staged {
        write,
        info,
        deleted,
        messages,
        updated: updated.into_values().collect(),
        calls,
    }
}

impl<C: StageWrite> Pending<C> {
    /// Decides the command on the batch: from its idempotency record if its key was seen,
    /// else by staging it (recording its key with its answer when it succeeds).
    fn stage(&mut self, batch: &mut Batch<'_>) {
        let user_id = self.command.user_id();
        if let Some(keyed) = &self.keyed {
            if let Some(decision) = batch.recorded(keyed, user_id) {
                self.decision = decision;
                return;
            }
        }
        self.decision = match self.command.stage(batch) {
            Err(error) => Decision::Refused(error),
            Ok(reply) => {
                // The record is stored with the effect (in the same write, so neither lands
                // without the other) and holds the answer the command gets once committed.
                if let Some(keyed) = &self.keyed {
                    let response = serde_json::to_string(&Into::<Reply>::into(reply.clone()));
                    batch.write.keys.push(KeyRow {
                        key: keyed.key.clone(),
                        user_id: user_id.to_owned(),
                        fingerprint: keyed.fingerprint.clone(),
                        response: response.unwrap_or_default(),
                    });
                }
                Decision::OnCommit(reply)
            }
        };
    }
}

/// The session as staged so far in a batch: what a command may read and change.
pub(crate) struct Batch<'a> {
    state: Option<&'a SessionState>,
    known: &'a HashMap<Uuid, Arc<Message>>,
    hide_foreign: bool,
    max_content_bytes: usize,
    default_ttl: Option<i64>,
    now: i64,
    /// The committed version the batch starts from.
    base: i64,
    /// How many commands of this batch changed the session so far. Each change has a version
    /// of its own (the committed one plus its place in the batch), so a command conditional on
    /// a version (`if_version`) sees the changes queued before it, and two answers with one
    /// version always show the same session.
    steps: i64,
    info: Option<SessionInfo>,
    deleted: bool,
    write: SessionWrite,
    /// Messages staged or changed by earlier commands of the batch, by id.
    pending: HashMap<Uuid, Arc<Message>>,
    messages: Vec<Arc<Message>>,
    /// Drafts stored before the batch that it changed, by id.
    updated: HashMap<Uuid, Arc<Message>>,
    /// Tool calls the batch made or answered so far, by id.
    calls: HashMap<String, Call>,
}

impl Batch<'_> {
    /// The session row, if there is one (deleted or not): `(info, deleted)`.
    pub fn existing(&self) -> Option<(&SessionInfo, bool)> {
        self.info.as_ref().map(|info| (info, self.deleted))
    }

    /// The session, if `user_id` may act on it.
    pub fn session(&self, user_id: &str) -> Result<&SessionInfo> {
        access(self.info.as_ref(), self.deleted, user_id, self.hide_foreign)
    }

    /// Refuses a command conditional on another version than the session's at this point.
    pub fn precondition(&self, if_version: Option<i64>) -> Result<()> {
        let current = self.base + self.steps;
        match if_version {
            Some(expected) if expected != current => Err(Error::PreconditionFailed { current }),
            _ => Ok(()),
        }
    }

    /// Records that a command changed the session: the change gets its own version (and the
    /// session's expiry moves back).
    pub fn changed(&mut self) {
        self.steps += 1;
        if let Some(info) = self.info.as_mut() {
            info.version = self.base + self.steps;
            info.touched(self.now);
        }
    }

    /// Whether the session is `user_id`'s and gone (deleted or expired), so that other
    /// commands find nothing, but its owner may erase it.
    pub fn owned_and_gone(&self, user_id: &str) -> bool {
        self.info
            .as_ref()
            .is_some_and(|info| info.user_id == user_id && (self.deleted || self.expired_at(info)))
    }

    /// Whether `info` has expired by now (its last write longer ago than its time to live).
    fn expired_at(&self, info: &SessionInfo) -> bool {
        info.expires_at
            .is_some_and(|expires| expires <= from_micros(self.now))
    }

    /// Creates the session row, with `ttl` seconds to live (`None`: the engine's default, `0`:
    /// never expires); returns the session as created.
    pub fn create(
        &mut self,
        user_id: &str,
        title: Option<String>,
        metadata: RawJson,
        ttl: Option<i64>,
    ) -> SessionInfo {
        let ttl = ttl.or(self.default_ttl).filter(|&ttl| ttl > 0);
        self.write.create = Some(NewSessionRow {
            user_id: user_id.to_owned(),
            title: title.clone(),
            metadata: metadata.get().to_owned(),
        });
        let created = self.info.insert(SessionInfo {
            id: self.write.session_id,
            user_id: user_id.to_owned(),
            title,
            metadata,
            usage: Usage::default(),
            message_count: 0,
            version: 0,
            created_at: from_micros(self.now),
            updated_at: from_micros(self.now),
            ttl_seconds: ttl,
            expires_at: expiry(self.now, ttl),
        });
        if ttl.is_some() {
            self.write.ttl = Some(ttl);
        }
        // The create is the session's first change.
        created.version = self.base + self.steps + 1;
        let created = created.clone();
        self.changed();
        created
    }

    /// The stored or staged message with this id, as the batch left it so far: staged or
    /// changed earlier in the batch, cached, or found stored after a conflict.
    pub fn stored_message(&self, id: &Uuid) -> Option<&Arc<Message>> {
        self.pending
            .get(id)
            .or_else(|| self.state.and_then(|state| state.cached(id)))
            .or_else(|| self.known.get(id))
    }

    /// The draft still in progress in the session, if any (one at a time).
    pub fn draft_in_progress(&self) -> Option<&Arc<Message>> {
        let cached = self.state.into_iter().flat_map(|state| state.tail.iter());
        cached
            .chain(self.messages.iter())
            .map(|message| self.stored_message(&message.id).unwrap_or(message))
            .find(|message| message.status == MessageStatus::InProgress)
    }

    /// Message `id` of `user_id`'s session, as the batch left it so far.
    fn message(&self, user_id: &str, id: &Uuid) -> Result<Arc<Message>> {
        self.session(user_id)?;
        self.stored_message(id)
            .cloned()
            .ok_or(Error::MessageNotFound)
    }

    /// The draft `id` of `user_id`'s session, still in progress.
    fn draft(&self, user_id: &str, id: &Uuid) -> Result<Arc<Message>> {
        let message = self.message(user_id, id)?;
        if message.status != MessageStatus::InProgress {
            return Err(Error::MessageFinished {
                status: message.status,
            });
        }
        Ok(message)
    }

    /// Appends each delta's text at its byte offset of draft `id`'s content, in order; returns
    /// the content's length after them. Text already there (a resend) changes nothing; past
    /// the end is a gap; other text inside the content is a conflict. All or nothing: a delta
    /// refused leaves the draft as it was.
    pub fn append_deltas<'t>(
        &mut self,
        user_id: &str,
        id: &Uuid,
        deltas: impl IntoIterator<Item = (u64, &'t str)>,
    ) -> Result<u64> {
        let draft = self.draft(user_id, id)?;
        let before = draft.text().unwrap_or_default();
        let mut content = before.to_owned();
        // A refusal tells the draft's length as it stands: nothing of the command applies.
        let length = before.len() as u64;
        for (offset, text) in deltas {
            let Some(start) = usize::try_from(offset)
                .ok()
                .filter(|&start| start <= content.len())
            else {
                return Err(Error::OffsetGap { length });
            };
            if !content.is_char_boundary(start) {
                return Err(Error::OffsetConflict { length });
            }
            let overlap = (content.len() - start).min(text.len());
            if content.as_bytes()[start..start + overlap] != text.as_bytes()[..overlap] {
                return Err(Error::OffsetConflict { length });
            }
            // The overlap ends on a character boundary of the content, so of the text too.
            content.push_str(text.get(overlap..).unwrap_or_default());
            if content.len() > self.max_content_bytes {
                return Err(Error::TooLarge {
                    field: "content".into(),
                    size: content.len(),
                    limit: self.max_content_bytes,
                });
            }
        }
        let length = content.len() as u64;
        if content.len() == before.len() {
            return Ok(length);
        }
        let added = content[before.len()..].to_owned();
        let at = before.len();
        let mut message = Message::clone(&draft);
        message.content = Some(Content::Text(content));
        let seq = message.seq;
        if !self.replace_staged_row(&message) {
            // One chunk per draft per flush: deltas right after the previous ones join them.
            match self.write.chunks.last_mut() {
                Some(chunk)
                    if chunk.seq == seq
                        && usize::try_from(chunk.offset)
                            .is_ok_and(|offset| offset + chunk.content.len() == at) =>
                {
                    chunk.content.push_str(&added);
                }
                _ => self.write.chunks.push(ChunkRow {
                    seq,
                    offset: at as i64,
                    content: added,
                }),
            }
        }
        self.keep_changed(Arc::new(message));
        self.changed();
        Ok(length)
    }

    /// Finishes draft `id` as `finished` says (its status, tool calls and refusal); returns the
    /// message as finished. Finishing it again the same way changes nothing and answers the
    /// same; another way is a conflict.
    pub fn finish(&mut self, user_id: &str, id: &Uuid, finished: &Finish) -> Result<Arc<Message>> {
        let message = self.message(user_id, id)?;
        // Only an assistant message streams: anything else was never a draft to finish.
        if message.role != Role::Assistant {
            return Err(Error::MessageFinished {
                status: message.status,
            });
        }
        if message.status != MessageStatus::InProgress {
            let same = message.status == finished.status
                && (finished.tool_calls.is_none() || message.tool_calls == finished.tool_calls)
                && (finished.refusal.is_none() || message.refusal == finished.refusal);
            return if same {
                Ok(message)
            } else {
                Err(Error::FinishConflict {
                    status: message.status,
                })
            };
        }
        if let Some(tool_calls) = &finished.tool_calls {
            self.check_tool_pairing([(0, Role::Assistant, Some(tool_calls), None)])
                .map_err(|error| match error {
                    Error::InvalidInput { reason, .. } => Error::invalid("tool_calls", reason),
                    other => other,
                })?;
        }
        // The last check: from here on nothing is refused, so a refused finish stages nothing.
        if let Some(usage) = finished.usage {
            self.add_usage(usage)?;
        }
        if let Some(tool_calls) = &finished.tool_calls {
            self.record_tool_calls(message.seq, Role::Assistant, Some(tool_calls), None);
        }
        let mut done = Message::clone(&message);
        done.status = finished.status;
        if finished.tool_calls.is_some() {
            done.tool_calls = finished.tool_calls.clone();
        }
        if finished.refusal.is_some() {
            done.refusal = finished.refusal.clone();
        }
        let done = Arc::new(done);
        if !self.replace_staged_row(&done) {
            self.write.chunks.retain(|chunk| chunk.seq != done.seq);
            self.write.finishes.push(FinishRow {
                seq: done.seq,
                message: done.clone(),
            });
        }
        self.keep_changed(done.clone());
        self.changed();
        Ok(done)
    }

    /// The tool call `id` of the session as the batch left it so far.
    fn call(&self, id: &str) -> Option<Call> {
        self.calls
            .get(id)
            .or_else(|| self.state.and_then(|state| state.calls.get(id)))
            .copied()
    }

    /// Checks that `messages` (new ones, in order, each with its index in the command) make
    /// only tool calls with ids new to the session and answer only calls made and not yet
    /// answered; changes nothing.
    pub fn check_tool_pairing<'m>(
        &self,
        messages: impl IntoIterator<Item = (usize, Role, Option<&'m RawJson>, Option<&'m str>)>,
    ) -> Result<()> {
        let mut scratch: HashMap<String, bool> = HashMap::new();
        for (index, role, tool_calls, tool_call_id) in messages {
            match role {
                Role::Assistant => {
                    for id in tool_calls.map(tool_call_ids).unwrap_or_default() {
                        if self.call(&id).is_some() || scratch.contains_key(&id) {
                            return Err(Error::invalid(
                                format!("messages[{index}].tool_calls"),
                                format!("tool call id {id:?} is already used in this session"),
                            ));
                        }
                        scratch.insert(id, false);
                    }
                }
                Role::Tool => {
                    let Some(id) = tool_call_id else { continue };
                    let answered = scratch
                        .get(id)
                        .copied()
                        .or_else(|| self.call(id).map(|call| call.answered));
                    match answered {
                        None => return Err(Error::UnknownToolCall { id: id.to_owned() }),
                        Some(true) => return Err(Error::ToolCallAnswered { id: id.to_owned() }),
                        Some(false) => {
                            scratch.insert(id.to_owned(), true);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Records the tool calls a message at `seq` makes or answers (checked already).
    pub fn record_tool_calls(
        &mut self,
        seq: i64,
        role: Role,
        tool_calls: Option<&RawJson>,
        tool_call_id: Option<&str>,
    ) {
        // The batch's copy starts from the session's entries it changes.
        if let Some(id) = tool_call_id.filter(|_| role == Role::Tool) {
            if let Some(call) = self.call(id) {
                self.calls.insert(id.to_owned(), call);
            }
        }
        record_calls(&mut self.calls, seq, role, tool_calls, tool_call_id);
    }

    /// If `message` was appended by this batch, stages it in its new state in place of the
    /// row (which is then inserted as it is now); `false` if it was stored before.
    fn replace_staged_row(&mut self, message: &Message) -> bool {
        let Some(row) = self.write.rows.iter_mut().find(|row| row.id == message.id) else {
            return false;
        };
        *row = Arc::new(message.clone());
        if let Some(new) = self.messages.iter_mut().find(|new| new.id == message.id) {
            *new = row.clone();
        }
        true
    }

    /// Remembers a message the batch changed, for the commands after it and the cached tail.
    fn keep_changed(&mut self, message: Arc<Message>) {
        let appended_here = self.messages.iter().any(|new| new.id == message.id);
        if !appended_here {
            self.updated.insert(message.id, message.clone());
        }
        self.pending.insert(message.id, message);
    }

    /// Stages a new message at the next sequence; returns the sequence. (A command checks
    /// access with [`Self::session`] first; without a session there is no sequence to take.)
    pub fn add_message(&mut self, id: Uuid, new: &NewMessage) -> Result<i64> {
        let now = from_micros(self.now);
        self.add_stored(|seq| Message::stored(seq, id, new, now))
    }

    /// Stages the message `make` gives for the next sequence, as it is (an import's keeps its
    /// time of creation); returns the sequence.
    pub fn add_stored(&mut self, make: impl FnOnce(i64) -> Message) -> Result<i64> {
        let Some(info) = self.info.as_mut() else {
            return Err(Error::NotFound);
        };
        let seq = info.message_count;
        info.message_count += 1;
        let message = Arc::new(make(seq));
        self.write.rows.push(message.clone());
        self.pending.insert(message.id, message.clone());
        self.messages.push(message);
        Ok(seq)
    }

    /// The time the batch is staged at (its commit time, as stored).
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        from_micros(self.now)
    }

    /// Sets the title.
    pub fn set_title(&mut self, title: &str) {
        self.write.title = Some(title.to_owned());
        if let Some(info) = self.info.as_mut() {
            info.title = Some(title.to_owned());
        }
    }

    /// Replaces the metadata.
    pub fn set_metadata(&mut self, metadata: &RawJson) {
        self.write.metadata = Some(metadata.get().to_owned());
        if let Some(info) = self.info.as_mut() {
            info.metadata = metadata.clone();
        }
    }

    /// Adds usage deltas (the database adds them to what it holds); refused, changing
    /// nothing, if a counter would pass [`MAX_USAGE_TOTAL`].
    pub fn add_usage(&mut self, delta: Usage) -> Result<()> {
        if let Some(info) = self.info.as_ref() {
            let room = |field: &str, total: i64, delta: i64| match total.checked_add(delta) {
                Some(sum) if sum <= MAX_USAGE_TOTAL => Ok(()),
                _ => Err(Error::invalid(
                    format!("usage.{field}"),
                    format!("would take the session's {field} past {MAX_USAGE_TOTAL}"),
                )),
            };
            room(
                "prompt_tokens",
                info.usage.prompt_tokens,
                delta.prompt_tokens,
            )?;
            room(
                "completion_tokens",
                info.usage.completion_tokens,
                delta.completion_tokens,
            )?;
        }
        // Within bounds: the batch's deltas are at most the totals' room, so no sum overflows.
        self.write.usage.prompt_tokens += delta.prompt_tokens;
        self.write.usage.completion_tokens += delta.completion_tokens;
        if let Some(info) = self.info.as_mut() {
            info.usage.prompt_tokens += delta.prompt_tokens;
            info.usage.completion_tokens += delta.completion_tokens;
        }
        Ok(())
    }

    /// Sets the time to live in seconds (`0`: never expires).
    pub fn set_ttl(&mut self, ttl: i64) {
        let ttl = Some(ttl).filter(|&ttl| ttl > 0);
        self.write.ttl = Some(ttl);
        if let Some(info) = self.info.as_mut() {
            info.ttl_seconds = ttl;
        }
    }

    /// Deletes the session.
    pub fn delete(&mut self) {
        // Deltas staged before it in the batch would be deleted with the rest: not written.
        self.write.chunks.clear();
        self.write.delete = true;
        self.deleted = true;
        self.steps += 1;
    }

    /// Deletes the session and erases what a delete keeps: title, metadata, usage and the
    /// idempotency records (the row stays, holding its id, owner and times).
    pub fn erase(&mut self) {
        self.delete();
        self.write.erase = true;
        if let Some(info) = self.info.as_mut() {
            info.title = None;
            info.metadata = RawJson::empty_object();
            info.usage = Usage::default();
            info.ttl_seconds = None;
            info.expires_at = None;
        }
    }

    /// The decision for a command whose idempotency key was seen before (stored, or earlier
    /// in this batch), whatever the session's state now; `None` to stage it.
    fn recorded<T>(&self, keyed: &Keyed, user_id: &str) -> Option<Decision<T>> {
        let expire_before = self.write.keys_expire_before;
        let stored = self
            .state
            .and_then(|state| state.key(&keyed.key))
            .and_then(Option::as_ref)
            .filter(|record| record.created_at >= expire_before)
            .map(|record| {
                (
                    &record.user_id,
                    &record.fingerprint,
                    &record.response,
                    false,
                )
            });
        // Sent twice in one batch: the second gets the first's answer if the write commits.
        let staged = || {
            let row = self.write.keys.iter().find(|row| row.key == keyed.key)?;
            Some((&row.user_id, &row.fingerprint, &row.response, true))
        };
        match stored.or_else(staged)? {
            // Another user's record is not theirs to see: the command goes on, and is refused
            // like any command on a session that is not theirs.
            (owner, ..) if owner != user_id => None,
            (_, fingerprint, ..) if *fingerprint != keyed.fingerprint => {
                Some(Decision::Refused(Error::IdempotencyKeyReused))
            }
            (_, _, response, with_this_write) => Some(Decision::Replay {
                response: response.clone(),
                with_this_write,
            }),
        }
    }
}

#[cfg(test)]
mod tests;
