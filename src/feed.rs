//! The change feed between processes that share a database: how a store tells the others which
//! versions this process committed, and tells the sessions live here about theirs, so that
//! reads through any process stay fresh. The engine starts whatever feed its store has
//! ([`ChangeFeed`]); the PostgreSQL store has one (LISTEN/NOTIFY, in its own directory), the
//! SQLite store none. The feed is an optimisation for freshness only: every write is checked
//! against the stored version and epoch whether or not a notice arrived.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::faults::FeedPause;
use crate::model::SessionId;

/// Told of every commit: the versions each session was committed at.
pub(crate) trait Committed: Send + Sync {
    /// `(session, version)` of each session a flush committed.
    fn committed(&self, versions: &mut dyn Iterator<Item = (SessionId, i64)>);
}

/// The sessions live in this process, as a feed's listener sees them.
// Only a store with a feed calls these (a build with SQLite alone has none).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) trait LiveSessions: Send + Sync + 'static {
    /// Whether the session has a live actor here.
    fn is_live(&self, session: SessionId) -> bool;
    /// Every live session.
    fn live(&self) -> Vec<SessionId>;
    /// Tells a live session that `version` of it is stored; done once the notice is in its
    /// mailbox.
    fn refresh(&self, session: SessionId, version: i64) -> BoxFuture<'_, ()>;
    /// Whether the listener is down: while it is, reads check the stored version.
    fn feed_down(&self, down: bool);
}

/// A store's change feed.
pub(crate) trait ChangeFeed: Send + Sync {
    /// Where the writer stage reports what it committed, to be announced.
    fn committed(&self) -> Arc<dyn Committed>;

    /// Starts announcing commits on `tracker`. `stop` is cancelled after the last commit, and
    /// what is pending then is announced once more.
    fn announce(&self, tracker: &TaskTracker, stop: CancellationToken);

    /// Starts listening for the other processes' commits on `tracker`, telling `live` about
    /// those of its sessions, until `stop`.
    fn listen(
        &self,
        tracker: &TaskTracker,
        live: Arc<dyn LiveSessions>,
        pause: FeedPause,
        stop: CancellationToken,
    );
}
