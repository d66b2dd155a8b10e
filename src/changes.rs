//! Freshness across processes on PostgreSQL: every engine announces the versions it commits
//! (`NOTIFY`), and listens for the others' announcements (`LISTEN`), so a session live in this
//! process catches up — and its subscribers see the new messages — as soon as another process
//! writes it.
//!
//! Announcements are batched (one `NOTIFY` carries many sessions: PostgreSQL serializes the
//! commits of notifying transactions, so one per flush would throttle the writers) and best
//! effort: a process that misses one still catches up on a fresh read (`GetSession::fresh`),
//! and its own next write to the session is refused by the version check and reloads.

use std::time::Duration;

use soloist_actors::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::model::SessionId;
use crate::session::{SessionActor, SessionRequest};
use crate::store::postgres::PostgresStore;

/// How long a notice waits for room in a session's mailbox.
const REFRESH_WAIT: Duration = Duration::from_millis(50);

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
/// up. Reconnects with backoff when the connection is lost.
pub(crate) async fn listen(
    store: PostgresStore,
    instance: Uuid,
    registry: Registry<SessionActor>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = tokio::select! {
            listener = store.listen() => listener,
            () = stop.cancelled() => return,
        };
        let mut listener = match listener {
            Ok(listener) => {
                backoff = Duration::from_millis(100);
                listener
            }
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
        loop {
            let notification = tokio::select! {
                notification = listener.recv() => notification,
                () = stop.cancelled() => return,
            };
            let notification = match notification {
                Ok(notification) => notification,
                Err(error) => {
                    debug!(%error, "lost the listening connection; reconnecting");
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
                if registry.is_live(&session) {
                    // If the actor passivated meanwhile this activates it; it then loads the
                    // newest state anyway. A mailbox that stays full is skipped rather than
                    // stalling every other session's notices: its next write or fresh read
                    // catches it up.
                    let refresh = registry.send(session, SessionRequest::Refresh(version));
                    let _ = tokio::time::timeout(REFRESH_WAIT, refresh).await;
                }
            }
        }
    }
}
