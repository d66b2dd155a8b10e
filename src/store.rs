//! Persistence: the [`Store`] enum over the SQL backends, and the records they exchange with the
//! session actors and the writer stage.
//!
//! A flush writes the batches of many sessions in one transaction. For each session it checks,
//! in that transaction, that the session's stored `version` is the one its actor loaded (so a
//! write made by another process is noticed before anything is written), inserts the messages
//! with `ON CONFLICT DO NOTHING` (so a stored message id or sequence is noticed without aborting
//! the transaction), and bumps `version`, `updated_at` and the counters by deltas. A session
//! that conflicts is left out and reported as [`FlushOutcome::Conflict`]; the others commit.

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use std::collections::HashMap;

use uuid::Uuid;

use crate::command::SessionCursor;
use crate::config::EngineConfig;
use crate::error::{Error, StorageError};
use crate::idempotency::KeyRecord;
use crate::model::{Message, RawJson, Role, SessionId, SessionInfo, Usage, from_micros};

/// A session's row and the newest messages, as loaded on activation.
#[derive(Debug)]
pub(crate) struct LoadedSession {
    pub info: SessionInfo,
    pub deleted: bool,
    /// The ownership epoch stored with the session.
    pub epoch: i64,
    /// The newest messages, ascending by `seq`.
    pub tail: Vec<Message>,
}

/// The row of a session created by a flush.
#[derive(Clone, Debug)]
pub(crate) struct NewSessionRow {
    pub user_id: String,
    pub title: Option<String>,
    pub metadata: String,
}

/// A message row to insert.
#[derive(Clone, Debug)]
pub(crate) struct MessageRow {
    pub seq: i64,
    pub id: Uuid,
    pub role: Role,
    pub content: Option<String>,
    pub name: Option<String>,
    pub tool_calls: Option<String>,
    pub tool_call_id: Option<String>,
    pub function_call: Option<String>,
    pub refusal: Option<String>,
}

/// Everything one session's batch changes, written atomically.
#[derive(Clone, Debug)]
pub(crate) struct SessionWrite {
    pub session_id: SessionId,
    /// Insert the session row first (`ON CONFLICT DO NOTHING`: a row already there is a conflict).
    pub create: Option<NewSessionRow>,
    /// The stored version this write was staged against (0 for a new session).
    pub expected_version: i64,
    /// The ownership epoch the session must still have: the one this process took over, or,
    /// with `claim`, the one it loaded.
    pub epoch: i64,
    /// Take the session over: the write bumps the epoch (the first write of an activation).
    pub claim: bool,
    pub rows: Vec<MessageRow>,
    pub title: Option<String>,
    pub metadata: Option<String>,
    pub usage: Usage,
    pub delete: bool,
    /// Idempotency records to store with the write; a key already stored (and not expired) is
    /// a conflict, like a stored message id.
    pub keys: Vec<KeyRow>,
    /// Idempotency records of the session older than this (microseconds) are expired: deleted
    /// when the write stores a key.
    pub keys_expire_before: i64,
    /// How far the write moves the session's version: one per command of the batch that
    /// changes the session (at least one), so that every change has a version of its own.
    pub steps: i64,
    /// Commit time (microseconds) for `updated_at` and the new rows' `created_at`.
    pub now: i64,
}

/// An idempotency record to insert.
#[derive(Clone, Debug)]
pub(crate) struct KeyRow {
    pub key: String,
    pub user_id: String,
    pub fingerprint: Vec<u8>,
    /// The answer, as a JSON [`Reply`](crate::Reply).
    pub response: String,
}

impl SessionWrite {
    pub fn new(session_id: SessionId, expected_version: i64, now: i64) -> Self {
        Self {
            session_id,
            create: None,
            expected_version,
            epoch: 0,
            claim: true,
            rows: Vec::new(),
            title: None,
            metadata: None,
            usage: Usage::default(),
            delete: false,
            keys: Vec::new(),
            keys_expire_before: 0,
            steps: 1,
            now,
        }
    }

    /// Bytes of message payload (content, texts, JSON) this write carries.
    pub fn payload_bytes(&self) -> usize {
        let text = |text: &Option<String>| text.as_ref().map_or(0, String::len);
        self.rows
            .iter()
            .map(|row| {
                text(&row.content)
                    + text(&row.name)
                    + text(&row.tool_calls)
                    + text(&row.tool_call_id)
                    + text(&row.function_call)
                    + text(&row.refusal)
            })
            .sum::<usize>()
            + text(&self.metadata)
    }

    pub fn is_empty(&self) -> bool {
        self.create.is_none()
            && self.rows.is_empty()
            && self.title.is_none()
            && self.metadata.is_none()
            && self.usage == Usage::default()
            && !self.delete
            && self.keys.is_empty()
    }
}

/// What a flush did with one session's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlushOutcome {
    /// Committed; the session's stored version is now `version`, and this process owns it.
    /// `took_over`: the write claimed the session while another process's lease on it was
    /// still running.
    Committed { version: i64, took_over: bool },
    /// Another writer changed the session (or a message id / sequence is already stored):
    /// nothing of this write was applied. Reload and restage.
    Conflict,
    /// Another process took the session over (its epoch moved): nothing of this write was
    /// applied, and this process may not write the session again without reloading it.
    Fenced,
}

/// What a flush finds stored for a session it writes, read under the row lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StoredHead {
    pub version: i64,
    pub deleted: bool,
    pub epoch: i64,
    /// Another process owns the session and its lease has not run out.
    pub leased_elsewhere: bool,
}

/// A session's stored head as the flushes select it: `(id, version, deleted, epoch,
/// leased_elsewhere)`.
pub(crate) type HeadRow = (Uuid, i64, bool, i64, bool);

/// The heads a flush found under its lock, by session.
pub(crate) fn heads(rows: impl IntoIterator<Item = HeadRow>) -> HashMap<Uuid, StoredHead> {
    rows.into_iter()
        .map(|(id, version, deleted, epoch, leased_elsewhere)| {
            let head = StoredHead {
                version,
                deleted,
                epoch,
                leased_elsewhere,
            };
            (id, head)
        })
        .collect()
}

/// Tracks, through the retries of one flush, which writes are still in it and what happened to
/// the ones that left.
pub(crate) struct FlushPlan {
    pub outcomes: Vec<Option<FlushOutcome>>,
    /// Which writes take a session over from a live lease.
    took_over: Vec<bool>,
}

impl FlushPlan {
    pub fn new(count: usize) -> Self {
        Self {
            outcomes: vec![None; count],
            took_over: vec![false; count],
        }
    }

    /// Indexes of the writes still in the transaction.
    pub fn active(&self) -> Vec<usize> {
        (0..self.outcomes.len())
            .filter(|&index| self.outcomes[index].is_none())
            .collect()
    }

    pub fn conflict(&mut self, index: usize) {
        self.outcomes[index] = Some(FlushOutcome::Conflict);
    }

    /// After the commit: every write still active committed.
    pub fn commit_active(&mut self, writes: &[SessionWrite]) -> Vec<FlushOutcome> {
        self.outcomes
            .iter()
            .zip(writes)
            .zip(&self.took_over)
            .map(|((outcome, write), &took_over)| {
                outcome.unwrap_or(FlushOutcome::Committed {
                    version: write.expected_version + write.steps,
                    took_over,
                })
            })
            .collect()
    }
}

/// Checks the locked session rows against what each active write expects: a moved epoch
/// fences the write, a moved version (or a deleted or missing row) is a conflict.
pub(crate) fn check_heads(
    plan: &mut FlushPlan,
    writes: &[SessionWrite],
    stored: &HashMap<Uuid, StoredHead>,
) {
    for index in plan.active() {
        let write = &writes[index];
        match stored.get(&write.session_id) {
            Some(head) if head.epoch != write.epoch => {
                plan.outcomes[index] = Some(FlushOutcome::Fenced);
            }
            Some(head) if head.version == write.expected_version && !head.deleted => {
                plan.took_over[index] = write.claim && head.leased_elsewhere;
            }
            _ => plan.conflict(index),
        }
    }
}

/// After the inserts of message rows and idempotency records (counted per session): the
/// active writes that did not get all of theirs in, because some message id, sequence or key
/// of theirs was already stored.
pub(crate) fn short_writes(
    plan: &FlushPlan,
    writes: &[SessionWrite],
    rows: &HashMap<Uuid, usize>,
    keys: &HashMap<Uuid, usize>,
) -> Vec<usize> {
    let count = |inserted: &HashMap<Uuid, usize>, id| inserted.get(id).copied().unwrap_or(0);
    plan.active()
        .into_iter()
        .filter(|&index| {
            let write = &writes[index];
            count(rows, &write.session_id) != write.rows.len()
                || count(keys, &write.session_id) != write.keys.len()
        })
        .collect()
}

/// A message row as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct MessageRecord {
    seq: i64,
    message_id: Uuid,
    role: String,
    content: Option<Vec<u8>>,
    name: Option<String>,
    tool_calls: Option<String>,
    tool_call_id: Option<String>,
    function_call: Option<String>,
    refusal: Option<String>,
    created_at: i64,
}

/// The columns [`MessageRecord`] reads, as a literal for `concat!`.
macro_rules! message_columns {
    () => {
        "seq, message_id, role, content, name, tool_calls, tool_call_id, function_call, \
         refusal, created_at"
    };
}
pub(crate) use message_columns;

fn corrupt(what: &str, error: impl std::fmt::Display) -> StorageError {
    StorageError::msg(format!("stored {what} is unreadable: {error}"))
}

fn parse_json(what: &str, text: Option<String>) -> Result<Option<RawJson>, StorageError> {
    text.map(|text| RawJson::from_stored(text).ok_or_else(|| corrupt(what, "not JSON")))
        .transpose()
}

impl TryFrom<MessageRecord> for Message {
    type Error = StorageError;

    fn try_from(record: MessageRecord) -> Result<Self, StorageError> {
        Ok(Message {
            seq: record.seq,
            id: record.message_id,
            role: record
                .role
                .parse::<Role>()
                .map_err(|error| corrupt("role", error))?,
            content: record
                .content
                .map(String::from_utf8)
                .transpose()
                .map_err(|error| corrupt("content", error))?,
            name: record.name,
            tool_calls: parse_json("tool_calls", record.tool_calls)?,
            tool_call_id: record.tool_call_id,
            function_call: parse_json("function_call", record.function_call)?,
            refusal: record.refusal,
            created_at: from_micros(record.created_at),
        })
    }
}

/// A session row as stored.
#[derive(sqlx::FromRow)]
pub(crate) struct SessionRecord {
    id: Uuid,
    user_id: String,
    title: Option<String>,
    metadata: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    message_count: i64,
    version: i64,
    created_at: i64,
    updated_at: i64,
    deleted: bool,
    epoch: i64,
}

/// The columns [`SessionRecord`] reads, as a literal for `concat!`.
macro_rules! session_columns {
    () => {
        "id, user_id, title, metadata, prompt_tokens, completion_tokens, message_count, \
         version, created_at, updated_at, (deleted_at IS NOT NULL) AS deleted, epoch"
    };
}
pub(crate) use session_columns;

impl SessionRecord {
    /// The session's info, whether it is deleted, and its ownership epoch.
    fn into_info(self) -> Result<(SessionInfo, bool, i64), StorageError> {
        let metadata =
            RawJson::from_stored(self.metadata).ok_or_else(|| corrupt("metadata", "not JSON"))?;
        Ok((
            SessionInfo {
                id: self.id,
                user_id: self.user_id,
                title: self.title,
                metadata,
                usage: Usage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                },
                message_count: self.message_count,
                version: self.version,
                created_at: from_micros(self.created_at),
                updated_at: from_micros(self.updated_at),
            },
            self.deleted,
            self.epoch,
        ))
    }
}

fn into_messages(records: Vec<MessageRecord>) -> Result<Vec<Message>, StorageError> {
    records.into_iter().map(Message::try_from).collect()
}

/// Who this process is when it takes sessions over, and for how long its claim holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ownership {
    pub owner: Uuid,
    /// The lease each write renews, in microseconds.
    pub lease_micros: i64,
}

/// The storage backends, chosen at run time from the database URL.
#[derive(Clone, Debug)]
pub(crate) enum Store {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteStore),
    #[cfg(feature = "postgres")]
    Postgres(postgres::PostgresStore),
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $body:expr) => {
        match $self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite($store) => $body,
            #[cfg(feature = "postgres")]
            Store::Postgres($store) => $body,
        }
    };
}

impl Store {
    /// Connects to the configured database and runs the embedded migrations.
    /// `owner` is this process's id, written into the sessions it takes over.
    pub async fn connect(config: &EngineConfig, owner: Uuid) -> Result<Store, Error> {
        let url = config.database_url.as_str();
        let ownership = Ownership {
            owner,
            lease_micros: i64::try_from(config.ownership_lease.as_micros()).unwrap_or(i64::MAX),
        };
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            return Ok(Store::Sqlite(
                sqlite::SqliteStore::connect(config, ownership).await?,
            ));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            return Ok(Store::Postgres(
                postgres::PostgresStore::connect(config, ownership).await?,
            ));
        }
        Err(Error::invalid(
            "database_url",
            format!("unsupported database URL {url:?}: expected sqlite: or postgres:"),
        ))
    }

    /// How many write transactions may be in flight at once.
    pub fn writer_count(&self, config: &EngineConfig) -> usize {
        #[cfg(not(feature = "postgres"))]
        let _ = config;
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => 1,
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => config.writer_connections.max(1) as usize,
        }
    }

    /// The session's row and its newest `tail` messages; `None` if there is no such row. With
    /// `readers` (the users whose commands asked for the load), the messages are read only if
    /// one of them owns the session: a load for someone else's commands costs what a load of
    /// a missing session costs, and keeps nothing of the conversation in memory.
    pub async fn load(
        &self,
        id: SessionId,
        tail: usize,
        readers: &[&str],
    ) -> Result<Option<LoadedSession>, StorageError> {
        dispatch!(self, store => store.load(id, tail, readers).await)
    }

    /// Sequences of those of `ids` that are stored in the session.
    pub async fn stored_ids(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, i64>, StorageError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        dispatch!(self, store => store.stored_ids(id, ids).await)
    }

    /// Those of `ids` that are stored in the session, as stored.
    pub async fn stored_messages(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<Vec<Message>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, store => store.stored_messages(id, ids).await)
    }

    /// The idempotency records of the session under `keys` created at or after `since`
    /// (microseconds), by key.
    pub async fn key_records(
        &self,
        id: SessionId,
        keys: &[String],
        since: i64,
    ) -> Result<HashMap<String, KeyRecord>, StorageError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, String, Vec<u8>, String, i64)> =
            dispatch!(self, store => store.key_records(id, keys, since).await)?;
        Ok(rows
            .into_iter()
            .map(|(key, user_id, fingerprint, response, created_at)| {
                let record = KeyRecord {
                    user_id,
                    fingerprint,
                    response,
                    created_at,
                };
                (key, record)
            })
            .collect())
    }

    /// Deletes at most `limit` idempotency records created before `cutoff` (microseconds), of
    /// any session; returns how many.
    pub async fn purge_keys(&self, cutoff: i64, limit: i64) -> Result<u64, StorageError> {
        dispatch!(self, store => store.purge_keys(cutoff, limit).await)
    }

    pub async fn read_messages(
        &self,
        id: SessionId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StorageError> {
        dispatch!(self, store => store.read_messages(id, after_seq, limit).await)
    }

    pub async fn list_sessions(
        &self,
        user_id: &str,
        before: Option<SessionCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        dispatch!(self, store => store.list_sessions(user_id, before, limit).await)
    }

    /// The stored version of a session, or `None` if there is no such row.
    pub async fn version(&self, id: SessionId) -> Result<Option<i64>, StorageError> {
        dispatch!(self, store => store.version(id).await)
    }

    /// After a flush's outcome was lost: the session's stored head, waiting for any write that
    /// still holds (or waits for) its row lock, as `(version, owned by this process, epoch)`;
    /// `None` if there is no such row.
    pub async fn settled_head(
        &self,
        id: SessionId,
    ) -> Result<Option<(i64, bool, i64)>, StorageError> {
        dispatch!(self, store => store.settled_head(id).await)
    }

    /// Writes many sessions' batches in one transaction; see the module docs. `Err` means the
    /// whole transaction failed and its outcome may be unknown.
    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        dispatch!(self, store => store.flush(writes).await)
    }

    /// Whether a failed flush may be retried as is: the database refused it before anything
    /// could have committed (lock timeout, deadlock, serialization failure).
    pub fn is_transient(&self, error: &StorageError) -> bool {
        dispatch!(self, store => store.is_transient(error))
    }

    /// Closes the connection pools.
    pub async fn close(&self) {
        dispatch!(self, store => store.close().await)
    }
}
