//! Per-user rate limits: each user's requests (by `x-user-id`) are drawn from a bucket of
//! `per_second` requests a second, holding up to `burst` (GCRA, the `governor` crate). A request
//! past it is refused before its body is read: `429 rate_limited`, with `Retry-After` the
//! whole seconds until the bucket lets the next request through, as the limiter computes it.
//!
//! The buckets are bounded: a user's bucket is keyed by a 64-bit hash of the user id, with a
//! key drawn at start (so no client can choose ids that collide with a given user's), and the
//! buckets that are full again are forgotten every minute. Only when [`MAX_BUCKETS`] users came
//! within that minute (user ids made up, say) do new ones share buckets, one of a set of
//! [`MAX_BUCKETS`], until the next forgetting: however many ids clients make up, the limiter
//! holds at most twice that many buckets (a few MiB).

use std::hash::BuildHasher;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{ApiError, ErrorCode};

/// Buckets past which new users share buckets until the idle ones are forgotten.
pub const MAX_BUCKETS: u64 = 1 << 16;

/// The buckets of every user seen lately.
#[derive(Debug)]
pub struct UserLimits {
    limiter: DefaultKeyedRateLimiter<u64>,
    clock: DefaultClock,
    /// Picks a user's bucket.
    hasher: std::collections::hash_map::RandomState,
}

impl UserLimits {
    /// Buckets of `per_second` requests a second, up to `burst` at once.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Takes one request from `user`'s bucket, or refuses it with the time to wait.
    pub fn check(&self, user: &str) -> Result<(), ApiError> {
        let mut bucket = self.hasher.hash_one(user);
        if self.limiter.len() as u64 >= MAX_BUCKETS {
            // That many users since the idle buckets were last forgotten (every minute): new
            // ones share one of a bounded set until then.
            bucket %= MAX_BUCKETS;
        }
        match self.limiter.check_key(&bucket) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                // Whole seconds, rounded up: a client that waits that long gets through.
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("too many requests from this user; retry in {seconds} s"),
                )
                .with_retry_after(seconds.max(1)))
            }
        }
    }

    /// Forgets the buckets that are full again (users idle long enough), so that the memory
    /// follows the users active lately, not every user ever seen.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Buckets held now (at most about twice [`MAX_BUCKETS`]).
    pub fn users(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::UserLimits;

    #[test]
    fn each_user_has_a_bucket_and_idle_ones_are_forgotten() {
        let two = NonZeroU32::new(2).expect("2");
        let one = NonZeroU32::new(1).expect("1");
        let limits = UserLimits::new(one, two);
        assert!(limits.check("alice").is_ok());
        assert!(limits.check("alice").is_ok());
        let refused = limits.check("alice").expect_err("past the burst");
        assert_eq!(refused.status().as_u16(), 429);
        assert_eq!(refused.retry_after(), Some(1), "one request a second");
        assert!(limits.check("bob").is_ok(), "another user's bucket");
        assert_eq!(limits.users(), 2);
        limits.forget_idle();
        assert_eq!(limits.users(), 2, "both buckets are still draining");
    }

    #[test]
    fn made_up_users_cannot_grow_the_buckets_past_the_bound() {
        let many = NonZeroU32::new(1000).expect("1000");
        let limits = UserLimits::new(many, many);
        for user in 0..(super::MAX_BUCKETS * 2) {
            let _ = limits.check(&format!("made-up-{user}"));
        }
        assert!(limits.users() <= 2 * super::MAX_BUCKETS as usize);
    }
}
