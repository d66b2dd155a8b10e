//! The PostgreSQL backend, for running many server processes on one database.
//!
//! A flush is a handful of statements whatever the number of sessions in it: the session rows
//! are locked in id order (so two processes flushing overlapping sessions cannot deadlock) and
//! every array of values goes in through `unnest`.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{
    FlushOutcome, FlushPlan, HeadRow, KeyRow, LoadedSession, MessageRecord, Ownership,
    SessionRecord, SessionWrite, check_heads, heads, into_messages, message_columns,
    session_columns, short_writes,
};
use crate::command::SessionCursor;
use crate::config::EngineConfig;
use crate::error::{Error, StorageError};
use crate::model::{Message, SessionId, SessionInfo};

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub(crate) struct PostgresStore {
    /// Connections for the writer stage.
    pool: PgPool,
    /// Connections for reads, which plan each query for its parameters (`plan_cache_mode =
    /// force_custom_plan`): a cached generic plan chosen while a table was small would keep
    /// scanning it whole once it has grown, and these queries are cheap to plan.
    readers: PgPool,
    /// How to open the connection that listens for other processes' commits.
    options: std::sync::Arc<PgConnectOptions>,
    ownership: Ownership,
}

/// The database's clock in microseconds, as SQL: leases are compared on one clock whatever the
/// clocks of the processes sharing the database say.
macro_rules! db_now_micros {
    () => {
        "(extract(epoch FROM now()) * 1000000)::int8"
    };
}

impl PostgresStore {
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
            pool,
            readers,
            options: std::sync::Arc::new(options),
            ownership,
        })
    }

    pub async fn load(
        &self,
        id: SessionId,
        tail: usize,
        readers: &[&str],
    ) -> Result<Option<LoadedSession>, StorageError> {
        // One snapshot for the row and the messages.
        let mut tx = self
            .readers
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let record: Option<SessionRecord> = sqlx::query_as(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(record) = record else {
            tx.commit().await?;
            return Ok(None);
        };
        let (info, deleted, epoch) = record.into_info()?;
        let foreign = !readers.is_empty() && !readers.contains(&info.user_id.as_str());
        let records: Vec<MessageRecord> = if deleted || tail == 0 || foreign {
            Vec::new()
        } else {
            sqlx::query_as(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE session_id = $1 AND seq >= $2 \
                 ORDER BY seq"
            ))
            .bind(id)
            // Sequences are contiguous, so the tail is a key range: a plan can only read it
            // through the primary key, however little the planner knows about the table.
            .bind((info.message_count - tail as i64).max(0))
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        Ok(Some(LoadedSession {
            info,
            deleted,
            epoch,
            tail: into_messages(records)?,
        }))
    }

    pub async fn stored_ids(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, i64>, StorageError> {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT message_id, seq FROM messages WHERE session_id = $1 AND message_id = ANY($2)",
        )
        .bind(id)
        .bind(ids)
        .fetch_all(&self.readers)
        .await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn stored_messages(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<Vec<Message>, StorageError> {
        let records: Vec<MessageRecord> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE session_id = $1 AND message_id = ANY($2)"
        ))
        .bind(id)
        .bind(ids)
        .fetch_all(&self.readers)
        .await?;
        into_messages(records)
    }

    pub async fn key_records(
        &self,
        id: SessionId,
        keys: &[String],
        since: i64,
    ) -> Result<Vec<(String, String, Vec<u8>, String, i64)>, StorageError> {
        Ok(sqlx::query_as(
            "SELECT key, user_id, fingerprint, response, created_at FROM idempotency_keys \
             WHERE session_id = $1 AND key = ANY($2) AND created_at >= $3",
        )
        .bind(id)
        .bind(keys)
        .bind(since)
        .fetch_all(&self.readers)
        .await?)
    }

    pub async fn purge_keys(&self, cutoff: i64, limit: i64) -> Result<u64, StorageError> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE ctid IN \
             (SELECT ctid FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn read_messages(
        &self,
        id: SessionId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StorageError> {
        let records: Vec<MessageRecord> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE session_id = $1 AND seq > $2 AND seq <= $3 \
             ORDER BY seq"
        ))
        .bind(id)
        .bind(after_seq)
        // Contiguous sequences: the page is exactly this key range.
        .bind(after_seq.saturating_add(limit as i64))
        .fetch_all(&self.readers)
        .await?;
        into_messages(records)
    }

    pub async fn list_sessions(
        &self,
        user_id: &str,
        before: Option<SessionCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let (before_time, before_id) = match before {
            Some(cursor) => (cursor.created_at_micros, cursor.id),
            None => (i64::MAX, Uuid::max()),
        };
        let records: Vec<SessionRecord> = sqlx::query_as(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions \
             WHERE user_id = $1 AND deleted_at IS NULL AND (created_at, id) < ($2, $3) \
             ORDER BY created_at DESC, id DESC LIMIT $4"
        ))
        .bind(user_id)
        .bind(before_time)
        .bind(before_id)
        .bind(limit as i64)
        .fetch_all(&self.readers)
        .await?;
        records
            .into_iter()
            .map(|record| record.into_info().map(|(info, ..)| info))
            .collect()
    }

    pub async fn version(&self, id: SessionId) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT version FROM sessions WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.readers)
                .await?,
        )
    }

    pub async fn settled_head(
        &self,
        id: SessionId,
    ) -> Result<Option<(i64, bool, i64)>, StorageError> {
        // `FOR UPDATE` queues behind a statement of the lost flush that the server may still be
        // running (a client that lost its connection does not stop a statement waiting for a
        // lock), so what this reads is final for that flush.
        let mut tx = self.readers.begin().await?;
        let head = sqlx::query_as(
            "SELECT version, COALESCE(owner = $2, false), epoch FROM sessions \
             WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .bind(self.ownership.owner)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(head)
    }

    /// The stored versions of those of `ids` that exist.
    pub async fn versions(&self, ids: &[SessionId]) -> Result<Vec<(SessionId, i64)>, StorageError> {
        Ok(
            sqlx::query_as("SELECT id, version FROM sessions WHERE id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.readers)
                .await?,
        )
    }

    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        // The common flush (appends, usage, title/metadata of existing sessions) is one
        // statement, so one round trip and its own transaction; creates and deletes take the
        // multi-statement path, as does a fast attempt that met a stored message id or a row
        // written by something other than soloist (a unique violation).
        if writes
            .iter()
            .all(|write| write.create.is_none() && !write.delete && write.keys.is_empty())
        {
            match self.flush_in_one_statement(writes).await {
                Err(error) if error.code() == Some(UNIQUE_VIOLATION) => {}
                other => return other,
            }
        }
        self.flush_in_transaction(writes).await
    }

    /// One statement: lock the sessions in id order, keep those whose version and ownership
    /// epoch are the expected ones, insert their rows, bump them (taking ownership and renewing
    /// the lease), and return what was found for each session. A row that meets a stored
    /// sequence or message id fails the whole statement with a unique violation (nothing is
    /// written), and the flush is redone by [`Self::flush_in_transaction`], which sorts out
    /// which sessions clashed. That happens only when a client re-sends an id the session's
    /// actor no longer caches, or when something other than soloist wrote rows, so the common
    /// case carries no probe of the `messages` table at all.
    async fn flush_in_one_statement(
        &self,
        writes: &[SessionWrite],
    ) -> Result<Vec<FlushOutcome>, StorageError> {
        let all: Vec<usize> = (0..writes.len()).collect();
        let sessions = SessionArrays::new(writes, &all);
        let rows = MessageArrays::new(writes, &all);
        let query = sqlx::query_as(concat!(
            "WITH w AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::text[], \
                                      $5::text[], $6::int8[], $7::int8[], $8::int8[], \
                                      $20::int8[], $21::bool[], $24::int8[]) \
                     AS w(id, expected, at, title, metadata, prompt, completion, added, \
                          epoch, claim, steps)), \
             locked AS MATERIALIZED ( \
                 SELECT s.id, s.version, s.deleted_at IS NOT NULL AS deleted, s.epoch, \
                        COALESCE(s.owner <> $22 AND s.lease_until > ",
            db_now_micros!(),
            ", false) AS leased_elsewhere \
                 FROM sessions s WHERE s.id = ANY($1) ORDER BY s.id FOR UPDATE), \
             m AS ( \
                 SELECT * FROM unnest($9::uuid[], $10::int8[], $11::uuid[], $12::text[], \
                                      $13::bytea[], $14::text[], $15::text[], $16::text[], \
                                      $17::text[], $18::text[], $19::int8[]) \
                     AS m(session_id, seq, message_id, role, content, name, tool_calls, \
                          tool_call_id, function_call, refusal, created_at)), \
             ok AS ( \
                 SELECT w.* FROM w JOIN locked l \
                     ON l.id = w.id AND l.version = w.expected AND l.epoch = w.epoch \
                        AND NOT l.deleted), \
             inserted AS ( \
                 INSERT INTO messages (session_id, seq, message_id, role, content, name, \
                                       tool_calls, tool_call_id, function_call, refusal, \
                                       created_at) \
                 SELECT m.* FROM m WHERE m.session_id IN (SELECT id FROM ok)), \
             updated AS ( \
                 UPDATE sessions AS s SET version = s.version + ok.steps, updated_at = ok.at, \
                        title = COALESCE(ok.title, s.title), \
                        metadata = COALESCE(ok.metadata, s.metadata), \
                        prompt_tokens = s.prompt_tokens + ok.prompt, \
                        completion_tokens = s.completion_tokens + ok.completion, \
                        message_count = s.message_count + ok.added, \
                        epoch = s.epoch + ok.claim::int4, owner = $22, \
                        lease_until = ",
            db_now_micros!(),
            " + $23 \
                 FROM ok WHERE s.id = ok.id RETURNING s.id) \
             SELECT l.id, l.version, l.deleted, l.epoch, l.leased_elsewhere, \
                    l.id IN (SELECT id FROM updated) AS written \
             FROM locked l",
        ))
        .bind(&sessions.ids)
        .bind(&sessions.expected)
        .bind(&sessions.times)
        .bind(&sessions.titles)
        .bind(&sessions.metadata)
        .bind(&sessions.prompt)
        .bind(&sessions.completion)
        .bind(&sessions.added);
        let found: Vec<(Uuid, i64, bool, i64, bool, bool)> = bind_message_arrays!(query, rows)
            .bind(&sessions.epochs)
            .bind(&sessions.claims)
            .bind(self.ownership.owner)
            .bind(self.ownership.lease_micros)
            .bind(&sessions.steps)
            .fetch_all(&self.pool)
            .await?;
        let written: HashSet<Uuid> = found.iter().filter(|row| row.5).map(|row| row.0).collect();
        // Which sessions were written is what the statement says; why the others were not
        // (fenced or conflicting), and whether a claim took a live lease, comes from the rows
        // it found under the lock, checked the way its `ok` join checked them.
        let found = found
            .into_iter()
            .map(|(id, version, deleted, epoch, leased, _)| (id, version, deleted, epoch, leased));
        let mut plan = FlushPlan::new(writes.len());
        check_heads(&mut plan, writes, &heads(found));
        Ok(plan
            .commit_active(writes)
            .into_iter()
            .zip(writes)
            .map(|(outcome, write)| match outcome {
                FlushOutcome::Committed { .. } if !written.contains(&write.session_id) => {
                    FlushOutcome::Conflict
                }
                other => other,
            })
            .collect())
    }

    /// The general flush: several statements in one transaction, for creates, deletes and
    /// idempotency records.
    async fn flush_in_transaction(
        &self,
        writes: &[SessionWrite],
    ) -> Result<Vec<FlushOutcome>, StorageError> {
        let mut plan = FlushPlan::new(writes.len());
        loop {
            if plan.active().is_empty() {
                return Ok(plan.commit_active(writes));
            }
            let mut tx = self.pool.begin().await?;
            create_sessions(&mut tx, writes, &mut plan).await?;

            let ids: Vec<Uuid> = plan
                .active()
                .into_iter()
                .map(|index| writes[index].session_id)
                .collect();
            let stored: Vec<HeadRow> = sqlx::query_as(concat!(
                "SELECT id, version, deleted_at IS NOT NULL, epoch, \
                        COALESCE(owner <> $2 AND lease_until > ",
                db_now_micros!(),
                ", false) FROM sessions WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ))
            .bind(&ids)
            .bind(self.ownership.owner)
            .fetch_all(&mut *tx)
            .await?;
            check_heads(&mut plan, writes, &heads(stored));

            let inserted = insert_messages(&mut tx, writes, &plan).await?;
            let keys = insert_keys(&mut tx, writes, &plan).await?;
            let short = short_writes(&plan, writes, &inserted, &keys);
            if !short.is_empty() {
                // Some of these sessions' rows or keys went in: undo all and retry without them.
                tx.rollback().await?;
                for index in short {
                    plan.conflict(index);
                }
                continue;
            }
            update_sessions(&mut tx, writes, &plan, self.ownership).await?;
            tx.commit().await?;
            return Ok(plan.commit_active(writes));
        }
    }

    pub fn is_transient(&self, error: &StorageError) -> bool {
        // serialization_failure, deadlock_detected, lock_not_available: the transaction was
        // rolled back by the server, so nothing of it committed.
        matches!(error.code(), Some("40001" | "40P01" | "55P03"))
    }

    /// Announces committed versions to other processes (`NOTIFY`), many per notice.
    pub async fn announce(&self, payload: &str) -> Result<(), StorageError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A connection listening for other processes' announcements.
    pub async fn listen(&self) -> Result<sqlx::postgres::PgListener, StorageError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.readers.options().get_acquire_timeout())
            .connect_lazy_with((*self.options).clone());
        let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
        // Report a lost connection at once (`try_recv` answers `None`) instead of reconnecting
        // inside `try_recv` first: the caller must know that notices may have been missed.
        listener.eager_reconnect(false);
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(listener)
    }

    pub async fn close(&self) {
        self.readers.close().await;
        self.pool.close().await;
    }
}

async fn create_sessions(
    tx: &mut Transaction<'static, Postgres>,
    writes: &[SessionWrite],
    plan: &mut FlushPlan,
) -> Result<(), StorageError> {
    let creating: Vec<usize> = plan
        .active()
        .into_iter()
        .filter(|&index| writes[index].create.is_some())
        .collect();
    if creating.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(creating.len());
    let mut users = Vec::with_capacity(creating.len());
    let mut titles = Vec::with_capacity(creating.len());
    let mut metadata = Vec::with_capacity(creating.len());
    let mut times = Vec::with_capacity(creating.len());
    for &index in &creating {
        let write = &writes[index];
        if let Some(create) = &write.create {
            ids.push(write.session_id);
            users.push(create.user_id.as_str());
            titles.push(create.title.as_deref());
            metadata.push(create.metadata.as_str());
            times.push(write.now);
        }
    }
    let created: HashSet<Uuid> = sqlx::query_scalar(
        "INSERT INTO sessions (id, user_id, title, metadata, created_at, updated_at) \
         SELECT id, user_id, title, metadata, at, at \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
              AS t(id, user_id, title, metadata, at) \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&titles)
    .bind(&metadata)
    .bind(&times)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    for index in creating {
        if !created.contains(&writes[index].session_id) {
            plan.conflict(index);
        }
    }
    Ok(())
}

async fn insert_messages(
    tx: &mut Transaction<'static, Postgres>,
    writes: &[SessionWrite],
    plan: &FlushPlan,
) -> Result<HashMap<Uuid, usize>, StorageError> {
    let rows = MessageArrays::new(writes, &plan.active());
    let mut inserted = HashMap::new();
    if rows.seqs.is_empty() {
        return Ok(inserted);
    }
    let query = sqlx::query_scalar(
        "INSERT INTO messages (session_id, seq, message_id, role, content, name, tool_calls, \
                               tool_call_id, function_call, refusal, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::bytea[], \
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                              $11::int8[]) \
         ON CONFLICT DO NOTHING RETURNING session_id",
    );
    let returned: Vec<Uuid> = bind_message_arrays!(query, rows)
        .fetch_all(&mut **tx)
        .await?;
    for session_id in returned {
        *inserted.entry(session_id).or_default() += 1;
    }
    Ok(inserted)
}

/// Stores the idempotency records of the active writes, after deleting their sessions' expired
/// ones; returns how many went in per session (a key already stored does not).
async fn insert_keys(
    tx: &mut Transaction<'static, Postgres>,
    writes: &[SessionWrite],
    plan: &FlushPlan,
) -> Result<HashMap<Uuid, usize>, StorageError> {
    let keyed: Vec<&SessionWrite> = plan
        .active()
        .into_iter()
        .map(|index| &writes[index])
        .filter(|write| !write.keys.is_empty())
        .collect();
    let mut inserted = HashMap::new();
    if keyed.is_empty() {
        return Ok(inserted);
    }
    let sessions: Vec<Uuid> = keyed.iter().map(|write| write.session_id).collect();
    let cutoffs: Vec<i64> = keyed.iter().map(|write| write.keys_expire_before).collect();
    sqlx::query(
        "DELETE FROM idempotency_keys k USING unnest($1::uuid[], $2::int8[]) AS e(id, cutoff) \
         WHERE k.session_id = e.id AND k.created_at < e.cutoff",
    )
    .bind(&sessions)
    .bind(&cutoffs)
    .execute(&mut **tx)
    .await?;
    let records: Vec<(&SessionWrite, &KeyRow)> = keyed
        .iter()
        .flat_map(|write| write.keys.iter().map(move |key| (*write, key)))
        .collect();
    let ids: Vec<Uuid> = records.iter().map(|(write, _)| write.session_id).collect();
    let keys: Vec<&str> = records.iter().map(|(_, key)| key.key.as_str()).collect();
    let users: Vec<&str> = records
        .iter()
        .map(|(_, key)| key.user_id.as_str())
        .collect();
    let fingerprints: Vec<&[u8]> = records
        .iter()
        .map(|(_, key)| key.fingerprint.as_slice())
        .collect();
    let responses: Vec<&str> = records
        .iter()
        .map(|(_, key)| key.response.as_str())
        .collect();
    let times: Vec<i64> = records.iter().map(|(write, _)| write.now).collect();
    let returned: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (session_id, key, user_id, fingerprint, response, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], \
                              $6::int8[]) \
         ON CONFLICT DO NOTHING RETURNING session_id",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(&users)
    .bind(&fingerprints)
    .bind(&responses)
    .bind(&times)
    .fetch_all(&mut **tx)
    .await?;
    for session_id in returned {
        *inserted.entry(session_id).or_default() += 1;
    }
    Ok(inserted)
}

async fn update_sessions(
    tx: &mut Transaction<'static, Postgres>,
    writes: &[SessionWrite],
    plan: &FlushPlan,
    ownership: Ownership,
) -> Result<(), StorageError> {
    let active = plan.active();
    let sessions = SessionArrays::new(writes, &active);
    let deleted_ids: Vec<Uuid> = active
        .iter()
        .map(|&index| &writes[index])
        .filter(|write| write.delete)
        .map(|write| write.session_id)
        .collect();
    sqlx::query(concat!(
        "UPDATE sessions AS s SET version = s.version + u.steps, updated_at = u.at, \
                title = COALESCE(u.title, s.title), metadata = COALESCE(u.metadata, s.metadata), \
                prompt_tokens = s.prompt_tokens + u.prompt, \
                completion_tokens = s.completion_tokens + u.completion, \
                message_count = s.message_count + u.added, \
                deleted_at = CASE WHEN u.del THEN u.at ELSE s.deleted_at END, \
                epoch = s.epoch + u.claim::int4, owner = $10, lease_until = ",
        db_now_micros!(),
        " + $11 \
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
                     $7::int8[], $8::bool[], $9::bool[], $12::int8[]) \
              AS u(id, at, title, metadata, prompt, completion, added, del, claim, steps) \
         WHERE s.id = u.id",
    ))
    .bind(&sessions.ids)
    .bind(&sessions.times)
    .bind(&sessions.titles)
    .bind(&sessions.metadata)
    .bind(&sessions.prompt)
    .bind(&sessions.completion)
    .bind(&sessions.added)
    .bind(&sessions.deletes)
    .bind(&sessions.claims)
    .bind(ownership.owner)
    .bind(ownership.lease_micros)
    .bind(&sessions.steps)
    .execute(&mut **tx)
    .await?;
    if !deleted_ids.is_empty() {
        sqlx::query("DELETE FROM messages WHERE session_id = ANY($1)")
            .bind(&deleted_ids)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Binds the arrays of a [`MessageArrays`] as the next 11 parameters, in column order.
macro_rules! bind_message_arrays {
    ($query:expr, $rows:expr) => {
        $query
            .bind(&$rows.session_ids)
            .bind(&$rows.seqs)
            .bind(&$rows.message_ids)
            .bind(&$rows.roles)
            .bind(&$rows.contents)
            .bind(&$rows.names)
            .bind(&$rows.tool_calls)
            .bind(&$rows.tool_call_ids)
            .bind(&$rows.function_calls)
            .bind(&$rows.refusals)
            .bind(&$rows.times)
    };
}
use bind_message_arrays;

/// The `NOTIFY` channel on which engines announce the versions they committed.
pub(crate) const CHANGES_CHANNEL: &str = "soloist_sessions";

/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// The per-session columns of some writes, as arrays for `unnest`.
struct SessionArrays<'a> {
    ids: Vec<Uuid>,
    expected: Vec<i64>,
    times: Vec<i64>,
    titles: Vec<Option<&'a str>>,
    metadata: Vec<Option<&'a str>>,
    prompt: Vec<i64>,
    completion: Vec<i64>,
    added: Vec<i64>,
    deletes: Vec<bool>,
    epochs: Vec<i64>,
    claims: Vec<bool>,
    steps: Vec<i64>,
}

impl<'a> SessionArrays<'a> {
    fn new(writes: &'a [SessionWrite], indexes: &[usize]) -> Self {
        let count = indexes.len();
        let mut arrays = Self {
            ids: Vec::with_capacity(count),
            expected: Vec::with_capacity(count),
            times: Vec::with_capacity(count),
            titles: Vec::with_capacity(count),
            metadata: Vec::with_capacity(count),
            prompt: Vec::with_capacity(count),
            completion: Vec::with_capacity(count),
            added: Vec::with_capacity(count),
            deletes: Vec::with_capacity(count),
            epochs: Vec::with_capacity(count),
            claims: Vec::with_capacity(count),
            steps: Vec::with_capacity(count),
        };
        for &index in indexes {
            let write = &writes[index];
            arrays.ids.push(write.session_id);
            arrays.expected.push(write.expected_version);
            arrays.times.push(write.now);
            arrays.titles.push(write.title.as_deref());
            arrays.metadata.push(write.metadata.as_deref());
            arrays.prompt.push(write.usage.prompt_tokens);
            arrays.completion.push(write.usage.completion_tokens);
            arrays.added.push(write.rows.len() as i64);
            arrays.deletes.push(write.delete);
            arrays.epochs.push(write.epoch);
            arrays.claims.push(write.claim);
            arrays.steps.push(write.steps);
        }
        arrays
    }
}

/// The message rows of some writes, as arrays for `unnest`.
struct MessageArrays<'a> {
    session_ids: Vec<Uuid>,
    seqs: Vec<i64>,
    message_ids: Vec<Uuid>,
    roles: Vec<&'static str>,
    contents: Vec<Option<&'a [u8]>>,
    names: Vec<Option<&'a str>>,
    tool_calls: Vec<Option<&'a str>>,
    tool_call_ids: Vec<Option<&'a str>>,
    function_calls: Vec<Option<&'a str>>,
    refusals: Vec<Option<&'a str>>,
    times: Vec<i64>,
}

impl<'a> MessageArrays<'a> {
    fn new(writes: &'a [SessionWrite], indexes: &[usize]) -> Self {
        let count: usize = indexes.iter().map(|&index| writes[index].rows.len()).sum();
        let mut arrays = Self {
            session_ids: Vec::with_capacity(count),
            seqs: Vec::with_capacity(count),
            message_ids: Vec::with_capacity(count),
            roles: Vec::with_capacity(count),
            contents: Vec::with_capacity(count),
            names: Vec::with_capacity(count),
            tool_calls: Vec::with_capacity(count),
            tool_call_ids: Vec::with_capacity(count),
            function_calls: Vec::with_capacity(count),
            refusals: Vec::with_capacity(count),
            times: Vec::with_capacity(count),
        };
        for &index in indexes {
            let write = &writes[index];
            for row in &write.rows {
                arrays.session_ids.push(write.session_id);
                arrays.seqs.push(row.seq);
                arrays.message_ids.push(row.id);
                arrays.roles.push(row.role.as_str());
                arrays
                    .contents
                    .push(row.content.as_deref().map(str::as_bytes));
                arrays.names.push(row.name.as_deref());
                arrays.tool_calls.push(row.tool_calls.as_deref());
                arrays.tool_call_ids.push(row.tool_call_id.as_deref());
                arrays.function_calls.push(row.function_call.as_deref());
                arrays.refusals.push(row.refusal.as_deref());
                arrays.times.push(write.now);
            }
        }
        arrays
    }
}
