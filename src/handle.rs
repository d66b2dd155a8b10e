//! [`SessionHandle`]: one session, acting as one user.

use crate::command::{
    AddUsage, AppendMessages, CreateSession, Created, DeleteSession, GetSession, SessionPage,
    UpdateSession,
};
use crate::engine::Engine;
use crate::error::Result;
use crate::model::{NewMessage, RawJson, SessionId, SessionInfo, Usage};
use crate::subscription::MessageStream;

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
            })
            .await
            .map(|appended| appended.sequences)
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
        MessageStream::start(
            self.engine.clone(),
            self.user_id.clone(),
            self.session_id,
            after_seq.unwrap_or(-1),
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
