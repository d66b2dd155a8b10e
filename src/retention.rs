//! Retention and erasure: the purge of expired sessions, and the erasure of everything a user
//! has.
//!
//! Both go through the sessions' actors, one [`DeleteSession`] with `erase` at a time, like any
//! other write: routed to the session's owner, fenced by its version and ownership epoch, so a
//! live actor (here or in another process) never serves what was erased and never writes over
//! it. The purge's erase is conditional (`only_if_expired`): a write that lands between the
//! purge reading the session as expired and its erase pushes the expiry back, and the session
//! stays.

use std::sync::Weak;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::Placement;
use crate::command::DeleteSession;
use crate::engine::{Engine, Inner};
use crate::error::{Error, Result};
use crate::model::{SessionId, now_micros};

/// Sessions read per page by [`Engine::erase_user_sessions`].
const ERASE_PAGE: usize = 100;

/// What [`Engine::erase_user_sessions`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErasedSessions {
    /// Sessions erased by this call.
    pub erased: u64,
    /// Whether sessions are left to erase (call again).
    pub more: bool,
}

/// Erases expired sessions every `interval`, `batch` at a time, until `stop`. In a cluster each
/// process erases the sessions placed on it (the others' are theirs to erase).
pub(crate) async fn purge_expired(
    engine: Weak<Inner>,
    interval: Duration,
    batch: usize,
    stop: CancellationToken,
) {
    let batch = batch.max(1);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(inner) = engine.upgrade() else {
            return;
        };
        let engine = Engine { inner };
        let purged = engine.purge_round(batch, &stop).await;
        if purged > 0 {
            debug!(purged, "expired sessions erased");
        }
    }
}

impl Engine {
    /// One round of the purge: every session expired by now, `batch` read at a time; how many
    /// were erased.
    async fn purge_round(&self, batch: usize, stop: &CancellationToken) -> u64 {
        let now = now_micros();
        let store = &self.inner.shared.store;
        let mut after = None;
        let mut purged = 0;
        loop {
            let expired = match store.expired_sessions(now, after, batch).await {
                Ok(expired) => expired,
                Err(error) => {
                    warn!(%error, "reading expired sessions failed; retrying next round");
                    return purged;
                }
            };
            let full = expired.len() == batch;
            for (session_id, user_id, expires_at) in expired {
                if stop.is_cancelled() {
                    return purged;
                }
                after = Some((expires_at, session_id));
                if !matches!(self.placement(session_id), Placement::Here) {
                    continue;
                }
                if self.purge(session_id, user_id).await {
                    purged += 1;
                    self.inner.shared.stats.record_purged();
                }
            }
            if !full {
                return purged;
            }
            // Let the writes queued meanwhile go first.
            tokio::task::yield_now().await;
        }
    }

    /// Erases one session if it is still expired; whether it did.
    async fn purge(&self, session_id: SessionId, user_id: String) -> bool {
        let erase = DeleteSession {
            user_id,
            session_id,
            erase: true,
            only_if_expired: true,
            ..DeleteSession::default()
        };
        match self.delete_session(erase).await {
            Ok(()) => true,
            // Written since (the expiry moved), or gone meanwhile.
            Err(Error::PreconditionFailed { .. } | Error::NotFound | Error::Forbidden) => false,
            Err(error) => {
                warn!(%session_id, %error, "could not erase an expired session; retrying next round");
                false
            }
        }
    }

    /// Erases the sessions of `user_id`, live or deleted, at most `max` of them: their
    /// messages, title, metadata, usage and idempotency records (each session's row stays as a
    /// tombstone with its id, owner and times, so that the id is never reused). Answers how
    /// many it erased and whether some are left (call again: a bounded call keeps one caller
    /// from holding a request for as long as their history takes to erase). Idempotent: once
    /// nothing is left it answers 0. Sessions the user creates meanwhile may be left; on an
    /// error, some may have been erased (call again).
    pub async fn erase_user_sessions(&self, user_id: &str, max: usize) -> Result<ErasedSessions> {
        crate::command::check_user(user_id, &self.config().limits)?;
        let store = &self.inner.shared.store;
        let mut after = None;
        let mut erased = 0;
        loop {
            let room = max.saturating_sub(erased as usize);
            // One more than there is room for: whether some are left.
            let page = store
                .unerased_sessions(user_id, after, room.min(ERASE_PAGE) + 1)
                .await?;
            let full = page.len() > room.min(ERASE_PAGE);
            for session_id in page.into_iter().take(room.min(ERASE_PAGE)) {
                after = Some(session_id);
                let erase = DeleteSession {
                    user_id: user_id.to_owned(),
                    session_id,
                    erase: true,
                    ..DeleteSession::default()
                };
                self.delete_session(erase).await?;
                erased += 1;
            }
            if !full || erased as usize >= max {
                return Ok(ErasedSessions { erased, more: full });
            }
        }
    }
}
