//! The session actor: the only code that changes a session. It owns the session's state (no
//! lock: the actor is the lock), stages each batch of queued commands in memory, hands one
//! write per batch to the writer stage, and answers every command after that write committed.
//!
//! - `protocol`: what goes through the mailbox, each command with its typed responder.
//! - `state`: the session as the actor knows it.
//! - `stage`: a batch of writes applied to a copy of the state (pure).
//! - `recover`: writing a staged batch, and what to do when that fails (settle an unknown
//!   outcome, reload and restage after a conflict or a fence).
//! - `read`: loading, catching up, and answering reads from the committed state.

pub(crate) mod protocol;
mod read;
mod recover;
pub(crate) mod stage;
mod state;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use soloist_actors::Actor;
use tracing::{Instrument, info_span};

use crate::config::EngineConfig;
use crate::error::Error;
use crate::fanout::Fanout;
use crate::model::{Message, MessageStatus, SessionId, SessionInfo};
use crate::stats::EngineStats;
use crate::store::Store;
use crate::writer::Writer;
use protocol::{Mail, Published, Read, Request, Write};
use state::SessionState;

/// What every session actor shares: the actor runtime's context.
pub(crate) struct Shared {
    pub store: Store,
    pub writer: Writer,
    pub stats: Arc<EngineStats>,
    pub config: EngineConfig,
    /// The change feed (PostgreSQL LISTEN/NOTIFY) is expected but not listening: notices of
    /// other processes' writes may be missed, so every read checks the stored version first.
    pub feed_down: AtomicBool,
    /// The drafts in progress in the sessions this process holds, for their timeout.
    pub drafts: Arc<crate::drafts::Drafts>,
    /// Test hooks (see [`crate::faults`]); not compiled into release builds.
    #[cfg(any(test, feature = "fault-injection"))]
    pub faults: crate::faults::Faults,
}

/// One actor per live session.
pub(crate) struct SessionActor {
    id: SessionId,
    shared: Arc<Shared>,
    /// `None` until loaded, and again after a write whose outcome is unknown.
    state: Option<SessionState>,
    /// Publishes what commits to subscribers; created by the first subscription, dropped on
    /// delete (which ends the subscriptions) and with the actor.
    events: Option<Fanout<Published>>,
    /// Whether a command of the session's owner (or a create) came through this activation.
    /// Until then the actor holds nothing anyone may read, and passivates after each batch.
    served_owner: bool,
}

impl Actor for SessionActor {
    type Key = SessionId;
    type Message = Mail;
    type Context = Shared;

    async fn activate(key: &SessionId, shared: &Arc<Shared>) -> Self {
        // Loading waits for the first batch, so a failed load can be answered (and retried).
        Self {
            id: *key,
            shared: shared.clone(),
            state: None,
            events: None,
            served_owner: false,
        }
    }

    /// Nothing to keep once the batch is answered: the session does not exist (or is deleted),
    /// its state is unknown, or only other users asked for it. Reads of missing or foreign
    /// sessions then leave no actor behind, however many come.
    fn finished(&self) -> bool {
        if self
            .events
            .as_ref()
            .is_some_and(|events| events.listener_count() > 0)
        {
            return false;
        }
        match &self.state {
            None => true,
            Some(state) => state.info.is_none() || state.deleted || !self.served_owner,
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Mail>) {
        // Unboxed for the batch: one move per request, against a commit per batch. Taken, not
        // drained: the runtime's buffer would otherwise keep its largest batch's capacity for
        // the whole life of the actor.
        let requests: Vec<Request> = std::mem::take(batch)
            .into_iter()
            .map(|request| *request)
            .collect();
        #[cfg(any(test, feature = "fault-injection"))]
        self.shared.faults.before_batch(self.id).await;
        let span = info_span!("session_batch", session_id = %self.id, commands = requests.len());
        // Boxed: the batch's future (staging, the write, database reads) is large, and inline it
        // would sit in every idle session's task for the whole life of the actor.
        Box::pin(self.process(requests).instrument(span)).await;
        // Let the callers just answered run before the next batch is taken: most of them send
        // their next command at once, and taking the mailbox first would make the next batch a
        // nearly empty one followed by a full one, twice the commits for the same rows.
        tokio::task::yield_now().await;
    }
}

/// A batch sorted by what the actor does with each request.
struct Sorted {
    reads: Vec<Read>,
    writes: Vec<Write>,
    /// The newest version another process announced.
    refresh: Option<i64>,
}

impl Sorted {
    fn new(requests: Vec<Request>) -> Self {
        let mut sorted = Sorted {
            reads: Vec::new(),
            writes: Vec::with_capacity(requests.len()),
            refresh: None,
        };
        for request in requests {
            match request {
                Request::Read(read) => sorted.reads.push(read),
                Request::Write(write) => sorted.writes.push(write),
                Request::Refresh(version) => {
                    sorted.refresh = Some(sorted.refresh.map_or(version, |v| v.max(version)));
                }
            }
        }
        sorted
    }

    /// Who sent the batch's commands.
    fn users(&self) -> impl Iterator<Item = &str> {
        let reads = self.reads.iter().map(Read::user);
        reads.chain(self.writes.iter().map(Write::user))
    }
}

impl SessionActor {
    /// Handles one batch: reads first, against the session as committed, then the writes in
    /// command order, staged together and written once.
    async fn process(&mut self, requests: Vec<Request>) {
        let taken = Instant::now();
        let waited = requests.iter().filter_map(|request| request.sent());
        let waited = waited.map(|sent| taken.saturating_duration_since(sent));
        self.shared.stats.record_batch(requests.len(), waited);
        let batch = Sorted::new(requests);
        if let Err(error) = self.prepare(&batch).await {
            let error = Error::Storage(error);
            for read in batch.reads {
                read.fail(error.clone());
            }
            for write in batch.writes {
                write.fail(error.clone());
            }
            return;
        }
        self.note_owner(&batch);
        let Sorted {
            reads, mut writes, ..
        } = batch;
        for read in reads {
            self.answer(read).await;
        }
        if writes.is_empty() {
            return;
        }
        let written = self.write(&mut writes).await;
        for write in writes {
            write.settle(&written);
        }
    }

    /// Notes whether the session's owner (or a create) sent any of the batch's commands.
    fn note_owner(&mut self, batch: &Sorted) {
        if self.served_owner {
            return;
        }
        let owner = self
            .state
            .as_ref()
            .and_then(|state| state.info.as_ref())
            .map(|info| info.user_id.as_str());
        self.served_owner = match owner {
            Some(owner) => batch.users().any(|user| user == owner),
            None => batch
                .writes
                .iter()
                .any(|write| matches!(write, Write::Create(_) | Write::Import(_))),
        };
    }

    /// Applies a committed batch to the in-memory state and publishes its new messages.
    fn apply(
        &mut self,
        info: Option<SessionInfo>,
        deleted: bool,
        messages: Vec<Arc<Message>>,
        updated: Vec<Arc<Message>>,
        version: i64,
    ) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if let Some(events) = self.events.as_ref().filter(|e| e.listener_count() > 0) {
            // Drafts that grew or ended first, as what changed since their cached state
            // (replaced below): they are older than the new messages.
            for message in &updated {
                let before = state.cached(&message.id).map(|cached| &**cached);
                for event in draft_news(before, message) {
                    let weight = event.weight();
                    events.send(event, weight);
                }
            }
            for message in &messages {
                let event = Published::Message(message.clone());
                let weight = event.weight();
                // Subscribers that lag behind catch up from the session.
                events.send(event, weight);
            }
        }
        // Drafts that grew or ended take their places in the tail while the message count
        // still matches it (the new messages are pushed below).
        state.replace_messages(updated.iter().cloned());
        state.info = info.map(|mut info| {
            // As staged; the database's word on the version wins all the same.
            info.version = version;
            info
        });
        // The drafts' timeouts: drafts that started or grew restart theirs, drafts that ended
        // drop theirs. A batch without drafts (the common append) touches nothing.
        if let Some(info) = state.info.as_ref() {
            let drafts = &self.shared.drafts;
            let started = messages
                .iter()
                .filter(|message| message.status == MessageStatus::InProgress);
            for draft in updated.iter().chain(started) {
                if draft.status == MessageStatus::InProgress {
                    drafts.touch(self.id, draft.id, &info.user_id);
                } else {
                    drafts.forget(self.id, Some(draft.id));
                }
            }
        }
        state.push_messages(messages, self.shared.config.cached_messages);
        if deleted {
            self.shared.drafts.forget(self.id, None);
            // Ends every subscription: they re-subscribe and learn the session is gone.
            self.events = None;
            state.deleted = true;
            state.clear_messages();
        }
    }
}

/// What subscribers are told of a draft committed as `after`, once `before` (its cached
/// state, if at hand): the text it grew by, then the message whole if it ended. Without a
/// cached state that it extends, the message whole.
fn draft_news(before: Option<&Message>, after: &Arc<Message>) -> Vec<Published> {
    let grown = before
        .filter(|before| before.status == MessageStatus::InProgress)
        .and_then(|before| {
            let (before, after) = (before.text()?, after.text()?);
            after
                .strip_prefix(before)
                .map(|grown| (before.len(), grown))
        });
    let Some((offset, grown)) = grown else {
        return vec![Published::Message(after.clone())];
    };
    let mut news = Vec::with_capacity(2);
    if !grown.is_empty() {
        news.push(Published::Delta {
            seq: after.seq,
            offset: offset as u64,
            text: grown.into(),
        });
    }
    if after.status != MessageStatus::InProgress {
        news.push(Published::Message(after.clone()));
    }
    news
}

/// What a change feed's listener needs of the live sessions.
impl crate::feed::LiveSessions for soloist_actors::Registry<SessionActor> {
    fn is_live(&self, session: SessionId) -> bool {
        soloist_actors::Registry::is_live(self, &session)
    }

    fn live(&self) -> Vec<SessionId> {
        self.live_keys()
    }

    fn refresh(&self, session: SessionId, version: i64) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            // A mailbox that closed meanwhile needs no notice: the next activation loads.
            let _ = self
                .send(session, Box::new(Request::Refresh(version)))
                .await;
        })
    }

    fn feed_down(&self, down: bool) {
        self.context()
            .feed_down
            .store(down, std::sync::atomic::Ordering::Release);
    }
}
