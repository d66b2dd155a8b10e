//! The one retry policy: exponential backoff with jitter, shared by the session actors (a
//! conflict, a write that did not commit) and the writer stage (a transient database refusal).

use std::time::Duration;

/// Exponential backoff: `first` doubled per attempt up to `max`, each delay drawn from its
/// upper half so that writers that collided once do not collide again in step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// Between attempts to write to the database: 2 ms, 4 ms, 8 ms ... at most 256 ms.
    pub const WRITE: Backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(256));

    /// A policy starting at `first` and capped at `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The delay before retry number `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.max);
        doubled.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Sleeps for [`Self::delay`].
    pub async fn sleep(&self, attempt: u32) {
        tokio::time::sleep(self.delay(attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_jitter_and_stops_at_the_cap() {
        let policy = Backoff::new(Duration::from_millis(2), Duration::from_millis(64));
        for attempt in 1..40 {
            let full =
                Duration::from_millis(2 << (attempt - 1).min(5)).min(Duration::from_millis(64));
            let delay = policy.delay(attempt);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
