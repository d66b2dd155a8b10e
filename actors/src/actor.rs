//! The [`Actor`] trait, and the task that runs one activation of an actor.
//!
//! The task, not the actor, owns the mailbox receiver. That is what makes supervision and
//! passivation safe: when a batch panics the task drops the broken actor and activates a new one
//! on the same mailbox; when the actor passivates the task closes the mailbox, handles whatever
//! was already queued, and only then lets the next activation for the key start.

use std::{
    future::Future,
    hash::Hash,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::FutureExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    registry::Inner,
    rt::{self, Instant},
    stats::Counters,
};

/// A keyed actor: state that exists at most once per key, handles its messages one batch at a
/// time, and needs no lock because nothing else touches it.
pub trait Actor: Sized + Send + 'static {
    /// Identifies one actor; the registry activates at most one actor per key.
    type Key: Clone + Eq + Hash + std::fmt::Debug + Send + Sync + 'static;
    /// What the actor's mailbox carries. Requests carry a `oneshot::Sender` for their reply.
    type Message: Send + 'static;
    /// Shared dependencies handed to every activation (store handles, config...).
    type Context: Send + Sync + 'static;

    /// Builds the actor for `key`: on first activation and again after a panic restart.
    /// Infallible: an actor that fails to load keeps that as state and answers its messages with
    /// errors.
    fn activate(key: &Self::Key, ctx: &Arc<Self::Context>) -> impl Future<Output = Self> + Send;

    /// Handles a batch: every message that was queued when the actor became ready, up to
    /// `max_batch`, in mailbox order. The actor should take all messages out of `batch`; whatever
    /// is left in it on return is dropped (dropping a message drops its reply sender, so the
    /// asker gets [`AskError::ActorFailed`](crate::AskError::ActorFailed)).
    fn handle(&mut self, batch: &mut Vec<Self::Message>) -> impl Future<Output = ()> + Send;

    /// Whether the actor has nothing worth keeping in memory after its last batch (say, it
    /// found that its key names nothing): the runtime then passivates it at once instead of
    /// after the idle timeout, so that requests for keys that lead nowhere leave nothing
    /// resident. Default: `false`.
    fn finished(&self) -> bool {
        false
    }

    /// Called once when the actor stops normally (idle passivation, eviction, shutdown) after its
    /// mailbox was drained. Default: nothing.
    fn stop(self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What the registry and one activation's task share.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    /// Registry clock reading at the last batch, so LRU eviction picks the longest idle actor.
    pub(crate) last_active: AtomicU64,
    /// True while activating, handling or stopping: eviction skips busy actors.
    pub(crate) busy: AtomicBool,
    /// Cancelled to ask the actor to passivate (explicit request or LRU eviction).
    pub(crate) passivate: CancellationToken,
    /// Cancelled once the task has fully ended; the next activation for the key waits for it.
    pub(crate) terminated: CancellationToken,
}

impl Lifecycle {
    /// A lifecycle for an actor that is about to activate (so counts as busy).
    pub(crate) fn new(now: u64) -> Self {
        Self {
            last_active: AtomicU64::new(now),
            busy: AtomicBool::new(true),
            passivate: CancellationToken::new(),
            terminated: CancellationToken::new(),
        }
    }
}

/// Everything one actor task needs, built by the registry inside the map's critical section.
pub(crate) struct ActorTask<A: Actor> {
    /// The registry: context, config, counters, shutdown token, and the map to leave.
    pub(crate) inner: Arc<Inner<A>>,
    /// The actor's key.
    pub(crate) key: A::Key,
    /// Unique per slot, so the task removes its own slot and never a successor's.
    pub(crate) generation: u64,
    /// The receiving half of the slot's mailbox.
    pub(crate) mailbox: mpsc::Receiver<A::Message>,
    /// Shared with the slot in the map.
    pub(crate) lifecycle: Arc<Lifecycle>,
    /// The previous activation's `terminated` token, if it was still draining: wait for it
    /// before activating so two activations for one key never overlap.
    pub(crate) predecessor: Option<CancellationToken>,
}

/// Removes the slot and signals termination when the task ends, however it ends (including a
/// panic outside the guarded calls, or the runtime dropping the task), so a successor waiting
/// on `terminated` can never hang.
struct Departure<A: Actor> {
    /// The registry whose map holds the slot.
    inner: Arc<Inner<A>>,
    /// The slot's key.
    key: A::Key,
    /// The slot's generation: remove only the slot this task owns.
    generation: u64,
    /// Holds the `terminated` token to cancel.
    lifecycle: Arc<Lifecycle>,
}

impl<A: Actor> Drop for Departure<A> {
    fn drop(&mut self) {
        self.inner.remove_slot(&self.key, self.generation);
        // A sender may find the key vacant and activate a fresh actor before the successor
        // already in the map (if any) is told to go ahead.
        rt::switch();
        self.lifecycle.terminated.cancel();
    }
}

/// Why an actor left its receive loop to passivate; for the log.
#[derive(Clone, Copy, Debug)]
enum StopReason {
    /// The registry is shutting down.
    Shutdown,
    /// `Registry::passivate` or LRU eviction asked for it.
    Requested,
    /// The actor said it has nothing left to keep ([`Actor::finished`]).
    Finished,
    /// No message arrived within the idle timeout.
    Idle,
    /// The mailbox closed by itself (cannot happen while the slot holds a sender).
    Closed,
}

/// Runs one activation of an actor for its whole life.
pub(crate) async fn run<A: Actor>(task: ActorTask<A>) {
    let ActorTask {
        inner,
        key,
        generation,
        mailbox,
        lifecycle,
        predecessor,
    } = task;
    let departure = Departure {
        inner,
        key,
        generation,
        lifecycle,
    };
    // `mailbox` moves into `drive` and is dropped before `departure`: leftover messages (after
    // an abandoned activation) are dropped before the successor may start.
    drive(&departure, mailbox, predecessor).await;
}

/// The body of [`run`]: activate, receive and handle batches, then drain and stop.
///
/// This future is what an idle actor's task holds for the whole life of the actor, so only the
/// receive loop is inline: activation, re-activation after a panic, the drain and `stop` run once
/// per activation and are boxed, so that their futures take no room in every idle task.
async fn drive<A: Actor>(
    departure: &Departure<A>,
    mut mailbox: mpsc::Receiver<A::Message>,
    predecessor: Option<CancellationToken>,
) {
    let Departure {
        inner,
        key,
        generation,
        lifecycle,
    } = departure;
    let generation = *generation;
    if let Some(predecessor) = predecessor {
        predecessor.cancelled().await;
    }
    let max_batch = inner.config.max_batch;
    let mut batch = Vec::new();
    let Some(mut actor) = Box::pin(activate::<A>(inner, key, generation, lifecycle)).await else {
        return Box::pin(abandon(&mut mailbox, &mut batch, max_batch)).await;
    };

    // Built once and polled again on every turn: creating the cancellation waits and a timer
    // for each message would cost more than the message round trip itself.
    let shutdown = inner.shutdown.cancelled();
    let passivate = lifecycle.passivate.cancelled();
    let idle_timeout = inner.config.idle_timeout;
    // The timer is not reset per message: when it fires, it checks how long the actor has
    // really been idle and re-arms for the rest.
    let idle_timer = rt::sleep(idle_timeout.unwrap_or(Duration::from_secs(365 * 24 * 3600)));
    tokio::pin!(shutdown, passivate, idle_timer);
    let mut last_active = Instant::now();
    let reason = loop {
        lifecycle.busy.store(false, Ordering::Relaxed);
        let received = tokio::select! {
            // Stop requests come first: the drain below still handles everything queued, and
            // a busy actor would otherwise never get round to passivating.
            biased;
            () = &mut shutdown => break StopReason::Shutdown,
            () = &mut passivate => break StopReason::Requested,
            received = mailbox.recv_many(&mut batch, max_batch) => received,
            () = &mut idle_timer, if idle_timeout.is_some() => {
                let idle_until = last_active + idle_timeout.unwrap_or_default();
                // A message that raced with the timer keeps the actor going.
                if Instant::now() >= idle_until && mailbox.is_empty() {
                    break StopReason::Idle;
                }
                idle_timer
                    .as_mut()
                    .reset(idle_until.max(Instant::now() + Duration::from_millis(1)));
                continue;
            }
        };
        if received == 0 {
            break StopReason::Closed;
        }
        if !handle(inner, lifecycle, &mut actor, &mut batch).await {
            match Box::pin(restart(inner, key, generation, lifecycle, actor)).await {
                Some(next) => actor = next,
                None => return Box::pin(abandon(&mut mailbox, &mut batch, max_batch)).await,
            }
        }
        last_active = Instant::now();
        if actor.finished() {
            break StopReason::Finished;
        }
    };
    Box::pin(passivate_actor(departure, mailbox, batch, actor, reason)).await;
}

/// Closes the mailbox, handles everything that got in before the close, and stops the actor.
async fn passivate_actor<A: Actor>(
    departure: &Departure<A>,
    mut mailbox: mpsc::Receiver<A::Message>,
    mut batch: Vec<A::Message>,
    mut actor: A,
    reason: StopReason,
) {
    let Departure {
        inner,
        key,
        generation,
        lifecycle,
    } = departure;
    let generation = *generation;
    let max_batch = inner.config.max_batch;
    // Senders that find the mailbox closed go back through the registry, which queues them in a
    // successor's mailbox; everything that got in before the close is handled here.
    debug!(?key, generation, ?reason, "actor passivating");
    lifecycle.busy.store(true, Ordering::Relaxed);
    // Until the close, senders still get into this mailbox, even after the idle check saw it
    // empty.
    rt::switch();
    mailbox.close();
    while mailbox.recv_many(&mut batch, max_batch).await > 0 {
        if !handle(inner, lifecycle, &mut actor, &mut batch).await {
            match restart(inner, key, generation, lifecycle, actor).await {
                Some(next) => actor = next,
                None => return abandon(&mut mailbox, &mut batch, max_batch).await,
            }
        }
    }
    if AssertUnwindSafe(actor.stop()).catch_unwind().await.is_err() {
        warn!(?key, generation, "actor panicked in stop");
    }
    Counters::add(&inner.counters.passivations, 1);
    debug!(?key, generation, ?reason, "actor passivated");
}

/// Hands one batch to the actor. Returns `false` if the batch panicked: the actor's state may
/// then be half-updated and must be replaced ([`restart`]) before it sees another message.
async fn handle<A: Actor>(
    inner: &Inner<A>,
    lifecycle: &Lifecycle,
    actor: &mut A,
    batch: &mut Vec<A::Message>,
) -> bool {
    lifecycle.busy.store(true, Ordering::Relaxed);
    Counters::add(&inner.counters.batches, 1);
    Counters::add(&inner.counters.messages, batch.len() as u64);
    let outcome = AssertUnwindSafe(actor.handle(batch)).catch_unwind().await;
    // Dropping the leftovers drops their reply senders: their askers get `ActorFailed`.
    batch.clear();
    lifecycle.last_active.store(inner.tick(), Ordering::Relaxed);
    outcome.is_ok()
}

/// Replaces an actor whose batch panicked with a fresh activation; `None` if re-activation was
/// abandoned at shutdown.
async fn restart<A: Actor>(
    inner: &Inner<A>,
    key: &A::Key,
    generation: u64,
    lifecycle: &Lifecycle,
    actor: A,
) -> Option<A> {
    Counters::add(&inner.counters.restarts, 1);
    warn!(
        ?key,
        generation, "actor panicked while handling a batch; restarting"
    );
    // The state may be half-updated: never let it see another message.
    drop(actor);
    activate::<A>(inner, key, generation, lifecycle).await
}

/// Builds the actor, retrying with exponential backoff if `activate` panics. Gives up (`None`)
/// only once the registry is shutting down, so shutdown cannot hang on an actor that never loads.
async fn activate<A: Actor>(
    inner: &Inner<A>,
    key: &A::Key,
    generation: u64,
    lifecycle: &Lifecycle,
) -> Option<A> {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    lifecycle.busy.store(true, Ordering::Relaxed);
    let mut backoff = FIRST_BACKOFF;
    loop {
        match AssertUnwindSafe(A::activate(key, &inner.context))
            .catch_unwind()
            .await
        {
            Ok(actor) => {
                Counters::add(&inner.counters.activations, 1);
                lifecycle.last_active.store(inner.tick(), Ordering::Relaxed);
                debug!(?key, generation, "actor activated");
                return Some(actor);
            }
            Err(_) => {
                Counters::add(&inner.counters.restarts, 1);
                if inner.shutdown.is_cancelled() {
                    warn!(
                        ?key,
                        generation, "actor activation panicked during shutdown; giving up"
                    );
                    return None;
                }
                warn!(
                    ?key,
                    generation,
                    ?backoff,
                    "actor activation panicked; retrying"
                );
                tokio::select! {
                    () = rt::sleep(backoff) => {}
                    () = inner.shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Closes the mailbox and drops everything in it, when there is no actor left to handle it.
/// Askers get `ActorFailed`.
async fn abandon<M>(mailbox: &mut mpsc::Receiver<M>, batch: &mut Vec<M>, max_batch: usize) {
    mailbox.close();
    batch.clear();
    while mailbox.recv_many(batch, max_batch).await > 0 {
        batch.clear();
    }
}
