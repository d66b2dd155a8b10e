//! What a flush decides about each write, whichever statements found it out: the plan that
//! tracks the writes through the retries of the general flush, and the one function that turns
//! a write and the head stored for its session into an outcome.

use std::collections::HashMap;

use uuid::Uuid;

use super::{FlushOutcome, SessionWrite};

/// What a flush finds stored for a session it writes, read under the row lock.
#[derive(Clone, Copy, Debug, sqlx::FromRow)]
pub(crate) struct StoredHead {
    /// The session.
    pub id: Uuid,
    /// Its stored version.
    pub version: i64,
    /// Whether it is deleted.
    pub deleted: bool,
    /// Its ownership epoch.
    pub epoch: i64,
    /// Another process owns the session and its lease has not run out.
    pub leased_elsewhere: bool,
}

impl StoredHead {
    /// Whether `write` may be applied on this head: the session is still at the version and
    /// the epoch the write was staged against, and not deleted (unless it erases a
    /// tombstone; such a write never takes the single-statement flush). The
    /// single-statement flush on PostgreSQL checks the same in SQL (its `ok` join).
    pub fn admits(&self, write: &SessionWrite) -> bool {
        self.version == write.expected_version
            && self.epoch == write.epoch
            && (!self.deleted || write.erase)
    }
}

/// The heads a flush found under its lock, by session.
pub(crate) fn by_session(heads: impl IntoIterator<Item = StoredHead>) -> HashMap<Uuid, StoredHead> {
    heads.into_iter().map(|head| (head.id, head)).collect()
}

/// The outcome of `write`, given the head stored for its session and whether the write was
/// applied: committed (taking the session over from a live lease, or not), or, if it was not
/// applied, fenced when the session's epoch moved and a conflict otherwise.
pub(crate) fn outcome(
    write: &SessionWrite,
    head: Option<&StoredHead>,
    written: bool,
) -> FlushOutcome {
    match head {
        Some(head) if written => FlushOutcome::Committed {
            version: write.expected_version + write.steps,
            took_over: write.claim && head.leased_elsewhere,
        },
        Some(head) if head.epoch != write.epoch => FlushOutcome::Fenced,
        _ => FlushOutcome::Conflict,
    }
}

/// Tracks, through the retries of one flush, which writes are still in it and what happened to
/// the ones that left.
pub(crate) struct FlushPlan {
    /// `None` while a write is still in the transaction; a committed outcome there is what it
    /// will be if the transaction commits.
    outcomes: Vec<Option<FlushOutcome>>,
    /// The committed outcome each write still in the transaction will have.
    committing: Vec<Option<FlushOutcome>>,
}

impl FlushPlan {
    /// `count` writes, all in the transaction.
    pub fn new(count: usize) -> Self {
        Self {
            outcomes: vec![None; count],
            committing: vec![None; count],
        }
    }

    /// Indexes of the writes still in the transaction.
    pub fn active(&self) -> Vec<usize> {
        (0..self.outcomes.len())
            .filter(|&index| self.outcomes[index].is_none())
            .collect()
    }

    /// Takes a write out of the transaction: something of its session is already stored.
    pub fn conflict(&mut self, index: usize) {
        self.outcomes[index] = Some(FlushOutcome::Conflict);
    }

    /// Checks the locked session rows against what each active write expects, and takes out
    /// the writes they do not admit.
    pub fn check_heads(&mut self, writes: &[SessionWrite], heads: &HashMap<Uuid, StoredHead>) {
        for index in self.active() {
            let write = &writes[index];
            let head = heads.get(write.session_id.as_uuid());
            match outcome(write, head, head.is_some_and(|head| head.admits(write))) {
                committed @ FlushOutcome::Committed { .. } => {
                    self.committing[index] = Some(committed);
                }
                refused => self.outcomes[index] = Some(refused),
            }
        }
    }

    /// After the inserts of message rows and idempotency records (counted per session): the
    /// active writes that did not get all of theirs in, because some message id, sequence or
    /// key of theirs was already stored.
    pub fn short_writes(
        &self,
        writes: &[SessionWrite],
        rows: &HashMap<Uuid, usize>,
        keys: &HashMap<Uuid, usize>,
    ) -> Vec<usize> {
        let count = |inserted: &HashMap<Uuid, usize>, id| inserted.get(id).copied().unwrap_or(0);
        self.active()
            .into_iter()
            .filter(|&index| {
                let write = &writes[index];
                let id = write.session_id.as_uuid();
                count(rows, id) != write.rows.len() || count(keys, id) != write.keys.len()
            })
            .collect()
    }

    /// After the commit (or when no write is left): every write still active committed.
    pub fn commit_active(self) -> Vec<FlushOutcome> {
        self.outcomes
            .into_iter()
            .zip(self.committing)
            .map(|(outcome, committing)| {
                // A write still active has passed `check_heads`, which set its committed
                // outcome; the conflict is only the type's answer to the impossible.
                outcome.or(committing).unwrap_or(FlushOutcome::Conflict)
            })
            .collect()
    }
}
