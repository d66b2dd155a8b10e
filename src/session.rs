//! The session actor: the only code that changes a session. It owns the session's state (no
//! lock: the actor is the lock), stages each batch of queued commands in memory, hands one
//! write per batch to the writer stage, and answers every command after that write committed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use soloist_actors::Actor;
use tokio::sync::{broadcast, oneshot};
use tracing::{Instrument, debug, info_span};
use uuid::Uuid;

use crate::command::{
    AddUsage, Appended, Created, DEFAULT_MESSAGE_PAGE, DeleteSession, GetSession, Reply,
    SessionPage, ValidMessage, validate_page,
};
use crate::config::EngineConfig;
use crate::error::{Error, Result, StorageError};
use crate::idempotency::{KeyRecord, Keyed};
use crate::model::{Message, RawJson, SessionId, SessionInfo, Usage, from_micros, now_micros};
use crate::stats::EngineStats;
use crate::store::{FlushOutcome, KeyRow, LoadedSession, NewSessionRow, SessionWrite, Store};
use crate::writer::Writer;

/// Where an actor sends its answer.
pub(crate) type Respond<T> = oneshot::Sender<Result<T>>;

/// A validated [`CreateSession`](crate::CreateSession).
#[derive(Debug)]
pub(crate) struct CreateRequest {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: RawJson,
    pub keyed: Option<Keyed>,
}

/// A validated [`AppendMessages`](crate::AppendMessages).
#[derive(Debug)]
pub(crate) struct AppendRequest {
    pub user_id: String,
    pub messages: Vec<ValidMessage>,
    pub if_version: Option<i64>,
}

/// A validated [`UpdateSession`](crate::UpdateSession).
#[derive(Debug)]
pub(crate) struct UpdateRequest {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: Option<RawJson>,
    pub if_version: Option<i64>,
    pub keyed: Option<Keyed>,
}

/// A validated [`AddUsage`](crate::AddUsage).
#[derive(Debug)]
pub(crate) struct UsageRequest {
    pub command: AddUsage,
    pub keyed: Option<Keyed>,
}

/// A validated [`DeleteSession`](crate::DeleteSession).
#[derive(Debug)]
pub(crate) struct DeleteRequest {
    pub command: DeleteSession,
    pub keyed: Option<Keyed>,
}

/// What goes through a session's mailbox, boxed whole ([`Mail`]).
#[derive(Debug)]
pub(crate) enum SessionRequest {
    Create(CreateRequest, Respond<Created>),
    Append(AppendRequest, Respond<Appended>),
    Get(GetSession, Respond<SessionPage>),
    Update(UpdateRequest, Respond<SessionInfo>),
    AddUsage(UsageRequest, Respond<Usage>),
    Delete(DeleteRequest, Respond<()>),
    Subscribe(SubscribeRequest, Respond<Subscribed>),
    /// Another process committed this version of the session: catch up before the next read.
    /// Nobody waits for an answer. (Sent by the PostgreSQL change listener only.)
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Refresh(i64),
}

/// One mailbox slot: a request boxed whole, so that a slot is one pointer. Every live session's
/// mailbox keeps a block of 32 slots allocated for as long as it lives, idle or not; boxing the
/// payloads alone left a reply sender and a tag in each slot (24 bytes: 768 per block instead
/// of 256). The box costs nothing extra: each request allocated its payload anyway.
pub(crate) type Mail = Box<SessionRequest>;

/// Ask for the messages after `after_seq` and for every message committed from then on.
#[derive(Debug)]
pub(crate) struct SubscribeRequest {
    pub user_id: String,
    pub after_seq: i64,
}

/// The answer to a [`SubscribeRequest`]: taken in one step of the actor, so that no commit can
/// fall between the backlog and the first live message.
#[derive(Debug)]
pub(crate) struct Subscribed {
    /// Stored messages after `after_seq`, at most a page.
    pub backlog: Vec<Arc<Message>>,
    /// Whether `backlog` reaches the newest message; if not, page again before listening.
    pub caught_up: bool,
    /// Every message committed after the backlog.
    pub live: broadcast::Receiver<Arc<Message>>,
}

/// Committed messages buffered per session for subscribers that fall behind; past it they
/// catch up from the database.
const SUBSCRIBER_BUFFER: usize = 1024;

/// What every session actor shares: the actor runtime's context.
pub(crate) struct Shared {
    pub store: Store,
    pub writer: Writer,
    pub stats: Arc<EngineStats>,
    pub config: EngineConfig,
    /// Sessions whose next batch panics after a pause: a fault hook for tests of supervision
    /// (see [`Engine::inject_panic`](crate::Engine::inject_panic)).
    pub panic_next_batch: Mutex<HashMap<SessionId, Duration>>,
    /// Set once a fault was injected, so that batches skip the lock above otherwise.
    pub faults_armed: AtomicBool,
    /// The change feed (PostgreSQL LISTEN/NOTIFY) is expected but not listening: notices of
    /// other processes' writes may be missed, so every read checks the stored version first.
    pub feed_down: AtomicBool,
}

/// The session as this actor knows it.
struct Loaded {
    /// `None` when no session row exists (yet).
    info: Option<SessionInfo>,
    deleted: bool,
    /// The newest messages, ascending; `tail[0].seq == info.message_count - tail.len()`.
    tail: VecDeque<Arc<Message>>,
    /// Message id → seq for the messages in `tail`.
    ids: HashMap<Uuid, i64>,
    /// The ownership epoch: as loaded until this actor's first write takes the session over
    /// (bumping it), then the one this actor holds.
    epoch: i64,
    /// Whether this actor has taken the session over (its writes then check `epoch` without
    /// bumping it). A reload gives the session up: the next write claims it again.
    owned: bool,
    /// Idempotency records looked up or written since the load, by key; `None`: not stored.
    keys: HashMap<String, Option<KeyRecord>>,
}

impl Loaded {
    fn from_store(loaded: Option<LoadedSession>) -> Self {
        match loaded {
            None => Self {
                info: None,
                deleted: false,
                tail: VecDeque::new(),
                ids: HashMap::new(),
                epoch: 0,
                owned: false,
                keys: HashMap::new(),
            },
            Some(loaded) => {
                let ids = loaded
                    .tail
                    .iter()
                    .map(|message| (message.id, message.seq))
                    .collect();
                Self {
                    info: Some(loaded.info),
                    deleted: loaded.deleted,
                    tail: loaded.tail.into_iter().map(Arc::new).collect(),
                    ids,
                    epoch: loaded.epoch,
                    owned: false,
                    keys: HashMap::new(),
                }
            }
        }
    }

    fn version(&self) -> i64 {
        self.info.as_ref().map_or(0, |info| info.version)
    }

    fn tail_start(&self) -> i64 {
        let count = self.info.as_ref().map_or(0, |info| info.message_count);
        count - self.tail.len() as i64
    }

    /// The cached message with this id.
    fn cached(&self, id: &Uuid) -> Option<&Arc<Message>> {
        let seq = *self.ids.get(id)?;
        self.tail
            .get(usize::try_from(seq - self.tail_start()).ok()?)
    }
}

/// Idempotency records kept per live session at most; past it the cache starts over (records
/// are looked up again from the database when a key comes back).
const CACHED_KEYS: usize = 1024;

/// One actor per live session.
pub(crate) struct SessionActor {
    id: SessionId,
    shared: Arc<Shared>,
    /// `None` until loaded, and again after a write whose outcome is unknown.
    state: Option<Loaded>,
    /// Publishes committed messages to subscribers; created by the first subscription,
    /// dropped on delete (which ends the subscriptions) and with the actor.
    events: Option<broadcast::Sender<Arc<Message>>>,
    /// Whether a command of the session's owner (or a create) came through this activation.
    /// Until then the actor holds nothing anyone may read, and passivates after each batch.
    served_owner: bool,
}

/// What staging decided for one command, turned into its reply once the batch is resolved.
///
/// A batch is linearized as: every read first, against the session as it was before the batch,
/// then every write in command order. So a read answers from the committed state, and each
/// write answers with the session as it stood right after that write (an `add_usage` does not
/// report the deltas of commands queued behind it).
enum Outcome {
    /// Refused while staging: answered with this error whatever the write does.
    Failed(Error),
    /// Answered from the state before the batch; stands whatever the write does.
    Read(Result<SessionPage>),
    Subscribed(Result<Subscribed>),
    /// Placeholders for reads, resolved before the write.
    PendingRead,
    PendingSubscribe,
    /// Writes: answered once the batch committed (or with the write's error).
    Created {
        created: bool,
        info: SessionInfo,
    },
    Appended(Vec<i64>),
    Updated(SessionInfo),
    UsageAdded(Usage),
    Deleted,
    /// The stored answer of an earlier command with the same idempotency key (a JSON
    /// [`Reply`]); `with_this_write`: that command is in this batch, so the answer stands only
    /// if the write commits.
    Replayed {
        response: String,
        with_this_write: bool,
    },
    /// While staging: the same key as an earlier command of this batch.
    SameAs(String),
    /// Nothing to answer (a refresh notice).
    Nothing,
}

impl Outcome {
    /// Whether the command changes the session once the write commits.
    fn is_write(&self) -> bool {
        matches!(
            self,
            Outcome::Created { .. }
                | Outcome::Appended(_)
                | Outcome::Updated(_)
                | Outcome::UsageAdded(_)
                | Outcome::Deleted
        )
    }

    /// The answer a write gets once committed (staging set its version and time).
    fn reply(&self) -> Option<Reply> {
        Some(match self {
            Outcome::Created { created, info } => Reply::SessionCreated(Created {
                session: info.clone(),
                created: *created,
            }),
            Outcome::Appended(sequences) => Reply::MessagesAppended(Appended {
                sequences: sequences.clone(),
            }),
            Outcome::Updated(info) => Reply::SessionUpdated(info.clone()),
            Outcome::UsageAdded(usage) => Reply::UsageAdded(*usage),
            Outcome::Deleted => Reply::SessionDeleted,
            _ => return None,
        })
    }
}

impl SessionRequest {
    /// Who sent the command (`None` for a notice).
    fn user(&self) -> Option<&str> {
        Some(match self {
            SessionRequest::Create(create, _) => &create.user_id,
            SessionRequest::Append(append, _) => &append.user_id,
            SessionRequest::Get(get, _) => &get.user_id,
            SessionRequest::Update(update, _) => &update.user_id,
            SessionRequest::AddUsage(add, _) => &add.command.user_id,
            SessionRequest::Delete(delete, _) => &delete.command.user_id,
            SessionRequest::Subscribe(subscribe, _) => &subscribe.user_id,
            SessionRequest::Refresh(_) => return None,
        })
    }

    /// The command's idempotency key and its sender, if it has one.
    fn keyed(&self) -> Option<(&Keyed, &str)> {
        match self {
            SessionRequest::Create(create, _) => create.keyed.as_ref().zip(Some(&*create.user_id)),
            SessionRequest::Update(update, _) => update.keyed.as_ref().zip(Some(&*update.user_id)),
            SessionRequest::AddUsage(add, _) => add.keyed.as_ref().zip(Some(&*add.command.user_id)),
            SessionRequest::Delete(delete, _) => {
                delete.keyed.as_ref().zip(Some(&*delete.command.user_id))
            }
            _ => None,
        }
    }
}

/// What a write put in the database, kept to settle a flush whose outcome was lost.
struct WrittenRows {
    expected_version: i64,
    /// How far the write moves the version.
    steps: i64,
    /// The epoch the session has once this write committed (and the owner is this process).
    held_epoch: i64,
    creates: bool,
    delete: bool,
    /// `(message id, staged seq)` of every new row.
    rows: Vec<(Uuid, i64)>,
}

impl WrittenRows {
    fn of(write: &SessionWrite) -> Self {
        Self {
            expected_version: write.expected_version,
            steps: write.steps,
            held_epoch: write.epoch + i64::from(write.claim),
            creates: write.create.is_some(),
            delete: write.delete,
            rows: write.rows.iter().map(|row| (row.id, row.seq)).collect(),
        }
    }
}

/// What the database says about a flush whose outcome was lost.
enum Settled {
    Committed(i64),
    NotCommitted,
    Unknown,
}

/// The result of staging a batch: the write, and what to apply once it committed.
struct Staged {
    write: SessionWrite,
    outcomes: Vec<Outcome>,
    /// The session after the batch (version and `updated_at` are set at commit).
    info: Option<SessionInfo>,
    deleted: bool,
    /// The new messages, for the cached tail and the subscribers.
    messages: Vec<Arc<Message>>,
}

/// Who may act on the session at a point of the batch.
fn check_access(
    info: Option<&SessionInfo>,
    deleted: bool,
    user_id: &str,
    hide_foreign: bool,
) -> Result<()> {
    match info {
        None => Err(Error::NotFound),
        Some(_) if deleted => Err(Error::NotFound),
        Some(info) if info.user_id != user_id => Err(if hide_foreign {
            Error::NotFound
        } else {
            Error::Forbidden
        }),
        Some(_) => Ok(()),
    }
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
            .is_some_and(|events| events.receiver_count() > 0)
        {
            return false;
        }
        match &self.state {
            None => true,
            Some(state) => state.info.is_none() || state.deleted || !self.served_owner,
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Mail>) {
        // Unboxed for the batch: one move per request, against a commit per batch.
        // Taken, not drained: the runtime's buffer would otherwise keep its largest batch's
        // capacity for the whole life of the actor.
        let requests: Vec<SessionRequest> = std::mem::take(batch)
            .into_iter()
            .map(|request| *request)
            .collect();
        let fault = self.take_injected_panic();
        if let Some(pause) = fault {
            // Let more commands queue behind the batch, then fail the way a bug would.
            // Boxed: a timer inline would sit in every idle session's task.
            Box::pin(tokio::time::sleep(pause)).await;
            panic!("injected fault in session {}", self.id);
        }
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

impl SessionActor {
    fn take_injected_panic(&self) -> Option<Duration> {
        if !self.shared.faults_armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut hooks = self
            .shared
            .panic_next_batch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if hooks.is_empty() {
            return None;
        }
        hooks.remove(&self.id)
    }

    /// Loads the session; with `readers`, its messages only if one of them owns it.
    async fn load(&mut self, readers: &[&str]) -> Result<(), StorageError> {
        self.shared.stats.record_load();
        let loaded = self
            .shared
            .store
            .load(self.id, self.shared.config.cached_messages, readers)
            .await?;
        self.state = Some(Loaded::from_store(loaded));
        Ok(())
    }

    /// Makes sure the state is loaded and, if a command asked for it, current.
    async fn prepare(&mut self, requests: &[SessionRequest]) -> Result<(), StorageError> {
        let Some(state) = &self.state else {
            let readers: Vec<&str> = requests.iter().filter_map(SessionRequest::user).collect();
            return self.load(&readers).await;
        };
        // Refusing someone else's commands from memory would answer faster than a missing
        // session (which is a database read) and tell them apart: pay the same read.
        if let Some(info) = &state.info {
            let mut users = requests.iter().filter_map(SessionRequest::user).peekable();
            let foreign_only = users.peek().is_some() && users.all(|user| user != info.user_id);
            if foreign_only {
                // The very read a load for them is (one read transaction, the row, no
                // messages): a lighter one would still answer sooner.
                let readers: Vec<&str> = requests.iter().filter_map(SessionRequest::user).collect();
                self.shared
                    .store
                    .load(self.id, self.shared.config.cached_messages, &readers)
                    .await?;
            }
        }
        let newer_elsewhere = requests.iter().any(
            |request| matches!(request, SessionRequest::Refresh(version) if *version > state.version()),
        );
        if newer_elsewhere {
            debug!(session_id = %self.id, "written by another process; catching up");
            return self.catch_up().await;
        }
        // A read asked to be fresh, or any read while the change feed is down (the fallback:
        // other processes' writes are not being announced here).
        let feed_down = self.shared.feed_down.load(Ordering::Acquire);
        let wants_fresh = requests.iter().any(|request| match request {
            SessionRequest::Get(get, _) => get.fresh || feed_down,
            SessionRequest::Subscribe(..) => feed_down,
            _ => false,
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

    /// Reloads the session and publishes to subscribers the messages other processes added.
    async fn catch_up(&mut self) -> Result<(), StorageError> {
        let known = self
            .state
            .as_ref()
            .and_then(|state| state.info.as_ref())
            .map_or(0, |info| info.message_count);
        self.load(&[]).await?;
        if let (Some(events), Some(state)) = (&self.events, &self.state) {
            if events.receiver_count() > 0 {
                for message in state.tail.iter().filter(|message| message.seq >= known) {
                    // A subscriber that finds a gap (messages older than the tail) reads them.
                    let _ = events.send(message.clone());
                }
            }
        }
        Ok(())
    }

    async fn process(&mut self, requests: Vec<SessionRequest>) {
        self.shared.stats.record_batch(requests.len());
        if let Err(error) = self.prepare(&requests).await {
            let error = Error::Storage(error);
            let outcomes = requests
                .iter()
                .map(|_| Outcome::Failed(error.clone()))
                .collect();
            self.reply(requests, outcomes, None);
            return;
        }
        if !self.served_owner {
            let owner = self
                .state
                .as_ref()
                .and_then(|state| state.info.as_ref())
                .map(|info| info.user_id.as_str());
            self.served_owner = requests.iter().any(|request| match owner {
                Some(owner) => request.user() == Some(owner),
                None => matches!(request, SessionRequest::Create(..)),
            });
        }
        let mut known = HashMap::new();
        let mut attempt = 0;
        loop {
            if let Err(error) = self.look_up_keys(&requests).await {
                let outcomes = requests.iter().map(|_| Outcome::Nothing).collect();
                self.reply(requests, outcomes, Some(Error::Storage(error)));
                return;
            }
            let mut staged = self.stage(&requests, &known);
            self.resolve_reads(&requests, &mut staged.outcomes).await;
            if staged.write.is_empty() {
                self.reply(requests, staged.outcomes, None);
                return;
            }
            let Staged {
                write,
                outcomes,
                info,
                deleted,
                messages,
            } = staged;
            let written = WrittenRows::of(&write);
            let records: Vec<(String, KeyRecord)> = write
                .keys
                .iter()
                .map(|row| {
                    let record = KeyRecord {
                        user_id: row.user_id.clone(),
                        fingerprint: row.fingerprint.clone(),
                        response: row.response.clone(),
                        created_at: write.now,
                    };
                    (row.key.clone(), record)
                })
                .collect();
            // The epoch this actor holds once the write commits.
            let held_epoch = write.epoch + i64::from(write.claim);
            let outcome = match self.shared.writer.write(write).await {
                // The connection failed around the commit: ask the database what happened
                // instead of guessing.
                Err(error) => match self.settle_unknown_outcome(&written).await {
                    Settled::Committed(version) => Ok(FlushOutcome::Committed {
                        version,
                        took_over: false,
                    }),
                    Settled::NotCommitted if attempt < self.shared.config.max_conflict_retries => {
                        attempt += 1;
                        debug!(session_id = %self.id, %error, "flush failed before committing; retrying");
                        let backoff = Duration::from_millis(2 << attempt.min(7));
                        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
                        continue;
                    }
                    Settled::NotCommitted | Settled::Unknown => Err(error),
                },
                other => other,
            };
            match outcome {
                Ok(FlushOutcome::Committed { version, .. }) => {
                    if let Some(state) = self.state.as_mut() {
                        state.epoch = held_epoch;
                        state.owned = true;
                        if state.keys.len() + records.len() > CACHED_KEYS {
                            state.keys.clear();
                        }
                        for (key, record) in records {
                            state.keys.insert(key, Some(record));
                        }
                    }
                    self.apply(info, deleted, messages, version);
                    self.reply(requests, outcomes, None);
                    return;
                }
                // Fenced: another process took the session over, so this copy may not be written
                // again. Nothing of the batch landed; like a conflict, reload the session from
                // the database (which gives up the stale epoch), restage the same commands on
                // what is stored and take the session back with the next write. The commands
                // queued behind are served from the reloaded state.
                Ok(refused @ (FlushOutcome::Conflict | FlushOutcome::Fenced)) => {
                    if refused == FlushOutcome::Fenced {
                        debug!(session_id = %self.id, "fenced: another process took the session over");
                    }
                    attempt += 1;
                    if attempt > self.shared.config.max_conflict_retries {
                        self.state = None;
                        let error = Error::Conflict(format!(
                            "the session kept changing under {attempt} attempts to write it"
                        ));
                        self.reply(requests, outcomes, Some(error));
                        return;
                    }
                    self.shared.stats.record_conflict_retry();
                    debug!(session_id = %self.id, attempt, "conflict; reloading and restaging");
                    let backoff = Duration::from_millis(1 << attempt.min(7));
                    tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
                    match self.reload_for_conflict(&requests).await {
                        Ok(stored) => known = stored,
                        Err(error) => {
                            self.state = None;
                            self.reply(requests, outcomes, Some(Error::Storage(error)));
                            return;
                        }
                    }
                }
                Err(error) => {
                    // Still unknown (the database cannot be read either): forget the state so
                    // the next command reloads it, and let the caller retry with the same ids.
                    self.state = None;
                    self.reply(requests, outcomes, Some(Error::Storage(error)));
                    return;
                }
            }
        }
    }

    /// After a flush failed without saying whether it committed: reads the session's stored
    /// version and the batch's message ids. Committed if the version moved by exactly this
    /// write and every row is stored at its staged sequence; not committed if nothing moved.
    /// Anything else (another writer meanwhile, or the database unreachable) stays unknown.
    async fn settle_unknown_outcome(&self, written: &WrittenRows) -> Settled {
        let store = &self.shared.store;
        let Ok(head) = store.settled_head(self.id).await else {
            return Settled::Unknown;
        };
        let ids: Vec<Uuid> = written.rows.iter().map(|&(id, _)| id).collect();
        let Ok(stored) = store.stored_ids(self.id, &ids).await else {
            return Settled::Unknown;
        };
        let all_stored = written
            .rows
            .iter()
            .all(|(id, seq)| stored.get(id) == Some(seq));
        let expected = written.expected_version;
        match head {
            // Only this write leaves exactly this: the next version, owned by this process at
            // the epoch the write checked (or claimed). Another process's write at that version
            // would carry its own owner and a new epoch, and this process writes the session
            // from one actor at a time, so the version and epoch pin the write down even when
            // it carries no message rows to look up.
            Some((version, true, epoch))
                if version == expected + written.steps
                    && epoch == written.held_epoch
                    && all_stored
                    && !written.delete =>
            {
                self.shared.stats.record_settled_outcome();
                Settled::Committed(version)
            }
            Some((version, _, _))
                if version == expected && stored.is_empty() && !written.creates =>
            {
                self.shared.stats.record_settled_outcome();
                Settled::NotCommitted
            }
            None if written.creates && stored.is_empty() => {
                self.shared.stats.record_settled_outcome();
                Settled::NotCommitted
            }
            _ => Settled::Unknown,
        }
    }

    /// Makes sure the state knows, for every idempotency key of the batch, whether a record of
    /// it is stored (and not expired).
    async fn look_up_keys(&mut self, requests: &[SessionRequest]) -> Result<(), StorageError> {
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let mut unknown: Vec<String> = requests
            .iter()
            .filter_map(SessionRequest::keyed)
            .map(|(key, _)| &key.key)
            .filter(|key| !state.keys.contains_key(*key))
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let retention = self.shared.config.idempotency_retention;
        let since =
            now_micros().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let mut found = self
            .shared
            .store
            .key_records(self.id, &unknown, since)
            .await?;
        if state.keys.len() + unknown.len() > CACHED_KEYS {
            state.keys.clear();
        }
        for key in unknown {
            let record = found.remove(&key);
            state.keys.insert(key, record);
        }
        Ok(())
    }

    /// After a conflict: reload the session and look up which of the batch's message ids are
    /// already stored, as stored.
    async fn reload_for_conflict(
        &mut self,
        requests: &[SessionRequest],
    ) -> Result<HashMap<Uuid, Arc<Message>>, StorageError> {
        self.load(&[]).await?;
        let ids: Vec<Uuid> = requests
            .iter()
            .filter_map(|request| match request {
                SessionRequest::Append(append, _) => Some(append),
                _ => None,
            })
            .flat_map(|append| append.messages.iter().filter_map(|valid| valid.message.id))
            .collect();
        let stored = self.shared.store.stored_messages(self.id, &ids).await?;
        Ok(stored
            .into_iter()
            .map(|message| (message.id, Arc::new(message)))
            .collect())
    }

    /// Walks the batch in command order over a staged copy of the session, producing one write
    /// and each command's outcome.
    fn stage(&self, requests: &[SessionRequest], known: &HashMap<Uuid, Arc<Message>>) -> Staged {
        let state = self.state.as_ref();
        let now = now_micros();
        let mut info = state.and_then(|state| state.info.clone());
        let mut deleted = state.is_some_and(|state| state.deleted);
        let mut write = SessionWrite::new(self.id, info.as_ref().map_or(0, |i| i.version), now);
        if let Some(state) = state {
            write.epoch = state.epoch;
            write.claim = !state.owned;
        }
        let retention =
            i64::try_from(self.shared.config.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
        write.keys_expire_before = now.saturating_sub(retention);
        let mut pending: HashMap<Uuid, Arc<Message>> = HashMap::new();
        let mut pending_keys: HashMap<&str, (&str, &[u8])> = HashMap::new();
        let mut keyed = Vec::new();
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut messages = Vec::new();
        // How many commands of this batch changed the session so far. Each change has a version
        // of its own (the committed one plus its place in the batch), so a command conditional
        // on a version (`if_version`) sees the changes queued before it, and two answers with
        // one version always show the same session.
        let mut steps: i64 = 0;
        let base = write.expected_version;
        let hide_foreign = self.shared.config.hide_foreign_sessions;

        for request in requests {
            let check = |info: &Option<SessionInfo>, deleted: bool, user_id: &str| {
                check_access(info.as_ref(), deleted, user_id, hide_foreign)
            };
            let precondition = |if_version: Option<i64>, steps: i64| match if_version {
                Some(expected) if expected != base + steps => Err(Error::PreconditionFailed {
                    current: base + steps,
                }),
                _ => Ok(()),
            };
            // A key seen before answers from its record, whatever the session's state now.
            if let Some((key, user_id)) = request.keyed() {
                let live = |record: &&KeyRecord| record.created_at >= write.keys_expire_before;
                let stored = state
                    .and_then(|state| state.keys.get(&key.key))
                    .and_then(Option::as_ref)
                    .filter(live)
                    .map(|record| (record.user_id.as_str(), record.fingerprint.as_slice()))
                    .or_else(|| pending_keys.get(key.key.as_str()).copied());
                match stored {
                    // Another user's record is not theirs to see: the command goes on, and is
                    // refused like any command on a session that is not theirs.
                    Some((owner, _)) if owner != user_id => {}
                    Some((_, fingerprint)) if fingerprint != key.fingerprint.as_slice() => {
                        outcomes.push(Outcome::Failed(Error::IdempotencyKeyReused));
                        continue;
                    }
                    Some(_) => {
                        let record = state
                            .and_then(|state| state.keys.get(&key.key))
                            .and_then(Option::as_ref)
                            .filter(live);
                        outcomes.push(match record {
                            Some(record) => Outcome::Replayed {
                                response: record.response.clone(),
                                with_this_write: false,
                            },
                            // Sent twice in one batch: the second gets the first's answer.
                            None => Outcome::SameAs(key.key.clone()),
                        });
                        continue;
                    }
                    None => {}
                }
            }
            let outcome = match request {
                SessionRequest::Create(create, _) => match &info {
                    None => {
                        write.create = Some(NewSessionRow {
                            user_id: create.user_id.clone(),
                            title: create.title.clone(),
                            metadata: create.metadata.get().to_owned(),
                        });
                        let created = SessionInfo {
                            id: self.id,
                            user_id: create.user_id.clone(),
                            title: create.title.clone(),
                            metadata: create.metadata.clone(),
                            usage: Usage::default(),
                            message_count: 0,
                            version: 0,
                            created_at: from_micros(now),
                            updated_at: from_micros(now),
                        };
                        steps += 1;
                        let created = SessionInfo {
                            version: base + steps,
                            ..created
                        };
                        info = Some(created.clone());
                        Outcome::Created {
                            created: true,
                            info: created,
                        }
                    }
                    // Another user's session, live or deleted, gets one answer: it must not
                    // tell whether that session was deleted.
                    Some(existing) if existing.user_id != create.user_id => {
                        Outcome::Failed(Error::Conflict("the session id is taken".into()))
                    }
                    Some(_) if deleted => Outcome::Failed(Error::Conflict(
                        "the session id belonged to a deleted session".into(),
                    )),
                    Some(existing) => Outcome::Created {
                        created: false,
                        info: existing.clone(),
                    },
                },
                SessionRequest::Append(append, _) => {
                    match (check(&info, deleted, &append.user_id), info.as_mut()) {
                        (Ok(()), Some(staged)) => {
                            // Each message is either stored already (a resend: its sequence) or
                            // new; an id stored with other content refuses the whole append.
                            let mut plan = Vec::with_capacity(append.messages.len());
                            let mut reused = None;
                            for valid in &append.messages {
                                let id = valid.message.id.unwrap_or_else(Uuid::now_v7);
                                let stored = state
                                    .and_then(|state| state.cached(&id))
                                    .or_else(|| pending.get(&id))
                                    .or_else(|| known.get(&id));
                                match stored {
                                    Some(stored) if stored.is_resend_of(&valid.message) => {
                                        plan.push((id, Some(stored.seq)));
                                    }
                                    Some(_) => {
                                        reused = Some(id);
                                        break;
                                    }
                                    None => plan.push((id, None)),
                                }
                            }
                            let adds = plan.iter().any(|(_, seq)| seq.is_none());
                            if let Some(id) = reused {
                                Outcome::Failed(Error::MessageIdReused { id })
                            } else if let (true, Err(error)) =
                                (adds, precondition(append.if_version, steps))
                            {
                                Outcome::Failed(error)
                            } else {
                                let mut sequences = Vec::with_capacity(plan.len());
                                for ((id, stored), valid) in plan.into_iter().zip(&append.messages)
                                {
                                    if let Some(seq) = stored {
                                        sequences.push(seq);
                                        continue;
                                    }
                                    let seq = staged.message_count;
                                    staged.message_count += 1;
                                    sequences.push(seq);
                                    let message = new_message(seq, id, valid, now);
                                    pending.insert(id, message.clone());
                                    write.rows.push(message.clone());
                                    messages.push(message);
                                }
                                if adds {
                                    steps += 1;
                                    staged.version = base + steps;
                                    staged.updated_at = from_micros(now);
                                }
                                Outcome::Appended(sequences)
                            }
                        }
                        (Err(error), _) => Outcome::Failed(error),
                        (Ok(()), None) => Outcome::Failed(Error::NotFound),
                    }
                }
                SessionRequest::Get(get, _) => match check(&info, deleted, &get.user_id) {
                    Err(error) => Outcome::Failed(error),
                    Ok(()) => Outcome::PendingRead,
                },
                SessionRequest::Refresh(_) => Outcome::Nothing,
                SessionRequest::Subscribe(subscribe, _) => {
                    match check(&info, deleted, &subscribe.user_id) {
                        Err(error) => Outcome::Failed(error),
                        Ok(()) => Outcome::PendingSubscribe,
                    }
                }
                SessionRequest::Update(update, _) => {
                    match (check(&info, deleted, &update.user_id), info.as_mut()) {
                        (Ok(()), Some(staged)) => match precondition(update.if_version, steps) {
                            Err(error) => Outcome::Failed(error),
                            Ok(()) => {
                                if let Some(title) = &update.title {
                                    write.title = Some(title.clone());
                                    staged.title = Some(title.clone());
                                }
                                if let Some(metadata) = &update.metadata {
                                    write.metadata = Some(metadata.get().to_owned());
                                    staged.metadata = metadata.clone();
                                }
                                if update.title.is_some() || update.metadata.is_some() {
                                    steps += 1;
                                    staged.version = base + steps;
                                    staged.updated_at = from_micros(now);
                                }
                                Outcome::Updated(staged.clone())
                            }
                        },
                        (Err(error), _) => Outcome::Failed(error),
                        (Ok(()), None) => Outcome::Failed(Error::NotFound),
                    }
                }
                SessionRequest::AddUsage(add, _) => {
                    let add = &add.command;
                    match (check(&info, deleted, &add.user_id), info.as_mut()) {
                        (Ok(()), Some(staged)) => {
                            let (prompt, completion) = (
                                i64::from(add.prompt_tokens),
                                i64::from(add.completion_tokens),
                            );
                            write.usage.prompt_tokens += prompt;
                            write.usage.completion_tokens += completion;
                            staged.usage.prompt_tokens += prompt;
                            staged.usage.completion_tokens += completion;
                            if prompt != 0 || completion != 0 {
                                steps += 1;
                                staged.version = base + steps;
                                staged.updated_at = from_micros(now);
                            }
                            Outcome::UsageAdded(staged.usage)
                        }
                        (Err(error), _) => Outcome::Failed(error),
                        (Ok(()), None) => Outcome::Failed(Error::NotFound),
                    }
                }
                SessionRequest::Delete(delete, _) => {
                    let command = &delete.command;
                    match (check(&info, deleted, &command.user_id), info.as_ref()) {
                        (Ok(()), Some(_)) => match precondition(command.if_version, steps) {
                            Err(error) => Outcome::Failed(error),
                            Ok(()) => {
                                write.delete = true;
                                deleted = true;
                                steps += 1;
                                Outcome::Deleted
                            }
                        },
                        (Err(error), _) => Outcome::Failed(error),
                        (Ok(()), None) => Outcome::Failed(Error::NotFound),
                    }
                }
            };
            // A keyed command that succeeds stores its record with its effect (in the same
            // write, so neither lands without the other).
            if let Some((key, user_id)) = request.keyed() {
                if outcome.is_write() {
                    pending_keys.insert(key.key.as_str(), (user_id, key.fingerprint.as_slice()));
                    keyed.push((outcomes.len(), key.clone(), user_id.to_owned()));
                }
            }
            outcomes.push(outcome);
        }
        // A write that only records keys (of commands that changed nothing) still moves the
        // version, as every committed write does.
        if !write.is_empty() {
            steps = steps.max(1);
        }
        write.steps = steps;
        if let Some(info) = info.as_mut() {
            if steps > 0 {
                info.version = base + steps;
                info.updated_at = from_micros(now);
            }
        }
        // The recorded answers are the ones the commands get once the write commits.
        for (index, key, user_id) in keyed {
            if let Some(reply) = outcomes[index].reply() {
                write.keys.push(KeyRow {
                    key: key.key,
                    user_id,
                    fingerprint: key.fingerprint,
                    response: serde_json::to_string(&reply).unwrap_or_default(),
                });
            }
        }
        for outcome in &mut outcomes {
            if let Outcome::SameAs(key) = outcome {
                *outcome = match write.keys.iter().find(|row| &row.key == key) {
                    Some(row) => Outcome::Replayed {
                        response: row.response.clone(),
                        with_this_write: true,
                    },
                    None => Outcome::Failed(Error::IdempotencyKeyReused),
                };
            }
        }
        Staged {
            write,
            outcomes,
            info,
            deleted,
            messages,
        }
    }

    /// Answers the batch's reads against the state before the batch.
    async fn resolve_reads(&mut self, requests: &[SessionRequest], outcomes: &mut [Outcome]) {
        for (request, outcome) in requests.iter().zip(outcomes.iter_mut()) {
            match (request, &*outcome) {
                (SessionRequest::Get(get, _), Outcome::PendingRead) => {
                    *outcome = Outcome::Read(self.page(get).await);
                }
                (SessionRequest::Subscribe(subscribe, _), Outcome::PendingSubscribe) => {
                    *outcome = Outcome::Subscribed(self.subscribe(subscribe.after_seq).await);
                }
                _ => {}
            }
        }
    }

    /// Applies a committed batch to the in-memory state and publishes its new messages.
    fn apply(
        &mut self,
        info: Option<SessionInfo>,
        deleted: bool,
        messages: Vec<Arc<Message>>,
        version: i64,
    ) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        state.info = info.map(|mut info| {
            // As staged; the database's word on the version wins all the same.
            info.version = version;
            info
        });
        if let Some(events) = &self.events {
            if events.receiver_count() > 0 {
                for message in &messages {
                    // Subscribers that lag behind catch up from the database.
                    let _ = events.send(message.clone());
                }
            }
        }
        for message in messages {
            state.ids.insert(message.id, message.seq);
            state.tail.push_back(message);
        }
        let keep = self.shared.config.cached_messages;
        while state.tail.len() > keep {
            if let Some(old) = state.tail.pop_front() {
                state.ids.remove(&old.id);
            }
        }
        if deleted {
            // Ends every subscription: they re-subscribe and learn the session is gone.
            self.events = None;
            state.deleted = true;
            state.tail.clear();
            state.ids.clear();
        }
    }

    /// Sends every command its reply, in command order. With `write_error`, the writes of the
    /// batch get that error; refusals and reads keep their own answers.
    fn reply(
        &self,
        requests: Vec<SessionRequest>,
        outcomes: Vec<Outcome>,
        write_error: Option<Error>,
    ) {
        let stats = &*self.shared.stats;
        for (request, outcome) in requests.into_iter().zip(outcomes) {
            if matches!(request, SessionRequest::Refresh(_)) {
                continue; // a notice, not a command: nobody waits for it
            }
            let outcome = match (&write_error, outcome) {
                (
                    Some(error),
                    Outcome::Created { .. }
                    | Outcome::Appended(_)
                    | Outcome::Updated(_)
                    | Outcome::UsageAdded(_)
                    | Outcome::Deleted
                    | Outcome::Replayed {
                        with_this_write: true,
                        ..
                    },
                ) => Outcome::Failed(error.clone()),
                (_, outcome) => outcome,
            };
            match (request, outcome) {
                (request, Outcome::Failed(error)) => {
                    stats.record_command(false);
                    reply_error(request, error);
                }
                (SessionRequest::Create(_, respond), Outcome::Created { created, info }) => {
                    send(
                        stats,
                        respond,
                        Ok(Created {
                            session: info,
                            created,
                        }),
                    );
                }
                (SessionRequest::Append(_, respond), Outcome::Appended(sequences)) => {
                    send(stats, respond, Ok(Appended { sequences }));
                }
                (SessionRequest::Get(_, respond), Outcome::Read(page)) => {
                    send(stats, respond, page);
                }
                (SessionRequest::Subscribe(_, respond), Outcome::Subscribed(subscribed)) => {
                    send(stats, respond, subscribed);
                }
                (SessionRequest::Update(_, respond), Outcome::Updated(info)) => {
                    send(stats, respond, Ok(info));
                }
                (SessionRequest::AddUsage(_, respond), Outcome::UsageAdded(usage)) => {
                    send(stats, respond, Ok(usage));
                }
                (SessionRequest::Delete(_, respond), Outcome::Deleted) => {
                    send(stats, respond, Ok(()));
                }
                (request, Outcome::Replayed { response, .. }) => {
                    replay(stats, request, &response);
                }
                (request, _) => {
                    // Staging gives each request an outcome of its own kind, so this cannot
                    // pair up differently; an answer is owed all the same.
                    stats.record_command(false);
                    reply_error(request, Error::ActorFailed);
                }
            }
        }
    }

    async fn subscribe(&mut self, after_seq: i64) -> Result<Subscribed> {
        let limit = self.shared.config.limits.max_page_size;
        let page = self
            .page(&GetSession {
                after_seq: Some(after_seq),
                limit: Some(limit),
                ..GetSession::default()
            })
            .await?;
        let events = self
            .events
            .get_or_insert_with(|| broadcast::channel(SUBSCRIBER_BUFFER).0);
        Ok(Subscribed {
            caught_up: page.next_after_seq.is_none(),
            backlog: page.messages,
            live: events.subscribe(),
        })
    }

    /// A page of the session as committed.
    async fn page(&self, get: &GetSession) -> Result<SessionPage> {
        let state = self.state.as_ref().ok_or(Error::NotFound)?;
        let info = match &state.info {
            Some(info) if !state.deleted => info.clone(),
            _ => return Err(Error::NotFound),
        };
        let limit = validate_page(get.limit, DEFAULT_MESSAGE_PAGE, &self.shared.config.limits);
        // Saturating: `after_seq` comes from the caller and may be anything.
        let start = get.after_seq.unwrap_or(-1).max(-1).saturating_add(1);
        let count = info.message_count;
        let messages: Vec<Arc<Message>> = if limit == 0 || start >= count {
            Vec::new()
        } else if start >= state.tail_start() {
            let skip = (start - state.tail_start()) as usize;
            state.tail.iter().skip(skip).take(limit).cloned().collect()
        } else {
            // Older than the cached tail: committed rows never change, so the database's copy
            // is the same as ours would be.
            let stored = self
                .shared
                .store
                .read_messages(self.id, start - 1, limit)
                .await?;
            stored.into_iter().map(Arc::new).collect()
        };
        let next_after_seq = messages
            .last()
            .map(|message| message.seq)
            .filter(|&last| last + 1 < count);
        Ok(SessionPage {
            session: info,
            messages,
            next_after_seq,
        })
    }
}

/// The message to cache and insert for one appended message.
fn new_message(seq: i64, id: Uuid, valid: &ValidMessage, now: i64) -> Arc<Message> {
    Arc::new(Message {
        seq,
        id,
        role: valid.message.role,
        content: valid.message.content.clone(),
        name: valid.message.name.clone(),
        tool_calls: valid.message.tool_calls.clone(),
        tool_call_id: valid.message.tool_call_id.clone(),
        function_call: valid.message.function_call.clone(),
        refusal: valid.message.refusal.clone(),
        created_at: from_micros(now),
    })
}

fn send<T>(stats: &EngineStats, respond: Respond<T>, result: Result<T>) {
    stats.record_command(result.is_ok());
    // The caller may have gone away; the command's effect stands regardless.
    let _ = respond.send(result);
}

/// Answers a command with the recorded answer of the first command with its idempotency key.
fn replay(stats: &EngineStats, request: SessionRequest, response: &str) {
    let reply = serde_json::from_str::<Reply>(response);
    match (request, reply) {
        (SessionRequest::Create(_, respond), Ok(Reply::SessionCreated(created))) => {
            send(stats, respond, Ok(created));
        }
        (SessionRequest::Update(_, respond), Ok(Reply::SessionUpdated(info))) => {
            send(stats, respond, Ok(info));
        }
        (SessionRequest::AddUsage(_, respond), Ok(Reply::UsageAdded(usage))) => {
            send(stats, respond, Ok(usage));
        }
        (SessionRequest::Delete(_, respond), Ok(Reply::SessionDeleted)) => {
            send(stats, respond, Ok(()));
        }
        // The fingerprint covers the command's kind, so a record of another kind (or one this
        // version cannot read) is the key used for something else.
        (request, _) => {
            stats.record_command(false);
            reply_error(request, Error::IdempotencyKeyReused);
        }
    }
}

fn reply_error(request: SessionRequest, error: Error) {
    match request {
        SessionRequest::Create(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Append(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Get(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Update(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::AddUsage(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Delete(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Subscribe(_, respond) => drop(respond.send(Err(error))),
        SessionRequest::Refresh(_) => {}
    }
}
