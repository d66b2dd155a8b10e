//! The strategies under test: soloist, the four it replaces, and the database's ceiling.
//!
//! Every strategy writes the same rows into the engine's own `messages` table and keeps the
//! session's row (`message_count`, `version`, `updated_at`, and the token counters in the
//! chat-turn workload) up to date the way such code would:
//!
//! | strategy | append | session row |
//! |---|---|---|
//! | `soloist` | [`SessionHandle::append`] with a client message id | the engine's own flush (`message_count + n`, `version + 1`) |
//! | (a) `naive` | `SELECT count(*)`, then `INSERT` at `count`; autocommit, no retry; the three statements on one pooled connection | a separate autocommit `UPDATE ... SET message_count = message_count + 1, version = version + 1` |
//! | (b) `max-retry` | one transaction: read `MAX(seq) + 1` (0 if none; as the primary key's last entry, see [`NEXT_SEQ`]), `INSERT`, commit; on a unique violation the whole transaction is retried once | the same `UPDATE`, inside the transaction (PostgreSQL: in the `INSERT`'s statement, a data-modifying CTE, so one round trip for both) |
//! | (c) `redis-lock` | `SET lock:<session> <token> NX PX 60000`, polled every `--lock-poll-ms` for at most `--lock-wait-secs` (a timeout is an error), then (b), then a compare-and-delete Lua script | as (b) |
//! | (d) `advisory-lock` | one transaction: `SELECT pg_advisory_xact_lock(hashtext(<session id>))`, then one statement that reads `MAX(seq) + 1` as (b) does and inserts there, commit; retried once on a unique violation as (b) (which the lock rules out) (PostgreSQL only) | in the same statement as the read and the insert |
//! | `limit` | one task per session, no coordination at all, sequences assigned locally: `--limit-batch` rows per multi-row `INSERT` and one commit per batch (PostgreSQL: a single autocommit `WITH inserted AS (INSERT ... SELECT FROM unnest(...)) UPDATE sessions ...`; SQLite: `BEGIN`, one `INSERT ... VALUES` list, the `UPDATE`, `COMMIT`) | `message_count + batch`, `version + 1` in the same commit |
//!
//! In the chat-turn workload the history read is the 50 messages before and including the
//! writer's own user message (`seq > s - 50 ORDER BY seq LIMIT 50`; soloist: `get(Some(s - 50),
//! Some(50))`, which it serves from memory), and token usage is `prompt_tokens + p,
//! completion_tokens + c, version + 1`: an autocommit `UPDATE` in (a) and (b), under the Redis
//! lock in (c), in a transaction holding the advisory lock in (d) (one autocommit statement that
//! takes the lock and then updates), `add_usage` in soloist.
//!
//! Between the grant of a lock ((c), (d)) and its release, every round trip is paid by every
//! append of the session in turn, so the locked strategies keep those round trips to what the
//! strategy needs: (d) holds its lock for the grant's answer, one statement and the commit. The
//! pools of the baselines do not ping a connection when they hand it out (as the engine's
//! writer pool does not).
//!
//! SQLite transactions of the baselines are plain `BEGIN` (deferred), as sqlx's `begin()` and
//! most application code issue them: a transaction that read a snapshot another connection
//! has since written fails to upgrade with `SQLITE_BUSY_SNAPSHOT`, which (b) does not retry.

use std::time::{Duration, Instant};

use clap::ValueEnum;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use soloist::SessionHandle;
use soloist::uuid::Uuid;
use sqlx::QueryBuilder;

use crate::db::{DbKind, Pool};
use crate::on_pool;
use crate::settings::Settings;
use crate::workload::{HISTORY_MESSAGES, Outgoing, now_micros};

/// A strategy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    /// The soloist engine.
    Soloist,
    /// (a) count the session's messages, insert at the count, no retry.
    #[value(alias = "a")]
    Naive,
    /// (b) incident 1's fix: MAX(seq)+1 inside one transaction, retry once on a unique violation.
    #[value(alias = "b")]
    MaxRetry,
    /// (c) incident 2's fix: a Redis lock per session around (b).
    #[value(alias = "c")]
    RedisLock,
    /// (d) `pg_advisory_xact_lock` per session, then read MAX(seq)+1 and insert (PostgreSQL only).
    #[value(alias = "d")]
    AdvisoryLock,
    /// The batched-insert ceiling: one task per session, multi-row inserts, no coordination.
    Limit,
}

impl StrategyKind {
    /// Every strategy, in table order.
    pub const ALL: [StrategyKind; 6] = [
        StrategyKind::Soloist,
        StrategyKind::Naive,
        StrategyKind::MaxRetry,
        StrategyKind::RedisLock,
        StrategyKind::AdvisoryLock,
        StrategyKind::Limit,
    ];

    /// The label used in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            StrategyKind::Soloist => "soloist",
            StrategyKind::Naive => "(a) naive count+i",
            StrategyKind::MaxRetry => "(b) max+1 in tx, retry once",
            StrategyKind::RedisLock => "(c) Redis lock + (b)",
            StrategyKind::AdvisoryLock => "(d) advisory lock + max+1",
            StrategyKind::Limit => "limit (batched insert)",
        }
    }

    /// The label with the `limit` strategy's rows per batch (and commit) in it, for every place
    /// that shows a figure: the limit's rows/s depend on its batch size.
    pub fn label_with_batch(self, limit_batch: usize) -> String {
        match self {
            StrategyKind::Limit => format!("limit ({limit_batch}-row batches)"),
            other => other.label().to_owned(),
        }
    }

    /// Whether the strategy can run on `db`.
    pub fn supports(self, db: DbKind) -> bool {
        self != StrategyKind::AdvisoryLock || db == DbKind::Postgres
    }
}

/// An error a strategy surfaced to its caller, reduced to a stable kind for counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    /// e.g. `unique_violation`, `sqlite_busy_snapshot`, `lock_timeout`, `conflict`.
    pub kind: String,
}

impl OpError {
    fn new(kind: impl Into<String>) -> Self {
        Self { kind: kind.into() }
    }

    /// Classifies a driver error of a baseline on `db`.
    pub fn sql(db: DbKind, error: &sqlx::Error) -> Self {
        let kind = match error {
            sqlx::Error::Database(database) => {
                if database.is_unique_violation() {
                    "unique_violation".to_owned()
                } else {
                    match (db, database.code()) {
                        (DbKind::Postgres, Some(code)) => match code.as_ref() {
                            "40P01" => "deadlock".to_owned(),
                            "40001" => "serialization_failure".to_owned(),
                            "55P03" => "lock_not_available".to_owned(),
                            other => format!("sqlstate_{other}"),
                        },
                        (DbKind::Sqlite, Some(code)) => match code.parse::<i32>() {
                            Ok(517) => "sqlite_busy_snapshot".to_owned(),
                            Ok(code) if code & 0xff == 5 => "sqlite_busy".to_owned(),
                            Ok(code) if code & 0xff == 6 => "sqlite_locked".to_owned(),
                            _ => format!("sqlite_{code}"),
                        },
                        (_, None) => "database".to_owned(),
                    }
                }
            }
            sqlx::Error::PoolTimedOut => "pool_timeout".to_owned(),
            sqlx::Error::Io(_) => "io".to_owned(),
            _ => "sqlx".to_owned(),
        };
        Self { kind }
    }

    /// Classifies an error the engine answered with.
    pub fn engine(error: &soloist::Error) -> Self {
        match error {
            soloist::Error::Storage(storage) => match storage.code() {
                Some(code) => Self::new(format!("storage_{code}")),
                None => Self::new("storage"),
            },
            other => Self::new(other.code()),
        }
    }

    fn redis(_error: &redis::RedisError) -> Self {
        Self::new("redis")
    }

    fn is_unique_violation(&self) -> bool {
        self.kind == "unique_violation"
    }
}

/// Per-writer counters beyond acks and errors.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Durable commits issued for writes (transactions, or autocommit write statements).
    pub commits: u64,
    /// Transactions retried after a unique violation ((b), (c), (d)).
    pub retries: u64,
}

/// Strategy (c)'s lock client and timings.
#[derive(Clone)]
pub struct RedisLock {
    connection: MultiplexedConnection,
    poll: Duration,
    wait: Duration,
    ttl_ms: u64,
}

/// Deletes the lock only if it still holds our token.
const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl RedisLock {
    /// Connects to Redis (checked with a `PING`).
    pub async fn connect(settings: &Settings) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(settings.redis_url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok(Self {
            connection,
            poll: settings.lock_poll,
            wait: settings.lock_wait,
            ttl_ms: u64::try_from(settings.lock_ttl.as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn acquire(&mut self, key: &str) -> Result<String, OpError> {
        let token = Uuid::new_v4().simple().to_string();
        let give_up = Instant::now() + self.wait;
        loop {
            let acquired: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.ttl_ms)
                .query_async(&mut self.connection)
                .await
                .map_err(|error| OpError::redis(&error))?;
            if acquired.is_some() {
                return Ok(token);
            }
            if Instant::now() >= give_up {
                return Err(OpError::new("lock_timeout"));
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn release(&mut self, key: &str, token: &str) -> Result<(), OpError> {
        let _deleted: i64 = redis::cmd("EVAL")
            .arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(token)
            .query_async(&mut self.connection)
            .await
            .map_err(|error| OpError::redis(&error))?;
        Ok(())
    }
}

/// How a raw-SQL strategy coordinates its writers.
#[derive(Clone)]
pub enum Guard {
    /// (a): nothing; count then insert in autocommit.
    Naive,
    /// (b): MAX(seq)+1 in a transaction, retry once.
    MaxRetry,
    /// (c): (b) inside a Redis lock.
    Redis(RedisLock),
    /// (d): an advisory transaction lock, then the read and the insert in one statement.
    Advisory,
}

/// One writer task's view of its session under one strategy.
pub enum Writer {
    /// Through the engine.
    Soloist(SessionHandle),
    /// Raw SQL on a pool.
    Sql {
        /// The run's pool.
        pool: Pool,
        /// The session written to.
        session: Uuid,
        /// `lock:<session>` for strategy (c).
        lock_key: String,
        /// The coordination.
        guard: Guard,
    },
}

const COUNT_MESSAGES: &str = "SELECT count(*) FROM messages WHERE session_id = $1";
/// `MAX(seq) + 1` (0 for an empty session), read as one backward step of the primary key
/// `(session_id, seq)`. Written as `SELECT COALESCE(MAX(seq) + 1, 0) ... WHERE session_id = $1`,
/// the statement's plan depends on statistics the benchmark's fresh tables never have
/// (autovacuum is off as installed, and sqlx prepares it once per connection, on the empty
/// table): PostgreSQL then keeps a generic plan that aggregates over every row of the session
/// through the `(session_id, message_id)` index, a read that grows with the session (~4 ms at
/// 5,000 rows). `ORDER BY seq DESC LIMIT 1` is the same read, and its plan is the primary
/// key's backward scan with or without statistics (any other index needs a sort).
const NEXT_SEQ: &str = "SELECT COALESCE((SELECT seq FROM messages WHERE session_id = $1 \
     ORDER BY seq DESC LIMIT 1) + 1, 0)";
const INSERT_MESSAGE: &str = "INSERT INTO messages \
     (session_id, seq, message_id, role, content, tool_calls, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const BUMP_SESSION: &str = "UPDATE sessions SET message_count = message_count + 1, \
     version = version + 1, updated_at = $1 WHERE id = $2";
const ADD_USAGE: &str = "UPDATE sessions SET prompt_tokens = prompt_tokens + $1, \
     completion_tokens = completion_tokens + $2, version = version + 1, updated_at = $3 \
     WHERE id = $4";
const READ_HISTORY: &str = "SELECT seq, message_id, role, content, tool_calls, created_at \
     FROM messages WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
const ADVISORY_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";
/// PostgreSQL, (b) and (c): [`INSERT_MESSAGE`] and [`BUMP_SESSION`] in one statement (a
/// data-modifying CTE always runs to completion), one round trip instead of two.
const INSERT_AND_BUMP_PG: &str = "WITH inserted AS (INSERT INTO messages \
     (session_id, seq, message_id, role, content, tool_calls, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)) \
     UPDATE sessions SET message_count = message_count + 1, version = version + 1, \
     updated_at = $7 WHERE id = $1";
/// (d), after [`ADVISORY_LOCK`] returned: read the next sequence (as [`NEXT_SEQ`]), insert there
/// and bump the session row, in one statement. It must be a statement of its own: under READ COMMITTED a
/// statement reads the snapshot taken when it starts, so a read in the locking statement would
/// not see the row the previous holder of the lock committed.
const LOCKED_APPEND_PG: &str = "WITH next AS ( \
         SELECT COALESCE((SELECT seq FROM messages WHERE session_id = $1 \
                          ORDER BY seq DESC LIMIT 1) + 1, 0) AS seq), \
     inserted AS ( \
         INSERT INTO messages \
         (session_id, seq, message_id, role, content, tool_calls, created_at) \
         SELECT $1, next.seq, $2, $3, $4, $5, $6 FROM next RETURNING seq), \
     bumped AS ( \
         UPDATE sessions SET message_count = message_count + 1, version = version + 1, \
         updated_at = $6 WHERE id = $1) \
     SELECT seq FROM inserted";
/// (d)'s usage, autocommit: the lock, then [`ADD_USAGE`], in one statement. Unlike the append
/// it needs no read after the lock: an `UPDATE` applies its increments to the newest version of
/// the row whatever its snapshot, so the lock can be taken inside the statement (the join makes
/// the lock come before the row is updated), and nothing of the client's is left between the
/// grant and the commit.
const LOCKED_USAGE_PG: &str = "WITH locked AS (SELECT pg_advisory_xact_lock(hashtext($5))) \
     UPDATE sessions SET prompt_tokens = prompt_tokens + $1, \
     completion_tokens = completion_tokens + $2, version = version + 1, updated_at = $3 \
     FROM locked WHERE id = $4";

/// The columns of a history row, decoded (and dropped) like an application would.
type HistoryRow = (i64, Uuid, String, Option<Vec<u8>>, Option<String>, i64);

impl Writer {
    /// A writer on `session` for a raw-SQL strategy.
    pub fn sql(pool: Pool, session: Uuid, guard: Guard) -> Self {
        Writer::Sql {
            pool,
            session,
            lock_key: format!("lock:{session}"),
            guard,
        }
    }

    /// Appends one message; answers with its sequence once the strategy reports success.
    pub async fn append(
        &mut self,
        message: &Outgoing,
        counters: &mut Counters,
    ) -> Result<i64, OpError> {
        match self {
            Writer::Soloist(handle) => {
                let sequences = handle
                    .append(vec![message.to_new_message()])
                    .await
                    .map_err(|error| OpError::engine(&error))?;
                sequences
                    .first()
                    .copied()
                    .ok_or_else(|| OpError::new("no_sequence"))
            }
            Writer::Sql {
                pool,
                session,
                lock_key,
                guard,
            } => match guard {
                Guard::Naive => naive_append(pool, *session, message, counters).await,
                Guard::MaxRetry => retrying_append(pool, *session, message, false, counters).await,
                Guard::Advisory => retrying_append(pool, *session, message, true, counters).await,
                Guard::Redis(lock) => {
                    let token = lock.acquire(lock_key).await?;
                    let appended = retrying_append(pool, *session, message, false, counters).await;
                    let released = lock.release(lock_key, &token).await;
                    let sequence = appended?;
                    released.map(|()| sequence)
                }
            },
        }
    }

    /// Reads up to [`HISTORY_MESSAGES`] messages after `after_seq`; answers how many came back.
    pub async fn read_history(&mut self, after_seq: i64) -> Result<usize, OpError> {
        match self {
            Writer::Soloist(handle) => {
                let after = (after_seq >= 0).then_some(after_seq);
                let page = handle
                    .get(after, Some(HISTORY_MESSAGES))
                    .await
                    .map_err(|error| OpError::engine(&error))?;
                Ok(page.messages.len())
            }
            Writer::Sql { pool, session, .. } => {
                let db = pool.kind();
                on_pool!(&*pool, p => {
                    let rows: Vec<HistoryRow> = sqlx::query_as(READ_HISTORY)
                        .bind(*session)
                        .bind(after_seq)
                        .bind(HISTORY_MESSAGES as i64)
                        .fetch_all(p)
                        .await
                        .map_err(|error| OpError::sql(db, &error))?;
                    Ok(rows.len())
                })
            }
        }
    }

    /// Adds token usage to the session.
    pub async fn add_usage(
        &mut self,
        prompt_tokens: u32,
        completion_tokens: u32,
        counters: &mut Counters,
    ) -> Result<(), OpError> {
        match self {
            Writer::Soloist(handle) => handle
                .add_usage(prompt_tokens, completion_tokens)
                .await
                .map(|_| ())
                .map_err(|error| OpError::engine(&error)),
            Writer::Sql {
                pool,
                session,
                lock_key,
                guard,
            } => match guard {
                Guard::Naive | Guard::MaxRetry => {
                    usage_autocommit(pool, *session, prompt_tokens, completion_tokens, counters)
                        .await
                }
                Guard::Redis(lock) => {
                    let token = lock.acquire(lock_key).await?;
                    let added = usage_autocommit(
                        pool,
                        *session,
                        prompt_tokens,
                        completion_tokens,
                        counters,
                    )
                    .await;
                    let released = lock.release(lock_key, &token).await;
                    added?;
                    released
                }
                Guard::Advisory => {
                    usage_advisory(pool, *session, prompt_tokens, completion_tokens, counters).await
                }
            },
        }
    }
}

/// (a): count, insert at the count, bump the session row; three autocommit statements.
async fn naive_append(
    pool: &Pool,
    session: Uuid,
    message: &Outgoing,
    counters: &mut Counters,
) -> Result<i64, OpError> {
    let db = pool.kind();
    let failed = |error: sqlx::Error| OpError::sql(db, &error);
    on_pool!(pool, p => {
        // One checkout for the three statements: each checkout costs the pool's ping when the
        // connection comes back, and the strategy is the statements, not the checkouts.
        let mut connection = p.acquire().await.map_err(failed)?;
        let count: i64 = sqlx::query_scalar(COUNT_MESSAGES)
            .bind(session)
            .fetch_one(&mut *connection)
            .await
            .map_err(failed)?;
        sqlx::query(INSERT_MESSAGE)
            .bind(session)
            .bind(count)
            .bind(message.id)
            .bind(message.role.as_str())
            .bind(message.content.as_bytes())
            .bind(message.tool_calls_text.as_deref())
            .bind(now_micros())
            .execute(&mut *connection)
            .await
            .map_err(failed)?;
        counters.commits += 1;
        sqlx::query(BUMP_SESSION)
            .bind(now_micros())
            .bind(session)
            .execute(&mut *connection)
            .await
            .map_err(failed)?;
        counters.commits += 1;
        Ok(count)
    })
}

/// (b), and (d) when `advisory`: the transaction, retried once on a unique violation.
///
/// (b) on PostgreSQL: `BEGIN`, the read, the insert with the session bump as one statement,
/// `COMMIT`. (d): `BEGIN`, the lock, [`LOCKED_APPEND_PG`], `COMMIT`.
async fn retrying_append(
    pool: &Pool,
    session: Uuid,
    message: &Outgoing,
    advisory: bool,
    counters: &mut Counters,
) -> Result<i64, OpError> {
    match transactional_append(pool, session, message, advisory, counters).await {
        Err(error) if error.is_unique_violation() => {
            counters.retries += 1;
            transactional_append(pool, session, message, advisory, counters).await
        }
        other => other,
    }
}

async fn transactional_append(
    pool: &Pool,
    session: Uuid,
    message: &Outgoing,
    advisory: bool,
    counters: &mut Counters,
) -> Result<i64, OpError> {
    let db = pool.kind();
    let failed = |error: sqlx::Error| OpError::sql(db, &error);
    let next = match pool {
        Pool::Pg(p) => {
            let mut tx = p.begin().await.map_err(failed)?;
            let next: i64 = if advisory {
                // (d): the lock, then one statement that reads, inserts and bumps: nothing
                // between the grant and the commit but that statement's round trip.
                sqlx::query(ADVISORY_LOCK)
                    .bind(session.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                sqlx::query_scalar(LOCKED_APPEND_PG)
                    .bind(session)
                    .bind(message.id)
                    .bind(message.role.as_str())
                    .bind(message.content.as_bytes())
                    .bind(message.tool_calls_text.as_deref())
                    .bind(now_micros())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(failed)?
            } else {
                let next: i64 = sqlx::query_scalar(NEXT_SEQ)
                    .bind(session)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(failed)?;
                sqlx::query(INSERT_AND_BUMP_PG)
                    .bind(session)
                    .bind(next)
                    .bind(message.id)
                    .bind(message.role.as_str())
                    .bind(message.content.as_bytes())
                    .bind(message.tool_calls_text.as_deref())
                    .bind(now_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                next
            };
            tx.commit().await.map_err(failed)?;
            next
        }
        // SQLite runs in this process: a statement costs no round trip, so the insert and the
        // bump stay two statements (SQLite has no data-modifying CTE either).
        Pool::Sqlite(_) if advisory => return Err(OpError::new("advisory_lock_needs_postgres")),
        Pool::Sqlite(p) => {
            let mut tx = p.begin().await.map_err(failed)?;
            let next: i64 = sqlx::query_scalar(NEXT_SEQ)
                .bind(session)
                .fetch_one(&mut *tx)
                .await
                .map_err(failed)?;
            sqlx::query(INSERT_MESSAGE)
                .bind(session)
                .bind(next)
                .bind(message.id)
                .bind(message.role.as_str())
                .bind(message.content.as_bytes())
                .bind(message.tool_calls_text.as_deref())
                .bind(now_micros())
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            sqlx::query(BUMP_SESSION)
                .bind(now_micros())
                .bind(session)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            next
        }
    };
    counters.commits += 1;
    Ok(next)
}

async fn usage_autocommit(
    pool: &Pool,
    session: Uuid,
    prompt_tokens: u32,
    completion_tokens: u32,
    counters: &mut Counters,
) -> Result<(), OpError> {
    let db = pool.kind();
    on_pool!(pool, p => {
        sqlx::query(ADD_USAGE)
            .bind(i64::from(prompt_tokens))
            .bind(i64::from(completion_tokens))
            .bind(now_micros())
            .bind(session)
            .execute(p)
            .await
            .map_err(|error| OpError::sql(db, &error))?;
        counters.commits += 1;
        Ok(())
    })
}

/// (d)'s usage: one autocommit statement that takes the session's advisory lock and then
/// updates the row ([`LOCKED_USAGE_PG`]); the lock is held until that statement commits.
async fn usage_advisory(
    pool: &Pool,
    session: Uuid,
    prompt_tokens: u32,
    completion_tokens: u32,
    counters: &mut Counters,
) -> Result<(), OpError> {
    let db = pool.kind();
    let failed = |error: sqlx::Error| OpError::sql(db, &error);
    let Pool::Pg(p) = pool else {
        return Err(OpError::new("advisory_lock_needs_postgres"));
    };
    sqlx::query(LOCKED_USAGE_PG)
        .bind(i64::from(prompt_tokens))
        .bind(i64::from(completion_tokens))
        .bind(now_micros())
        .bind(session)
        .bind(session.to_string())
        .execute(p)
        .await
        .map_err(failed)?;
    counters.commits += 1;
    Ok(())
}

/// `limit`: writes `messages` at sequences `first_seq..` with one multi-row `INSERT` and bumps
/// the session row by the batch, in one commit (PostgreSQL: one statement, a CTE; SQLite: one
/// transaction of two statements).
pub async fn insert_batch(
    pool: &Pool,
    session: Uuid,
    first_seq: i64,
    messages: &[Outgoing],
) -> Result<(), OpError> {
    let db = pool.kind();
    let failed = |error: sqlx::Error| OpError::sql(db, &error);
    let now = now_micros();
    let count = messages.len() as i64;
    match pool {
        Pool::Pg(p) => {
            let mut sessions = Vec::with_capacity(messages.len());
            let mut seqs = Vec::with_capacity(messages.len());
            let mut ids = Vec::with_capacity(messages.len());
            let mut roles = Vec::with_capacity(messages.len());
            let mut contents = Vec::with_capacity(messages.len());
            let mut tool_calls = Vec::with_capacity(messages.len());
            let mut times = Vec::with_capacity(messages.len());
            for (offset, message) in (0i64..).zip(messages) {
                sessions.push(session);
                seqs.push(first_seq + offset);
                ids.push(message.id);
                roles.push(message.role.as_str());
                contents.push(message.content.as_bytes());
                tool_calls.push(message.tool_calls_text.as_deref());
                times.push(now);
            }
            // One statement, one round trip, one commit: the insert and the session bump
            // together, as tight as a batched write gets.
            sqlx::query(
                "WITH inserted AS ( \
                     INSERT INTO messages \
                     (session_id, seq, message_id, role, content, tool_calls, created_at) \
                     SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[], \
                                          $5::bytea[], $6::text[], $7::int8[]) \
                     RETURNING 1) \
                 UPDATE sessions SET message_count = message_count + (SELECT count(*) FROM inserted), \
                        version = version + 1, updated_at = $8 \
                 WHERE id = $9",
            )
            .bind(&sessions)
            .bind(&seqs)
            .bind(&ids)
            .bind(&roles)
            .bind(&contents)
            .bind(&tool_calls)
            .bind(&times)
            .bind(now)
            .bind(session)
            .execute(p)
            .await
            .map_err(failed)?;
        }
        Pool::Sqlite(p) => {
            let mut tx = p.begin().await.map_err(failed)?;
            let mut insert = QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO messages \
                 (session_id, seq, message_id, role, content, tool_calls, created_at) ",
            );
            insert.push_values((0i64..).zip(messages), |mut row, (offset, message)| {
                row.push_bind(session)
                    .push_bind(first_seq + offset)
                    .push_bind(message.id)
                    .push_bind(message.role.as_str())
                    .push_bind(message.content.as_bytes())
                    .push_bind(message.tool_calls_text.as_deref())
                    .push_bind(now);
            });
            insert.build().execute(&mut *tx).await.map_err(failed)?;
            sqlx::query(
                "UPDATE sessions SET message_count = message_count + $1, \
                 version = version + 1, updated_at = $2 WHERE id = $3",
            )
            .bind(count)
            .bind(now)
            .bind(session)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::StrategyKind;

    #[test]
    fn the_limit_label_names_its_batch() {
        assert_eq!(
            StrategyKind::Limit.label_with_batch(64),
            "limit (64-row batches)"
        );
        assert_eq!(
            StrategyKind::AdvisoryLock.label_with_batch(64),
            StrategyKind::AdvisoryLock.label()
        );
    }
}
