//! The runtime primitives at which the registry's tasks interleave: tokio's, or shuttle's models
//! of them when the crate is compiled with `--cfg shuttle`.
//!
//! Normal builds use tokio and the standard library directly; every item here is a re-export or
//! an inlined no-op, so they cost nothing. The `soloist-actors-shuttle` package (`shuttle/` beside
//! `src/`) compiles these same sources with `cfg(shuttle)` set by its build script, and runs the
//! registry under shuttle's randomized schedulers (see `shuttle/schedules.rs`). Under shuttle:
//! - tasks are shuttle futures, and the activation gate is shuttle's `RwLock`, so blocking on it
//!   is a scheduling point instead of a deadlock of the single thread shuttle runs on;
//! - [`switch`] is a scheduling point, placed where another task acting in between matters;
//! - time is virtual: a [`Sleep`] completes at whatever point the scheduler next runs its task
//!   after one yield, and moves the clock forward to its deadline. So an idle timeout can fire
//!   at any interleaving point, as it can on a loaded machine.
//!
//! Tokio's channels, `CancellationToken`, `TaskTracker` and `DashMap` are used as they are: they
//! contain no scheduling points, so under shuttle each of their operations is atomic. That is
//! what their locks and atomics guarantee anyway, as long as no task holds a `DashMap` guard
//! across a scheduling point (which the registry never does: its guards are never held across an
//! `.await` or a [`switch`]).

#[cfg(not(shuttle))]
pub(crate) use std::sync::RwLock;
#[cfg(not(shuttle))]
pub(crate) use tokio::{
    task::yield_now,
    time::{Instant, sleep},
};

#[cfg(shuttle)]
pub(crate) use shuttle::{future::yield_now, sync::RwLock};
#[cfg(shuttle)]
pub(crate) use virtual_time::{Instant, sleep};

/// Runs `future` as a new task.
#[cfg(not(shuttle))]
pub(crate) fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(future);
}

/// Runs `future` as a new task.
#[cfg(shuttle)]
pub(crate) fn spawn<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    shuttle::future::spawn(future);
}

/// A point where another task may run before this one goes on: a no-op in normal builds.
#[cfg(not(shuttle))]
#[inline(always)]
pub(crate) fn switch() {}

/// A point where another task may run before this one goes on.
#[cfg(shuttle)]
pub(crate) fn switch() {
    // A panicking task is being torn down by shuttle: scheduling it again would not help.
    if !std::thread::panicking() {
        shuttle::thread::yield_now();
    }
}

/// Time under shuttle, which does not model it: a clock that moves only when a timer fires.
#[cfg(shuttle)]
mod virtual_time {
    use std::{
        cell::Cell,
        future::Future,
        ops::Add,
        pin::Pin,
        task::{Context, Poll},
        time::Duration,
    };

    std::thread_local! {
        /// Virtual time elapsed on this thread. Shuttle runs every task of an execution on the
        /// thread that called it; only differences between readings matter.
        static NOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// A reading of the virtual clock.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub(crate) struct Instant(Duration);

    impl Instant {
        /// The virtual clock now.
        pub(crate) fn now() -> Self {
            Self(NOW.get())
        }
    }

    impl Add<Duration> for Instant {
        type Output = Self;

        fn add(self, duration: Duration) -> Self {
            Self(self.0 + duration)
        }
    }

    /// A timer that fires the next time its task runs after having yielded once.
    pub(crate) struct Sleep {
        /// Where the clock moves when the timer fires, if it is behind.
        deadline: Instant,
        /// The yield that lets other tasks run first; `None` once it completed.
        yielding: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    }

    /// A timer for `duration` from now.
    pub(crate) fn sleep(duration: Duration) -> Sleep {
        Sleep {
            deadline: Instant::now() + duration,
            yielding: Some(Box::pin(shuttle::future::yield_now())),
        }
    }

    impl Sleep {
        /// Re-arms the timer for `deadline`.
        pub(crate) fn reset(mut self: Pin<&mut Self>, deadline: Instant) {
            self.deadline = deadline;
            self.yielding = Some(Box::pin(shuttle::future::yield_now()));
        }
    }

    impl Future for Sleep {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if let Some(yielding) = self.yielding.as_mut() {
                if yielding.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.yielding = None;
                NOW.set(NOW.get().max(self.deadline.0));
            }
            Poll::Ready(())
        }
    }
}
