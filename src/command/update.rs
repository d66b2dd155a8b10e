//! `update_session`: a new title and/or metadata (last writer wins).

use serde::{Deserialize, Serialize};

use super::validate::{check_title_and_metadata, check_ttl, check_user};
use super::{Command, SessionCommand, addressed, keyed_by};
use crate::config::Limits;
use crate::error::Result;
use crate::idempotency::Keyed;
use crate::model::{RawJson, SessionId, SessionInfo};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, StageWrite};

/// Change a session's title and/or metadata (last writer wins).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UpdateSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// New title, when present.
    #[serde(default)]
    pub title: Option<String>,
    /// New metadata object (replaces the old one), when present.
    #[serde(default)]
    pub metadata: Option<RawJson>,
    /// A new time to live in seconds (`0`: never expires), counted from this write, when
    /// present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`](crate::Error::PreconditionFailed) and nothing
    /// changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`](crate::Error::IdempotencyKeyReused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SessionCommand for UpdateSession {
    type Reply = SessionInfo;
    const NAME: &'static str = "update_session";

    addressed!();

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        check_title_and_metadata(&self.title, &self.metadata, limits)?;
        check_ttl(self.ttl_seconds)
    }

    fn keyed(&self) -> Result<Option<Keyed>> {
        keyed_by(self, &self.idempotency_key, |mut update| {
            update.idempotency_key = None;
            Command::UpdateSession(update)
        })
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<SessionInfo>) -> Request {
        Request::Write(Write::Update(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for UpdateSession {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<SessionInfo> {
        batch.session(&self.user_id)?;
        batch.precondition(self.if_version)?;
        if let Some(title) = &self.title {
            batch.set_title(title);
        }
        if let Some(metadata) = &self.metadata {
            batch.set_metadata(metadata);
        }
        if let Some(ttl) = self.ttl_seconds {
            batch.set_ttl(ttl);
        }
        if self.title.is_some() || self.metadata.is_some() || self.ttl_seconds.is_some() {
            batch.changed();
        }
        batch.session(&self.user_id).cloned()
    }
}
