//! `add_usage`: token usage deltas.

use serde::{Deserialize, Serialize};

use super::{Command, SessionCommand, addressed, keyed_by};
use crate::error::Result;
use crate::idempotency::Keyed;
use crate::model::{SessionId, Usage};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, StageWrite};

/// Add token usage; the counters move by these deltas in the database (`x = x + delta`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AddUsage {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Prompt tokens to add.
    pub prompt_tokens: u32,
    /// Completion tokens to add.
    pub completion_tokens: u32,
    /// Makes a retry exact (HTTP `Idempotency-Key`): a command with a key already used on this
    /// session within [`EngineConfig::idempotency_retention`](crate::EngineConfig::idempotency_retention)
    /// applies nothing and returns the first answer; the same key with a different command is
    /// [`Error::IdempotencyKeyReused`](crate::Error::IdempotencyKeyReused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SessionCommand for AddUsage {
    type Reply = Usage;
    const NAME: &'static str = "add_usage";

    addressed!();

    fn keyed(&self) -> Result<Option<Keyed>> {
        keyed_by(self, &self.idempotency_key, |mut add| {
            add.idempotency_key = None;
            Command::AddUsage(add)
        })
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<Usage>) -> Request {
        Request::Write(Write::AddUsage(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for AddUsage {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<Usage> {
        batch.session(&self.user_id)?;
        let delta = Usage {
            prompt_tokens: i64::from(self.prompt_tokens),
            completion_tokens: i64::from(self.completion_tokens),
        };
        batch.add_usage(delta)?;
        if delta != Usage::default() {
            batch.changed();
        }
        Ok(batch.session(&self.user_id)?.usage)
    }
}
