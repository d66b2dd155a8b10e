//! The correctness check, read straight from the database after a run.
//!
//! Every writer remembers what it was acknowledged: `(session, seq, message id)`. For soloist
//! that is the sequence `append` answered; for (a)–(d) and `limit` it is the sequence of the
//! insert that committed (they never re-send a message after an error, so the committed insert
//! is the ack). Afterwards the check reads every `(session_id, seq, message_id)` row and every
//! session's `message_count`, and counts:
//!
//! - **lost:** acknowledged message ids that are not stored;
//! - **duplicated:** message ids stored more than once;
//! - **misplaced:** acknowledged message ids stored in another session or at another sequence
//!   than the one acknowledged;
//! - **gaps:** sequence numbers missing from `0..n-1` in some session (plus sessions whose
//!   sequences do not start at 0, counted per missing number);
//! - **count drift:** sessions whose `message_count` differs from their number of rows.

use std::collections::HashMap;

use serde::Serialize;
use soloist::uuid::Uuid;

use crate::db::Pool;
use crate::error::LoadError;
use crate::on_pool;

/// One acknowledged message, as its writer saw it.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    /// Index of the session in the run's session list.
    pub session: u32,
    /// The sequence it was acknowledged at.
    pub seq: i64,
    /// Its message id.
    pub id: Uuid,
}

/// What the check found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckResult {
    /// Message rows stored.
    pub rows: u64,
    /// Messages acknowledged to writers.
    pub acked: u64,
    /// Acknowledged but not stored.
    pub lost: u64,
    /// Stored more than once (extra copies).
    pub duplicated: u64,
    /// Acknowledged at one place, stored at another.
    pub misplaced: u64,
    /// Sequence numbers missing from `0..n-1`.
    pub gaps: u64,
    /// Sessions whose `message_count` is not their number of rows.
    pub count_drift: u64,
}

impl CheckResult {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.misplaced == 0
            && self.gaps == 0
            && self.count_drift == 0
    }
}

/// Reads the run's rows and checks them against the acknowledgements.
pub async fn verify(
    pool: &Pool,
    sessions: &[Uuid],
    acked: &[Ack],
) -> Result<CheckResult, LoadError> {
    let rows: Vec<(Uuid, i64, Uuid)> = on_pool!(pool, p => {
        sqlx::query_as("SELECT session_id, seq, message_id FROM messages")
            .fetch_all(p)
            .await?
    });
    let counts: Vec<(Uuid, i64)> = on_pool!(pool, p => {
        sqlx::query_as("SELECT id, message_count FROM sessions")
            .fetch_all(p)
            .await?
    });

    let mut result = CheckResult {
        rows: rows.len() as u64,
        acked: acked.len() as u64,
        ..CheckResult::default()
    };
    let mut stored: HashMap<Uuid, (Uuid, i64)> = HashMap::with_capacity(rows.len());
    let mut per_session: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for &(session, seq, id) in &rows {
        if stored.insert(id, (session, seq)).is_some() {
            result.duplicated += 1;
        }
        per_session.entry(session).or_default().push(seq);
    }
    for seqs in per_session.values_mut() {
        seqs.sort_unstable();
        seqs.dedup();
        let negative = seqs.iter().take_while(|&&seq| seq < 0).count() as i64;
        let highest = seqs.last().copied().unwrap_or(-1);
        let missing = (highest + 1 - (seqs.len() as i64 - negative)).max(0);
        // A negative sequence is out of place too.
        result.gaps += (missing + negative) as u64;
    }
    for (session, message_count) in counts {
        let stored_rows = per_session.get(&session).map_or(0, Vec::len) as i64;
        if stored_rows != message_count {
            result.count_drift += 1;
        }
    }
    for ack in acked {
        let Some(&session) = sessions.get(ack.session as usize) else {
            result.misplaced += 1;
            continue;
        };
        match stored.get(&ack.id) {
            None => result.lost += 1,
            Some(&(stored_session, seq)) if stored_session != session || seq != ack.seq => {
                result.misplaced += 1;
            }
            Some(_) => {}
        }
    }
    Ok(result)
}
