//! Engine configuration: where the data lives, the input limits, and the knobs of the actor
//! runtime and the writer stage.

use std::time::Duration;

/// How durable an SQLite commit is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteSync {
    /// `synchronous=FULL`: an acknowledged append survives power loss (the default).
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster in WAL mode; an acknowledged append survives a process
    /// crash but the last commits may be lost on power loss.
    Normal,
}

/// Size limits checked before a command reaches its session; a command over any of them is
/// refused whole with [`Error::TooLarge`](crate::Error::TooLarge) and changes nothing.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes of `content` (and of `refusal`) per message. Default 64 KiB.
    pub max_content_bytes: usize,
    /// Messages per append call. Default 256.
    pub max_messages_per_append: usize,
    /// Serialized bytes of a JSON field (`tool_calls`, `function_call`, session metadata).
    /// Default 64 KiB.
    pub max_json_bytes: usize,
    /// Bytes of a title, a name, a tool call id or a user id. Default 1 KiB.
    pub max_text_bytes: usize,
    /// Messages a read returns at most. Default 1000.
    pub max_page_size: usize,
    /// Payload bytes (content, texts, JSON) of the messages a read returns at most: a page
    /// ends before the message that would take it past this (it holds one message at least),
    /// with its cursor, so what one read holds in memory is bounded by bytes as well as by
    /// count. Default 4 MiB.
    pub max_page_bytes: usize,
    /// Nesting of arrays and objects in a JSON field at most. Default 100, so that a message
    /// or session carrying the field stays readable by JSON parsers with a recursion limit
    /// (serde_json's is 128).
    pub max_json_depth: usize,
    /// Messages one import may carry; they are written in one transaction, so this bounds its
    /// size (and how long it holds the writer). Default 100,000.
    pub max_import_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 64 * 1024,
            max_messages_per_append: 256,
            max_json_bytes: 64 * 1024,
            max_text_bytes: 1024,
            max_page_size: 1000,
            max_page_bytes: 4 * 1024 * 1024,
            max_json_depth: 100,
            max_import_messages: 100_000,
        }
    }
}

/// Configuration of an [`Engine`](crate::Engine).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Database URL: `sqlite://path/to/file.db` (created if missing), `sqlite::memory:` (a
    /// private in-memory database shared by the engine's connections), or
    /// `postgres://user@host/db`.
    pub database_url: String,
    /// SQLite durability (ignored on PostgreSQL).
    pub sqlite_sync: SqliteSync,
    /// How long an SQLite connection waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// SQLite: the most pages the database file may grow to (`PRAGMA max_page_count`; pages
    /// are 4 KiB). Writes past it fail with a storage error and change nothing. `None`: no cap
    /// beyond SQLite's own.
    pub sqlite_max_pages: Option<u32>,
    /// Connections for reads (activation, older pages, listings).
    pub read_pool_size: u32,
    /// PostgreSQL: how many combined write transactions may be in flight at once (each on its
    /// own connection). SQLite always has exactly one writer connection.
    pub writer_connections: u32,
    /// Sessions combined into one write transaction at most.
    pub max_sessions_per_flush: usize,
    /// Message rows written in one transaction at most (a larger batch is split).
    pub max_rows_per_flush: usize,
    /// Payload bytes (content and JSON fields) written in one transaction at most.
    pub max_bytes_per_flush: usize,
    /// Mailbox capacity per session.
    pub mailbox_capacity: usize,
    /// How long a command waits for room in a full mailbox before failing with
    /// [`Error::Overloaded`](crate::Error::Overloaded); `None` waits as long as it takes.
    pub send_timeout: Option<Duration>,
    /// The longest a command may take, from the call to its answer, before failing with
    /// [`Error::Timeout`](crate::Error::Timeout): what bounds a caller's wait while the
    /// database is unreachable. `None` waits as long as it takes. Default 30 s.
    pub command_timeout: Option<Duration>,
    /// How long the engine waits for a database connection (the pools' acquire timeout)
    /// before the operation fails with a storage error. Default 5 s. On PostgreSQL it also
    /// bounds how long one of the engine's statements waits for a row lock (`lock_timeout`)
    /// and how long one of its transactions may sit idle (`idle_in_transaction_session_timeout`),
    /// so a process paused inside a flush transaction cannot hold the others' writes up for
    /// longer.
    pub database_timeout: Duration,
    /// A session actor idle this long passivates (its memory is freed; the next command
    /// reloads it).
    pub idle_timeout: Duration,
    /// A draft (a streamed reply in progress) that gets no delta for this long is finished
    /// `incomplete` by the process that holds its session; so is one found in progress when
    /// its session is activated, if no delta comes within this long. Default 60 s.
    pub draft_timeout: Duration,
    /// Live session actors at most; beyond it the least recently used idle ones passivate.
    pub max_live_sessions: Option<usize>,
    /// Newest messages kept in memory per live session; older pages are read from the database.
    pub cached_messages: usize,
    /// Attempts to resolve a conflict with another process before answering
    /// [`Error::Conflict`](crate::Error::Conflict).
    pub max_conflict_retries: u32,
    /// PostgreSQL: follow other processes' writes (LISTEN/NOTIFY), so that sessions live here
    /// catch up as soon as another process writes them. Default `true`; when off, a stale copy
    /// is still caught by the version check on the next write, or by a `fresh` read.
    pub listen_for_changes: bool,
    /// How long a process's claim on a session it writes stays fresh: each write renews it
    /// until then (measured on the database's clock). A process may take a session over at any
    /// time (the ownership epoch fences the previous owner out), but a takeover before the
    /// lease ran out is counted in [`Stats::takeovers`](crate::Stats::takeovers): it means
    /// requests for one session are reaching several processes at once. Default 10 s.
    pub ownership_lease: Duration,
    /// The address other processes reach this one at (e.g. `http://10.0.0.7:8080`). When set,
    /// the engine registers itself as a member in the database at start, renews its heartbeat
    /// while it runs and removes itself when it shuts down (see [`Engine::members`](crate::Engine::members)).
    /// Default `None`: not a member.
    pub advertise_url: Option<String>,
    /// How long a member stays listed without renewing its heartbeat; it renews three times per
    /// lease, and reads the other members each time. Default 3 s.
    pub member_lease: Duration,
    /// The secret with which the members authenticate the commands they forward to each other
    /// ([`Engine::cluster_secret`](crate::Engine::cluster_secret)). Default `None`: a member
    /// uses the one stored in the database, which the first member generates (32 random bytes),
    /// so that processes that share a database share it with no setting.
    pub cluster_secret: Option<String>,
    /// Answer [`Error::NotFound`](crate::Error::NotFound) rather than
    /// [`Error::Forbidden`](crate::Error::Forbidden) to a user who does not own the session, so
    /// that session ids cannot be probed. Default `true`.
    pub hide_foreign_sessions: bool,
    /// How long an idempotency key is remembered: a command with the same key within this
    /// time replays the first answer. Default 24 hours.
    pub idempotency_retention: Duration,
    /// The time to live of a session created without one
    /// ([`CreateSession::ttl_seconds`](crate::CreateSession::ttl_seconds)): it expires that
    /// long after its last write. Default `None`: sessions never expire.
    pub default_session_ttl: Option<Duration>,
    /// How often the purge looks for expired sessions and erases them (in batches of
    /// [`Self::purge_batch`], one session at a time through its actor, so that writers are not
    /// stalled); `None` turns the purge off. Default 60 s.
    pub purge_interval: Option<Duration>,
    /// Expired sessions the purge reads per round; it goes on at once while rounds come back
    /// full. Default 100.
    pub purge_batch: usize,
    /// Sessions (not deleted) a user may have: a create or an import of a new session past it
    /// is refused with [`Error::QuotaExceeded`](crate::Error::QuotaExceeded). Counted with a
    /// read before each new session, so sessions created at the same moment may pass it by
    /// as many. `None` (the default): no bound.
    pub max_sessions_per_user: Option<u64>,
    /// Input limits.
    pub limits: Limits,
}

impl EngineConfig {
    /// The defaults, on the given database.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            sqlite_sync: SqliteSync::Full,
            busy_timeout: Duration::from_secs(5),
            sqlite_max_pages: None,
            read_pool_size: 4,
            writer_connections: 4,
            max_sessions_per_flush: 256,
            max_rows_per_flush: 4096,
            max_bytes_per_flush: 16 * 1024 * 1024,
            mailbox_capacity: 256,
            send_timeout: None,
            command_timeout: Some(Duration::from_secs(30)),
            database_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            draft_timeout: Duration::from_secs(60),
            max_live_sessions: Some(100_000),
            cached_messages: 1000,
            max_conflict_retries: 8,
            listen_for_changes: true,
            ownership_lease: Duration::from_secs(10),
            advertise_url: None,
            member_lease: Duration::from_secs(3),
            cluster_secret: None,
            hide_foreign_sessions: true,
            idempotency_retention: Duration::from_secs(24 * 3600),
            default_session_ttl: None,
            purge_interval: Some(Duration::from_secs(60)),
            purge_batch: 100,
            max_sessions_per_user: None,
            limits: Limits::default(),
        }
    }
}
