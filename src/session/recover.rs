//! Writing a staged batch, and what to do when that fails: settle a write whose outcome was
//! lost, reload and restage after a conflict or a fence, give up after bounded attempts.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{debug, warn};
use uuid::Uuid;

use super::SessionActor;
use super::protocol::Write;
use super::stage::{StageRules, Staged, stage};
use super::state::SessionState;
use crate::backoff::Backoff;
use crate::error::{Error, Result, StorageError};
use crate::idempotency::KeyRecord;
use crate::model::{Message, MessageStatus, NewMessage, Role, now_micros};
use crate::store::{FlushOutcome, SessionWrite};

/// Why an attempt to write a staged batch did not commit.
enum Retry {
    /// Refused by the database: another writer changed the session, or another process took
    /// it over (fenced). Nothing landed; reload and restage.
    Conflict,
    /// The write failed and the database shows it did not commit: restage and write again.
    NotCommitted(StorageError),
    /// Nothing more to try: the write's outcome is unknown, or the database cannot be read.
    GiveUp(Error),
}

/// What a write put in the database, kept to settle a flush whose outcome was lost.
struct WrittenRows {
    expected_version: i64,
    /// How far the write moves the version.
    steps: i64,
    /// The epoch the session has once this write committed (and the owner is this process).
    held_epoch: i64,
    creates: bool,
    delete: bool,
    /// `(message id, staged seq)` of every new row.
    rows: Vec<(Uuid, i64)>,
}

impl WrittenRows {
    fn of(write: &SessionWrite) -> Self {
        Self {
            expected_version: write.expected_version,
            steps: write.steps,
            held_epoch: held_epoch(write),
            creates: write.create.is_some(),
            delete: write.delete,
            rows: write.rows.iter().map(|row| (row.id, row.seq)).collect(),
        }
    }
}

/// The epoch the session has once `write` committed.
fn held_epoch(write: &SessionWrite) -> i64 {
    write.epoch + i64::from(write.claim)
}

/// What the database says about a flush whose outcome was lost.
enum Settled {
    Committed(i64),
    NotCommitted,
    Unknown,
}

impl SessionActor {
    /// Stages the batch's writes and writes them in one go, restaging after a conflict or a
    /// write that did not commit, at most `max_conflict_retries` times. `Ok` once committed
    /// (or when there was nothing to write); otherwise the error every write not refused by
    /// staging is answered with. The state is then dropped, to be reloaded by the next batch,
    /// and the callers retry with the same ids.
    pub(super) async fn write(&mut self, writes: &mut [Write]) -> Result<()> {
        let mut known = self.uncached_messages(writes).await.map_err(|error| {
            self.state = None;
            Error::Storage(error)
        })?;
        let mut attempt = 0;
        loop {
            let retry = match self.write_once(writes, &known).await {
                Ok(()) => return Ok(()),
                Err(retry) => retry,
            };
            attempt += 1;
            let conflict = matches!(retry, Retry::Conflict);
            let error = match retry {
                Retry::GiveUp(error) => Some(error),
                _ if attempt <= self.shared.config.max_conflict_retries => None,
                Retry::NotCommitted(error) => Some(Error::Storage(error)),
                Retry::Conflict => Some(Error::Conflict(format!(
                    "the session kept changing under {attempt} attempts to write it"
                ))),
            };
            if let Some(error) = error {
                self.state = None;
                return Err(error);
            }
            Backoff::WRITE.sleep(attempt).await;
            if conflict {
                self.shared.stats.record_conflict_retry();
                debug!(session_id = %self.id, attempt, "conflict; reloading and restaging");
                known = self.reload_for_conflict(writes).await.map_err(|error| {
                    self.state = None;
                    Error::Storage(error)
                })?;
            }
        }
    }

    /// One attempt: look up the batch's idempotency keys, stage, write, and apply what
    /// committed.
    async fn write_once(
        &mut self,
        writes: &mut [Write],
        known: &HashMap<Uuid, Arc<Message>>,
    ) -> Result<(), Retry> {
        self.look_up_keys(writes)
            .await
            .map_err(|error| Retry::GiveUp(Error::Storage(error)))?;
        let config = &self.shared.config;
        let rules = StageRules {
            hide_foreign: config.hide_foreign_sessions,
            key_retention: i64::try_from(config.idempotency_retention.as_micros())
                .unwrap_or(i64::MAX),
            max_content_bytes: config.limits.max_content_bytes,
            default_ttl: config
                .default_session_ttl
                .map(|ttl| i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        };
        let now = now_micros();
        let staged = stage(self.id, self.state.as_ref(), writes, known, rules, now);
        if staged.write.is_empty() {
            return Ok(());
        }
        let Staged {
            write,
            info,
            deleted,
            messages,
            updated,
            calls,
        } = staged;
        let written = WrittenRows::of(&write);
        let records: Vec<(String, Option<KeyRecord>)> = write
            .keys
            .iter()
            .map(|row| {
                let record = KeyRecord {
                    user_id: row.user_id.clone(),
                    fingerprint: row.fingerprint.clone(),
                    response: row.response.clone(),
                    created_at: write.now,
                };
                (row.key.clone(), Some(record))
            })
            .collect();
        let version = match self.shared.writer.write(write).await {
            Ok(FlushOutcome::Committed { version, .. }) => version,
            Ok(FlushOutcome::Conflict) => return Err(Retry::Conflict),
            // Fenced: another process took the session over, so this copy may not be written
            // again. Nothing of the batch landed; like a conflict, reload the session from the
            // database (which gives up the stale epoch), restage the same commands on what is
            // stored and take the session back with the next write.
            Ok(FlushOutcome::Fenced) => {
                debug!(session_id = %self.id, "fenced: another process took the session over");
                return Err(Retry::Conflict);
            }
            // The database refused a statement of this write (the writer has flushed it alone,
            // apart from the sessions it was batched with): nothing of it committed, and the
            // same write would be refused again.
            Err(error) if self.shared.store.is_refused(&error) => {
                // Its cause is for the operator's log; the client learns that retrying the
                // same command will not help.
                warn!(session_id = %self.id, %error, "the database refused a write");
                return Err(Retry::GiveUp(Error::invalid(
                    "command",
                    "the database refused what the command stores (a value it cannot hold, \
                     or a rule of its own); retrying it cannot succeed",
                )));
            }
            // The connection failed around the commit: ask the database what happened instead
            // of guessing.
            Err(error) => match self.settle_unknown_outcome(&written).await {
                Settled::Committed(version) => version,
                Settled::NotCommitted => {
                    debug!(session_id = %self.id, %error, "flush failed before committing; retrying");
                    return Err(Retry::NotCommitted(error));
                }
                Settled::Unknown => return Err(Retry::GiveUp(Error::Storage(error))),
            },
        };
        if let Some(state) = self.state.as_mut() {
            state.epoch = written.held_epoch;
            state.owned = true;
            state.remember_keys(records.into_iter());
            state.calls.extend(calls);
        }
        self.apply(info, deleted, messages, updated, version);
        Ok(())
    }

    /// After a flush failed without saying whether it committed: reads the session's stored
    /// version and the batch's message ids. Committed if the version moved by exactly this
    /// write and every row is stored at its staged sequence; not committed if nothing moved.
    /// Anything else (another writer meanwhile, or the database unreachable) stays unknown.
    async fn settle_unknown_outcome(&self, written: &WrittenRows) -> Settled {
        let store = &self.shared.store;
        let Ok(head) = store.settled_head(self.id).await else {
            return Settled::Unknown;
        };
        let ids: Vec<Uuid> = written.rows.iter().map(|&(id, _)| id).collect();
        let Ok(stored) = store.stored_ids(self.id, &ids).await else {
            return Settled::Unknown;
        };
        let all_stored = written
            .rows
            .iter()
            .all(|(id, seq)| stored.get(id) == Some(seq));
        let expected = written.expected_version;
        let settled = match head {
            // Only this write leaves exactly this: the next version, owned by this process at
            // the epoch the write checked (or claimed). Another process's write at that version
            // would carry its own owner and a new epoch, and this process writes the session
            // from one actor at a time, so the version and epoch pin the write down even when
            // it carries no message rows to look up.
            Some((version, true, epoch))
                if version == expected + written.steps
                    && epoch == written.held_epoch
                    && all_stored
                    && !written.delete =>
            {
                Settled::Committed(version)
            }
            Some((version, _, _))
                if version == expected && stored.is_empty() && !written.creates =>
            {
                Settled::NotCommitted
            }
            None if written.creates && stored.is_empty() => Settled::NotCommitted,
            _ => return Settled::Unknown,
        };
        self.shared.stats.record_settled_outcome();
        settled
    }

    /// Makes sure the state knows, for every idempotency key of the batch, whether a record of
    /// it is stored (and not expired).
    async fn look_up_keys(&mut self, writes: &[Write]) -> Result<(), StorageError> {
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let mut unknown: Vec<String> = writes
            .iter()
            .filter_map(Write::keyed)
            .map(|keyed| &keyed.key)
            .filter(|key| state.key(key).is_none())
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let retention = self.shared.config.idempotency_retention;
        let since =
            now_micros().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let mut found = self
            .shared
            .store
            .key_records(self.id, &unknown, since)
            .await?;
        let records: Vec<_> = unknown
            .into_iter()
            .map(|key| {
                let record = found.remove(&key);
                (key, record)
            })
            .collect();
        state.remember_keys(records.into_iter());
        Ok(())
    }

    /// After a conflict: reload the session and look up which of the batch's message ids are
    /// already stored, as stored.
    /// The messages, as stored, that the batch's commands name by id where the tail does not
    /// hold them and staging would otherwise answer before the database has a say:
    /// - deltas and finishes (a finish sent again long after, a delta to a message finished
    ///   long ago, get the answer they would get from the tail);
    /// - appended messages that staging would refuse as new (a draft while another is in
    ///   progress, a tool result whose call is answered or unknown) but that may be resends of
    ///   messages stored long ago, which answer their sequences.
    ///
    /// No read unless a command names such a message: new messages are otherwise told from
    /// resends by the database's unique constraints, and drafts in progress are always cached.
    async fn uncached_messages(
        &self,
        writes: &[Write],
    ) -> Result<HashMap<Uuid, Arc<Message>>, StorageError> {
        let Some(state) = self.state.as_ref().filter(|state| !state.partial) else {
            return Ok(HashMap::new());
        };
        let ids = uncached_ids(state, writes);
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let stored = self.shared.store.stored_messages(self.id, &ids).await?;
        Ok(stored
            .into_iter()
            .map(|message| (message.id, Arc::new(message)))
            .collect())
    }

    async fn reload_for_conflict(
        &mut self,
        writes: &[Write],
    ) -> Result<HashMap<Uuid, Arc<Message>>, StorageError> {
        self.load(&[], false).await?;
        let named = writes.iter().filter_map(Write::named_message);
        let ids: Vec<Uuid> = writes
            .iter()
            .flat_map(Write::message_ids)
            .chain(named)
            .collect();
        let stored = self.shared.store.stored_messages(self.id, &ids).await?;
        Ok(stored
            .into_iter()
            .map(|message| (message.id, Arc::new(message)))
            .collect())
    }
}

/// The ids [`SessionActor::uncached_messages`] looks up: named by a delta or a finish, or
/// appended in a message staging would refuse as new, and not in the tail.
fn uncached_ids(state: &SessionState, writes: &[Write]) -> Vec<Uuid> {
    // Whether a draft streams: a walk of the tail, so only for a batch that starts one.
    let streaming = std::cell::OnceCell::new();
    let refused_if_new = |message: &&NewMessage| match message.role {
        Role::Tool => message
            .tool_call_id
            .as_deref()
            .and_then(|id| state.calls.get(id))
            .is_none_or(|call| call.answered),
        _ => {
            message.status == Some(MessageStatus::InProgress)
                && *streaming.get_or_init(|| {
                    state
                        .tail
                        .iter()
                        .any(|message| message.status == MessageStatus::InProgress)
                })
        }
    };
    writes
        .iter()
        .flat_map(|write| {
            let appended = match write {
                Write::Append(pending) => pending.command.messages.as_slice(),
                _ => &[],
            };
            let appended = appended
                .iter()
                .filter(refused_if_new)
                .filter_map(|message| message.id);
            let imported = match write {
                Write::Import(pending) if repeats_into(state, &pending.command) => {
                    pending.command.messages.as_slice()
                }
                _ => &[],
            };
            let imported = imported.iter().map(|message| message.id);
            write
                .named_message()
                .into_iter()
                .chain(appended)
                .chain(imported)
        })
        .filter(|id| state.cached(id).is_none())
        .collect()
}

/// Whether `import` may be a repeat into the session: the importer's, live, with at least as
/// many messages. Only then are its messages compared with the stored ones (read by id);
/// otherwise staging answers without them.
fn repeats_into(state: &SessionState, import: &crate::command::ImportSession) -> bool {
    state.info.as_ref().is_some_and(|info| {
        !state.deleted
            && info.user_id == import.user_id
            && info.message_count >= import.messages.len() as i64
    })
}
