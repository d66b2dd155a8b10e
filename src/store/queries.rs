//! Every statement of the shared store code, written once and rendered for a dialect when a
//! store connects. A statement's parameters are bound in the order its `?` stand in the text.
//!
//! The texts never vary per call: a statement that carries rows or a list has one text per
//! chunk size with `VALUES` (powers of two) and a single one with arrays, so that each stays
//! prepared in the connections' statement caches.

use sqlx::SqlStr;

use super::dialect::{Batched, Dialect};
use super::rows::{
    ChunkInsert, ExpiredKeys, FinishUpdate, KeyInsert, MessageRow, NewSession, SESSION_COLUMNS,
    SessionChange, WriteRow, key_columns, message_columns, names,
};

/// The rendered statements of one store.
#[derive(Debug)]
pub(crate) struct Queries {
    /// A session's row. Binds: id.
    pub session: SqlStr,
    /// A session's newest messages. Binds: id, first sequence.
    pub tail: SqlStr,
    /// The messages before a sequence that make or answer tool calls. Binds: id, sequence.
    pub older_tool_messages: SqlStr,
    /// The sequence of a session's oldest draft in progress before a sequence (no row if
    /// none). Binds: id, before this sequence.
    pub oldest_draft: SqlStr,
    /// A page of a session's messages. Binds: id, after this sequence, up to this one.
    pub read_messages: SqlStr,
    /// A page of a user's sessions (not deleted, not expired), newest first. Binds: user, now,
    /// cursor time, cursor id, limit.
    pub list_sessions: SqlStr,
    /// Sessions expired by a time, after a cursor, soonest first. Binds: now, cursor time,
    /// cursor id, limit.
    pub expired_sessions: SqlStr,
    /// A user's sessions not erased yet, after a cursor, by id. Binds: user, cursor id, limit.
    pub unerased_sessions: SqlStr,
    /// How many sessions a user has that are not deleted, counting up to a bound. Binds:
    /// user, bound.
    pub count_user_sessions: SqlStr,
    /// Drafts in progress in live sessions whose last write's lease ran out a while ago.
    /// Binds: now, how long ago (microseconds), now, limit.
    pub orphaned_drafts: SqlStr,
    /// A session's stored version. Binds: id.
    pub version: SqlStr,
    /// A session's head, once no write holds its row. Binds: owner, id.
    pub settled_head: SqlStr,
    /// Registers a member or renews its heartbeat. Binds: id, address, now, now.
    pub join_member: SqlStr,
    /// Removes a member. Binds: id.
    pub leave_member: SqlStr,
    /// The members whose heartbeat is recent. Binds: now, lease.
    pub live_members: SqlStr,
    /// Writes a cluster setting unless it is set. Binds: name, value.
    pub init_setting: SqlStr,
    /// A cluster setting. Binds: name.
    pub setting: SqlStr,
    /// Deletes some expired idempotency records. Binds: cutoff, limit.
    pub purge_keys: SqlStr,
    /// Sequences of the stored ones of some message ids. Binds: session id, list.
    pub stored_ids: Batched,
    /// The stored ones of some message ids. Binds: session id, list.
    pub stored_messages: Batched,
    /// The live idempotency records of some keys. Binds: session id, since, list.
    pub key_records: Batched,
    /// Creates session rows, returning the ids it created. Binds: rows.
    pub create_sessions: Batched,
    /// Reads (and locks) the heads a flush writes. Binds: owner, now, list.
    pub heads: Batched,
    /// Inserts messages, returning the session of each inserted one. Binds: rows.
    pub insert_messages: Batched,
    /// Deletes sessions' expired idempotency records. Binds: rows.
    pub delete_expired_keys: Batched,
    /// Inserts idempotency records, returning the session of each inserted one. Binds: rows.
    pub insert_keys: Batched,
    /// Applies flushes' changes to their sessions. Binds: rows, owner, now, lease.
    pub update_sessions: Batched,
    /// Deletes the messages of deleted sessions. Binds: list.
    pub delete_messages: Batched,
    /// The chunks of a session's drafts in a range of sequences, in order. Binds: id, first
    /// sequence, last sequence.
    pub chunks: SqlStr,
    /// Inserts drafts' chunks. Binds: rows.
    pub insert_chunks: Batched,
    /// Finishes drafts: status, whole content, tool calls, refusal. Binds: rows.
    pub finish_messages: Batched,
    /// Deletes the chunks of finished drafts. Binds: rows (of `finish_messages`).
    pub delete_finished_chunks: Batched,
    /// Deletes the chunks of deleted sessions. Binds: list.
    pub delete_chunks: Batched,
    /// Deletes the idempotency records of erased sessions. Binds: list.
    pub delete_session_keys: Batched,
}

impl Queries {
    /// Renders every statement for `dialect`.
    pub fn new(dialect: &Dialect) -> Self {
        let d = dialect;
        let messages = message_columns();
        Self {
            session: d.render(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"
            )),
            // Sequences are contiguous, so the tail is a key range: a plan can only read it
            // through the primary key, however little the planner knows about the table.
            tail: d.render(&format!(
                "SELECT {messages} FROM messages WHERE session_id = ? AND seq >= ? ORDER BY seq"
            )),
            older_tool_messages: d.render(
                "SELECT seq, role, tool_calls, tool_call_id FROM messages \
                 WHERE session_id = ? AND seq < ? \
                 AND (tool_calls IS NOT NULL OR tool_call_id IS NOT NULL) ORDER BY seq",
            ),
            oldest_draft: d.render(
                "SELECT seq FROM messages \
                 WHERE session_id = ? AND seq < ? AND status = 'in_progress' \
                 ORDER BY seq LIMIT 1",
            ),
            // Contiguous sequences: a page is exactly a key range too.
            read_messages: d.render(&format!(
                "SELECT {messages} FROM messages \
                 WHERE session_id = ? AND seq > ? AND seq <= ? ORDER BY seq"
            )),
            list_sessions: d.render(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions \
                 WHERE user_id = ? AND deleted_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > ?) AND (created_at, id) < (?, ?) \
                 ORDER BY created_at DESC, id DESC LIMIT ?"
            )),
            expired_sessions: d.render(
                "SELECT id, user_id, expires_at FROM sessions \
                 WHERE expires_at <= ? AND (expires_at, id) > (?, ?) \
                 ORDER BY expires_at, id LIMIT ?",
            ),
            unerased_sessions: d.render(
                "SELECT id FROM sessions WHERE user_id = ? AND erased_at IS NULL AND id > ? \
                 ORDER BY id LIMIT ?",
            ),
            orphaned_drafts: d.render(&format!(
                "SELECT m.session_id, m.message_id, s.user_id FROM messages m \
                 JOIN sessions s ON s.id = m.session_id \
                 WHERE m.status = 'in_progress' AND s.deleted_at IS NULL \
                 AND (s.lease_until IS NULL OR s.lease_until < {now} - ?) \
                 AND (s.expires_at IS NULL OR s.expires_at > {now}) \
                 ORDER BY s.lease_until LIMIT ?",
                now = d.now()
            )),
            count_user_sessions: d.render(
                "SELECT COUNT(*) FROM (SELECT 1 FROM sessions \
                 WHERE user_id = ? AND deleted_at IS NULL LIMIT ?) counted",
            ),
            version: d.render("SELECT version FROM sessions WHERE id = ?"),
            settled_head: d.render(&format!(
                "SELECT version, COALESCE(owner = ?, false), epoch FROM sessions WHERE id = ?{}",
                d.lock
            )),
            join_member: d.render(&format!(
                "INSERT INTO members (id, address, started_at, heartbeat_at) VALUES (?, ?, {now}, {now}) \
                 ON CONFLICT (id) DO UPDATE SET address = excluded.address, \
                 heartbeat_at = excluded.heartbeat_at",
                now = d.now()
            )),
            leave_member: d.render("DELETE FROM members WHERE id = ?"),
            live_members: d.render(&format!(
                "SELECT id, address, started_at, heartbeat_at FROM members \
                 WHERE heartbeat_at > {} - ? ORDER BY id",
                d.now()
            )),
            init_setting: d.render(
                "INSERT INTO cluster_settings (name, value) VALUES (?, ?) \
                 ON CONFLICT (name) DO NOTHING",
            ),
            setting: d.render("SELECT value FROM cluster_settings WHERE name = ?"),
            purge_keys: d.render(&format!(
                "DELETE FROM idempotency_keys WHERE {address} IN \
                 (SELECT {address} FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
                address = d.row_address
            )),
            stored_ids: d.render_batched(|count| {
                format!(
                    "SELECT message_id, seq FROM messages WHERE session_id = ? AND message_id {}",
                    d.in_list(count)
                )
            }),
            stored_messages: d.render_batched(|count| {
                format!(
                    "SELECT {messages} FROM messages WHERE session_id = ? AND message_id {}",
                    d.in_list(count)
                )
            }),
            key_records: d.render_batched(|count| {
                format!(
                    "SELECT {} FROM idempotency_keys \
                     WHERE session_id = ? AND created_at >= ? AND key {}",
                    key_columns(),
                    d.in_list(count)
                )
            }),
            create_sessions: d.render_batched(|count| {
                format!(
                    "{} ON CONFLICT (id) DO NOTHING RETURNING id",
                    insert::<NewSession>(d, "sessions", count)
                )
            }),
            heads: d.render_batched(|count| heads(d, count)),
            insert_messages: d.render_batched(|count| {
                format!(
                    "{} ON CONFLICT DO NOTHING RETURNING session_id",
                    insert::<MessageRow>(d, "messages", count)
                )
            }),
            // A join, so that both planners find each session's records through the primary
            // key's prefix and delete them by the primary key.
            delete_expired_keys: d.render_batched(|count| {
                format!(
                    "WITH {} DELETE FROM idempotency_keys WHERE (session_id, key) IN \
                     (SELECT k.session_id, k.key FROM e JOIN idempotency_keys k \
                      ON k.session_id = e.session_id AND k.created_at < e.cutoff)",
                    d.table("e", ExpiredKeys::COLUMNS, count)
                )
            }),
            insert_keys: d.render_batched(|count| {
                format!(
                    "{} ON CONFLICT DO NOTHING RETURNING session_id",
                    insert::<KeyInsert>(d, "idempotency_keys", count)
                )
            }),
            update_sessions: d.render_batched(|count| {
                format!(
                    "WITH {} UPDATE sessions SET {} FROM u WHERE sessions.id = u.id",
                    d.table("u", SessionChange::COLUMNS, count),
                    session_update(d)
                )
            }),
            delete_messages: d.render_batched(|count| {
                format!("DELETE FROM messages WHERE session_id {}", d.in_list(count))
            }),
            chunks: d.render(
                "SELECT seq, byte_offset, content FROM message_chunks \
                 WHERE session_id = ? AND seq >= ? AND seq <= ? ORDER BY seq, byte_offset",
            ),
            insert_chunks: d.render_batched(|count| {
                format!(
                    "{} ON CONFLICT DO NOTHING",
                    insert::<ChunkInsert>(d, "message_chunks", count)
                )
            }),
            finish_messages: d.render_batched(|count| {
                format!(
                    "WITH {} UPDATE messages SET status = f.status, content = f.content, \
                     tool_calls = COALESCE(f.tool_calls, messages.tool_calls), \
                     refusal = COALESCE(f.refusal, messages.refusal) \
                     FROM f WHERE messages.session_id = f.session_id AND messages.seq = f.seq",
                    d.table("f", FinishUpdate::COLUMNS, count)
                )
            }),
            delete_finished_chunks: d.render_batched(|count| {
                format!(
                    "WITH {} DELETE FROM message_chunks WHERE (session_id, seq) IN \
                     (SELECT session_id, seq FROM f)",
                    d.table("f", FinishUpdate::COLUMNS, count)
                )
            }),
            delete_session_keys: d.render_batched(|count| {
                format!(
                    "DELETE FROM idempotency_keys WHERE session_id {}",
                    d.in_list(count)
                )
            }),
            delete_chunks: d.render_batched(|count| {
                format!(
                    "DELETE FROM message_chunks WHERE session_id {}",
                    d.in_list(count)
                )
            }),
        }
    }
}

/// `INSERT INTO table (columns) <rows>` for `count` rows of `R`.
fn insert<R: WriteRow>(d: &Dialect, table: &str, count: usize) -> String {
    format!(
        "INSERT INTO {table} ({}) {}",
        names(R::COLUMNS),
        d.rows(R::COLUMNS, count)
    )
}

/// The heads of `count` sessions a flush writes, as [`StoredHead`](super::flush::StoredHead)
/// reads them, locked until the commit. Binds: owner, now, list.
pub(crate) fn heads(d: &Dialect, count: usize) -> String {
    format!(
        "SELECT id, version, deleted_at IS NOT NULL AS deleted, epoch, \
                COALESCE(owner <> ? AND lease_until > {now}, false) AS leased_elsewhere \
         FROM sessions WHERE id {list}{lock}",
        now = d.now(),
        list = d.in_list(count),
        lock = d.lock
    )
}

/// The assignments that apply a [`SessionChange`] named `u` to its session, making this
/// process its owner (and bumping the epoch if the write claims it) and renewing the lease.
/// An erase clears the content a delete keeps; `u.ttl` is -1 to keep the time to live, 0 for
/// none, else seconds; every write pushes the expiry back (a NULL time to live makes it NULL).
/// Binds: owner, now, lease.
pub(crate) fn session_update(d: &Dialect) -> String {
    let ttl = "(CASE WHEN u.ttl < 0 THEN sessions.ttl_seconds WHEN u.ttl = 0 THEN NULL \
               ELSE u.ttl END)";
    format!(
        "owner = ?, lease_until = {now} + ?, epoch = sessions.epoch + u.claim, \
         version = sessions.version + u.steps, updated_at = u.at, \
         title = CASE WHEN u.erase THEN NULL ELSE COALESCE(u.title, sessions.title) END, \
         metadata = CASE WHEN u.erase THEN '{{}}' ELSE COALESCE(u.metadata, sessions.metadata) END, \
         prompt_tokens = CASE WHEN u.erase THEN 0 ELSE sessions.prompt_tokens + u.prompt END, \
         completion_tokens = \
             CASE WHEN u.erase THEN 0 ELSE sessions.completion_tokens + u.completion END, \
         message_count = sessions.message_count + u.added, \
         deleted_at = CASE WHEN u.del THEN COALESCE(sessions.deleted_at, u.at) \
                      ELSE sessions.deleted_at END, \
         erased_at = CASE WHEN u.erase THEN COALESCE(sessions.erased_at, u.at) \
                     ELSE sessions.erased_at END, \
         ttl_seconds = {ttl}, \
         expires_at = CASE WHEN u.del THEN NULL ELSE u.at + {ttl} * 1000000 END",
        now = d.now(),
    )
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use sqlx::Sqlite;

    use super::Queries;
    use crate::store::backend::Backend;
    use crate::store::dialect::statement_chunks;
    use crate::store::rows::{MessageRow, WriteRow};

    fn placeholders(sql: sqlx::SqlStr) -> usize {
        sql.as_str().matches('?').count()
    }

    #[test]
    fn each_chunk_gets_the_text_rendered_for_its_size() {
        let queries = Queries::new(&Sqlite::DIALECT);
        for chunk in statement_chunks(&[0; 509], 256) {
            let columns = MessageRow::COLUMNS.len();
            let text = queries.insert_messages.get(chunk.len());
            assert_eq!(placeholders(text), chunk.len() * columns);
        }
        // Lists are padded up to the next power of two.
        for count in [1, 2, 3, 5, 100, 255, 256] {
            let text = queries.delete_messages.get(count);
            assert_eq!(placeholders(text), count.next_power_of_two());
        }
    }
}
