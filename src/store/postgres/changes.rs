//! Freshness across processes on PostgreSQL: every engine announces the versions it commits
//! (`NOTIFY`), and listens for the others' announcements (`LISTEN`), so a session live in this
//! process catches up — and its subscribers see the new messages — as soon as another process
//! writes it.
//!
//! Announcements are batched (one `NOTIFY` carries many sessions: PostgreSQL serializes the
//! commits of notifying transactions, so one per flush would throttle the writers), coalesced
//! per session (nothing is dropped for lack of room) and sent again after a failure. A notice
//! for a session whose mailbox stays full is deferred and delivered on a later tick. While the
//! listener is not connected, every read checks the stored version; after it reconnects, the
//! live sessions that missed a write are caught up from one query; and a write on a stale copy
//! is refused by the epoch and version checks and reloads.
//!
//! What remains is a window, not a loss: a notice travels after the commit it announces (a few
//! milliseconds), and a process killed between its commit and its notice never sends it; a
//! plain read through another process can miss such a write until that session's next notice
//! or write. `fresh` reads check the stored version and have no window.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use uuid::Uuid;

use super::PostgresStore;
use crate::backoff::Backoff;
use crate::error::StorageError;
use crate::faults::FeedPause;
use crate::feed::{ChangeFeed, Committed, LiveSessions};
use crate::model::SessionId;

/// How long a notice waits for room in a session's mailbox.
const REFRESH_WAIT: Duration = Duration::from_millis(50);

/// How often notices deferred by a full mailbox are tried again.
const MISSED_RETRY: Duration = Duration::from_millis(100);

/// How often the listener checks that its connection still delivers (see `listen`).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long the catch-up after a reconnection waits for room in a session's mailbox.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// How long the announcer waits before sending a notice again after a failure.
const ANNOUNCE_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// How long the listener waits before connecting again.
const LISTEN_RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Stay under PostgreSQL's 8000-byte payload limit.
const MAX_PAYLOAD: usize = 7_000;

/// Sends the committed `(session, version)` pairs to the other processes, many per notice, as
/// `"<instance> <session>:<version> <session>:<version> ..."`. A notice that cannot be sent
/// (the database unreachable) is retried with backoff. On `stop` — cancelled once every
/// session has drained, so after the last commit — what is pending is sent one last time.
async fn announce(
    store: PostgresStore,
    instance: Uuid,
    announcements: Arc<Announcements>,
    stop: CancellationToken,
) {
    let mut failures = 0;
    loop {
        let stopping = tokio::select! {
            () = announcements.wait() => false,
            () = stop.cancelled() => true,
        };
        let pending: Vec<(SessionId, i64)> = announcements.take().into_iter().collect();
        let mut sent = 0;
        for payload in payloads(instance, &pending) {
            if let Err(error) = store.announce(&payload.text).await {
                debug!(%error, "could not announce committed versions; will retry");
                break;
            }
            sent = payload.end;
        }
        if stopping {
            return;
        }
        if sent < pending.len() {
            // Put back what did not go out; newer versions added meanwhile win.
            announcements.add(pending[sent..].iter().copied());
            failures += 1;
            tokio::select! {
                () = ANNOUNCE_RETRY.sleep(failures) => {}
                () = stop.cancelled() => {}
            }
        } else {
            failures = 0;
        }
    }
}

/// One notice's text, and the index in the pending list just past its last pair.
struct Payload {
    text: String,
    end: usize,
}

/// Splits the pending pairs into notices under PostgreSQL's payload limit.
fn payloads(instance: Uuid, pending: &[(SessionId, i64)]) -> Vec<Payload> {
    let mut payloads = Vec::new();
    let mut text = String::new();
    for (index, (session, version)) in pending.iter().enumerate() {
        if text.is_empty() {
            text.push_str(&instance.to_string());
        }
        text.push(' ');
        text.push_str(&session.to_string());
        text.push(':');
        text.push_str(&version.to_string());
        if text.len() > MAX_PAYLOAD || index + 1 == pending.len() {
            payloads.push(Payload {
                text: std::mem::take(&mut text),
                end: index + 1,
            });
        }
    }
    payloads
}

/// What woke the listener.
enum Event {
    Notice(Result<Option<sqlx::postgres::PgNotification>, sqlx::Error>),
    Retry,
    Heartbeat,
}

/// Listens for the other processes' announcements and tells the sessions live here to catch
/// up. While it is not listening (not yet connected, connection lost, or paused by a test),
/// `feed_down` is set and every read checks the stored version instead. After each
/// (re)connection, the live sessions whose stored version moved while nothing was heard are
/// told to catch up, from one query.
async fn listen(
    store: PostgresStore,
    instance: Uuid,
    registry: Arc<dyn LiveSessions>,
    mut pause: FeedPause,
    stop: CancellationToken,
) {
    let registry = &*registry;
    let feed_down = |down: bool| registry.feed_down(down);
    let mut failures = 0;
    loop {
        feed_down(true);
        // Paused (a test's fault hook): stay disconnected until resumed.
        tokio::select! {
            resumed = pause.resumed() => {
                if !resumed {
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
                failures += 1;
                tokio::select! {
                    () = LISTEN_RETRY.sleep(failures) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
        };
        // Listening from here on: anything committed before is found by this query.
        let caught_up = tokio::select! {
            caught_up = catch_up_live_sessions(&store, registry) => caught_up,
            () = stop.cancelled() => return,
        };
        if let Err(error) = caught_up {
            debug!(%error, "could not check the live sessions after connecting; retrying");
            failures += 1;
            tokio::select! {
                () = LISTEN_RETRY.sleep(failures) => {}
                () = stop.cancelled() => return,
            }
            continue;
        }
        failures = 0;
        feed_down(false);
        // Notices for sessions whose mailbox stayed full, delivered again on the next tick.
        let mut missed: HashMap<SessionId, i64> = HashMap::new();
        let mut retry = tokio::time::interval(MISSED_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A connection that hangs without breaking (a half-open TCP connection, a stalled
        // server process) delivers nothing and reports nothing: every `HEARTBEAT` the listener
        // sends a notice of its own, and if the previous one has not come back by then, it
        // treats the connection as lost.
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping_unanswered = false;
        loop {
            let event = tokio::select! {
                notification = listener.try_recv() => Event::Notice(notification),
                _ = retry.tick(), if !missed.is_empty() => Event::Retry,
                _ = heartbeat.tick() => Event::Heartbeat,
                () = pause.paused() => break,
                () = stop.cancelled() => return,
            };
            let notification = match event {
                Event::Retry => {
                    for (session, version) in std::mem::take(&mut missed) {
                        if !refresh(registry, session, version, REFRESH_WAIT).await {
                            missed.insert(session, version);
                        }
                    }
                    continue;
                }
                Event::Heartbeat => {
                    if ping_unanswered {
                        warn!("the listening connection stopped delivering; reconnecting");
                        break;
                    }
                    // A ping that cannot be sent proves nothing either way.
                    ping_unanswered = store.announce(&instance.to_string()).await.is_ok();
                    continue;
                }
                Event::Notice(Ok(Some(notification))) => notification,
                // `None`: the connection was lost, and with it any notice sent meanwhile.
                Event::Notice(Ok(None) | Err(_)) => {
                    debug!("lost the listening connection; reconnecting");
                    break;
                }
            };
            let mut words = notification.payload().split(' ');
            if words.next() == Some(instance.to_string().as_str()) {
                // Our own ping or commits: the connection delivers.
                ping_unanswered = false;
                continue;
            }
            for change in words {
                let Some((session, version)) = change.split_once(':') else {
                    continue;
                };
                let (Ok(session), Ok(version)) = (session.parse(), version.parse()) else {
                    continue;
                };
                if !refresh(registry, session, version, REFRESH_WAIT).await {
                    let newest = missed.entry(session).or_insert(version);
                    *newest = (*newest).max(version);
                }
            }
        }
    }
}

/// Tells a live session that `version` is stored. If the actor passivated meanwhile this
/// activates it; it then loads the newest state anyway. Returns false if the mailbox stayed
/// full for `wait`: rather than stall every other session's notices, the caller tries again
/// later.
async fn refresh(
    registry: &dyn LiveSessions,
    session: SessionId,
    version: i64,
    wait: Duration,
) -> bool {
    if !registry.is_live(session) {
        return true; // its next activation loads the stored state
    }
    let refresh = registry.refresh(session, version);
    let delivered = tokio::time::timeout(wait, refresh).await.is_ok();
    if !delivered {
        debug!(session_id = %session, "mailbox full: change notice deferred");
    }
    delivered
}

/// After (re)connecting: the stored versions of every session live here, each sent to its
/// actor, which catches up if it is behind (and publishes what it missed to its subscribers).
async fn catch_up_live_sessions(
    store: &PostgresStore,
    registry: &dyn LiveSessions,
) -> Result<(), StorageError> {
    let live = registry.live();
    for chunk in live.chunks(10_000) {
        for (session, version) in store.versions(chunk).await? {
            // Reads keep checking the stored version until this is done, so a busy session's
            // mailbox may take its time to make room; one still full after that catches up on
            // its next notice, write or fresh read.
            refresh(registry, session, version, CATCH_UP_WAIT).await;
        }
    }
    Ok(())
}

/// The committed versions not yet announced: the writers add to it, the announcer takes it.
/// A session written many times before the announcer comes round is announced once, at its
/// newest version, so nothing is ever dropped for lack of room, and a notice that fails to go
/// out is put back and sent again.
#[derive(Default)]
pub(crate) struct Announcements {
    pending: std::sync::Mutex<HashMap<SessionId, i64>>,
    ready: Notify,
}

impl Announcements {
    /// Records committed versions (one lock for a whole flush) and wakes the announcer.
    pub(crate) fn add(&self, committed: impl IntoIterator<Item = (SessionId, i64)>) {
        let mut added = false;
        {
            let mut pending = self.lock();
            for (session, version) in committed {
                let newest = pending.entry(session).or_insert(version);
                *newest = (*newest).max(version);
                added = true;
            }
        }
        if added {
            self.ready.notify_one();
        }
    }

    pub(crate) fn take(&self) -> HashMap<SessionId, i64> {
        std::mem::take(&mut *self.lock())
    }

    /// Waits until something was added since the last wait.
    pub(crate) async fn wait(&self) {
        self.ready.notified().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, i64>> {
        // The map stays consistent whatever panicked while holding it.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Committed for Announcements {
    fn committed(&self, versions: &mut dyn Iterator<Item = (SessionId, i64)>) {
        self.add(versions);
    }
}

/// The PostgreSQL change feed: notices out through [`announce`], in through [`listen`].
pub(crate) struct Feed {
    store: PostgresStore,
    /// This process's id: the sender of its notices, so that it skips its own.
    instance: Uuid,
    announcements: Arc<Announcements>,
}

impl Feed {
    /// The feed of `store`, for the process `instance`.
    pub fn new(store: PostgresStore, instance: Uuid) -> Self {
        Self {
            store,
            instance,
            announcements: Arc::default(),
        }
    }
}

impl ChangeFeed for Feed {
    fn committed(&self) -> Arc<dyn Committed> {
        self.announcements.clone()
    }

    fn announce(&self, tracker: &TaskTracker, stop: CancellationToken) {
        tracker.spawn(announce(
            self.store.clone(),
            self.instance,
            self.announcements.clone(),
            stop,
        ));
    }

    fn listen(
        &self,
        tracker: &TaskTracker,
        live: Arc<dyn LiveSessions>,
        pause: FeedPause,
        stop: CancellationToken,
    ) {
        tracker.spawn(listen(self.store.clone(), self.instance, live, pause, stop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_cover_every_pair_once() {
        let instance = Uuid::new_v4();
        let pending: Vec<(SessionId, i64)> = (0..1_000)
            .map(|version| (SessionId::new(), version))
            .collect();
        let notices = payloads(instance, &pending);
        assert!(notices.len() > 1, "1,000 pairs need several notices");
        let mut seen = Vec::new();
        let mut start = 0;
        for payload in &notices {
            assert!(payload.text.len() < 8_000, "PostgreSQL's payload limit");
            let mut words = payload.text.split(' ');
            assert_eq!(words.next(), Some(instance.to_string().as_str()));
            let pairs: Vec<&str> = words.collect();
            assert_eq!(
                pairs.len(),
                payload.end - start,
                "`end` marks the last pair sent"
            );
            start = payload.end;
            seen.extend(pairs.into_iter().map(str::to_owned));
        }
        let expected: Vec<String> = pending
            .iter()
            .map(|(session, version)| format!("{session}:{version}"))
            .collect();
        assert_eq!(seen, expected);
        assert!(payloads(instance, &[]).is_empty());
    }

    #[tokio::test]
    async fn announcements_keep_the_newest_version_and_wake_the_announcer() {
        let announcements = Announcements::default();
        let (a, b) = (SessionId::new(), SessionId::new());
        announcements.add([(a, 3), (b, 1)]);
        announcements.add([(a, 2), (b, 5)]);
        // The wake-up was stored: waiting now returns at once.
        tokio::time::timeout(Duration::from_secs(1), announcements.wait())
            .await
            .expect("woken");
        let mut taken: Vec<_> = announcements.take().into_iter().collect();
        taken.sort();
        let mut expected = vec![(a, 3), (b, 5)];
        expected.sort();
        assert_eq!(taken, expected);
        assert!(announcements.take().is_empty(), "taken once");
        // Nothing added, nothing to wake for.
        announcements.add([]);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), announcements.wait())
                .await
                .is_err()
        );
    }
}
