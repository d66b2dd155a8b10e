//! `delete_session`: a session and its messages gone; its id is never reused.

use serde::{Deserialize, Serialize};

use super::{Command, SessionCommand, addressed, keyed_by};
use crate::error::Result;
use crate::idempotency::Keyed;
use crate::model::SessionId;
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, StageWrite};

/// Delete a session and its messages. Later commands on it answer
/// [`Error::NotFound`](crate::Error::NotFound), and its id cannot be reused. Its owner may
/// erase it again ([`Self::erase`]), which answers `Ok` whether or not it was deleted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeleteSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`](crate::Error::PreconditionFailed) and nothing
    /// changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
    /// Erase the content too: the title, metadata, usage and idempotency records, which a
    /// plain delete keeps with the session's tombstone (HTTP `?erase=true`). Erasing a deleted
    /// session erases it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub erase: bool,
    /// Apply only if the session has expired (its time to live has run out since its last
    /// write); otherwise [`Error::PreconditionFailed`](crate::Error::PreconditionFailed). The
    /// engine's purge sends this, so that a write between its finding the session expired
    /// and the erase keeps the session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_if_expired: bool,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`](crate::Error::IdempotencyKeyReused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SessionCommand for DeleteSession {
    type Reply = ();
    const NAME: &'static str = "delete_session";

    addressed!();

    fn keyed(&self) -> Result<Option<Keyed>> {
        keyed_by(self, &self.idempotency_key, |mut delete| {
            delete.idempotency_key = None;
            Command::DeleteSession(delete)
        })
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<()>) -> Request {
        Request::Write(Write::Delete(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for DeleteSession {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<()> {
        // A deleted or expired session is not found, except by its owner's erase: erasing is
        // idempotent, and erases what an earlier delete kept (the purge's erase lands here).
        if self.erase && batch.owned_and_gone(&self.user_id) {
            batch.erase();
            return Ok(());
        }
        let current = batch.session(&self.user_id)?.version;
        batch.precondition(self.if_version)?;
        if self.only_if_expired {
            // Not expired (or it would be gone): written since the purge found it.
            return Err(crate::Error::PreconditionFailed { current });
        }
        if self.erase {
            batch.erase();
        } else {
            batch.delete();
        }
        Ok(())
    }
}
