//! `import_session`: a session and all its messages, as an export gives them, stored in one
//! write: all or nothing, idempotent by its ids.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::validate::{check_imported, check_title_and_metadata, check_user};
use super::{SessionCommand, addressed};
use crate::config::Limits;
use crate::error::{Error, Result};
use crate::idempotency::{CreateIds, Keyed};
use crate::model::{ImportedMessage, MessageStatus, RawJson, SessionId, SessionInfo, Usage};
use crate::session::protocol::{Pending, Request, Responder, Write};
use crate::session::stage::{Batch, StageWrite};

/// Import a session: create it under its id with its title, metadata and usage, and store its
/// messages at sequences 0, 1, 2... in the order given, keeping their ids, fields, statuses and
/// times, in one write (one transaction): all of it, or nothing.
///
/// - **Validation**: every message is checked as the append that could have stored it (the
///   same limits, roles, tool-call pairing, content rules; see [`ImportedMessage`]), plus: ids
///   present, unique and not nil (the session's too), `seq` (when given) equal to the
///   message's position, at most [`Limits::max_import_messages`] messages. A draft
///   `in_progress` is stored `incomplete`, with its content so far: nobody streams into an
///   imported session (and it is what the draft timeout would make of it).
/// - **Owner**: the caller, whoever owned the session where it was exported.
/// - **Idempotent by ids**: importing into a session of the caller's that already holds every
///   message given, at the same sequence with the same content (as it stores them), changes
///   nothing and answers the session as it is, with `created == false` (its title, metadata
///   and usage are not compared, as a create's repeat does not compare them; messages added
///   after the imported ones do not matter). A session of the caller's that holds fewer
///   messages, or others under these ids, is [`Error::SessionIdTaken`] or
///   [`Error::MessageIdReused`], and nothing changes.
/// - **Someone else's id**: a session of another user's (live or deleted), or one the caller
///   deleted, is answered as every command on it is: [`Error::NotFound`] (or
///   [`Error::Forbidden`] with foreign sessions revealed), and nothing changes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImportSession {
    /// The caller, who becomes the owner.
    pub user_id: String,
    /// The session's id, kept.
    pub session_id: SessionId,
    /// Optional title.
    #[serde(default)]
    pub title: Option<String>,
    /// Optional JSON object; `{}` when absent.
    #[serde(default)]
    pub metadata: Option<RawJson>,
    /// The session's token usage, as its totals.
    #[serde(default)]
    pub usage: Usage,
    /// The messages, in sequence order.
    pub messages: Vec<ImportedMessage>,
}

/// The answer to [`ImportSession`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    /// The session as stored.
    pub session: SessionInfo,
    /// `false` when the session held the messages already (an idempotent repeat).
    pub created: bool,
}

impl SessionCommand for ImportSession {
    type Reply = Imported;
    const NAME: &'static str = "import_session";

    addressed!();

    fn may_create(&self) -> bool {
        true
    }

    /// An id in the form keyed creates get (UUIDv8) is taken only if this server issued it to
    /// the importer: otherwise an import could take, before its owner, the id someone else's
    /// keyed create will get.
    fn settle_id(&mut self, ids: &CreateIds) -> Result<()> {
        let keyed_form = self.session_id.as_uuid().get_version_num() == 8;
        if keyed_form && !ids.issued_to(&self.user_id, self.session_id) {
            return Err(Error::invalid(
                "session_id",
                "a UUIDv8 is the id of a keyed create, and this server did not issue this one \
                 to you; import under another id",
            ));
        }
        Ok(())
    }

    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(&self.user_id, limits)?;
        if self.session_id.as_uuid().is_nil() {
            return Err(Error::invalid(
                "session_id",
                "the nil UUID is not a session id",
            ));
        }
        check_title_and_metadata(&self.title, &self.metadata, limits)?;
        self.metadata.get_or_insert_with(RawJson::empty_object);
        super::validate::check_usage("usage", &self.usage, super::MAX_USAGE_TOTAL)?;
        if self.messages.len() > limits.max_import_messages {
            return Err(Error::TooLarge {
                field: "messages".into(),
                size: self.messages.len(),
                limit: limits.max_import_messages,
            });
        }
        let mut ids = HashSet::with_capacity(self.messages.len());
        for (index, message) in self.messages.iter_mut().enumerate() {
            if message.seq.is_some_and(|seq| seq != index as i64) {
                return Err(Error::invalid(
                    format!("messages[{index}].seq"),
                    format!(
                        "is not {index}: messages are imported in sequence order, from 0, \
                         without gaps"
                    ),
                ));
            }
            if !ids.insert(message.id) {
                return Err(Error::invalid(
                    format!("messages[{index}].id"),
                    "the same message id appears twice in one import",
                ));
            }
            check_imported(index, &message.to_new(), limits)?;
            if message.status == MessageStatus::InProgress {
                message.status = MessageStatus::Incomplete;
            }
        }
        Ok(())
    }

    fn into_request(self, keyed: Option<Keyed>, respond: Responder<Imported>) -> Request {
        Request::Write(Write::Import(Pending::new(self, keyed, respond)))
    }
}

impl StageWrite for ImportSession {
    fn stage(&self, batch: &mut Batch<'_>) -> Result<Imported> {
        if batch.existing().is_some() {
            return self.repeat(batch);
        }
        let messages = self.messages.iter().enumerate().map(|(index, message)| {
            let (calls, answers) = (message.tool_calls.as_ref(), message.tool_call_id.as_deref());
            (index, message.role, calls, answers)
        });
        batch.check_tool_pairing(messages)?;
        let metadata = self.metadata.clone().unwrap_or_else(RawJson::empty_object);
        batch.create(&self.user_id, self.title.clone(), metadata, None);
        let now = batch.now();
        for message in &self.messages {
            let seq = batch.add_stored(|seq| {
                let mut stored = message.stored(seq, now);
                // Stored to the microsecond: the copy in memory says the same.
                stored.created_at = crate::model::from_micros(stored.created_at.timestamp_micros());
                stored
            })?;
            batch.record_tool_calls(
                seq,
                message.role,
                message.tool_calls.as_ref(),
                message.tool_call_id.as_deref(),
            );
        }
        batch.add_usage(self.usage)?;
        Ok(Imported {
            session: batch.session(&self.user_id)?.clone(),
            created: true,
        })
    }
}

impl ImportSession {
    /// The session exists: the import is a repeat if the caller's session holds every message
    /// already, each at its sequence with the same content; nothing is staged.
    fn repeat(&self, batch: &Batch<'_>) -> Result<Imported> {
        let session = batch.session(&self.user_id)?;
        if session.message_count < self.messages.len() as i64 {
            return Err(Error::SessionIdTaken);
        }
        for (seq, message) in (0i64..).zip(&self.messages) {
            match batch.stored_message(&message.id) {
                Some(stored) if stored.seq == seq && stored.is_resend_of(&message.to_new()) => {}
                Some(_) => return Err(Error::MessageIdReused { id: message.id }),
                None => return Err(Error::SessionIdTaken),
            }
        }
        Ok(Imported {
            session: session.clone(),
            created: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::model::{Content, Role};

    /// An import travels between processes as JSON: its messages must come back exactly,
    /// raw JSON, statuses and times included.
    #[test]
    fn an_import_round_trips_as_a_command() {
        let message = ImportedMessage {
            seq: Some(0),
            id: uuid::Uuid::now_v7(),
            role: Role::Assistant,
            content: Some(Content::Text("so far".into())),
            name: None,
            tool_calls: Some(RawJson::parse(r#"[{"id":"c","n":1.50}]"#).expect("json")),
            tool_call_id: None,
            function_call: None,
            refusal: None,
            metadata: None,
            status: MessageStatus::Incomplete,
            created_at: Some(chrono::DateTime::UNIX_EPOCH),
        };
        let import = ImportSession {
            user_id: "alice".into(),
            session_id: SessionId::new(),
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
            },
            messages: vec![message.clone()],
            ..ImportSession::default()
        };
        let text = serde_json::to_string(&Command::from(import)).expect("serialize");
        let Command::ImportSession(back) = Command::from_json(&text).expect("parse") else {
            panic!("another command: {text}");
        };
        assert_eq!(back.messages, vec![message]);
        assert_eq!(back.usage.completion_tokens, 4);
    }
}
