//! Fault injection for tests: a panic in a session's next batch, writes held back, the change
//! feed disconnected. Compiled only for tests (`cfg(test)`, or the `fault-injection` feature,
//! which the test kit turns on); a release build of the server has none of it, and nothing of
//! it is checked on the hot path of a build without it.

#[cfg(any(test, feature = "fault-injection"))]
pub(crate) use enabled::*;

#[cfg(any(test, feature = "fault-injection"))]
mod enabled {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::model::SessionId;

    /// The armed faults of one engine.
    #[derive(Debug, Default)]
    pub(crate) struct Faults {
        /// Sessions whose next batch panics after a pause.
        panic_next_batch: Mutex<HashMap<SessionId, Duration>>,
    }

    impl Faults {
        /// Makes the session's next batch panic after `pause`.
        pub fn arm_panic(&self, session: SessionId, pause: Duration) {
            self.lock().insert(session, pause);
        }

        /// Called before each batch: panics if a panic was armed for the session, after
        /// letting more commands queue behind the batch, the way a bug would fail.
        pub async fn before_batch(&self, session: SessionId) {
            let armed = self.lock().remove(&session);
            if let Some(pause) = armed {
                // Boxed: a timer inline would sit in every idle session's task.
                Box::pin(tokio::time::sleep(pause)).await;
                panic!("injected fault in session {session}");
            }
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Duration>> {
            self.panic_next_batch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

/// Lets a test hold the change listener (PostgreSQL LISTEN) disconnected; without fault
/// injection compiled in, it never pauses.
#[derive(Clone, Debug)]
pub(crate) struct FeedPause {
    #[cfg(any(test, feature = "fault-injection"))]
    paused: tokio::sync::watch::Receiver<bool>,
}

impl FeedPause {
    /// A pause switch and the listener's side of it.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (switch, paused) = tokio::sync::watch::channel(false);
        (switch, Self { paused })
    }

    /// The listener's side of a switch that is never turned.
    #[cfg(not(any(test, feature = "fault-injection")))]
    pub fn new() -> ((), Self) {
        ((), Self {})
    }

    /// Waits until the feed may connect; `false` if it never will again.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub async fn resumed(&mut self) -> bool {
        #[cfg(any(test, feature = "fault-injection"))]
        return self.paused.wait_for(|paused| !*paused).await.is_ok();
        #[cfg(not(any(test, feature = "fault-injection")))]
        true
    }

    /// Waits until a test pauses the feed.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub async fn paused(&mut self) {
        #[cfg(any(test, feature = "fault-injection"))]
        if self.paused.wait_for(|paused| *paused).await.is_ok() {
            return;
        }
        std::future::pending::<()>().await;
    }
}
