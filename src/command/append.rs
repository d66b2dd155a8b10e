//! `append`: messages at the end of a session, each at the next sequence.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::validate::{check_messages, check_user};
use super::{SessionCommand, addressed};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::idempotency::Keyed;
use crate::model::{MessageStatus, NewMessage, SessionId};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, Finish, StageWrite};

/// Append 1..N messages; answered after the transaction holding them committed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AppendMessages {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// The messages, stored in this order at consecutive sequences (unless some were stored
    /// before under the same ids).
    pub messages: Vec<NewMessage>,
    /// Apply only if the session is still at this version (its ETag; HTTP `If-Match`):
    /// otherwise [`Error::PreconditionFailed`] and nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<i64>,
    /// What a draft this append starts does when another is still streaming: refused with
    /// [`Error::TurnInProgress`] (the default), or `interrupt`: the running draft is finished
    /// `incomplete` first, in the same commit.
    #[serde(default, skip_serializing_if = "OnBusy::is_refuse")]
    pub on_busy: OnBusy,
}

/// What starting a draft does while another streams in the session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OnBusy {
    /// Refuse the append: [`Error::TurnInProgress`].
    #[default]
    Refuse,
    /// Finish the running draft `incomplete`, then start the new one, in one commit.
    Interrupt,
}

impl OnBusy {
    fn is_refuse(&self) -> bool {
        *self == OnBusy::Refuse
    }
}

/// The answer to an append: each message's sequence, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Appended {
    /// Sequence of each message.
    pub sequences: Vec<i64>,
}

impl SessionCommand for AppendMessages {
    type Reply = Appended;
    const NAME: &'static str = "append";

    addressed!();

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        check_messages(&self.messages, limits)
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<Appended>) -> Request {
        Request::Write(Write::Append(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for AppendMessages {
    /// Each message is either stored already (a resend: its sequence) or new; an id stored with
    /// other content refuses the whole append.
    fn stage(&self, batch: &mut Batch<'_>) -> Result<Appended> {
        batch.session(&self.user_id)?;
        let mut plan = Vec::with_capacity(self.messages.len());
        for message in &self.messages {
            let id = message.id.unwrap_or_else(Uuid::now_v7);
            match batch.stored_message(&id) {
                Some(stored) if stored.is_resend_of(message) => plan.push((id, Some(stored.seq))),
                Some(_) => return Err(Error::MessageIdReused { id }),
                None => plan.push((id, None)),
            }
        }
        let adds = plan.iter().any(|(_, stored)| stored.is_none());
        if adds {
            batch.precondition(self.if_version)?;
        }
        // A tool result answers a call the session made and nobody answered yet.
        let new_messages = plan
            .iter()
            .zip(&self.messages)
            .enumerate()
            .filter(|(_, ((_, stored), _))| stored.is_none())
            .map(|(index, (_, message))| {
                (
                    index,
                    message.role,
                    message.tool_calls.as_ref(),
                    message.tool_call_id.as_deref(),
                )
            });
        batch.check_tool_pairing(new_messages)?;
        // One reply streams at a time: a new draft waits for the one in progress to finish.
        let new_drafts = plan
            .iter()
            .zip(&self.messages)
            .filter(|((_, stored), message)| {
                stored.is_none() && message.status == Some(MessageStatus::InProgress)
            })
            .count();
        if new_drafts > 1 {
            return Err(Error::invalid(
                "messages",
                "one append starts at most one draft",
            ));
        }
        if new_drafts == 1 {
            if let Some(draft) = batch.draft_in_progress().map(|draft| draft.id) {
                if self.on_busy == OnBusy::Refuse {
                    return Err(Error::TurnInProgress { id: draft });
                }
                let cut = Finish {
                    status: MessageStatus::Incomplete,
                    tool_calls: None,
                    refusal: None,
                    usage: None,
                };
                batch.finish(&self.user_id, &draft, &cut)?;
            }
        }
        let sequences = plan
            .into_iter()
            .zip(&self.messages)
            .map(|((id, stored), message)| match stored {
                Some(seq) => Ok(seq),
                // Fails for the first new message or for none: the session was checked above.
                None => {
                    let seq = batch.add_message(id, message)?;
                    batch.record_tool_calls(
                        seq,
                        message.role,
                        message.tool_calls.as_ref(),
                        message.tool_call_id.as_deref(),
                    );
                    Ok(seq)
                }
            })
            .collect::<Result<Vec<i64>>>()?;
        if adds {
            batch.changed();
        }
        Ok(Appended { sequences })
    }
}
