//! Persistence: the [`Store`] enum over the SQL backends, and the records they exchange with the
//! session actors and the writer stage.
//!
//! The backends share their code: each statement is written once (`queries`) and rendered for
//! the backend's dialect (`dialect`); the reads and the general flush run the same way on every
//! backend (`sql`), and what a flush decides about each write is decided in one place
//! (`flush`). A backend's own file holds its connection set-up, how it binds rows, and what
//! only it can do (on PostgreSQL, the single-statement flush and LISTEN/NOTIFY).
//!
//! A flush writes the batches of many sessions in one transaction. For each session it checks,
//! in that transaction, that the session's stored `version` is the one its actor loaded (so a
//! write made by another process is noticed before anything is written), inserts the messages
//! with `ON CONFLICT DO NOTHING` (so a stored message id or sequence is noticed without aborting
//! the transaction), and bumps `version`, `updated_at` and the counters by deltas. A session
//! that conflicts is left out and reported as [`FlushOutcome::Conflict`]; the others commit.

mod backend;
mod dialect;
mod flush;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod queries;
mod rows;
mod sql;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::command::SessionCursor;
use crate::config::EngineConfig;
use crate::error::{Error, StorageError};
use crate::idempotency::KeyRecord;
use crate::model::{Member, Message, SessionId, SessionInfo, Usage};
pub(crate) use rows::{ChunkRow, FinishRow};

/// A session's row and the newest messages, as loaded on activation.
#[derive(Debug)]
pub(crate) struct LoadedSession {
    /// The session's row.
    pub info: SessionInfo,
    /// Whether the session is deleted (its row stays, as a tombstone).
    pub deleted: bool,
    /// The ownership epoch stored with the session.
    pub epoch: i64,
    /// The newest messages, ascending by `seq`.
    pub tail: Vec<Message>,
    /// The messages before the tail that make or answer tool calls (their sequence, role,
    /// tool calls and tool call id only), ascending.
    pub older_tool_messages: Vec<ToolMessage>,
    /// Loaded for readers who do not own the session: `tail` and `older_tool_messages` are
    /// empty whatever is stored.
    pub partial: bool,
}

/// What a stored message says of tool calls.
#[derive(Clone, Debug)]
pub(crate) struct ToolMessage {
    pub seq: i64,
    pub role: crate::model::Role,
    pub tool_calls: Option<crate::model::RawJson>,
    pub tool_call_id: Option<String>,
}

/// The row of a session created by a flush.
#[derive(Clone, Debug)]
pub(crate) struct NewSessionRow {
    /// The session's owner.
    pub user_id: String,
    /// The initial title.
    pub title: Option<String>,
    /// The initial metadata, as JSON text.
    pub metadata: String,
}

/// Everything one session's batch changes, written atomically.
#[derive(Clone, Debug)]
pub(crate) struct SessionWrite {
    /// The session written.
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
    /// The messages to insert, as the session actor staged (and cached) them.
    pub rows: Vec<Arc<Message>>,
    /// A new title, if the batch sets one.
    pub title: Option<String>,
    /// New metadata (JSON text), if the batch sets it.
    pub metadata: Option<String>,
    /// Token counts to add to the session's.
    pub usage: Usage,
    /// Delete the session (keeping its row as a tombstone) and its messages.
    pub delete: bool,
    /// With `delete`: erase its content too (title, metadata, usage, idempotency records).
    /// Allowed on a session already deleted.
    pub erase: bool,
    /// A new time to live in seconds (`Some(None)`: none), if the batch sets one.
    pub ttl: Option<Option<i64>>,
    /// Text appended to drafts, one chunk per draft.
    pub chunks: Vec<ChunkRow>,
    /// Drafts finished (their chunks compacted into the message row).
    pub finishes: Vec<FinishRow>,
    /// Idempotency records to store with the write; a key already stored (and not expired) is
    /// a conflict, like a stored message id.
    pub keys: Vec<KeyRow>,
    /// Idempotency records of the session older than this (microseconds) are expired: deleted
    /// when the write stores a key.
    pub keys_expire_before: i64,
    /// How far the write moves the session's version: one per command of the batch that
    /// changes the session (at least one), so that every change has a version of its own.
    pub steps: i64,
    /// Commit time (microseconds) for `updated_at` (the new rows carry their `created_at`:
    /// this time, staged, or an import's).
    pub now: i64,
}

/// An idempotency record to insert.
#[derive(Clone, Debug)]
pub(crate) struct KeyRow {
    /// The idempotency key the command was sent with.
    pub key: String,
    /// The user who sent it.
    pub user_id: String,
    /// What identifies the command, so that a key sent again with another command is told
    /// apart.
    pub fingerprint: Vec<u8>,
    /// The answer, as a JSON [`Reply`](crate::Reply).
    pub response: String,
}

impl SessionWrite {
    /// A write that changes nothing yet, staged against `expected_version` at time `now`.
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
            erase: false,
            ttl: None,
            chunks: Vec::new(),
            finishes: Vec::new(),
            keys: Vec::new(),
            keys_expire_before: 0,
            steps: 1,
            now,
        }
    }

    /// Bytes of message payload (content, texts, JSON) this write carries.
    pub fn payload_bytes(&self) -> usize {
        rows::payload_bytes(&self.rows)
            + self.metadata.as_ref().map_or(0, String::len)
            + self
                .chunks
                .iter()
                .map(|chunk| chunk.content.len())
                .sum::<usize>()
            + rows::payload_bytes(self.finishes.iter().map(|finish| &finish.message))
    }

    /// Whether the write has parts only the general flush writes (creates, deletes, keys,
    /// drafts' finishes).
    #[cfg(feature = "postgres")]
    pub fn needs_general_flush(&self) -> bool {
        self.create.is_some() || self.delete || !self.keys.is_empty() || !self.finishes.is_empty()
    }

    /// Whether the write changes nothing (and need not be flushed).
    pub fn is_empty(&self) -> bool {
        self.create.is_none()
            && self.rows.is_empty()
            && self.title.is_none()
            && self.metadata.is_none()
            && self.ttl.is_none()
            && self.usage == Usage::default()
            && !self.delete
            && self.keys.is_empty()
            && self.chunks.is_empty()
            && self.finishes.is_empty()
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

/// Who this process is when it takes sessions over, and for how long its claim holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ownership {
    /// This process's id.
    pub owner: Uuid,
    /// The lease each write renews, in microseconds.
    pub lease_micros: i64,
}

/// The storage backends, chosen at run time from the database URL.
#[derive(Clone, Debug)]
pub(crate) enum Store {
    /// `sqlite:` URLs, files and in-memory databases.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteStore),
    /// `postgres:` and `postgresql:` URLs.
    #[cfg(feature = "postgres")]
    Postgres(postgres::PostgresStore),
}

/// Runs `$body` with `$sql` bound to the backend's shared [`sql::Sql`] store.
macro_rules! dispatch {
    ($self:ident, $sql:ident => $body:expr) => {
        match $self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(store) => {
                let $sql = &store.sql;
                $body
            }
            #[cfg(feature = "postgres")]
            Store::Postgres(store) => {
                let $sql = &store.sql;
                $body
            }
        }
    };
}

/// Declares methods of [`Store`] that every backend answers the same way: each is written
/// once, in [`sql::Sql`], and the store hands the call to its backend's.
macro_rules! delegate {
    ($($(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $type:ty)*) -> $output:ty;)*) => {
        $(
            $(#[$doc])*
            pub async fn $name(&self $(, $arg: $type)*) -> $output {
                dispatch!(self, sql => sql.$name($($arg),*).await)
            }
        )*
    };
}

impl Store {
    /// Connects to the configured database and runs the embedded migrations.
    /// `owner` is this process's id, written into the sessions it takes over.
    pub async fn connect(config: &EngineConfig, owner: Uuid) -> Result<Store, Error> {
        let url = config.database_url.as_str();
        let lease = i64::try_from(config.ownership_lease.as_micros()).unwrap_or(i64::MAX);
        let ownership = Ownership {
            owner,
            // Added to the current time in SQL: kept far enough from the end of the range that
            // the sum cannot overflow.
            lease_micros: lease.min(i64::MAX / 4),
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

    /// The store's change feed between processes, if it has one.
    pub fn change_feed(&self, instance: Uuid) -> Option<Box<dyn crate::feed::ChangeFeed>> {
        #[cfg(not(feature = "postgres"))]
        let _ = instance;
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => None,
            #[cfg(feature = "postgres")]
            Store::Postgres(store) => Some(Box::new(postgres::changes::Feed::new(
                store.clone(),
                instance,
            ))),
        }
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

    delegate! {
        /// The session's row and its newest `tail` messages; `None` if there is no such row.
        /// With `readers` (the users whose commands asked for the load), the messages are read
        /// only if one of them owns the session: a load for someone else's commands costs what
        /// a load of a missing session costs, and keeps nothing of the conversation in memory.
        /// With `hide` too, a session none of them owns loads as missing: only its owner column
        /// is read, so that it answers as fast as a missing one.
        fn load(&self, id: SessionId, tail: usize, readers: &[&str], hide: bool)
            -> Result<Option<LoadedSession>, StorageError>;

        /// Sequences of those of `ids` that are stored in the session.
        fn stored_ids(&self, id: SessionId, ids: &[Uuid])
            -> Result<HashMap<Uuid, i64>, StorageError>;

        /// Those of `ids` that are stored in the session, as stored.
        fn stored_messages(&self, id: SessionId, ids: &[Uuid])
            -> Result<Vec<Message>, StorageError>;

        /// The idempotency records of the session under `keys` created at or after `since`
        /// (microseconds), by key.
        fn key_records(&self, id: SessionId, keys: &[String], since: i64)
            -> Result<HashMap<String, KeyRecord>, StorageError>;

        /// Deletes at most `limit` idempotency records created before `cutoff`
        /// (microseconds), of any session; returns how many.
        fn purge_keys(&self, cutoff: i64, limit: i64) -> Result<u64, StorageError>;

        /// Up to `limit` messages of the session after sequence `after_seq`, ascending.
        fn read_messages(&self, id: SessionId, after_seq: i64, limit: usize)
            -> Result<Vec<Message>, StorageError>;

        /// Up to `limit` of the user's live sessions created before the cursor, newest first.
        fn list_sessions(&self, user_id: &str, before: Option<SessionCursor>, limit: usize)
            -> Result<Vec<SessionInfo>, StorageError>;

        /// Up to `limit` sessions expired by `now` (microseconds), after the cursor
        /// `(expires_at, id)`, soonest first: `(id, owner, expires_at)`.
        fn expired_sessions(&self, now: i64, after: Option<(i64, SessionId)>, limit: usize)
            -> Result<Vec<(SessionId, String, i64)>, StorageError>;

        /// Up to `limit` of the user's sessions (deleted or not) whose content is not erased
        /// yet, with ids after `after`, by id.
        fn unerased_sessions(&self, user_id: &str, after: Option<SessionId>, limit: usize)
            -> Result<Vec<SessionId>, StorageError>;

        /// Registers this process as a member under `id`, reachable at `address`, or renews its
        /// heartbeat (and address) if it is one.
        fn join_member(&self, id: Uuid, address: &str) -> Result<(), StorageError>;

        /// Removes the member `id`.
        fn leave_member(&self, id: Uuid) -> Result<(), StorageError>;

        /// The cluster setting `name`, set to `initial` first if no process set it yet.
        fn cluster_setting(&self, name: &str, initial: &str) -> Result<String, StorageError>;

        /// The members whose heartbeat is younger than `lease_micros`, by id.
        fn live_members(&self, lease_micros: i64) -> Result<Vec<Member>, StorageError>;

        /// Up to `limit` drafts in progress, `(session, message, user)`, in live sessions
        /// whose last write's lease ran out more than `silent_for` microseconds ago (their
        /// writer stopped, or they were handed over and left), the longest silent first.
        fn orphaned_drafts(&self, silent_for: i64, limit: i64)
            -> Result<Vec<(SessionId, Uuid, String)>, StorageError>;

        /// How many sessions the user has that are not deleted, counting up to `bound`.
        fn count_user_sessions(&self, user_id: &str, bound: u64) -> Result<u64, StorageError>;

        /// The stored version of a session, or `None` if there is no such row.
        fn version(&self, id: SessionId) -> Result<Option<i64>, StorageError>;

        /// After a flush's outcome was lost: the session's stored head, waiting for any write
        /// that still holds (or waits for) its row lock, as `(version, owned by this process,
        /// epoch)`; `None` if there is no such row.
        fn settled_head(&self, id: SessionId)
            -> Result<Option<(i64, bool, i64)>, StorageError>;
    }

    /// Writes many sessions' batches in one transaction; see the module docs. `Err` means the
    /// whole transaction failed and its outcome may be unknown.
    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(store) => store.sql.flush(writes).await,
            // The single-statement flush first, where it can do the work.
            #[cfg(feature = "postgres")]
            Store::Postgres(store) => store.flush(writes).await,
        }
    }

    /// Whether a failed flush may be retried as is: the database refused it before anything
    /// could have committed (lock timeout, deadlock, serialization failure).
    pub fn is_transient(&self, error: &StorageError) -> bool {
        dispatch!(self, sql => sql.is_transient(error))
    }

    /// Whether the database refused a statement for what it carried (a value it cannot
    /// store, a constraint, a trigger's refusal): nothing of the flush committed, and the same
    /// write would be refused again.
    pub fn is_refused(&self, error: &StorageError) -> bool {
        dispatch!(self, sql => sql.is_refused(error))
    }

    /// Closes the connection pools.
    pub async fn close(&self) {
        dispatch!(self, sql => sql.close().await)
    }
}
