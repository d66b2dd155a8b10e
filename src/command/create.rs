//! `create_session`: a new session, idempotent on its id.

use serde::{Deserialize, Serialize};

use super::validate::{check_title_and_metadata, check_ttl, check_user};
use super::{Command, SessionCommand, keyed_by};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::idempotency::{CreateIds, Keyed};
use crate::model::{RawJson, SessionId, SessionInfo};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, StageWrite};

/// Create a session. Idempotent on `session_id`: creating an existing session of the same user
/// returns it with `created == false`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CreateSession {
    /// The caller, who becomes the owner.
    pub user_id: String,
    /// The id to use; when absent, derived from the user and the idempotency key if there is
    /// one, else a new UUIDv7. An id taken by another user is [`Error::SessionIdTaken`], so an
    /// application that lets untrusted users choose ids lets them learn which ids exist:
    /// derive them per user instead (as `soloist-server` does, which accepts no ids).
    #[serde(default)]
    pub session_id: Option<SessionId>,
    /// Optional title.
    #[serde(default)]
    pub title: Option<String>,
    /// Optional JSON object; `{}` when absent.
    #[serde(default)]
    pub metadata: Option<RawJson>,
    /// Seconds the session lives after its last write, then it is erased; `0`: never expires;
    /// absent: [`EngineConfig::default_session_ttl`](crate::EngineConfig::default_session_ttl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer to [`CreateSession`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// The session as stored.
    pub session: SessionInfo,
    /// `false` when the session already existed (an idempotent repeat).
    pub created: bool,
}

impl SessionCommand for CreateSession {
    type Reply = Created;
    const NAME: &'static str = "create_session";

    fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Chosen by [`Self::validate`] when the command leaves it open.
    fn session_id(&self) -> SessionId {
        self.session_id.unwrap_or_default()
    }

    /// A create that names no id and carries no key gets a new one (no fingerprint covers
    /// it); a keyed one keeps it open, its id being derived from the key wherever it runs.
    fn place(&mut self, ids: &CreateIds) -> SessionId {
        match (self.session_id, &self.idempotency_key) {
            (Some(id), _) => id,
            (None, Some(key)) => ids.derive(&self.user_id, key),
            (None, None) => *self.session_id.insert(SessionId::new()),
        }
    }

    fn may_create(&self) -> bool {
        true
    }

    /// Without an id, a keyed create derives one from the key, so that its retries reach the
    /// same session (and the record of the first answer).
    fn settle_id(&mut self, ids: &CreateIds) -> Result<()> {
        if let (None, Some(key)) = (self.session_id, &self.idempotency_key) {
            self.session_id = Some(ids.derive(&self.user_id, key));
        }
        Ok(())
    }

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        check_title_and_metadata(&self.title, &self.metadata, limits)?;
        check_ttl(self.ttl_seconds)?;
        self.metadata.get_or_insert_with(RawJson::empty_object);
        // A keyed create has its id by now (`settle_id`).
        self.session_id.get_or_insert_with(SessionId::new);
        Ok(())
    }

    fn keyed(&self) -> Result<Option<Keyed>> {
        keyed_by(self, &self.idempotency_key, |mut create| {
            create.idempotency_key = None;
            Command::CreateSession(create)
        })
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<Created>) -> Request {
        Request::Write(Write::Create(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for CreateSession {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<Created> {
        match batch.existing() {
            None => {
                let metadata = self.metadata.clone().unwrap_or_else(RawJson::empty_object);
                let session = batch.create(
                    &self.user_id,
                    self.title.clone(),
                    metadata,
                    self.ttl_seconds,
                );
                Ok(Created {
                    session,
                    created: true,
                })
            }
            // Another user's session, live or deleted, gets one answer: it must not tell
            // whether that session was deleted.
            Some((existing, _)) if existing.user_id != self.user_id => Err(Error::SessionIdTaken),
            Some((_, true)) => Err(Error::SessionIdTaken),
            Some((existing, false)) => Ok(Created {
                session: existing.clone(),
                created: false,
            }),
        }
    }
}
