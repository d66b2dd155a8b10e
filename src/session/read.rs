//! Loading the session, keeping it current, and answering reads from the committed state.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::debug;

use super::protocol::{Published, Read, Subscribed};
use super::state::SessionState;
use super::{SessionActor, Sorted};
use crate::command::{DEFAULT_MESSAGE_PAGE, GetSession, SessionPage, validate_page};
use crate::error::{Error, Result, StorageError};
use crate::fanout::Fanout;
use crate::model::{Message, MessageStatus};

/// Events held per session for subscribers that have not taken them (at most this many, and
/// at most [`SUBSCRIBER_BUFFER_BYTES`] of them); a subscriber that falls further behind
/// catches up from the session, from its own position.
const SUBSCRIBER_BUFFER: usize = 1024;

/// Bytes of events held per session for subscribers that have not taken them (or four of the
/// largest messages the limits allow, if more): what subscribers that stop reading can pin,
/// whatever the session's writers send.
pub(crate) const SUBSCRIBER_BUFFER_BYTES: usize = 1 << 20;

/// The payload bytes of a page so far, against its bound.
struct PageBytes {
    taken: usize,
    max: usize,
}

impl PageBytes {
    fn new(max: usize) -> Self {
        Self { taken: 0, max }
    }

    /// Whether `message` goes in the page (the first always does), counting it if so.
    fn fits(&mut self, message: &Message) -> bool {
        let bytes = message.payload_bytes();
        if self.taken > 0 && self.taken + bytes > self.max {
            return false;
        }
        self.taken += bytes;
        true
    }
}

impl SessionActor {
    /// Loads the session; with `readers`, its messages only if one of them owns it, and with
    /// `hide` too, as missing if none of them does.
    pub(super) async fn load(&mut self, readers: &[&str], hide: bool) -> Result<(), StorageError> {
        self.shared.stats.record_load();
        let loaded = self
            .shared
            .store
            .load(self.id, self.shared.config.cached_messages, readers, hide)
            .await?;
        if hide && loaded.is_none() {
            // Missing, or hidden from these readers: nothing to keep, and the next batch
            // (perhaps its owner's) loads again.
            self.state = None;
            return Ok(());
        }
        let state = SessionState::from_store(loaded);
        if let Some(info) = &state.info {
            let drafts = state
                .tail
                .iter()
                .filter(|message| message.status == MessageStatus::InProgress);
            for draft in drafts {
                self.shared.drafts.adopt(self.id, draft.id, &info.user_id);
            }
        }
        self.state = Some(state);
        Ok(())
    }

    /// Makes sure the state is loaded and, if a command asked for it, current.
    pub(super) async fn prepare(&mut self, batch: &Sorted) -> Result<(), StorageError> {
        // A batch of reads only, for users who do not own the session: with foreign sessions
        // hidden, what it finds is what a missing session gives them (a write of theirs, such
        // as a create under a taken id, needs the row to be refused rightly).
        let hide = self.shared.config.hide_foreign_sessions && batch.writes.is_empty();
        // Loaded for other users (no messages): not a state to serve the owner from.
        let owner_of_partial = self.state.as_ref().is_some_and(|state| {
            state.partial
                && state
                    .info
                    .as_ref()
                    .is_some_and(|info| batch.users().any(|user| user == info.user_id))
        });
        if owner_of_partial {
            self.state = None;
        }
        let Some(state) = &self.state else {
            let users: Vec<&str> = batch.users().collect();
            return self.load(&users, hide).await;
        };
        // Refusing someone else's commands from memory would answer faster than a missing
        // session (which is a database read) and tell them apart: pay the same read.
        if let Some(info) = &state.info {
            let mut users = batch.users().peekable();
            let foreign_only = users.peek().is_some() && users.all(|user| user != info.user_id);
            if foreign_only {
                // The very read a load for them is (one read transaction, the row, no
                // messages): a lighter one would still answer sooner.
                let users: Vec<&str> = batch.users().collect();
                self.shared
                    .store
                    .load(self.id, self.shared.config.cached_messages, &users, hide)
                    .await?;
            }
        }
        if batch
            .refresh
            .is_some_and(|version| version > state.version())
        {
            debug!(session_id = %self.id, "written by another process; catching up");
            return self.catch_up().await;
        }
        // A read asked to be fresh, or any read while the change feed is down (the fallback:
        // other processes' writes are not being announced here).
        let feed_down = self.shared.feed_down.load(Ordering::Acquire);
        let wants_fresh = batch.reads.iter().any(|read| match read {
            Read::Get(get, _) => get.fresh || feed_down,
            Read::Subscribe(..) => feed_down,
        });
        if wants_fresh {
            let stored = self.shared.store.version(self.id).await?;
            if stored.unwrap_or(0) != state.version() {
                debug!(session_id = %self.id, "stale copy; reloading for a fresh read");
                return self.catch_up().await;
            }
        }
        Ok(())
    }

    /// Reloads the session and publishes to subscribers what other processes committed: the
    /// messages they added, and what became of the drafts this copy had in progress.
    pub(super) async fn catch_up(&mut self) -> Result<(), StorageError> {
        let known = self.state.as_ref().map_or(0, SessionState::message_count);
        // The drafts this copy had in progress: what other processes added to them, or how
        // they ended, is news too.
        let drafts: Vec<Arc<Message>> = self
            .state
            .iter()
            .flat_map(|state| state.tail.iter())
            .filter(|message| message.status == MessageStatus::InProgress)
            .cloned()
            .collect();
        self.load(&[], false).await?;
        if let (Some(events), Some(state)) = (&self.events, &self.state) {
            if events.listener_count() > 0 {
                for before in &drafts {
                    let Some(after) = state.cached(&before.id).filter(|after| *after != before)
                    else {
                        continue;
                    };
                    for event in super::draft_news(Some(before), after) {
                        let weight = event.weight();
                        events.send(event, weight);
                    }
                }
                for message in state.tail.iter().filter(|message| message.seq >= known) {
                    // A subscriber that finds a gap (messages older than the tail) reads them.
                    let event = Published::Message(message.clone());
                    let weight = event.weight();
                    events.send(event, weight);
                }
            }
        }
        Ok(())
    }

    /// Answers a read from the session as committed before the batch's writes.
    pub(super) async fn answer(&mut self, read: Read) {
        match read {
            Read::Get(get, respond) => respond.send(self.page(&get).await),
            Read::Subscribe(subscribe, respond) => {
                let subscribed =
                    self.subscribe(&subscribe.user_id, subscribe.after_seq, subscribe.draft);
                respond.send(subscribed.await);
            }
        }
    }

    /// The backlog after a subscriber's position and a listener for what commits next. A
    /// position this copy of the session does not reach is checked again against the stored
    /// session (another process may have written what the subscriber saw) before it is
    /// refused.
    async fn subscribe(
        &mut self,
        user_id: &str,
        after_seq: i64,
        draft: Option<(i64, u64)>,
    ) -> Result<Subscribed> {
        match self.subscribe_here(user_id, after_seq, draft).await {
            Err(Error::InvalidInput { .. }) => {
                self.catch_up().await?;
                self.subscribe_here(user_id, after_seq, draft).await
            }
            subscribed => subscribed,
        }
    }

    async fn subscribe_here(
        &mut self,
        user_id: &str,
        after_seq: i64,
        draft: Option<(i64, u64)>,
    ) -> Result<Subscribed> {
        let limit = self.shared.config.limits.max_page_size;
        let read = |after_seq: i64, limit: usize| GetSession {
            user_id: user_id.to_owned(),
            after_seq: Some(after_seq),
            limit: Some(limit),
            ..GetSession::default()
        };
        // Read first: someone else's session is missing, whatever the position.
        let page = self.page(&read(after_seq, limit)).await?;
        // A position the stream never gave: refused, rather than followed in silence (or
        // mistaken for a gap at every message).
        let newest = page.session.message_count - 1;
        if after_seq > newest {
            return Err(Error::invalid(
                "position",
                format!("past the session's newest message ({newest})"),
            ));
        }
        let mut backlog = Vec::new();
        if let Some((draft, offset)) = draft.filter(|&(draft, _)| draft <= after_seq) {
            backlog = self.page(&read(draft.saturating_sub(1), 1)).await?.messages;
            let content = backlog
                .first()
                .filter(|message| message.seq == draft)
                .map(|message| message.text().unwrap_or_default());
            let within = content.is_some_and(|content| {
                usize::try_from(offset).is_ok_and(|offset| content.is_char_boundary(offset))
            });
            if !within {
                return Err(Error::invalid(
                    "position",
                    format!("not a place in the content of message {draft}"),
                ));
            }
        }
        backlog.extend(page.messages);
        let limits = &self.shared.config.limits;
        // Room for a few of the largest messages, whatever the limits are raised to.
        let largest =
            2 * limits.max_content_bytes + 3 * limits.max_json_bytes + 3 * limits.max_text_bytes;
        let bytes = SUBSCRIBER_BUFFER_BYTES.max(4 * largest);
        let events = self
            .events
            .get_or_insert_with(|| Fanout::new(bytes, SUBSCRIBER_BUFFER));
        Ok(Subscribed {
            caught_up: page.next_after_seq.is_none(),
            backlog,
            live: events.subscribe(),
        })
    }

    /// A page of the session as committed, if the caller may read it.
    async fn page(&self, get: &GetSession) -> Result<SessionPage> {
        let state = self.state.as_ref().ok_or(Error::NotFound)?;
        let hide_foreign = self.shared.config.hide_foreign_sessions;
        let info = state.readable_by(&get.user_id, hide_foreign)?.clone();
        let limit = validate_page(get.limit, DEFAULT_MESSAGE_PAGE, &self.shared.config.limits);
        // Saturating: `after_seq` comes from the caller and may be anything.
        let start = get.after_seq.unwrap_or(-1).max(-1).saturating_add(1);
        let count = info.message_count;
        let max_bytes = self.shared.config.limits.max_page_bytes;
        let mut page = PageBytes::new(max_bytes);
        let messages: Vec<Arc<Message>> = if limit == 0 || start >= count {
            Vec::new()
        } else if start >= state.tail_start() {
            let skip = (start - state.tail_start()) as usize;
            let cached = state.tail.iter().skip(skip).take(limit);
            cached
                .take_while(|message| page.fits(message))
                .cloned()
                .collect()
        } else {
            // Older than the cached tail: committed rows never change, so the database's copy
            // is the same as ours would be. Read a few at a time, so that what is read past
            // the byte bound is a few messages, not a page.
            const READ_AT_ONCE: usize = 64;
            let mut messages = Vec::new();
            let mut after = start - 1;
            'read: while messages.len() < limit {
                let wanted = (limit - messages.len()).min(READ_AT_ONCE);
                let stored = self
                    .shared
                    .store
                    .read_messages(self.id, after, wanted)
                    .await?;
                let read = stored.len();
                for message in stored {
                    if !page.fits(&message) {
                        break 'read;
                    }
                    after = message.seq;
                    messages.push(Arc::new(message));
                }
                if read < wanted {
                    break;
                }
            }
            messages
        };
        let next_after_seq = messages
            .last()
            .map(|message| message.seq)
            .filter(|&last| last + 1 < count);
        Ok(SessionPage {
            session: info,
            messages,
            next_after_seq,
            pending_tool_calls: state.pending_calls(),
        })
    }
}
