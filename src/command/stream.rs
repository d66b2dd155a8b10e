//! Streaming an assistant reply: `append_deltas` grows a draft (a message appended with status
//! `in_progress`), `finish_message` ends it. Both go through the session's actor like every
//! write, so the deltas of all streams share its group commit: no commit per token.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validate::check_user;
use super::{SessionCommand, addressed};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::idempotency::Keyed;
use crate::model::{Message, MessageStatus, RawJson, SessionId, Usage};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, Finish, StageWrite};

/// Deltas one command carries at most.
pub const MAX_DELTAS: usize = 1024;

/// Text for a draft, at a byte offset of its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Delta {
    /// Bytes of the draft's content before this text (UTF-8). It makes a delta idempotent:
    /// text already there at this offset is a resend and changes nothing.
    pub offset: u64,
    /// The text.
    pub content: String,
}

/// Append deltas to a draft, in order; answered once they are durable.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppendDeltas {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// The draft's message id.
    pub message_id: Uuid,
    /// The deltas, applied in order.
    pub deltas: Vec<Delta>,
}

/// The answer to appending deltas: the draft's content length in bytes, with the deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeltasAppended {
    /// Bytes of the draft's content now.
    pub length: u64,
}

impl SessionCommand for AppendDeltas {
    type Reply = DeltasAppended;
    const NAME: &'static str = "append_deltas";

    addressed!();

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        if self.deltas.is_empty() {
            return Err(Error::invalid("deltas", "at least one delta is required"));
        }
        if self.deltas.len() > MAX_DELTAS {
            return Err(Error::TooLarge {
                field: "deltas".into(),
                size: self.deltas.len(),
                limit: MAX_DELTAS,
            });
        }
        let bytes: usize = self.deltas.iter().map(|delta| delta.content.len()).sum();
        if bytes > limits.max_content_bytes {
            return Err(Error::TooLarge {
                field: "deltas".into(),
                size: bytes,
                limit: limits.max_content_bytes,
            });
        }
        Ok(())
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<DeltasAppended>) -> Request {
        Request::Write(Write::Deltas(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for AppendDeltas {
    /// All or nothing: a delta refused refuses the ones before it in the command too.
    fn stage(&self, batch: &mut Batch<'_>) -> Result<DeltasAppended> {
        let deltas = self
            .deltas
            .iter()
            .map(|delta| (delta.offset, delta.content.as_str()));
        let length = batch.append_deltas(&self.user_id, &self.message_id, deltas)?;
        Ok(DeltasAppended { length })
    }
}

/// End a draft: its status, and what only the end knows (tool calls, refusal, usage).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinishMessage {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// The draft's message id.
    pub message_id: Uuid,
    /// `completed`, `incomplete` or `aborted`.
    pub status: MessageStatus,
    /// The reply's tool calls (a JSON array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<RawJson>,
    /// The model's refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Tokens to add to the session's usage, in the same commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The answer to [`FinishMessage`]: the message as finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageFinished {
    /// The message.
    pub message: Message,
}

impl SessionCommand for FinishMessage {
    type Reply = MessageFinished;
    const NAME: &'static str = "finish_message";

    addressed!();

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        if self.status == MessageStatus::InProgress {
            return Err(Error::invalid(
                "status",
                "a draft finishes completed, incomplete or aborted",
            ));
        }
        if let Some(tool_calls) = &self.tool_calls {
            super::validate::check_tool_calls("tool_calls", tool_calls, limits)?;
        }
        if let Some(refusal) = &self.refusal {
            if refusal.len() > limits.max_content_bytes {
                return Err(Error::TooLarge {
                    field: "refusal".into(),
                    size: refusal.len(),
                    limit: limits.max_content_bytes,
                });
            }
            if refusal.contains('\0') {
                return Err(Error::invalid("refusal", "must not contain NUL characters"));
            }
        }
        if let Some(usage) = &self.usage {
            super::validate::check_usage("usage", usage, super::MAX_USAGE_DELTA)?;
        }
        Ok(())
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<MessageFinished>) -> Request {
        Request::Write(Write::Finish(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for FinishMessage {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<MessageFinished> {
        let finish = Finish {
            status: self.status,
            tool_calls: self.tool_calls.clone(),
            refusal: self.refusal.clone(),
            usage: self.usage,
        };
        let message = batch.finish(&self.user_id, &self.message_id, &finish)?;
        Ok(MessageFinished {
            message: Message::clone(&message),
        })
    }
}
