//! The session actor: the only code that changes a session. It owns the session's state (no
//! lock: the actor is the lock), stages each batch of queued commands in memory, hands one
//! write per batch to the writer stage, and answers every command after that write committed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use soloist_actors::Actor;
use tokio::sync::{broadcast, oneshot};
use tracing::{Instrument, debug, info_span};
use uuid::Uuid;

use crate::command::{
    AddUsage, Appended, Created, DEFAULT_MESSAGE_PAGE, DeleteSession, GetSession, SessionPage,
    ValidMessage, validate_page,
};
use crate::config::EngineConfig;
use crate::error::{Error, Result, StorageError};
use crate::model::{Message, SessionId, SessionInfo, Usage, from_micros, now_micros};
use crate::stats::EngineStats;
use crate::store::{FlushOutcome, LoadedSession, MessageRow, NewSessionRow, SessionWrite, Store};
use crate::writer::Writer;

/// Where an actor sends its answer.
pub(crate) type Respond<T> = oneshot::Sender<Result<T>>;

/// A validated [`CreateSession`](crate::CreateSession).
#[derive(Debug)]
pub(crate) struct CreateRequest {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: Value,
    pub metadata_json: String,
}

/// A validated [`AppendMessages`](crate::AppendMessages).
#[derive(Debug)]
pub(crate) struct AppendRequest {
    pub user_id: String,
    pub messages: Vec<ValidMessage>,
}

/// A validated [`UpdateSession`](crate::UpdateSession).
#[derive(Debug)]
pub(crate) struct UpdateRequest {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: Option<(Value, String)>,
}

/// What goes through a session's mailbox. Payloads are boxed so that a mailbox slot stays
/// small whatever the command.
#[derive(Debug)]
pub(crate) enum SessionRequest {
    Create(Box<CreateRequest>, Respond<Created>),
    Append(Box<AppendRequest>, Respond<Appended>),
    Get(Box<GetSession>, Respond<SessionPage>),
    Update(Box<UpdateRequest>, Respond<SessionInfo>),
    AddUsage(Box<AddUsage>, Respond<Usage>),
    Delete(Box<DeleteSession>, Respond<()>),
    Subscribe(Box<SubscribeRequest>, Respond<Subscribed>),
}

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
}

impl Loaded {
    fn from_store(loaded: Option<LoadedSession>) -> Self {
        match loaded {
            None => Self {
                info: None,
                deleted: false,
                tail: VecDeque::new(),
                ids: HashMap::new(),
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
}

/// One actor per live session.
pub(crate) struct SessionActor {
    id: SessionId,
    shared: Arc<Shared>,
    /// `None` until loaded, and again after a write whose outcome is unknown.
    state: Option<Loaded>,
    /// Publishes committed messages to subscribers; created by the first subscription,
    /// dropped on delete (which ends the subscriptions) and with the actor.
    events: Option<broadcast::Sender<Arc<Message>>>,
}

/// What staging decided for one command.
enum Planned {
    /// Answered without the write (an error, or nothing to do).
    Failed(Error),
    Created {
        created: bool,
    },
    Appended(Vec<i64>),
    Read,
    Updated,
    UsageAdded,
    Deleted,
    Subscribed,
}

/// The result of staging a batch: the write and what to apply once it committed.
struct Staged {
    write: SessionWrite,
    planned: Vec<Planned>,
    created: Option<(String, Option<String>, Value)>,
    title: Option<String>,
    metadata: Option<Value>,
    messages: Vec<Arc<Message>>,
}

/// The staged view of the session's ownership while a batch is staged command by command.
struct View<'a> {
    owner: Option<&'a str>,
    deleted: bool,
    hide_foreign: bool,
}

impl View<'_> {
    fn check(&self, user_id: &str) -> Result<()> {
        match self.owner {
            None => Err(Error::NotFound),
            Some(_) if self.deleted => Err(Error::NotFound),
            Some(owner) if owner != user_id => Err(if self.hide_foreign {
                Error::NotFound
            } else {
                Error::Forbidden
            }),
            Some(_) => Ok(()),
        }
    }
}

impl Actor for SessionActor {
    type Key = SessionId;
    type Message = SessionRequest;
    type Context = Shared;

    async fn activate(key: &SessionId, shared: &Arc<Shared>) -> Self {
        // Loading waits for the first batch, so a failed load can be answered (and retried).
        Self {
            id: *key,
            shared: shared.clone(),
            state: None,
            events: None,
        }
    }

    async fn handle(&mut self, batch: &mut Vec<SessionRequest>) {
        let requests = std::mem::take(batch);
        let span = info_span!("session_batch", session_id = %self.id, commands = requests.len());
        self.process(requests).instrument(span).await;
    }
}

impl SessionActor {
    async fn load(&mut self) -> Result<(), StorageError> {
        self.shared.stats.record_load();
        let loaded = self
            .shared
            .store
            .load(self.id, self.shared.config.cached_messages)
            .await?;
        self.state = Some(Loaded::from_store(loaded));
        Ok(())
    }

    /// Makes sure the state is loaded and, if a command asked for it, current.
    async fn prepare(&mut self, requests: &[SessionRequest]) -> Result<(), StorageError> {
        let Some(state) = &self.state else {
            return self.load().await;
        };
        let wants_fresh = requests
            .iter()
            .any(|request| matches!(request, SessionRequest::Get(get, _) if get.fresh));
        if wants_fresh {
            let stored = self.shared.store.version(self.id).await?;
            if stored.unwrap_or(0) != state.version() {
                debug!(session_id = %self.id, "stale copy; reloading for a fresh read");
                return self.load().await;
            }
        }
        Ok(())
    }

    async fn process(&mut self, requests: Vec<SessionRequest>) {
        self.shared.stats.record_batch(requests.len());
        if let Err(error) = self.prepare(&requests).await {
            self.fail_all(requests, Error::Storage(error));
            return;
        }
        let mut known_ids = HashMap::new();
        let mut attempt = 0;
        loop {
            let staged = self.stage(&requests, &known_ids);
            if staged.write.is_empty() {
                self.finish(requests, staged.planned).await;
                return;
            }
            let Staged {
                write,
                planned,
                created,
                title,
                metadata,
                messages,
            } = staged;
            let now = write.now;
            let delete = write.delete;
            let usage = write.usage;
            match self.shared.writer.write(write).await {
                Ok(FlushOutcome::Committed { version }) => {
                    self.apply(
                        version, now, created, title, metadata, usage, messages, delete,
                    );
                    self.finish(requests, planned).await;
                    return;
                }
                Ok(FlushOutcome::Conflict) => {
                    attempt += 1;
                    if attempt > self.shared.config.max_conflict_retries {
                        let error = || {
                            Error::Conflict(format!(
                                "session kept changing under {attempt} attempts to write it"
                            ))
                        };
                        self.state = None;
                        self.fail_writes(requests, planned, error);
                        return;
                    }
                    self.shared.stats.record_conflict_retry();
                    debug!(session_id = %self.id, attempt, "conflict; reloading and restaging");
                    let backoff = Duration::from_millis(1 << attempt.min(7));
                    tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
                    let reloaded = self.reload_for_conflict(&requests).await;
                    match reloaded {
                        Ok(ids) => known_ids = ids,
                        Err(error) => {
                            self.state = None;
                            self.fail_all(requests, Error::Storage(error));
                            return;
                        }
                    }
                }
                Err(error) => {
                    // The outcome is unknown (the commit may have gone through): forget the
                    // state so the next command reloads it from the database.
                    self.state = None;
                    self.fail_all(requests, Error::Storage(error));
                    return;
                }
            }
        }
    }

    /// After a conflict: reload the session and look up which of the batch's message ids are
    /// already stored, with their sequences.
    async fn reload_for_conflict(
        &mut self,
        requests: &[SessionRequest],
    ) -> Result<HashMap<Uuid, i64>, StorageError> {
        self.load().await?;
        let ids: Vec<Uuid> = requests
            .iter()
            .filter_map(|request| match request {
                SessionRequest::Append(append, _) => Some(append),
                _ => None,
            })
            .flat_map(|append| append.messages.iter().filter_map(|valid| valid.message.id))
            .collect();
        self.shared.store.stored_ids(self.id, &ids).await
    }

    fn stage(&self, requests: &[SessionRequest], known_ids: &HashMap<Uuid, i64>) -> Staged {
        let state = self.state.as_ref();
        let info = state.and_then(|state| state.info.as_ref());
        let now = now_micros();
        let mut write = SessionWrite::new(self.id, info.map_or(0, |info| info.version), now);
        let mut staged_owner: Option<String> = None;
        let mut view_deleted = state.is_some_and(|state| state.deleted);
        let mut next_seq = info.map_or(0, |info| info.message_count);
        let mut pending_ids: HashMap<Uuid, i64> = HashMap::new();
        let mut planned = Vec::with_capacity(requests.len());
        let mut created = None;
        let mut title = None;
        let mut metadata = None;
        let mut messages = Vec::new();
        let hide_foreign = self.shared.config.hide_foreign_sessions;

        for request in requests {
            let owner = info
                .map(|info| info.user_id.as_str())
                .or(staged_owner.as_deref());
            let view = View {
                owner,
                deleted: view_deleted,
                hide_foreign,
            };
            let plan = match request {
                SessionRequest::Create(create, _) => match view.owner {
                    None => {
                        write.create = Some(NewSessionRow {
                            user_id: create.user_id.clone(),
                            title: create.title.clone(),
                            metadata: create.metadata_json.clone(),
                        });
                        created = Some((
                            create.user_id.clone(),
                            create.title.clone(),
                            create.metadata.clone(),
                        ));
                        staged_owner = Some(create.user_id.clone());
                        Planned::Created { created: true }
                    }
                    Some(_) if view.deleted => Planned::Failed(Error::Conflict(
                        "the session id belonged to a deleted session".into(),
                    )),
                    Some(owner) if owner != create.user_id => {
                        Planned::Failed(Error::Conflict("the session id is taken".into()))
                    }
                    Some(_) => Planned::Created { created: false },
                },
                SessionRequest::Append(append, _) => match view.check(&append.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => {
                        let mut sequences = Vec::with_capacity(append.messages.len());
                        for valid in &append.messages {
                            let id = valid.message.id.unwrap_or_else(Uuid::now_v7);
                            let existing = state
                                .and_then(|state| state.ids.get(&id))
                                .or_else(|| pending_ids.get(&id))
                                .or_else(|| known_ids.get(&id));
                            if let Some(&seq) = existing {
                                sequences.push(seq);
                                continue;
                            }
                            let seq = next_seq;
                            next_seq += 1;
                            pending_ids.insert(id, seq);
                            sequences.push(seq);
                            let message = Arc::new(Message {
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
                            });
                            write.rows.push(MessageRow {
                                seq,
                                id,
                                role: message.role,
                                content: message.content.clone(),
                                name: message.name.clone(),
                                tool_calls: valid.tool_calls_json.clone(),
                                tool_call_id: message.tool_call_id.clone(),
                                function_call: valid.function_call_json.clone(),
                                refusal: message.refusal.clone(),
                            });
                            messages.push(message);
                        }
                        Planned::Appended(sequences)
                    }
                },
                SessionRequest::Get(get, _) => match view.check(&get.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => Planned::Read,
                },
                SessionRequest::Update(update, _) => match view.check(&update.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => {
                        if let Some(new_title) = &update.title {
                            write.title = Some(new_title.clone());
                            title = Some(new_title.clone());
                        }
                        if let Some((value, json)) = &update.metadata {
                            write.metadata = Some(json.clone());
                            metadata = Some(value.clone());
                        }
                        Planned::Updated
                    }
                },
                SessionRequest::AddUsage(add, _) => match view.check(&add.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => {
                        write.usage.prompt_tokens += i64::from(add.prompt_tokens);
                        write.usage.completion_tokens += i64::from(add.completion_tokens);
                        Planned::UsageAdded
                    }
                },
                SessionRequest::Subscribe(subscribe, _) => match view.check(&subscribe.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => Planned::Subscribed,
                },
                SessionRequest::Delete(delete, _) => match view.check(&delete.user_id) {
                    Err(error) => Planned::Failed(error),
                    Ok(()) => {
                        write.delete = true;
                        view_deleted = true;
                        Planned::Deleted
                    }
                },
            };
            planned.push(plan);
        }
        Staged {
            write,
            planned,
            created,
            title,
            metadata,
            messages,
        }
    }

    /// Applies a committed write to the in-memory state.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        version: i64,
        now: i64,
        created: Option<(String, Option<String>, Value)>,
        title: Option<String>,
        metadata: Option<Value>,
        usage: Usage,
        messages: Vec<Arc<Message>>,
        delete: bool,
    ) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if let Some((user_id, title, metadata)) = created {
            state.info = Some(SessionInfo {
                id: self.id,
                user_id,
                title,
                metadata,
                usage: Usage::default(),
                message_count: 0,
                version: 0,
                created_at: from_micros(now),
                updated_at: from_micros(now),
            });
        }
        let Some(info) = state.info.as_mut() else {
            return;
        };
        if let Some(title) = title {
            info.title = Some(title);
        }
        if let Some(metadata) = metadata {
            info.metadata = metadata;
        }
        info.usage.prompt_tokens += usage.prompt_tokens;
        info.usage.completion_tokens += usage.completion_tokens;
        info.message_count += messages.len() as i64;
        info.version = version;
        info.updated_at = from_micros(now);
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
        if delete {
            self.events = None;
            state.deleted = true;
            state.tail.clear();
            state.ids.clear();
        }
    }

    /// Answers every command of a batch whose write committed (or that had nothing to write).
    async fn finish(&mut self, requests: Vec<SessionRequest>, planned: Vec<Planned>) {
        let stats = self.shared.stats.clone();
        let stats = &*stats;
        for (request, plan) in requests.into_iter().zip(planned) {
            match (request, plan) {
                (request, Planned::Failed(error)) => {
                    stats.record_command(false);
                    reply_error(request, error);
                }
                (SessionRequest::Create(_, respond), Planned::Created { created }) => {
                    let result = self.info().map(|session| Created { session, created });
                    send(stats, respond, result);
                }
                (SessionRequest::Append(_, respond), Planned::Appended(sequences)) => {
                    send(stats, respond, Ok(Appended { sequences }));
                }
                (SessionRequest::Get(get, respond), Planned::Read) => {
                    let page = self.page(&get).await;
                    send(stats, respond, page);
                }
                (SessionRequest::Update(_, respond), Planned::Updated) => {
                    send(stats, respond, self.info());
                }
                (SessionRequest::AddUsage(_, respond), Planned::UsageAdded) => {
                    send(stats, respond, self.info().map(|info| info.usage));
                }
                (SessionRequest::Delete(_, respond), Planned::Deleted) => {
                    send(stats, respond, Ok(()));
                }
                (SessionRequest::Subscribe(subscribe, respond), Planned::Subscribed) => {
                    let subscribed = self.subscribe(subscribe.after_seq).await;
                    send(stats, respond, subscribed);
                }
                (request, _) => {
                    // Staging plans each request by its own variant; this cannot pair up
                    // differently, but an answer is owed all the same.
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

    fn info(&self) -> Result<SessionInfo> {
        self.state
            .as_ref()
            .and_then(|state| state.info.clone())
            .ok_or(Error::NotFound)
    }

    async fn page(&self, get: &GetSession) -> Result<SessionPage> {
        let state = self.state.as_ref().ok_or(Error::NotFound)?;
        let info = state.info.clone().ok_or(Error::NotFound)?;
        let limit = validate_page(get.limit, DEFAULT_MESSAGE_PAGE, &self.shared.config.limits);
        let after_seq = get.after_seq.unwrap_or(-1).max(-1);
        let count = info.message_count;
        let messages: Vec<Arc<Message>> = if limit == 0 || after_seq + 1 >= count {
            Vec::new()
        } else if after_seq + 1 >= state.tail_start() {
            let skip = (after_seq + 1 - state.tail_start()) as usize;
            state.tail.iter().skip(skip).take(limit).cloned().collect()
        } else {
            // Older than the cached tail: committed rows never change, so the database's copy
            // is the same as ours would be.
            let stored = self
                .shared
                .store
                .read_messages(self.id, after_seq, limit)
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

    fn fail_all(&self, requests: Vec<SessionRequest>, error: Error) {
        for request in requests {
            self.shared.stats.record_command(false);
            reply_error(request, error.clone());
        }
    }

    /// Answers the writes of a batch with `error`; its reads and its refused commands get
    /// their own answers.
    fn fail_writes(
        &self,
        requests: Vec<SessionRequest>,
        planned: Vec<Planned>,
        error: impl Fn() -> Error,
    ) {
        for (request, plan) in requests.into_iter().zip(planned) {
            self.shared.stats.record_command(false);
            match plan {
                Planned::Failed(own) => reply_error(request, own),
                _ => reply_error(request, error()),
            }
        }
    }
}

fn send<T>(stats: &EngineStats, respond: Respond<T>, result: Result<T>) {
    stats.record_command(result.is_ok());
    // The caller may have gone away; the command's effect stands regardless.
    let _ = respond.send(result);
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
    }
}
