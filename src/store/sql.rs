//! The code every SQL backend runs the same way: the reads and the general flush, over the
//! statements of `queries` rendered for the backend's dialect. A backend supplies only what
//! really differs ([`Backend`]): its dialect, how rows and lists are bound, and which errors
//! are transient; and it keeps its own connection set-up and anything only it can do.
//!
//! Each function is generic over the sqlx driver, and written against what both drivers
//! provide (the bounds of the `impl` block below); it is compiled once per backend.

use std::collections::{HashMap, HashSet};
use std::convert::identity;
use std::sync::Arc;

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Row, Type};
use uuid::Uuid;

use super::backend::{Backend, Params};
use super::dialect::Batched;
use super::flush::{FlushPlan, StoredHead, by_session};
use super::queries::Queries;
use super::rows::{
    ChunkInsert, ChunkRecord, ExpiredKeys, FinishUpdate, KeyInsert, KeyRecordRow, MessageRecord,
    MessageRow, NewSession, SessionChange, SessionRecord, ToolMessageRecord, WriteRow,
    into_messages, with_chunks,
};
use super::{FlushOutcome, LoadedSession, Ownership, SessionWrite};
use crate::command::SessionCursor;
use crate::error::StorageError;
use crate::idempotency::KeyRecord;
use crate::model::{
    Member, Message, MessageStatus, SessionId, SessionInfo, from_micros, now_micros,
};

/// A SQL store: its connection pools, its rendered statements, and who this process is.
#[derive(Debug)]
pub(crate) struct Sql<DB: Database> {
    /// Connections for writes (flushes, purges).
    pub writer: Pool<DB>,
    /// Connections for reads.
    pub readers: Pool<DB>,
    /// Who this process is, written into the sessions it writes.
    pub ownership: Ownership,
    queries: Arc<Queries>,
}

impl<DB: Database> Clone for Sql<DB> {
    fn clone(&self) -> Self {
        Self {
            writer: self.writer.clone(),
            readers: self.readers.clone(),
            ownership: self.ownership,
            queries: self.queries.clone(),
        }
    }
}

impl<DB: Backend> Sql<DB> {
    /// A store over connected (and migrated) pools; renders its statements.
    pub fn new(writer: Pool<DB>, readers: Pool<DB>, ownership: Ownership) -> Self {
        Self {
            writer,
            readers,
            ownership,
            queries: Arc::new(Queries::new(&DB::DIALECT)),
        }
    }

    /// See [`Store::is_transient`](super::Store::is_transient).
    pub fn is_transient(&self, error: &StorageError) -> bool {
        DB::is_transient(error)
    }

    /// See [`Store::is_refused`](super::Store::is_refused).
    pub fn is_refused(&self, error: &StorageError) -> bool {
        DB::is_refused(error)
    }

    /// Closes the connection pools.
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }
}

/// Which messages of a session a read names.
#[derive(Clone, Copy)]
enum MessageQuery<'a> {
    /// These ids.
    Ids(&'a [Uuid]),
    /// The sequences after `after`, up to `last`.
    Range { after: i64, last: i64 },
}

/// The shared code needs of a driver what SQLite's and PostgreSQL's both provide: executors
/// over pools and transactions, the scalar types it binds, and the records it reads.
impl<DB> Sql<DB>
where
    DB: Backend,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> Uuid: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q, 'a> &'a str: Encode<'q, DB> + Type<DB>,
    for<'r> (Uuid,): FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (Uuid, i64): FromRow<'r, DB::Row>,
    for<'r> (i64, bool, i64): FromRow<'r, DB::Row>,
    for<'r> (Uuid, String, i64, i64): FromRow<'r, DB::Row>,
    for<'r> (Uuid, String, i64): FromRow<'r, DB::Row>,
    for<'r> (Uuid, Uuid, String): FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> SessionRecord: FromRow<'r, DB::Row>,
    for<'r> MessageRecord: FromRow<'r, DB::Row>,
    for<'r> KeyRecordRow: FromRow<'r, DB::Row>,
    for<'r> StoredHead: FromRow<'r, DB::Row>,
    for<'r> ChunkRecord: FromRow<'r, DB::Row>,
    for<'r> ToolMessageRecord: FromRow<'r, DB::Row>,
    for<'r> String: sqlx::Decode<'r, DB> + Type<DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
{
    /// See [`Store::load`](super::Store::load).
    pub async fn load(
        &self,
        id: SessionId,
        tail: usize,
        readers: &[&str],
        hide: bool,
    ) -> Result<Option<LoadedSession>, StorageError> {
        // One read transaction, so the row and the messages are one snapshot.
        let mut tx = self.readers.begin_with(DB::DIALECT.begin_snapshot).await?;
        let args = Params::<DB>::new().add(id).finish()?;
        let row: Option<DB::Row> = sqlx::query_with(self.queries.session.clone(), args)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        if hide && !readers.is_empty() {
            let owner: String = row.try_get("user_id")?;
            if !readers.contains(&owner.as_str()) {
                tx.commit().await?;
                return Ok(None);
            }
        }
        let (info, deleted, epoch) = SessionRecord::from_row(&row)?.into_info()?;
        let foreign = !readers.is_empty() && !readers.contains(&info.user_id.as_str());
        let mut first = (info.message_count - tail as i64).max(0);
        if !deleted && !foreign && first > 0 {
            // A draft still in progress is kept with the tail, however old.
            let args = Params::<DB>::new().add(id).add(first).finish()?;
            let oldest_draft: Option<i64> =
                sqlx::query_scalar_with(self.queries.oldest_draft.clone(), args)
                    .fetch_optional(&mut *tx)
                    .await?;
            first = oldest_draft.map_or(first, |draft| draft.min(first));
        }
        let records: Vec<MessageRecord> = if deleted || foreign || first >= info.message_count {
            Vec::new()
        } else {
            let args = Params::<DB>::new().add(id).add(first).finish()?;
            sqlx::query_as_with(self.queries.tail.clone(), args)
                .fetch_all(&mut *tx)
                .await?
        };
        // What the tail does not hold of the session's tool calls, for their pairing.
        let older: Vec<ToolMessageRecord> = if deleted || foreign || first == 0 {
            Vec::new()
        } else {
            let args = Params::<DB>::new().add(id).add(first).finish()?;
            sqlx::query_as_with(self.queries.older_tool_messages.clone(), args)
                .fetch_all(&mut *tx)
                .await?
        };
        let older_tool_messages = older
            .into_iter()
            .map(super::ToolMessage::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tail = into_messages(records)?;
        self.complete_drafts(&mut tx, id, &mut tail).await?;
        tx.commit().await?;
        Ok(Some(LoadedSession {
            info,
            deleted,
            epoch,
            tail,
            older_tool_messages,
            partial: foreign,
        }))
    }

    /// Adds their stored chunks to the drafts among `messages` (read on `tx`, which must be the
    /// snapshot the messages were read in: a draft finished in between has its chunks gone).
    async fn complete_drafts(
        &self,
        tx: &mut DB::Connection,
        id: SessionId,
        messages: &mut [Message],
    ) -> Result<(), StorageError> {
        let mut drafts = messages
            .iter()
            .filter(|message| message.status == MessageStatus::InProgress)
            .map(|message| message.seq);
        let Some(first) = drafts.next() else {
            return Ok(());
        };
        let last = drafts.next_back().unwrap_or(first);
        let args = Params::<DB>::new().add(id).add(first).add(last).finish()?;
        let chunks: Vec<ChunkRecord> = sqlx::query_as_with(self.queries.chunks.clone(), args)
            .fetch_all(&mut *tx)
            .await?;
        with_chunks(messages, chunks)
    }

    /// The messages `query` names, from the reading pool; if drafts are among them, read
    /// again with the drafts' chunks in one snapshot.
    async fn read_with_drafts(
        &self,
        id: SessionId,
        query: MessageQuery<'_>,
    ) -> Result<Vec<Message>, StorageError> {
        let messages = {
            let mut connection = self.readers.acquire().await?;
            into_messages(self.fetch_messages(&mut connection, id, query).await?)?
        };
        if messages
            .iter()
            .all(|message| message.status != MessageStatus::InProgress)
        {
            return Ok(messages);
        }
        let mut tx = self.readers.begin_with(DB::DIALECT.begin_snapshot).await?;
        let mut messages = into_messages(self.fetch_messages(&mut tx, id, query).await?)?;
        self.complete_drafts(&mut tx, id, &mut messages).await?;
        tx.commit().await?;
        Ok(messages)
    }

    /// The stored rows of the messages `query` names.
    async fn fetch_messages(
        &self,
        connection: &mut DB::Connection,
        id: SessionId,
        query: MessageQuery<'_>,
    ) -> Result<Vec<MessageRecord>, StorageError> {
        let mut records: Vec<MessageRecord> = Vec::new();
        match query {
            MessageQuery::Ids(ids) => {
                for chunk in DB::DIALECT.list_chunks(ids) {
                    let args = Params::<DB>::new().add(id).list(chunk).finish()?;
                    let statement = self.queries.stored_messages.get(chunk.len());
                    records.extend(
                        sqlx::query_as_with(statement, args)
                            .fetch_all(&mut *connection)
                            .await?,
                    );
                }
            }
            MessageQuery::Range { after, last } => {
                let args = Params::<DB>::new().add(id).add(after).add(last).finish()?;
                records = sqlx::query_as_with(self.queries.read_messages.clone(), args)
                    .fetch_all(&mut *connection)
                    .await?;
            }
        }
        Ok(records)
    }

    /// See [`Store::stored_ids`](super::Store::stored_ids).
    pub async fn stored_ids(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, i64>, StorageError> {
        let mut stored = HashMap::new();
        for chunk in DB::DIALECT.list_chunks(ids) {
            let args = Params::<DB>::new().add(id).list(chunk).finish()?;
            let rows: Vec<(Uuid, i64)> =
                sqlx::query_as_with(self.queries.stored_ids.get(chunk.len()), args)
                    .fetch_all(&self.readers)
                    .await?;
            stored.extend(rows);
        }
        Ok(stored)
    }

    /// See [`Store::stored_messages`](super::Store::stored_messages).
    pub async fn stored_messages(
        &self,
        id: SessionId,
        ids: &[Uuid],
    ) -> Result<Vec<Message>, StorageError> {
        self.read_with_drafts(id, MessageQuery::Ids(ids)).await
    }

    /// See [`Store::key_records`](super::Store::key_records).
    pub async fn key_records(
        &self,
        id: SessionId,
        keys: &[String],
        since: i64,
    ) -> Result<HashMap<String, KeyRecord>, StorageError> {
        let mut records = HashMap::new();
        for chunk in DB::DIALECT.list_chunks(keys) {
            let args = Params::<DB>::new()
                .add(id)
                .add(since)
                .list(chunk)
                .finish()?;
            let rows: Vec<KeyRecordRow> =
                sqlx::query_as_with(self.queries.key_records.get(chunk.len()), args)
                    .fetch_all(&self.readers)
                    .await?;
            records.extend(rows.into_iter().map(KeyRecordRow::into_record));
        }
        Ok(records)
    }

    /// See [`Store::purge_keys`](super::Store::purge_keys).
    pub async fn purge_keys(&self, cutoff: i64, limit: i64) -> Result<u64, StorageError> {
        let args = Params::<DB>::new().add(cutoff).add(limit).finish()?;
        let done = sqlx::query_with(self.queries.purge_keys.clone(), args)
            .execute(&self.writer)
            .await?;
        Ok(DB::rows_affected(&done))
    }

    /// See [`Store::read_messages`](super::Store::read_messages).
    pub async fn read_messages(
        &self,
        id: SessionId,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Message>, StorageError> {
        let last = after_seq.saturating_add(limit as i64);
        self.read_with_drafts(
            id,
            MessageQuery::Range {
                after: after_seq,
                last,
            },
        )
        .await
    }

    /// See [`Store::list_sessions`](super::Store::list_sessions).
    pub async fn list_sessions(
        &self,
        user_id: &str,
        before: Option<SessionCursor>,
        limit: usize,
    ) -> Result<Vec<SessionInfo>, StorageError> {
        let (before_time, before_id) = match before {
            Some(cursor) => (cursor.created_at_micros, cursor.id.into()),
            None => (i64::MAX, Uuid::max()),
        };
        let args = Params::<DB>::new()
            .add(user_id)
            .add(now_micros())
            .add(before_time)
            .add(before_id)
            .add(limit as i64)
            .finish()?;
        let records: Vec<SessionRecord> =
            sqlx::query_as_with(self.queries.list_sessions.clone(), args)
                .fetch_all(&self.readers)
                .await?;
        records
            .into_iter()
            .map(|record| record.into_info().map(|(info, ..)| info))
            .collect()
    }

    /// See [`Store::expired_sessions`](super::Store::expired_sessions).
    pub async fn expired_sessions(
        &self,
        now: i64,
        after: Option<(i64, SessionId)>,
        limit: usize,
    ) -> Result<Vec<(SessionId, String, i64)>, StorageError> {
        let (after_time, after_id) = match after {
            Some((time, id)) => (time, id.into()),
            None => (i64::MIN, Uuid::nil()),
        };
        let args = Params::<DB>::new()
            .add(now)
            .add(after_time)
            .add(after_id)
            .add(limit as i64)
            .finish()?;
        let rows: Vec<(Uuid, String, i64)> =
            sqlx::query_as_with(self.queries.expired_sessions.clone(), args)
                .fetch_all(&self.readers)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, user_id, expires_at)| (id.into(), user_id, expires_at))
            .collect())
    }

    /// See [`Store::unerased_sessions`](super::Store::unerased_sessions).
    pub async fn unerased_sessions(
        &self,
        user_id: &str,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StorageError> {
        let after: Uuid = after.map_or(Uuid::nil(), Into::into);
        let args = Params::<DB>::new()
            .add(user_id)
            .add(after)
            .add(limit as i64)
            .finish()?;
        let ids: Vec<Uuid> = sqlx::query_scalar_with(self.queries.unerased_sessions.clone(), args)
            .fetch_all(&self.readers)
            .await?;
        Ok(ids.into_iter().map(SessionId::from).collect())
    }

    /// See [`Store::join_member`](super::Store::join_member).
    pub async fn join_member(&self, id: Uuid, address: &str) -> Result<(), StorageError> {
        let now = now_micros();
        let args = Params::<DB>::new()
            .add(id)
            .add(address)
            .now(now)
            .now(now)
            .finish()?;
        sqlx::query_with(self.queries.join_member.clone(), args)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// See [`Store::leave_member`](super::Store::leave_member).
    pub async fn leave_member(&self, id: Uuid) -> Result<(), StorageError> {
        let args = Params::<DB>::new().add(id).finish()?;
        sqlx::query_with(self.queries.leave_member.clone(), args)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// See [`Store::cluster_setting`](super::Store::cluster_setting).
    pub async fn cluster_setting(&self, name: &str, initial: &str) -> Result<String, StorageError> {
        let args = Params::<DB>::new().add(name).add(initial).finish()?;
        sqlx::query_with(self.queries.init_setting.clone(), args)
            .execute(&self.writer)
            .await?;
        let args = Params::<DB>::new().add(name).finish()?;
        let (value,): (String,) = sqlx::query_as_with(self.queries.setting.clone(), args)
            .fetch_one(&self.writer)
            .await?;
        Ok(value)
    }

    /// See [`Store::live_members`](super::Store::live_members).
    pub async fn live_members(&self, lease_micros: i64) -> Result<Vec<Member>, StorageError> {
        let args = Params::<DB>::new()
            .now(now_micros())
            .add(lease_micros)
            .finish()?;
        let rows: Vec<(Uuid, String, i64, i64)> =
            sqlx::query_as_with(self.queries.live_members.clone(), args)
                .fetch_all(&self.readers)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, address, started_at, heartbeat_at)| Member {
                id,
                address,
                started_at: from_micros(started_at),
                heartbeat_at: from_micros(heartbeat_at),
            })
            .collect())
    }

    /// See [`Store::orphaned_drafts`](super::Store::orphaned_drafts).
    pub async fn orphaned_drafts(
        &self,
        silent_for: i64,
        limit: i64,
    ) -> Result<Vec<(SessionId, Uuid, String)>, StorageError> {
        let now = now_micros();
        let args = Params::<DB>::new()
            .now(now)
            .add(silent_for)
            .now(now)
            .add(limit)
            .finish()?;
        let rows: Vec<(Uuid, Uuid, String)> =
            sqlx::query_as_with(self.queries.orphaned_drafts.clone(), args)
                .fetch_all(&self.readers)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(session, message, user)| (SessionId::from_uuid(session), message, user))
            .collect())
    }

    /// See [`Store::count_user_sessions`](super::Store::count_user_sessions).
    pub async fn count_user_sessions(
        &self,
        user_id: &str,
        bound: u64,
    ) -> Result<u64, StorageError> {
        let bound = i64::try_from(bound).unwrap_or(i64::MAX);
        let args = Params::<DB>::new().add(user_id).add(bound).finish()?;
        let count: i64 = sqlx::query_scalar_with(self.queries.count_user_sessions.clone(), args)
            .fetch_one(&self.readers)
            .await?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    /// See [`Store::version`](super::Store::version).
    pub async fn version(&self, id: SessionId) -> Result<Option<i64>, StorageError> {
        let args = Params::<DB>::new().add(id).finish()?;
        Ok(sqlx::query_scalar_with(self.queries.version.clone(), args)
            .fetch_optional(&self.readers)
            .await?)
    }

    /// See [`Store::settled_head`](super::Store::settled_head).
    pub async fn settled_head(
        &self,
        id: SessionId,
    ) -> Result<Option<(i64, bool, i64)>, StorageError> {
        // Where the dialect locks rows (PostgreSQL), the lock queues behind a statement of the
        // lost flush that the server may still be running (a client that lost its connection
        // does not stop a statement waiting for a lock), so what this reads is final for that
        // flush. SQLite needs no lock: a flush's transaction lives and dies with its
        // connection in this process, so none can still be running once its outcome was
        // reported lost.
        let mut tx = self.readers.begin().await?;
        let args = Params::<DB>::new()
            .add(self.ownership.owner)
            .add(id)
            .finish()?;
        let head = sqlx::query_as_with(self.queries.settled_head.clone(), args)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(head)
    }

    /// The general flush: several statements in one transaction; see the module docs of
    /// `store`. Writes that meet something already stored leave it, and the transaction is
    /// redone without them.
    pub async fn flush(&self, writes: &[SessionWrite]) -> Result<Vec<FlushOutcome>, StorageError> {
        let mut plan = FlushPlan::new(writes.len());
        loop {
            if plan.active().is_empty() {
                return Ok(plan.commit_active());
            }
            let mut transaction = self.writer.begin_with(DB::DIALECT.begin_write).await?;
            let tx = &mut *transaction;
            self.create_sessions(tx, writes, &mut plan).await?;
            // Leases are measured on one clock: the database's, or, where the dialect binds
            // it, this machine's (the processes sharing an SQLite file share the machine).
            let now = now_micros();
            let heads = self.lock_heads(tx, writes, &plan, now).await?;
            plan.check_heads(writes, &heads);

            let active = plan.active();
            let messages: Vec<MessageRow> = active
                .iter()
                .flat_map(|&index| MessageRow::of(&writes[index]))
                .collect();
            let rows = self
                .run_chunks(tx, &self.queries.insert_messages, &messages, identity)
                .await?;
            let keys = self.insert_keys(tx, writes, &active).await?;
            let (rows, keys) = (count_by_session(rows), count_by_session(keys));
            let short = plan.short_writes(writes, &rows, &keys);
            if !short.is_empty() {
                // Some of these sessions' rows or keys went in: undo all and retry without them.
                transaction.rollback().await?;
                for index in short {
                    plan.conflict(index);
                }
                continue;
            }
            self.update_sessions(tx, writes, &active, now).await?;
            self.write_drafts(tx, writes, &active).await?;
            self.delete_sessions(tx, writes, &active).await?;
            transaction.commit().await?;
            return Ok(plan.commit_active());
        }
    }

    /// Runs `statement` over `rows`, a chunk of them a statement, with the parameters `more`
    /// adds after each chunk's rows (`identity`: none); returns the session ids it returns
    /// (one per inserted row for the inserts, none for the others).
    async fn run_chunks<R: WriteRow>(
        &self,
        tx: &mut DB::Connection,
        statement: &Batched,
        rows: &[R],
        more: impl Fn(Params<DB>) -> Params<DB>,
    ) -> Result<Vec<Uuid>, StorageError> {
        let mut returned = Vec::new();
        for chunk in DB::DIALECT.row_chunks(rows) {
            let args = more(Params::new().rows(chunk)).finish()?;
            let ids: Vec<Uuid> = sqlx::query_scalar_with(statement.get(chunk.len()), args)
                .fetch_all(&mut *tx)
                .await?;
            returned.extend(ids);
        }
        Ok(returned)
    }

    /// Inserts the rows of the active writes that create their session; a write whose row is
    /// already there conflicts.
    async fn create_sessions(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        plan: &mut FlushPlan,
    ) -> Result<(), StorageError> {
        let creating: Vec<usize> = plan
            .active()
            .into_iter()
            .filter(|&index| writes[index].create.is_some())
            .collect();
        let rows: Vec<NewSession> = creating
            .iter()
            .filter_map(|&index| NewSession::of(&writes[index]))
            .collect();
        let created: HashSet<Uuid> = self
            .run_chunks(tx, &self.queries.create_sessions, &rows, identity)
            .await?
            .into_iter()
            .collect();
        for index in creating {
            if !created.contains(writes[index].session_id.as_uuid()) {
                plan.conflict(index);
            }
        }
        Ok(())
    }

    /// Reads the stored heads of the active writes' sessions, locking them where the dialect
    /// locks rows (in id order, so that two processes flushing overlapping sessions cannot
    /// deadlock).
    async fn lock_heads(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        plan: &FlushPlan,
        now: i64,
    ) -> Result<HashMap<Uuid, StoredHead>, StorageError> {
        let ids: Vec<Uuid> = plan
            .active()
            .into_iter()
            .map(|index| writes[index].session_id.into())
            .collect();
        let mut heads = Vec::with_capacity(ids.len());
        for chunk in DB::DIALECT.list_chunks(&ids) {
            let args = Params::<DB>::new()
                .add(self.ownership.owner)
                .now(now)
                .list(chunk)
                .finish()?;
            let found: Vec<StoredHead> =
                sqlx::query_as_with(self.queries.heads.get(chunk.len()), args)
                    .fetch_all(&mut *tx)
                    .await?;
            heads.extend(found);
        }
        Ok(by_session(heads))
    }

    /// Stores the idempotency records of the active writes, after deleting their sessions'
    /// expired ones; returns the session of each record that went in (a key already stored
    /// does not).
    async fn insert_keys(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        active: &[usize],
    ) -> Result<Vec<Uuid>, StorageError> {
        let keyed: Vec<&SessionWrite> = active
            .iter()
            .map(|&index| &writes[index])
            .filter(|write| !write.keys.is_empty())
            .collect();
        let expired: Vec<ExpiredKeys> = keyed.iter().map(|write| ExpiredKeys(write)).collect();
        let queries = &self.queries;
        self.run_chunks(tx, &queries.delete_expired_keys, &expired, identity)
            .await?;
        let records: Vec<KeyInsert> = keyed
            .iter()
            .flat_map(|write| write.keys.iter().map(|key| KeyInsert { write, key }))
            .collect();
        self.run_chunks(tx, &queries.insert_keys, &records, identity)
            .await
    }

    /// Appends the active writes' chunks to their drafts, and finishes their finished drafts
    /// (the whole text into the message row, the chunks deleted).
    async fn write_drafts(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        active: &[usize],
    ) -> Result<(), StorageError> {
        let chunks: Vec<ChunkInsert> = active
            .iter()
            .flat_map(|&index| ChunkInsert::of(&writes[index]))
            .collect();
        let queries = &self.queries;
        self.run_chunks(tx, &queries.insert_chunks, &chunks, identity)
            .await?;
        let finishes: Vec<FinishUpdate> = active
            .iter()
            .flat_map(|&index| FinishUpdate::of(&writes[index]))
            .collect();
        self.run_chunks(tx, &queries.finish_messages, &finishes, identity)
            .await?;
        self.run_chunks(tx, &queries.delete_finished_chunks, &finishes, identity)
            .await?;
        Ok(())
    }

    /// Applies the active writes to their sessions (taking them over and renewing the lease).
    async fn update_sessions(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        active: &[usize],
        now: i64,
    ) -> Result<(), StorageError> {
        let changes: Vec<SessionChange> = active
            .iter()
            .map(|&index| SessionChange(&writes[index]))
            .collect();
        let Ownership {
            owner,
            lease_micros,
        } = self.ownership;
        self.run_chunks(tx, &self.queries.update_sessions, &changes, |params| {
            params.add(owner).now(now).add(lease_micros)
        })
        .await?;
        Ok(())
    }

    /// Deletes the messages and draft chunks of the sessions the active writes delete, and the
    /// idempotency records of those they erase. The last statements of the transaction: a
    /// delete staged behind a delta in the same batch would otherwise leave the delta's chunk,
    /// written after it.
    async fn delete_sessions(
        &self,
        tx: &mut DB::Connection,
        writes: &[SessionWrite],
        active: &[usize],
    ) -> Result<(), StorageError> {
        let deleted: Vec<Uuid> = active
            .iter()
            .map(|&index| &writes[index])
            .filter(|write| write.delete)
            .map(|write| write.session_id.into())
            .collect();
        for chunk in DB::DIALECT.list_chunks(&deleted) {
            let args = Params::<DB>::new().list(chunk).finish()?;
            sqlx::query_with(self.queries.delete_messages.get(chunk.len()), args)
                .execute(&mut *tx)
                .await?;
            let args = Params::<DB>::new().list(chunk).finish()?;
            sqlx::query_with(self.queries.delete_chunks.get(chunk.len()), args)
                .execute(&mut *tx)
                .await?;
        }
        let erased: Vec<Uuid> = active
            .iter()
            .map(|&index| &writes[index])
            .filter(|write| write.erase)
            .map(|write| write.session_id.into())
            .collect();
        for chunk in DB::DIALECT.list_chunks(&erased) {
            let args = Params::<DB>::new().list(chunk).finish()?;
            sqlx::query_with(self.queries.delete_session_keys.get(chunk.len()), args)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// How many rows went in per session, from the sessions the inserts returned.
fn count_by_session(returned: Vec<Uuid>) -> HashMap<Uuid, usize> {
    let mut counts = HashMap::new();
    for session_id in returned {
        *counts.entry(session_id).or_default() += 1;
    }
    counts
}
