//! The PostgreSQL backend, for running many server processes on one database.
//!
//! A flush is a handful of statements whatever the number of sessions in it: the session rows
//! are locked in id order (so two processes flushing overlapping sessions cannot deadlock) and
//! every array of values goes in through `unnest`.

use std::collections::HashMap;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{
    FlushOutcome, FlushPlan, LoadedSession, MessageRecord, SessionRecord, SessionWrite,
    check_versions, into_messages, message_columns, session_columns, short_writes,
};
use crate::command::SessionCursor;
use crate::config::EngineConfig;
use crate::error::{Error, StorageError};
use crate::model::{Message, SessionId, SessionInfo};

/// The PostgreSQL store.
#[derive(Clone, Debug)]
pub(crate) struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn connect(config: &EngineConfig) -> Result<Self, Error> {
        let options: PgConnectOptions = config
            .database_url
            .parse()
            .map_err(|error: sqlx::Error| Error::invalid("database_url", error.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.read_pool_size.max(1) + config.writer_connections.max(1))
            .connect_with(options)
            .await
            .map_err(StorageError::from)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StorageError::from)?;
        Ok(Self { pool })
    }

    pub async fn load(
        &self,
        id: SessionId,
        tail: usize,
    ) -> Result<Option<LoadedSession>, StorageError> {
        // One snapshot for the row and the messages.
        let mut tx = self
            .pool
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
        let (info, deleted) = record.into_info()?;
        let mut records: Vec<MessageRecord> = if deleted || tail == 0 {
            Vec::new()
        } else {
            sqlx::query_as(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE session_id = $1 \
                 ORDER BY seq DESC LIMIT $2"
            ))
            .bind(id)
            .bind(tail as i64)
            .fetch_all(&mut *tx)
            .await?
        };
        tx.commit().await?;
        records.reverse();
        Ok(Some(LoadedSession {
            info,
            deleted,
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
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
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
            " FROM messages WHERE session_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3"
        ))
        .bind(id)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        records
            .into_iter()
            .map(|record| record.into_info().map(|(info, _)| info))
            .collect()
    }

    pub async fn version(&self, id: SessionId) -> Result<Option<i64>, StorageError> {
        Ok(
            sqlx::query_scalar("SELECT version FROM sessions WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
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
            let stored: Vec<(Uuid, i64, bool)> = sqlx::query_as(
                "SELECT id, version, deleted_at IS NOT NULL FROM sessions \
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let stored = stored
                .into_iter()
                .map(|(id, version, deleted)| (id, (version, deleted)))
                .collect();
            check_versions(&mut plan, writes, &stored);

            let inserted = insert_messages(&mut tx, writes, &plan).await?;
            let short = short_writes(&plan, writes, &inserted);
            if !short.is_empty() {
                // Some of these sessions' rows went in: undo all and retry without them.
                tx.rollback().await?;
                for index in short {
                    plan.conflict(index);
                }
                continue;
            }
            update_sessions(&mut tx, writes, &plan).await?;
            tx.commit().await?;
            return Ok(plan.commit_active(writes));
        }
    }

    pub fn is_transient(&self, error: &StorageError) -> bool {
        // serialization_failure, deadlock_detected, lock_not_available: the transaction was
        // rolled back by the server, so nothing of it committed.
        matches!(error.code(), Some("40001" | "40P01" | "55P03"))
    }

    pub async fn close(&self) {
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
    let created: Vec<Uuid> = sqlx::query_scalar(
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
    .await?;
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
    let count: usize = plan
        .active()
        .into_iter()
        .map(|index| writes[index].rows.len())
        .sum();
    let mut inserted = HashMap::new();
    if count == 0 {
        return Ok(inserted);
    }
    let mut session_ids = Vec::with_capacity(count);
    let mut seqs = Vec::with_capacity(count);
    let mut message_ids = Vec::with_capacity(count);
    let mut roles = Vec::with_capacity(count);
    let mut contents = Vec::with_capacity(count);
    let mut names = Vec::with_capacity(count);
    let mut tool_calls = Vec::with_capacity(count);
    let mut tool_call_ids = Vec::with_capacity(count);
    let mut function_calls = Vec::with_capacity(count);
    let mut refusals = Vec::with_capacity(count);
    let mut times = Vec::with_capacity(count);
    for index in plan.active() {
        let write = &writes[index];
        for row in &write.rows {
            session_ids.push(write.session_id);
            seqs.push(row.seq);
            message_ids.push(row.id);
            roles.push(row.role.as_str());
            contents.push(row.content.as_deref().map(str::as_bytes));
            names.push(row.name.as_deref());
            tool_calls.push(row.tool_calls.as_deref());
            tool_call_ids.push(row.tool_call_id.as_deref());
            function_calls.push(row.function_call.as_deref());
            refusals.push(row.refusal.as_deref());
            times.push(write.now);
        }
    }
    let returned: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (session_id, seq, message_id, role, content, name, tool_calls, \
                               tool_call_id, function_call, refusal, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::bytea[], \
                              $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                              $11::int8[]) \
         ON CONFLICT DO NOTHING RETURNING session_id",
    )
    .bind(&session_ids)
    .bind(&seqs)
    .bind(&message_ids)
    .bind(&roles)
    .bind(&contents)
    .bind(&names)
    .bind(&tool_calls)
    .bind(&tool_call_ids)
    .bind(&function_calls)
    .bind(&refusals)
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
) -> Result<(), StorageError> {
    let active = plan.active();
    let mut ids = Vec::with_capacity(active.len());
    let mut times = Vec::with_capacity(active.len());
    let mut titles = Vec::with_capacity(active.len());
    let mut metadata = Vec::with_capacity(active.len());
    let mut prompt = Vec::with_capacity(active.len());
    let mut completion = Vec::with_capacity(active.len());
    let mut counts = Vec::with_capacity(active.len());
    let mut deletes = Vec::with_capacity(active.len());
    let mut deleted_ids = Vec::new();
    for index in active {
        let write = &writes[index];
        ids.push(write.session_id);
        times.push(write.now);
        titles.push(write.title.as_deref());
        metadata.push(write.metadata.as_deref());
        prompt.push(write.usage.prompt_tokens);
        completion.push(write.usage.completion_tokens);
        counts.push(write.rows.len() as i64);
        deletes.push(write.delete);
        if write.delete {
            deleted_ids.push(write.session_id);
        }
    }
    sqlx::query(
        "UPDATE sessions AS s SET version = s.version + 1, updated_at = u.at, \
                title = COALESCE(u.title, s.title), metadata = COALESCE(u.metadata, s.metadata), \
                prompt_tokens = s.prompt_tokens + u.prompt, \
                completion_tokens = s.completion_tokens + u.completion, \
                message_count = s.message_count + u.added, \
                deleted_at = CASE WHEN u.del THEN u.at ELSE s.deleted_at END \
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
                     $7::int8[], $8::bool[]) \
              AS u(id, at, title, metadata, prompt, completion, added, del) \
         WHERE s.id = u.id",
    )
    .bind(&ids)
    .bind(&times)
    .bind(&titles)
    .bind(&metadata)
    .bind(&prompt)
    .bind(&completion)
    .bind(&counts)
    .bind(&deletes)
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
