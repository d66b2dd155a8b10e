//! The session as its actor knows it: the committed row, the newest messages, the ownership
//! epoch and the idempotency records seen since the load.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use uuid::Uuid;

use crate::idempotency::KeyRecord;
use crate::model::{Message, MessageStatus, PendingToolCall, Role, SessionInfo, tool_call_ids};
use crate::store::LoadedSession;

/// Idempotency records kept per live session at most; past it the cache starts over (records
/// are looked up again from the database when a key comes back).
const CACHED_KEYS: usize = 1024;

/// The committed state of one session.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// `None` when no session row exists (yet).
    pub info: Option<SessionInfo>,
    pub deleted: bool,
    /// The newest messages, ascending; `tail[0].seq == info.message_count - tail.len()`.
    pub tail: VecDeque<Arc<Message>>,
    /// Message id → seq for the messages in `tail`.
    ids: HashMap<Uuid, i64>,
    /// The ownership epoch: as loaded until this actor's first write takes the session over
    /// (bumping it), then the one this actor holds.
    pub epoch: i64,
    /// Whether this actor has taken the session over (its writes then check `epoch` without
    /// bumping it). A reload gives the session up: the next write claims it again.
    pub owned: bool,
    /// Idempotency records looked up or written since the load, by key; `None`: not stored.
    keys: HashMap<String, Option<KeyRecord>>,
    /// Every tool call the session's assistant messages made, by id.
    pub calls: HashMap<String, Call>,
    /// Loaded for other users than the owner: the row only, no messages and no tool calls.
    /// Its owner's commands load the session again.
    pub partial: bool,
}

/// A tool call of the session: the assistant message that made it, and whether a `tool`
/// message answered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub seq: i64,
    pub answered: bool,
}

/// Records the tool calls `message` (at `seq`) makes or answers in `calls`.
pub(crate) fn record_calls(
    calls: &mut HashMap<String, Call>,
    seq: i64,
    role: Role,
    tool_calls: Option<&crate::model::RawJson>,
    tool_call_id: Option<&str>,
) {
    match role {
        Role::Assistant => {
            for id in tool_calls.map(tool_call_ids).unwrap_or_default() {
                calls.entry(id).or_insert(Call {
                    seq,
                    answered: false,
                });
            }
        }
        Role::Tool => {
            if let Some(call) = tool_call_id.and_then(|id| calls.get_mut(id)) {
                call.answered = true;
            }
        }
        _ => {}
    }
}

impl SessionState {
    /// The state as loaded (`None`: no session row).
    pub fn from_store(loaded: Option<LoadedSession>) -> Self {
        let Some(loaded) = loaded else {
            return Self::default();
        };
        let ids = loaded
            .tail
            .iter()
            .map(|message| (message.id, message.seq))
            .collect();
        let mut calls = HashMap::new();
        let older = loaded.older_tool_messages.iter().map(|older| {
            let (calls, answers) = (older.tool_calls.as_ref(), older.tool_call_id.as_deref());
            (older.seq, older.role, calls, answers)
        });
        let cached = loaded.tail.iter().map(|message| {
            let (calls, answers) = (message.tool_calls.as_ref(), message.tool_call_id.as_deref());
            (message.seq, message.role, calls, answers)
        });
        for (seq, role, made, answered) in older.chain(cached) {
            record_calls(&mut calls, seq, role, made, answered);
        }
        Self {
            info: Some(loaded.info),
            deleted: loaded.deleted,
            tail: loaded.tail.into_iter().map(Arc::new).collect(),
            ids,
            epoch: loaded.epoch,
            owned: false,
            keys: HashMap::new(),
            calls,
            partial: loaded.partial,
        }
    }

    /// The tool calls no `tool` message has answered yet, oldest first.
    pub fn pending_calls(&self) -> Vec<PendingToolCall> {
        let mut pending: Vec<PendingToolCall> = self
            .calls
            .iter()
            .filter(|(_, call)| !call.answered)
            .map(|(id, call)| PendingToolCall {
                id: id.clone(),
                seq: call.seq,
            })
            .collect();
        pending.sort_by(|a, b| (a.seq, &a.id).cmp(&(b.seq, &b.id)));
        pending
    }

    /// The committed version (0 before the session exists).
    pub fn version(&self) -> i64 {
        self.info.as_ref().map_or(0, |info| info.version)
    }

    /// How many messages are committed.
    pub fn message_count(&self) -> i64 {
        self.info.as_ref().map_or(0, |info| info.message_count)
    }

    /// The sequence of the oldest cached message.
    pub fn tail_start(&self) -> i64 {
        self.message_count() - self.tail.len() as i64
    }

    /// The cached message with this id.
    pub fn cached(&self, id: &Uuid) -> Option<&Arc<Message>> {
        let seq = *self.ids.get(id)?;
        self.tail
            .get(usize::try_from(seq - self.tail_start()).ok()?)
    }

    /// Appends committed messages to the cached tail, keeping the newest `keep`, and any
    /// draft still in progress with the messages after it: a draft's deltas and finish are
    /// staged against its cached state, so it stays cached until it ends (one draft at a
    /// time, so at most the messages appended while it streams come in addition).
    pub fn push_messages(&mut self, messages: impl IntoIterator<Item = Arc<Message>>, keep: usize) {
        for message in messages {
            self.ids.insert(message.id, message.seq);
            self.tail.push_back(message);
        }
        while self.tail.len() > keep {
            if self
                .tail
                .front()
                .is_some_and(|oldest| oldest.status == MessageStatus::InProgress)
            {
                break;
            }
            if let Some(old) = self.tail.pop_front() {
                self.ids.remove(&old.id);
            }
        }
    }

    /// Puts committed new states of cached messages (drafts grown or finished) in place of
    /// the old.
    pub fn replace_messages(&mut self, messages: impl IntoIterator<Item = Arc<Message>>) {
        let start = self.tail_start();
        for message in messages {
            let index = usize::try_from(message.seq - start).ok();
            if let Some(slot) = index.and_then(|index| self.tail.get_mut(index)) {
                if slot.id == message.id {
                    *slot = message;
                }
            }
        }
    }

    /// Forgets the messages (the session was deleted).
    pub fn clear_messages(&mut self) {
        self.tail.clear();
        self.ids.clear();
    }

    /// The session, if `user_id` may read it.
    pub fn readable_by(&self, user_id: &str, hide_foreign: bool) -> crate::Result<&SessionInfo> {
        access(self.info.as_ref(), self.deleted, user_id, hide_foreign)
    }

    /// The idempotency record of `key`: `None` if never looked up, `Some(None)` if not stored.
    pub fn key(&self, key: &str) -> Option<&Option<KeyRecord>> {
        self.keys.get(key)
    }

    /// Remembers what the database holds for these keys.
    pub fn remember_keys(
        &mut self,
        records: impl ExactSizeIterator<Item = (String, Option<KeyRecord>)>,
    ) {
        if self.keys.len() + records.len() > CACHED_KEYS {
            self.keys.clear();
        }
        self.keys.extend(records);
    }
}

/// Who may act on a session: its owner, while it is not deleted. Another user is told the
/// session does not exist, or, with `hide_foreign` off, that it is not theirs.
pub(crate) fn access<'a>(
    info: Option<&'a SessionInfo>,
    deleted: bool,
    user_id: &str,
    hide_foreign: bool,
) -> crate::Result<&'a SessionInfo> {
    // An expired session is gone for everyone from its expiry on, whether or not the purge
    // has erased it yet.
    let gone = deleted || info.is_some_and(SessionInfo::expired);
    match info {
        Some(info) if !gone && info.user_id == user_id => Ok(info),
        Some(_) if !gone && !hide_foreign => Err(crate::Error::Forbidden),
        _ => Err(crate::Error::NotFound),
    }
}
