//! Per-user rate limits: each user's requests (by `x-user-id`) are drawn from a bucket of
//! `per_second` requests a second, holding up to `burst` (GCRA, the `governor` crate). A request
//! past it is refused before its body is read: `429 rate_limited`, with `Retry-After` the
//! whole seconds until the bucket lets the next request through, as the limiter computes it.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::{ApiError, ErrorCode};

/// The buckets of every user seen lately.
#[derive(Debug)]
pub struct UserLimits {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl UserLimits {
    /// Buckets of `per_second` requests a second, up to `burst` at once.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from `user`'s bucket, or refuses it with the time to wait.
    pub fn check(&self, user: &str) -> Result<(), ApiError> {
        match self.limiter.check_key(&user.to_owned()) {
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

    /// Users with a bucket now.
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
}
