//! [`SessionHandle`]: one session, acting as one user.

use uuid::Uuid;

use crate::command::{
    AddUsage, AppendDeltas, AppendMessages, CreateSession, Created, DeleteSession, Delta,
    FinishMessage, GetSession, SessionPage, UpdateSession,
};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{Message, MessageStatus, NewMessage, RawJson, SessionId, SessionInfo, Usage};
use crate::subscription::{MessageStream, Position};

/// A handle on one session acting as one user: the engine's commands with the ids filled in.
/// Cheap to clone and to share between tasks.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    pub(crate) engine: Engine,
    pub(crate) user_id: String,
    pub(crate) session_id: SessionId,
}

impl SessionHandle {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.session_id
    }

    /// Creates the session (idempotent).
    pub async fn create(
        &self,
        title: Option<String>,
        metadata: Option<RawJson>,
    ) -> Result<Created> {
        self.engine
            .create_session(CreateSession {
                user_id: self.user_id.clone(),
                session_id: Some(self.session_id),
                title,
                metadata,
                ..Default::default()
            })
            .await
    }

    /// Appends messages; answers with their sequences once committed.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<i64>> {
        self.engine
            .append(AppendMessages {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                messages,
                if_version: None,
                on_busy: Default::default(),
            })
            .await
            .map(|appended| appended.sequences)
    }

    /// Starts streaming an assistant reply: appends `message` (an assistant message, its
    /// content the text so far or none) as a draft, in progress; answers with its sequence
    /// once stored. Messages appended later order after it. The draft's id (the message's, or
    /// a new one) is what [`Self::append_delta`] and [`Self::finish_message`] name; sending
    /// the same start again (same id) answers the same sequence.
    pub async fn start_message(&self, mut message: NewMessage) -> Result<(Uuid, i64)> {
        let id = *message.id.get_or_insert_with(Uuid::now_v7);
        message.status = Some(MessageStatus::InProgress);
        let sequences = self.append(vec![message]).await?;
        Ok((id, sequences.first().copied().unwrap_or_default()))
    }

    /// Appends `text` to draft `message_id` at byte `offset` of its content (what the caller
    /// has sent of it so far); answers with the content's length once the text is durable. A
    /// resend of text already there changes nothing; see [`crate::Error::OffsetGap`] and
    /// [`crate::Error::OffsetConflict`].
    pub async fn append_delta(&self, message_id: Uuid, offset: u64, text: &str) -> Result<u64> {
        self.engine
            .append_deltas(AppendDeltas {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                message_id,
                deltas: vec![Delta {
                    offset,
                    content: text.to_owned(),
                }],
            })
            .await
            .map(|appended| appended.length)
    }

    /// Ends draft `message_id` with `status` (`completed`, `incomplete` or `aborted`), adding
    /// `usage` to the session's in the same commit; answers with the message as finished.
    /// Finishing it again the same way answers the same.
    pub async fn finish_message(
        &self,
        message_id: Uuid,
        status: MessageStatus,
        usage: Option<Usage>,
    ) -> Result<Message> {
        self.engine
            .finish_message(FinishMessage {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                message_id,
                status,
                tool_calls: None,
                refusal: None,
                usage,
            })
            .await
            .map(|finished| finished.message)
    }

    /// Reads metadata and up to `limit` messages after `after_seq`.
    pub async fn get(&self, after_seq: Option<i64>, limit: Option<usize>) -> Result<SessionPage> {
        self.engine
            .get_session(GetSession {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                after_seq,
                limit,
                fresh: false,
            })
            .await
    }

    /// Changes the title and/or metadata.
    pub async fn update(
        &self,
        title: Option<String>,
        metadata: Option<RawJson>,
    ) -> Result<SessionInfo> {
        self.engine
            .update_session(UpdateSession {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                title,
                metadata,
                ..Default::default()
            })
            .await
    }

    /// Adds token usage.
    pub async fn add_usage(&self, prompt_tokens: u32, completion_tokens: u32) -> Result<Usage> {
        self.engine
            .add_usage(AddUsage {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                prompt_tokens,
                completion_tokens,
                idempotency_key: None,
            })
            .await
    }

    /// Follows the session: the stored messages after `after_seq` (all when `None`), then each
    /// new message as it commits, gap-free and in order.
    pub async fn subscribe(&self, after_seq: Option<i64>) -> Result<MessageStream> {
        self.subscribe_from(Position::after(after_seq.unwrap_or(-1)))
            .await
    }

    /// Follows the session from `position` (what a subscriber was given: see [`Position`]):
    /// the messages after it and the rest of its open draft, then everything as it commits.
    /// Read events with [`MessageStream::next_event`] to follow drafts delta by delta.
    pub async fn subscribe_from(&self, position: Position) -> Result<MessageStream> {
        MessageStream::start(
            self.engine.clone(),
            self.user_id.clone(),
            self.session_id,
            position,
        )
        .await
    }

    /// Deletes the session.
    pub async fn delete(&self) -> Result<()> {
        self.engine
            .delete_session(DeleteSession {
                user_id: self.user_id.clone(),
                session_id: self.session_id,
                ..DeleteSession::default()
            })
            .await
    }
}
