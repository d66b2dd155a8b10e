//! The PostgreSQL backend, for running many server processes on one database.
//!
//! A flush is a handful of statements whatever the number of sessions in it: the session rows
//! are locked in id order (so two processes flushing overlapping sessions cannot deadlock) and
//! every array of values goes in through `unnest`. The common flush is a single statement
//! (`flush_in_one_statement`).

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgQueryResult};
use sqlx::{Arguments, Postgres, SqlStr};
use uuid::Uuid;

pub(crate) mod changes;

use super::backend::{Backend, Params};
use super::dialect::{Batch, Dialect};
use super::flush::{StoredHead, outcome};
use super::queries::{heads, session_update};
use super::rows::{ChunkInsert, MessageRow, SessionChange, SqlType, Value, WriteRow, names};
use super::sql::Sql;
use super::{FlushOutcome, Ownership, SessionWrite};
use crate::config::EngineConfig;
use crate::error::{Error, StorageError};
use crate::model::SessionId;

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub(crate) struct PostgresStore {
    /// The writer connections (no sequential scans) and the readers, which plan each query
    /// for its parameters (`plan_cache_mode = force_custom_plan`): a cached generic plan chosen
    /// while a table was small would keep scanning it whole once it has grown, and these
    /// queries are cheap to plan.
    pub sql: Sql<Postgres>,
    /// How to open the connection that listens for other processes' commits.
    options: Arc<PgConnectOptions>,
    /// The statement of [`Self::flush_in_one_statement`].
    one_statement: SqlStr,
    /// The same, also writing drafts' chunks (only batches that carry some bind them).
    one_statement_chunks: SqlStr,
}

impl Backend for Postgres {
    const DIALECT: Dialect = Dialect {
        numbered: true,
        batch: Batch::Arrays { array_type },
        // Leases are compared on one clock whatever the clocks of the processes sharing the
        // database say.
        clock: Some("(extract(epoch FROM now()) * 1000000)::int8"),
        lock: " ORDER BY id FOR UPDATE",
        begin_write: "BEGIN",
        begin_snapshot: "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        row_address: "ctid",
    };

    fn bind_rows<R: WriteRow>(args: &mut PgArguments, rows: &[R]) -> Result<(), BoxDynError> {
        let mut columns: Vec<Column> = R::COLUMNS
            .iter()
            .map(|&(_, sql_type)| Column::new(sql_type, rows.len()))
            .collect();
        for row in rows {
            for (column, value) in columns.iter_mut().zip(row.values()) {
                column.push(value)?;
            }
        }
        for column in columns {
            column.bind(args)?;
        }
        Ok(())
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    fn is_transient(error: &StorageError) -> bool {
        // serialization_failure, deadlock_detected, lock_not_available: the transaction was
        // rolled back by the server, so nothing of it committed.
        matches!(error.code(), Some("40001" | "40P01" | "55P03"))
    }

    fn is_refused(error: &StorageError) -> bool {
        // Data exceptions (22: a number out of range, say), integrity constraints (23),
        // raised exceptions (P0: a trigger's refusal). Not the classes of a connection lost or
        // cut (08, 57), of resources (53) or of a rolled-back transaction (40).
        error.code().is_some_and(|code| {
            ["22", "23", "P0"]
                .iter()
                .any(|class| code.starts_with(class))
        })
    }
}

/// The array type of a column of [`SqlType`].
fn array_type(sql_type: SqlType) -> &'static str {
    match sql_type {
        SqlType::Uuid => "uuid[]",
        SqlType::Int => "int8[]",
        SqlType::Bool => "bool[]",
        SqlType::Text => "text[]",
        SqlType::Bytes => "bytea[]",
    }
}

/// One column of some rows, as the array `unnest` takes.
enum Column<'a> {
    /// `uuid[]`.
    Uuid(Vec<Uuid>),
    /// `int8[]`.
    Int(Vec<i64>),
    /// `bool[]`.
    Bool(Vec<bool>),
    /// `text[]`.
    Text(Vec<Option<&'a str>>),
    /// `bytea[]`.
    Bytes(Vec<Option<&'a [u8]>>),
}

impl<'a> Column<'a> {
    /// An empty column of `sql_type`, for `capacity` rows.
    fn new(sql_type: SqlType, capacity: usize) -> Self {
        match sql_type {
            SqlType::Uuid => Column::Uuid(Vec::with_capacity(capacity)),
            SqlType::Int => Column::Int(Vec::with_capacity(capacity)),
            SqlType::Bool => Column::Bool(Vec::with_capacity(capacity)),
            SqlType::Text => Column::Text(Vec::with_capacity(capacity)),
            SqlType::Bytes => Column::Bytes(Vec::with_capacity(capacity)),
        }
    }

    /// Adds the value of the next row; it must be of the column's type.
    fn push(&mut self, value: Value<'a>) -> Result<(), BoxDynError> {
        match (self, value) {
            (Column::Uuid(values), Value::Uuid(value)) => values.push(value),
            (Column::Int(values), Value::Int(value)) => values.push(value),
            (Column::Bool(values), Value::Bool(value)) => values.push(value),
            (Column::Text(values), Value::Text(value)) => values.push(value),
            (Column::Bytes(values), Value::Bytes(value)) => values.push(value),
            (_, value) => return Err(format!("{value:?} does not fit its column's type").into()),
        }
        Ok(())
    }

    /// Binds the column as one array parameter.
    fn bind(self, args: &mut PgArguments) -> Result<(), BoxDynError> {
        match self {
            Column::Uuid(values) => args.add(values),
            Column::Int(values) => args.add(values),
            Column::Bool(values) => args.add(values),
            Column::Text(values) => args.add(values),
            Column::Bytes(values) => args.add(values),
        }
    }
}

/// The statement of [`PostgresStore::flush_in_one_statement`]. Binds: the writes' changes,
/// owner, their ids, their message rows, (with `chunks`) their drafts' chunk rows, owner,
/// lease. Batches without chunks take the statement without them, which does not even run an
/// empty insert.
fn one_statement_flush(chunks: bool) -> SqlStr {
    let d = &Postgres::DIALECT;
    let messages = MessageRow::COLUMNS;
    d.render(&format!(
        "WITH {changes}, \
         locked AS MATERIALIZED ({heads}), \
         {rows}, \
         {chunks}\
         ok AS (SELECT w.* FROM w JOIN locked l \
                ON l.id = w.id AND l.version = w.expected AND l.epoch = w.epoch \
                   AND NOT l.deleted), \
         inserted AS (INSERT INTO messages ({columns}) \
                      SELECT m.* FROM m WHERE m.session_id IN (SELECT id FROM ok)), \
         {chunked}\
         updated AS (UPDATE sessions SET {update} FROM ok AS u WHERE sessions.id = u.id \
                     RETURNING sessions.id) \
         SELECT l.*, l.id IN (SELECT id FROM updated) AS written FROM locked l",
        changes = d.table("w", SessionChange::COLUMNS, 1),
        heads = heads(d, 1),
        rows = d.table("m", messages, 1),
        chunks = if chunks {
            format!("{}, ", d.table("c", ChunkInsert::COLUMNS, 1))
        } else {
            String::new()
        },
        chunked = if chunks {
            format!(
                "chunked AS (INSERT INTO message_chunks ({}) \
                 SELECT c.* FROM c WHERE c.session_id IN (SELECT id FROM ok) \
                 ON CONFLICT DO NOTHING), ",
                names(ChunkInsert::COLUMNS)
            )
        } else {
            String::new()
        },
        columns = names(messages),
        update = session_update(d),
    ))
}

/// A head the single-statement flush locked, and whether it wrote the session.
#[derive(sqlx::FromRow)]
struct Found {
    #[sqlx(flatten)]
    head: StoredHead,
    written: bool,
}

impl PostgresStore {
    /// Connects the writer and reader pools and runs the migrations.
    pub async fn connect(config: &EngineConfig, ownership: Ownership) -> Result<Self, Error> {
        let options: PgConnectOptions = config
            .database_url
            .parse()
            .map_err(|error: sqlx::Error| Error::invalid("database_url", error.to_string()))?;
        // No ping before each use: a flush is one round trip, and a ping would double it. A
        // broken connection fails its statement instead, which callers see as a retryable
        // storage error.
        // Writer statements always reach rows by key. Their plans are prepared once per
        // connection and cached; a plan made while a table was small (or never analyzed, as
        // where autovacuum is off) could pick a sequential scan and keep it as the table grows,
        // so the writer connections rule sequential scans out.
        // A process paused or cut off inside a transaction (SIGSTOP, a long GC-like stall, a
        // partition) would hold its row locks, and every other process's flush of those
        // sessions would wait on them without end: the server ends such a transaction, and a
        // statement gives up waiting for a lock, after `database_timeout`.
        let timeout = config.database_timeout.as_millis().max(1).to_string();
        let options = options.options([
            ("lock_timeout", timeout.as_str()),
            ("idle_in_transaction_session_timeout", timeout.as_str()),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.writer_connections.max(1))
            .acquire_timeout(config.database_timeout)
            .test_before_acquire(false)
            .connect_with(options.clone().options([("enable_seqscan", "off")]))
            .await
            .map_err(StorageError::from)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StorageError::from)?;
        let readers = PgPoolOptions::new()
            .max_connections(config.read_pool_size.max(1))
            .acquire_timeout(config.database_timeout)
            .connect_with(
                options
                    .clone()
                    .options([("plan_cache_mode", "force_custom_plan")]),
            )
            .await
            .map_err(StorageError::from)?;
        Ok(Self {
            sql: Sql::new(pool, readers, ownership),
            options: Arc::new(options),
            one_statement: one_statement_flush(false),
            one_statement_chunks: one_statement_flush(true),
        })
    }

    /// The stored versions of those of `ids` that exist.
    pub async fn versions(&self, ids: &[SessionId]) -> Result<Vec<(SessionId, i64)>, StorageError> {
        Ok(
            sqlx::query_as("SELECT id, version FROM sessions WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.sql.readers)
                .await?,
        )
    }

    /// Writes the batches: in one statement where it can, else through the general flush.
    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        // The common flush (appends, usage, title/metadata of existing sessions) is one
        // statement, so one round trip and its own transaction; creates and deletes take the
        // multi-statement path, as does a fast attempt that met a stored message id or a row
        // written by something other than soloist (a unique violation).
        if !writes.iter().any(SessionWrite::needs_general_flush) {
            match self.flush_in_one_statement(writes).await {
                Err(error) if error.code() == Some(UNIQUE_VIOLATION) => {}
                other => return other,
            }
        }
        self.sql.flush(writes).await
    }

    /// One statement: lock the sessions in id order, keep those whose version and ownership
    /// epoch are the expected ones, insert their rows, bump them (taking ownership and renewing
    /// the lease), and return what was found for each session and whether it was written. A
    /// row that meets a stored sequence or message id fails the whole statement with a unique
    /// violation (nothing is written), and the flush is redone by the general flush, which
    /// sorts out which sessions clashed. That happens only when a client re-sends an id the
    /// session's actor no longer caches, or when something other than soloist wrote rows, so
    /// the common case carries no probe of the `messages` table at all.
    async fn flush_in_one_statement(
        &self,
        writes: &[SessionWrite],
    ) -> Result<Vec<FlushOutcome>, StorageError> {
        let changes: Vec<SessionChange> = writes.iter().map(SessionChange).collect();
        let ids: Vec<Uuid> = writes.iter().map(|write| write.session_id.into()).collect();
        let rows: Vec<MessageRow> = writes.iter().flat_map(MessageRow::of).collect();
        let chunks: Vec<ChunkInsert> = writes.iter().flat_map(ChunkInsert::of).collect();
        let Ownership {
            owner,
            lease_micros,
        } = self.sql.ownership;
        let args = Params::<Postgres>::new()
            .rows(&changes)
            .add(owner)
            .list(&ids)
            .rows(&rows);
        let (args, statement) = if chunks.is_empty() {
            (args, &self.one_statement)
        } else {
            (args.rows(&chunks), &self.one_statement_chunks)
        };
        let args = args.add(owner).add(lease_micros).finish()?;
        let found: Vec<Found> = sqlx::query_as_with(statement.clone(), args)
            .fetch_all(&self.sql.writer)
            .await?;
        // Which sessions were written is what the statement says; why the others were not, and
        // whether a claim took a live lease, comes from the heads it found under the lock.
        let found: HashMap<Uuid, Found> = found
            .into_iter()
            .map(|found| (found.head.id, found))
            .collect();
        Ok(writes
            .iter()
            .map(|write| {
                let found = found.get(write.session_id.as_uuid());
                let written = found.is_some_and(|found| found.written);
                outcome(write, found.map(|found| &found.head), written)
            })
            .collect())
    }

    /// Announces committed versions to other processes (`NOTIFY`), many per notice.
    pub async fn announce(&self, payload: &str) -> Result<(), StorageError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(payload)
            .execute(&self.sql.writer)
            .await?;
        Ok(())
    }

    /// A connection listening for other processes' announcements.
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener, StorageError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.sql.readers.options().get_acquire_timeout())
            .connect_lazy_with((*self.options).clone());
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        // Report a lost connection at once (`try_recv` answers `None`) instead of reconnecting
        // inside `try_recv` first: the caller must know that notices may have been missed.
        listener.eager_reconnect(false);
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(listener)
    }
}

/// The `NOTIFY` channel on which engines announce the versions they committed.
pub(crate) const CHANGES_CHANNEL: &str = "soloist_sessions";

/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";
