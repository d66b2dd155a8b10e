//! Abandoned drafts: nothing stays in progress forever. The process that holds a session
//! notes each draft it starts, grows or loads; a draft with no delta for
//! [`EngineConfig::draft_timeout`](crate::EngineConfig::draft_timeout) is finished
//! `incomplete` through the engine, like a client's finish, so the finish is routed, ordered
//! and durable as any other. A draft found in progress when its session is activated (its
//! process died, or handed the session over) starts its timeout then: deltas that keep coming
//! (through any process) keep it streaming, and a stream that died ends within the timeout.
//! Drafts of sessions that nobody activates again are found too: every process looks, now and
//! then, for drafts in progress in sessions nobody wrote for longer than their lease and the
//! draft timeout (a live owner finishes such a draft itself), and adopts them, so that a
//! process that stopped mid-reply leaves no draft in progress (with its chunks) for longer than
//! the lease, twice the timeout and the look's period.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::command::FinishMessage;
use crate::engine::{Engine, Inner};
use crate::error::Error;
use crate::model::{MessageStatus, SessionId};

/// The drafts in progress this process holds: one per session at most.
#[derive(Debug, Default)]
pub(crate) struct Drafts {
    open: DashMap<SessionId, Open>,
    /// Woken when a draft is noted, so that the sweeper sleeps while there is none.
    noted: tokio::sync::Notify,
}

#[derive(Debug)]
struct Open {
    message_id: Uuid,
    user_id: String,
    /// When the draft last grew (or was started, or found).
    last: Instant,
}

impl Drafts {
    /// Draft `message_id` of `user_id`'s session started or grew just now.
    pub fn touch(&self, session: SessionId, message_id: Uuid, user_id: &str) {
        let new = self
            .open
            .insert(
                session,
                Open {
                    message_id,
                    user_id: user_id.to_owned(),
                    last: Instant::now(),
                },
            )
            .is_none();
        if new {
            self.noted.notify_one();
        }
    }

    /// Draft `message_id` was found in progress as its session loaded: its timeout starts now,
    /// unless this process knows it already.
    pub fn adopt(&self, session: SessionId, message_id: Uuid, user_id: &str) {
        let known = self
            .open
            .get(&session)
            .is_some_and(|open| open.message_id == message_id);
        if !known {
            self.touch(session, message_id, user_id);
        }
    }

    /// Draft `message_id` ended (or its session is gone).
    pub fn forget(&self, session: SessionId, message_id: Option<Uuid>) {
        self.open.remove_if(&session, |_, open| {
            message_id.is_none_or(|message_id| open.message_id == message_id)
        });
    }

    /// The drafts with no delta for `timeout`: `(session, message, user)`.
    fn expired(&self, timeout: Duration) -> Vec<(SessionId, Uuid, String)> {
        self.open
            .iter()
            .filter(|open| open.last.elapsed() >= timeout)
            .map(|open| (*open.key(), open.message_id, open.user_id.clone()))
            .collect()
    }
}

/// Drafts one look for orphans adopts at most; the next look takes the rest.
const ORPHANS_PER_LOOK: i64 = 1000;

/// Adopts the drafts in progress in sessions that nobody wrote for longer than their lease
/// and the draft timeout (their process stopped, or handed them over and nobody came back: a
/// live owner would have finished such a draft itself), so that [`finish_abandoned`] ends them
/// here after their timeout. Looks at once, then every `period`, until `stop`.
pub(crate) async fn adopt_orphans(
    store: crate::store::Store,
    drafts: Arc<Drafts>,
    timeout: Duration,
    period: Duration,
    stop: CancellationToken,
) {
    let silent_for = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX / 4);
    loop {
        match store.orphaned_drafts(silent_for, ORPHANS_PER_LOOK).await {
            Ok(orphans) => {
                if !orphans.is_empty() {
                    debug!(count = orphans.len(), "adopted drafts no process holds");
                }
                for (session, message_id, user_id) in orphans {
                    drafts.adopt(session, message_id, &user_id);
                }
            }
            Err(error) => warn!(%error, "could not look for orphaned drafts; looking again later"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// Finishes the drafts with no delta for `timeout` as `incomplete`, checking every quarter of
/// it (at most every second), until `stop`.
pub(crate) async fn finish_abandoned(
    engine: Weak<Inner>,
    drafts: Arc<Drafts>,
    timeout: Duration,
    stop: CancellationToken,
) {
    let period = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        // No timer while no draft is open.
        let idle = drafts.open.is_empty();
        tokio::select! {
            () = stop.cancelled() => return,
            () = drafts.noted.notified(), if idle => continue,
            () = tokio::time::sleep(period), if !idle => {}
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let engine = Engine { inner };
        for (session, message_id, user_id) in drafts.expired(timeout) {
            let finish = FinishMessage {
                user_id,
                session_id: session,
                message_id,
                status: MessageStatus::Incomplete,
                tool_calls: None,
                refusal: None,
                usage: None,
            };
            match engine.finish_message(finish).await {
                Ok(_) => debug!(%session, %message_id, "finished an abandoned draft as incomplete"),
                // Finished meanwhile, or gone: nothing left to do.
                Err(
                    Error::FinishConflict { .. }
                    | Error::MessageNotFound
                    | Error::NotFound
                    | Error::Forbidden,
                ) => {}
                Err(error) => {
                    warn!(%session, %message_id, %error, "could not finish an abandoned draft; retrying");
                    continue;
                }
            }
            drafts.forget(session, Some(message_id));
        }
    }
}
