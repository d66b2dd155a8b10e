//! The embedded SQLite backend: one writer connection (SQLite has one writer at a time anyway)
//! and a pool of readers, in WAL mode with `synchronous=FULL` by default.
//!
//! `sqlite::memory:` opens a private in-memory database through SQLite's `memdb` VFS, which
//! every connection of the engine shares with real locking between them. Each task gets its own
//! connection and its own transaction from the pool, so one task's rollback can never touch
//! another task's writes (incident 3).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::{
    FlushOutcome, FlushPlan, HeadRow, KeyRow, LoadedSession, MessageRecord, Ownership,
    SessionRecord, SessionWrite, check_heads, heads, into_messages, message_columns,
    session_columns, short_writes,
};
use crate::command::SessionCursor;
use crate::config::{EngineConfig, SqliteSync};
use crate::error::{Error, StorageError};
use crate::model::{Message, SessionId, SessionInfo};

/// The most rows or sessions one statement carries (SQLite allows 32766 bound parameters; a
/// message row binds 11).
const MAX_PER_STATEMENT: usize = 256;

/// Splits `items` into chunks whose lengths are powers of two (largest first, at most
/// [`MAX_PER_STATEMENT`]). A multi-row statement's text depends on its row count, and SQLite
/// prepares each distinct text anew; with power-of-two chunks the few shapes there are stay in
/// the connection's statement cache, so a flush of any size reuses prepared statements.
fn statement_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let size = MAX_PER_STATEMENT.min(1 << rest.len().ilog2());
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// The SQLite store.
#[derive(Clone, Debug)]
pub(crate) struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
    ownership: Ownership,
}

fn is_memory_url(url: &str) -> bool {
    matches!(
        url,
        "sqlite::memory:" | "sqlite://:memory:" | "sqlite::memory"
    )
}

impl SqliteStore {
    pub async fn connect(config: &EngineConfig, ownership: Ownership) -> Result<Self, Error> {
        let url = config.database_url.as_str();
        let options = if is_memory_url(url) {
            // A name starting with '/' makes memdb share the database between this process's
            // connections; the UUID keeps each engine's database private.
            SqliteConnectOptions::new()
                .filename(format!("/soloist-{}", Uuid::new_v4()))
                .vfs("memdb")
                .journal_mode(SqliteJournalMode::Memory)
        } else {
            SqliteConnectOptions::from_str(url)
                .map_err(|error| Error::invalid("database_url", error.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(match config.sqlite_sync {
                    SqliteSync::Full => SqliteSynchronous::Full,
                    SqliteSync::Normal => SqliteSynchronous::Normal,
                })
        }
        .busy_timeout(config.busy_timeout)
        .foreign_keys(true);
        let options = match config.sqlite_max_pages {
            Some(pages) => options.pragma("max_page_count", pages.to_string()),
            None => options,
        };

        // The pools never close their last connection: an in-memory database lives only as long
        // as one connection is open.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(StorageError::from)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(StorageError::from)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(config.read_pool_size.max(1))
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(StorageError::from)?;
        Ok(Self {
            writer,
            readers,
            ownership,
        })
    }

    pub async fn load(
        &self,
        id: SessionId,
        tail: usize,
        readers: &[&str],
    ) -> Result<Option<LoadedSession>, StorageError> {
        // One read transaction, so the row and the messages are one snapshot.
        let mut tx = self.readers.begin().await?;
        let record: Option<SessionRecord> = sqlx::query_as(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE id = ?"
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
                " FROM messages WHERE session_id = ? AND seq >= ? \
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
        let mut query =
            QueryBuilder::<Sqlite>::new("SELECT message_id, seq FROM messages WHERE session_id = ");
        query.push_bind(id).push(" AND message_id IN (");
        let mut list = query.separated(", ");
        for message_id in ids {
            list.push_bind(*message_id);
        }
        query.push(")");
        let rows: Vec<(Uuid, i64)> = query.build_query_as().fetch_all(&self.readers).await?;
        Ok(rows.into_iter().collect())
    }

    pub async fn stored_messages(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<Vec<Message>, StorageError> {
        let mut query = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE session_id = "
        ));
        query.push_bind(id).push(" AND message_id IN (");
        let mut list = query.separated(", ");
        for message_id in ids {
            list.push_bind(*message_id);
        }
        query.push(")");
        let records: Vec<MessageRecord> = query.build_query_as().fetch_all(&self.readers).await?;
        into_messages(records)
    }

    pub async fn key_records(
        &self,
        id: SessionId,
        keys: &[String],
        since: i64,
    ) -> Result<Vec<(String, String, Vec<u8>, String, i64)>, StorageError> {
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT key, user_id, fingerprint, response, created_at FROM idempotency_keys WHERE session_id = ",
        );
        query
            .push_bind(id)
            .push(" AND created_at >= ")
            .push_bind(since)
            .push(" AND key IN (");
        let mut list = query.separated(", ");
        for key in keys {
            list.push_bind(key.as_str());
        }
        query.push(")");
        Ok(query.build_query_as().fetch_all(&self.readers).await?)
    }

    pub async fn purge_keys(&self, cutoff: i64, limit: i64) -> Result<u64, StorageError> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE rowid IN \
             (SELECT rowid FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
        )
        .bind(cutoff)
        .bind(limit)
        .execute(&self.writer)
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
            " FROM messages WHERE session_id = ? AND seq > ? AND seq <= ? \
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
             WHERE user_id = ? AND deleted_at IS NULL AND (created_at, id) < (?, ?) \
             ORDER BY created_at DESC, id DESC LIMIT ?"
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
            sqlx::query_scalar("SELECT version FROM sessions WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.readers)
                .await?,
        )
    }

    pub async fn settled_head(
        &self,
        id: SessionId,
    ) -> Result<Option<(i64, bool, i64)>, StorageError> {
        // A flush's transaction lives and dies with its connection in this process: none can
        // still be running once its outcome was reported lost.
        Ok(sqlx::query_as(
            "SELECT version, COALESCE(owner = ?, 0), epoch FROM sessions WHERE id = ?",
        )
        .bind(self.ownership.owner)
        .bind(id)
        .fetch_optional(&self.readers)
        .await?)
    }

    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        let mut plan = FlushPlan::new(writes.len());
        loop {
            if plan.active().is_empty() {
                return Ok(plan.commit_active(writes));
            }
            // IMMEDIATE takes the write lock up front: a deferred transaction that reads first
            // could fail to upgrade with SQLITE_BUSY when another process writes.
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;

            let creating: Vec<usize> = plan
                .active()
                .into_iter()
                .filter(|&index| writes[index].create.is_some())
                .collect();
            for chunk in statement_chunks(&creating) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO sessions (id, user_id, title, metadata, created_at, updated_at) ",
                );
                query.push_values(chunk, |mut values, &index| {
                    let write = &writes[index];
                    if let Some(create) = &write.create {
                        values
                            .push_bind(write.session_id)
                            .push_bind(create.user_id.as_str())
                            .push_bind(create.title.as_deref())
                            .push_bind(create.metadata.as_str())
                            .push_bind(write.now)
                            .push_bind(write.now);
                    }
                });
                query.push(" ON CONFLICT (id) DO NOTHING RETURNING id");
                let created: HashSet<Uuid> = query
                    .build_query_scalar()
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
                for &index in chunk {
                    if !created.contains(&writes[index].session_id) {
                        plan.conflict(index);
                    }
                }
            }

            // The write lock is held from BEGIN IMMEDIATE: what this reads stays true until the
            // commit. Leases are measured on this machine's clock (the processes sharing an
            // SQLite file share the machine).
            let now = crate::model::now_micros();
            let mut stored = Vec::new();
            for chunk in statement_chunks(&plan.active()) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT id, version, deleted_at IS NOT NULL, epoch, \
                     COALESCE(owner <> ",
                );
                query
                    .push_bind(self.ownership.owner)
                    .push(" AND lease_until > ")
                    .push_bind(now)
                    .push(", 0) FROM sessions WHERE id IN (");
                let mut list = query.separated(", ");
                for &index in chunk {
                    list.push_bind(writes[index].session_id);
                }
                query.push(")");
                let rows: Vec<HeadRow> = query.build_query_as().fetch_all(&mut *tx).await?;
                stored.extend(rows);
            }
            check_heads(&mut plan, writes, &heads(stored));

            let mut inserted: HashMap<Uuid, usize> = HashMap::new();
            let rows: Vec<_> = plan
                .active()
                .into_iter()
                .flat_map(|index| {
                    let write = &writes[index];
                    write.rows.iter().map(move |row| (write, row))
                })
                .collect();
            for chunk in statement_chunks(&rows) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO messages (session_id, seq, message_id, role, content, name, \
                     tool_calls, tool_call_id, function_call, refusal, created_at) ",
                );
                query.push_values(chunk, |mut values, (write, row)| {
                    values
                        .push_bind(write.session_id)
                        .push_bind(row.seq)
                        .push_bind(row.id)
                        .push_bind(row.role.as_str())
                        .push_bind(row.content.as_deref().map(str::as_bytes))
                        .push_bind(row.name.as_deref())
                        .push_bind(row.tool_calls.as_deref())
                        .push_bind(row.tool_call_id.as_deref())
                        .push_bind(row.function_call.as_deref())
                        .push_bind(row.refusal.as_deref())
                        .push_bind(write.now);
                });
                query.push(" ON CONFLICT DO NOTHING RETURNING session_id");
                let returned: Vec<Uuid> = query.build_query_scalar().fetch_all(&mut *tx).await?;
                for session_id in returned {
                    *inserted.entry(session_id).or_default() += 1;
                }
            }
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

            // Every session in one statement: on SQLite each statement is a round trip to the
            // connection's worker thread.
            let active = plan.active();
            for chunk in statement_chunks(&active) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "WITH u(id, at, title, metadata, prompt, completion, added, del, claim, steps) AS (",
                );
                query.push_values(chunk, |mut values, &index| {
                    let write = &writes[index];
                    values
                        .push_bind(write.session_id)
                        .push_bind(write.now)
                        .push_bind(write.title.as_deref())
                        .push_bind(write.metadata.as_deref())
                        .push_bind(write.usage.prompt_tokens)
                        .push_bind(write.usage.completion_tokens)
                        .push_bind(write.rows.len() as i64)
                        .push_bind(write.delete)
                        .push_bind(write.claim)
                        .push_bind(write.steps);
                });
                query
                    .push(") UPDATE sessions SET owner = ")
                    .push_bind(self.ownership.owner)
                    .push(", lease_until = ")
                    .push_bind(now.saturating_add(self.ownership.lease_micros))
                    .push(
                        ", epoch = epoch + u.claim, version = version + u.steps, updated_at = u.at, \
                     title = COALESCE(u.title, sessions.title), \
                     metadata = COALESCE(u.metadata, sessions.metadata), \
                     prompt_tokens = prompt_tokens + u.prompt, \
                     completion_tokens = completion_tokens + u.completion, \
                     message_count = message_count + u.added, \
                     deleted_at = CASE WHEN u.del THEN u.at ELSE deleted_at END \
                     FROM u WHERE sessions.id = u.id",
                    );
                query.build().execute(&mut *tx).await?;
            }
            let deleted: Vec<Uuid> = active
                .iter()
                .map(|&index| &writes[index])
                .filter(|write| write.delete)
                .map(|write| write.session_id)
                .collect();
            if !deleted.is_empty() {
                let mut query =
                    QueryBuilder::<Sqlite>::new("DELETE FROM messages WHERE session_id IN (");
                let mut list = query.separated(", ");
                for id in deleted {
                    list.push_bind(id);
                }
                query.push(")");
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            return Ok(plan.commit_active(writes));
        }
    }

    pub fn is_transient(&self, error: &StorageError) -> bool {
        // SQLITE_BUSY and SQLITE_LOCKED, with any extended code: the lock was not granted, so
        // nothing was written.
        error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
    }

    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }
}

/// Stores the idempotency records of the active writes, after deleting their sessions' expired
/// ones; returns how many went in per session (a key already stored does not).
async fn insert_keys(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
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
    for write in &keyed {
        sqlx::query("DELETE FROM idempotency_keys WHERE session_id = ? AND created_at < ?")
            .bind(write.session_id)
            .bind(write.keys_expire_before)
            .execute(&mut **tx)
            .await?;
    }
    let records: Vec<(&SessionWrite, &KeyRow)> = keyed
        .iter()
        .flat_map(|write| write.keys.iter().map(move |key| (*write, key)))
        .collect();
    for chunk in statement_chunks(&records) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO idempotency_keys \
             (session_id, key, user_id, fingerprint, response, created_at) ",
        );
        query.push_values(chunk, |mut values, (write, key)| {
            values
                .push_bind(write.session_id)
                .push_bind(key.key.as_str())
                .push_bind(key.user_id.as_str())
                .push_bind(key.fingerprint.as_slice())
                .push_bind(key.response.as_str())
                .push_bind(write.now);
        });
        query.push(" ON CONFLICT DO NOTHING RETURNING session_id");
        let returned: Vec<Uuid> = query.build_query_scalar().fetch_all(&mut **tx).await?;
        for session_id in returned {
            *inserted.entry(session_id).or_default() += 1;
        }
    }
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::statement_chunks;

    #[test]
    fn chunks_are_powers_of_two_and_cover_everything() {
        for count in [0usize, 1, 2, 3, 7, 64, 255, 256, 257, 509, 1000] {
            let items: Vec<usize> = (0..count).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&items).collect();
            assert!(chunks.iter().all(|chunk| chunk.len().is_power_of_two()));
            assert!(
                chunks
                    .iter()
                    .all(|chunk| chunk.len() <= super::MAX_PER_STATEMENT)
            );
            let joined: Vec<usize> = chunks.concat();
            assert_eq!(joined, items, "{count} items");
        }
        let items = vec![0; 509];
        let sizes: Vec<usize> = statement_chunks(&items).map(<[usize]>::len).collect();
        assert_eq!(sizes, vec![256, 128, 64, 32, 16, 8, 4, 1]);
    }
}
