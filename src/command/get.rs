//! `get_session`: a session's metadata and a page of its messages.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{SessionCommand, addressed};
use crate::idempotency::Keyed;
use crate::model::{Message, PendingToolCall, SessionId, SessionInfo};
use crate::session::protocol::{Read, Request, Responder};

/// Default page size of [`GetSession`].
pub const DEFAULT_MESSAGE_PAGE: usize = 100;

/// Read a session: metadata, usage and the messages after `after_seq`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GetSession {
    /// The caller; must own the session.
    pub user_id: String,
    /// The session.
    pub session_id: SessionId,
    /// Only messages with `seq > after_seq` (all when absent).
    #[serde(default)]
    pub after_seq: Option<i64>,
    /// At most this many messages (default 100, capped by
    /// [`Limits::max_page_size`](crate::Limits::max_page_size)); 0 returns metadata only.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Check the session's version in the database first, so that writes made through other
    /// processes are visible. In a cluster, a fresh read runs at the session's owner.
    #[serde(default)]
    pub fresh: bool,
}

/// The answer to [`GetSession`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionPage {
    /// Metadata and usage.
    pub session: SessionInfo,
    /// Messages in ascending `seq`.
    pub messages: Vec<Arc<Message>>,
    /// Pass as `after_seq` to read the next page; `None` when this page reached the end.
    pub next_after_seq: Option<i64>,
    /// The tool calls of the session's assistant messages that no `tool` message has answered
    /// yet, oldest first.
    #[serde(default)]
    pub pending_tool_calls: Vec<PendingToolCall>,
}

impl SessionCommand for GetSession {
    type Reply = SessionPage;
    const NAME: &'static str = "get_session";

    addressed!();

    /// A plain read runs wherever it is received (the change feed keeps every process's copy
    /// fresh); a `fresh` one runs at the owner, which holds the latest state.
    fn at_owner(&self) -> bool {
        self.fresh
    }

    fn into_request(self, _: Option<Keyed>, respond: Responder<SessionPage>) -> Request {
        Request::Read(Read::Get(self, respond))
    }
}
