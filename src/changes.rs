//! Freshness across processes on PostgreSQL: every engine announces the versions it commits
//! (`NOTIFY`), and listens for the others' announcements (`LISTEN`), so a session live in this
//! process catches up — and its subscribers see the new messages — as soon as another process
//! writes it.
//!
//! Announcements are batched (one `NOTIFY` carries many sessions: PostgreSQL serializes the
//! commits of notifying transactions, so one per flush would throttle the writers) and best
//! effort: while the listener is not connected, every read checks the stored version; after it
//! reconnects, the live sessions that missed a write are caught up from one query; and a write
//! on a stale copy is refused by the epoch and version checks and reloads.

use std::time::Duration;

use soloist_actors::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::error::StorageError;
use crate::model::SessionId;
use crate::session::{SessionActor, SessionRequest};
use crate::store::postgres::PostgresStore;

/// How long a notice waits for room in a session's mailbox.
const REFRESH_WAIT: Duration = Duration::from_millis(50);

/// How long the catch-up after a reconnection waits for room in a session's mailbox.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Stay under PostgreSQL's 8000-byte payload limit.
const MAX_PAYLOAD: usize = 7_000;

/// Sends the committed `(session, version)` pairs to the other processes, many per notice, as
/// `"<instance> <session>:<version> <session>:<version> ..."`.
pub(crate) async fn announce(
    store: PostgresStore,
    instance: Uuid,
    mut changes: mpsc::Receiver<(SessionId, i64)>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(512);
    loop {
        let received = tokio::select! {
            received = changes.recv_many(&mut batch, 512) => received,
            () = stop.cancelled() => return,
        };
        if received == 0 {
            return;
        }
        let mut payload = String::with_capacity(MAX_PAYLOAD + 64);
        for (session, version) in batch.drain(..) {
            if payload.is_empty() {
                payload.push_str(&instance.to_string());
            }
            payload.push(' ');
            payload.push_str(&session.to_string());
            payload.push(':');
            payload.push_str(&version.to_string());
            if payload.len() > MAX_PAYLOAD {
                send(&store, &payload).await;
                payload.clear();
            }
        }
        if !payload.is_empty() {
            send(&store, &payload).await;
        }
    }
}

async fn send(store: &PostgresStore, payload: &str) {
    if let Err(error) = store.announce(payload).await {
        debug!(%error, "could not announce committed versions");
    }
}

/// Listens for the other processes' announcements and tells the sessions live here to catch
/// up. While it is not listening (not yet connected, connection lost, or paused by a test),
/// `feed_down` is set and every read checks the stored version instead. After each
/// (re)connection, the live sessions whose stored version moved while nothing was heard are
/// told to catch up, from one query.
pub(crate) async fn listen(
    store: PostgresStore,
    instance: Uuid,
    registry: Registry<SessionActor>,
    mut paused: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let feed_down = |down: bool| {
        registry
            .context()
            .feed_down
            .store(down, std::sync::atomic::Ordering::Release);
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        feed_down(true);
        // Paused (a test's fault hook): stay disconnected until resumed.
        tokio::select! {
            resumed = paused.wait_for(|paused| !*paused) => {
                if resumed.is_err() {
                    return;
                }
            }
            () = stop.cancelled() => return,
        }
        let listener = tokio::select! {
            listener = store.listen() => listener,
            () = stop.cancelled() => return,
        };
        let mut listener = match listener {
            Ok(listener) => listener,
            Err(error) => {
                warn!(%error, "cannot listen for other processes' writes; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        // Listening from here on: anything committed before is found by this query.
        let caught_up = tokio::select! {
            caught_up = catch_up_live_sessions(&store, &registry) => caught_up,
            () = stop.cancelled() => return,
        };
        if let Err(error) = caught_up {
            debug!(%error, "could not check the live sessions after connecting; retrying");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        backoff = Duration::from_millis(100);
        feed_down(false);
        loop {
            let notification = tokio::select! {
                notification = listener.try_recv() => notification,
                _ = paused.wait_for(|paused| *paused) => break,
                () = stop.cancelled() => return,
            };
            let notification = match notification {
                Ok(Some(notification)) => notification,
                // `None`: the connection was lost, and with it any notice sent meanwhile.
                Ok(None) | Err(_) => {
                    debug!("lost the listening connection; reconnecting");
                    break;
                }
            };
            let mut words = notification.payload().split(' ');
            if words.next() == Some(instance.to_string().as_str()) {
                continue; // our own commits
            }
            for change in words {
                let Some((session, version)) = change.split_once(':') else {
                    continue;
                };
                let (Ok(session), Ok(version)) = (session.parse(), version.parse()) else {
                    continue;
                };
                refresh(&registry, session, version, REFRESH_WAIT).await;
            }
        }
    }
}

/// Tells a live session that `version` is stored. If the actor passivated meanwhile this
/// activates it; it then loads the newest state anyway. A mailbox that stays full is skipped
/// rather than stalling every other session's notices: its next write or fresh read catches it
/// up.
async fn refresh(
    registry: &Registry<SessionActor>,
    session: SessionId,
    version: i64,
    wait: Duration,
) {
    if registry.is_live(&session) {
        let refresh = registry.send(session, Box::new(SessionRequest::Refresh(version)));
        if tokio::time::timeout(wait, refresh).await.is_err() {
            debug!(session_id = %session, "mailbox full: change notice skipped");
        }
    }
}

/// After (re)connecting: the stored versions of every session live here, each sent to its
/// actor, which catches up if it is behind (and publishes what it missed to its subscribers).
async fn catch_up_live_sessions(
    store: &PostgresStore,
    registry: &Registry<SessionActor>,
) -> Result<(), StorageError> {
    let live = registry.live_keys();
    for chunk in live.chunks(10_000) {
        for (session, version) in store.versions(chunk).await? {
            // Reads keep checking the stored version until this is done, so a busy session's
            // mailbox may take its time to make room.
            refresh(registry, session, version, CATCH_UP_WAIT).await;
        }
    }
    Ok(())
}
