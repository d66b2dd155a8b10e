//! `list_sessions`: a user's sessions, newest first, served by the database (which holds every
//! acknowledged change) rather than by the sessions' actors.

use serde::{Deserialize, Serialize};

use super::validate::{check_user, validate_page};
use crate::config::Limits;
use crate::error::Result;
use crate::model::{SessionId, SessionInfo};
use crate::store::Store;

/// Default page size of [`ListSessions`].
pub const DEFAULT_SESSION_PAGE: usize = 50;

/// List a user's sessions, newest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListSessions {
    /// Whose sessions.
    pub user_id: String,
    /// Only sessions older than this cursor (a `next_before` of a previous page).
    #[serde(default)]
    pub before: Option<SessionCursor>,
    /// At most this many (default 50, capped by [`Limits::max_page_size`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Position in a session listing: creation time and id of the last session of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionCursor {
    /// Creation time in microseconds since the Unix epoch.
    pub created_at_micros: i64,
    /// Tie-breaker between sessions created in the same microsecond.
    pub id: SessionId,
}

/// The answer to [`ListSessions`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    /// Sessions, newest first.
    pub sessions: Vec<SessionInfo>,
    /// Cursor for the next page; `None` at the end.
    pub next_before: Option<SessionCursor>,
}

impl ListSessions {
    /// Reads the page from `store`.
    pub(crate) async fn run(self, store: &Store, limits: &Limits) -> Result<SessionList> {
        check_user(&self.user_id, limits)?;
        let limit = validate_page(self.limit, DEFAULT_SESSION_PAGE, limits);
        // One more than asked tells whether another page follows.
        let mut sessions = store
            .list_sessions(&self.user_id, self.before, limit + 1)
            .await?;
        // As many as the page's bytes allow (one at least): metadata may be large.
        let mut bytes = 0usize;
        let fit = sessions
            .iter()
            .position(|session| {
                bytes +=
                    session.metadata.get().len() + session.title.as_ref().map_or(0, String::len);
                bytes > limits.max_page_bytes
            })
            .map_or(sessions.len(), |index| index.max(1));
        let more = sessions.len() > limit.min(fit);
        sessions.truncate(limit.min(fit));
        let next_before = if more {
            sessions.last().map(|last| SessionCursor {
                created_at_micros: last.created_at.timestamp_micros(),
                id: last.id,
            })
        } else {
            None
        };
        Ok(SessionList {
            sessions,
            next_before,
        })
    }
}
