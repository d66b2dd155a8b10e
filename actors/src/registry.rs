//! [`Registry`]: the map from keys to actor mailboxes, and everything that touches it.
//!
//! Each slot in the map holds a mailbox sender and the [`Lifecycle`] it shares with its actor
//! task. A slot whose sender is closed belongs to an actor that is draining; the next message
//! for that key replaces it with a new slot whose task waits for the old one to end before it
//! activates. No DashMap guard is ever held across an `.await`.

use std::{
    fmt,
    ops::Deref,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, Entry};
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use crate::{
    actor::{self, Actor, ActorTask, Lifecycle},
    error::{AskError, SendError},
    rt::{self, RwLock},
    stats::{Counters, RegistryStats},
};

/// How a [`Registry`] sizes mailboxes and batches and when it passivates actors.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Messages each actor's bounded mailbox holds before senders wait. Default 256; at least 1.
    pub mailbox_capacity: usize,
    /// Most messages handed to one `Actor::handle` call. Default 256; at least 1.
    pub max_batch: usize,
    /// An actor with an empty mailbox for this long passivates. Default 60 s; `None` keeps
    /// actors live until they are asked to passivate, evicted, or shut down.
    pub idle_timeout: Option<Duration>,
    /// How long a sender waits on a full mailbox before getting `Overloaded`. Default `None`:
    /// wait as long as it takes (backpressure).
    pub send_timeout: Option<Duration>,
    /// Soft cap on live actors: above it, the least recently used idle actors are asked to
    /// passivate. Default `None`: no cap.
    pub max_live_actors: Option<usize>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            mailbox_capacity: 256,
            max_batch: 256,
            idle_timeout: Some(Duration::from_secs(60)),
            send_timeout: None,
            max_live_actors: None,
        }
    }
}

/// One key's entry in the map.
pub(crate) struct Slot<M> {
    /// The actor's mailbox; closed once the actor has started to passivate.
    sender: mpsc::Sender<M>,
    /// Unique per slot, so a finished task removes its own slot and never its successor's.
    generation: u64,
    /// Shared with the actor task: activity, passivation request, termination.
    lifecycle: Arc<Lifecycle>,
}

impl<M> Slot<M> {
    /// Messages queued (or being sent) in the mailbox.
    fn depth(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }

    /// Whether LRU eviction may ask this actor to passivate: activated, not handling anything,
    /// nothing queued, and not already on its way out.
    fn is_evictable(&self) -> bool {
        !self.lifecycle.busy.load(Ordering::Relaxed) && self.depth() == 0 && !self.is_leaving()
    }

    /// Whether the actor has been asked to passivate or has started to: it will leave the map
    /// without further help.
    fn is_leaving(&self) -> bool {
        self.sender.is_closed() || self.lifecycle.passivate.is_cancelled()
    }
}

/// The state behind a [`Registry`], shared with every actor task.
pub(crate) struct Inner<A: Actor> {
    /// Key → mailbox of the actor that currently owns the key.
    map: DashMap<A::Key, Slot<A::Message>>,
    /// Number of slots in `map`, kept alongside it so the hot path never walks the shards.
    slots: AtomicUsize,
    /// Handed to every activation.
    pub(crate) context: Arc<A::Context>,
    /// The configuration, with capacities clamped to at least 1.
    pub(crate) config: RegistryConfig,
    /// Lifetime statistics.
    pub(crate) counters: Counters,
    /// Logical clock for `Lifecycle::last_active`; only its order matters.
    clock: AtomicU64,
    /// Source of slot generations.
    next_generation: AtomicU64,
    /// Set once shutdown starts; checked before every send and every activation.
    shutting_down: AtomicBool,
    /// Activations hold it shared while they check `shutting_down` and spawn; shutdown takes it
    /// exclusively to set the flag. So every actor is either spawned before shutdown starts
    /// waiting on the tracker, or sees the flag and is never spawned.
    activation_gate: RwLock<()>,
    /// Cancelled at shutdown; every actor selects on it.
    pub(crate) shutdown: CancellationToken,
    /// Every actor task, so shutdown can wait for the last one.
    tracker: TaskTracker,
    /// Set while one caller scans for LRU victims, so concurrent activations do not all scan.
    evicting: AtomicBool,
}

impl<A: Actor> Inner<A> {
    /// Advances the logical clock.
    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Refuses new messages and new activations, and tells every actor to drain and stop.
    fn begin_shutdown(&self) {
        {
            let _exclusive = self
                .activation_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            self.shutting_down.store(true, Ordering::SeqCst);
        }
        self.shutdown.cancel();
        self.tracker.close();
    }

    /// Removes `key`'s slot if it is still the one with `generation`.
    pub(crate) fn remove_slot(&self, key: &A::Key, generation: u64) {
        if self
            .map
            .remove_if(key, |_, slot| slot.generation == generation)
            .is_some()
        {
            self.slots.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Routes messages to keyed actors, activating them on demand. Cheap to clone; every clone
/// refers to the same actors.
///
/// Dropping the last clone starts a shutdown without waiting for it: actors drain their
/// mailboxes and stop in the background (as long as the runtime keeps running). Call
/// [`shutdown`](Self::shutdown) to wait for that.
pub struct Registry<A: Actor> {
    /// Shared by the clones only: actor tasks hold the `Inner` directly, so that the last
    /// clone's drop can be noticed.
    inner: Arc<Owner<A>>,
}

/// The registry handles' share of [`Inner`]; dropped with the last [`Registry`] clone.
struct Owner<A: Actor>(Arc<Inner<A>>);

impl<A: Actor> Deref for Owner<A> {
    type Target = Inner<A>;

    fn deref(&self) -> &Inner<A> {
        &self.0
    }
}

impl<A: Actor> Drop for Owner<A> {
    fn drop(&mut self) {
        // Actor tasks keep `Inner`, and `Inner`'s map keeps their mailboxes open: without this,
        // actors that never idle out would outlive every handle.
        if !self.shutting_down.load(Ordering::SeqCst) {
            debug!("last actor registry handle dropped; shutting down");
            self.begin_shutdown();
        }
    }
}

impl<A: Actor> Clone for Registry<A> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<A: Actor> fmt::Debug for Registry<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.inner.config)
            .field("live_actors", &self.live_count())
            .field("shutting_down", &self.is_shutting_down())
            .finish_non_exhaustive()
    }
}

/// What the lock-free attempt to enqueue a message found.
enum FastPath<M> {
    /// The message is in the mailbox.
    Sent,
    /// The mailbox is full; wait on this sender.
    Full(M, mpsc::Sender<M>),
    /// No open mailbox for the key: activate one.
    Missing(M),
}

impl<A: Actor> Registry<A> {
    /// Creates an empty registry. Actors are spawned on the current tokio runtime when their
    /// first message arrives, so `send` and `ask` must run inside one.
    pub fn new(context: Arc<A::Context>, config: RegistryConfig) -> Self {
        let config = RegistryConfig {
            mailbox_capacity: config.mailbox_capacity.max(1),
            max_batch: config.max_batch.max(1),
            ..config
        };
        Self {
            inner: Arc::new(Owner(Arc::new(Inner {
                map: DashMap::new(),
                slots: AtomicUsize::new(0),
                context,
                config,
                counters: Counters::default(),
                clock: AtomicU64::new(0),
                next_generation: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                activation_gate: RwLock::new(()),
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                evicting: AtomicBool::new(false),
            }))),
        }
    }

    /// Queues `message` for `key`'s actor, activating it if needed.
    ///
    /// Waits while the mailbox is full, for at most `send_timeout` if one is configured. A
    /// message that meets a mailbox closed by passivation is re-routed to the key's next
    /// activation, so once this returns `Ok` the message will be handled. Messages sent one after
    /// another by one caller are handled in order.
    pub async fn send(
        &self,
        key: A::Key,
        message: A::Message,
    ) -> Result<(), SendError<A::Message>> {
        let mut message = message;
        loop {
            if self.is_shutting_down() {
                return Err(SendError::ShuttingDown(message));
            }
            let sender = match self.try_send_now(&key, message) {
                FastPath::Sent => return Ok(()),
                FastPath::Full(returned, sender) => {
                    message = returned;
                    sender
                }
                FastPath::Missing(returned) => {
                    message = returned;
                    match self.open_mailbox(&key) {
                        Some(sender) => sender,
                        None => return Err(SendError::ShuttingDown(message)),
                    }
                }
            };
            // No map guard is held from here on.
            match self.inner.config.send_timeout {
                None => match sender.send(message).await {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::SendError(returned)) => message = returned,
                },
                Some(timeout) => match sender.send_timeout(message, timeout).await {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::SendTimeoutError::Timeout(returned)) => {
                        return Err(SendError::Overloaded(returned));
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(returned)) => message = returned,
                },
            }
            // The mailbox closed under us: its actor is passivating. Go round again; the
            // registry will route the message to the next activation. Yield first: if actors
            // cannot run at all (the runtime is shutting down and drops new tasks at once),
            // this loop must not spin without ever returning to the scheduler.
            rt::yield_now().await;
        }
    }

    /// Sends the request built by `make` to `key`'s actor and waits for its reply.
    ///
    /// `make` receives the reply sender to put in the message. Fails with `Overloaded` or
    /// `ShuttingDown` if the request was not accepted, and with `ActorFailed` if the actor dropped
    /// the reply sender without answering (for example because it panicked).
    pub async fn ask<R: Send>(
        &self,
        key: A::Key,
        make: impl FnOnce(oneshot::Sender<R>) -> A::Message,
    ) -> Result<R, AskError> {
        let (reply_to, reply) = oneshot::channel();
        self.send(key, make(reply_to)).await?;
        reply.await.map_err(|_| AskError::ActorFailed)
    }

    /// The shared context handed to every activation.
    pub fn context(&self) -> &Arc<A::Context> {
        &self.inner.context
    }

    /// Actors in the map: running, draining, or waiting for a predecessor to finish.
    pub fn live_count(&self) -> usize {
        self.inner.slots.load(Ordering::Relaxed)
    }

    /// Whether `key` has an actor in the map (running, draining, or about to activate).
    pub fn is_live(&self, key: &A::Key) -> bool {
        self.inner.map.contains_key(key)
    }

    /// The keys that have an actor in the map now (a snapshot).
    pub fn live_keys(&self) -> Vec<A::Key> {
        self.inner
            .map
            .iter()
            .map(|slot| slot.key().clone())
            .collect()
    }

    /// Asks `key`'s actor, if any, to passivate: it stops accepting messages, handles what is
    /// queued, and calls `stop`. Later messages activate a new actor. Does not wait.
    pub fn passivate(&self, key: &A::Key) {
        if let Some(slot) = self.inner.map.get(key) {
            slot.lifecycle.passivate.cancel();
        }
    }

    /// A snapshot of the registry's gauges and counters.
    pub fn stats(&self) -> RegistryStats {
        let mut stats = self.inner.counters.snapshot();
        stats.live_actors = self.live_count() as u64;
        stats.mailbox_depth = self.inner.map.iter().map(|slot| slot.depth() as u64).sum();
        stats
    }

    /// Whether [`shutdown`](Self::shutdown) has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuses new messages (`SendError::ShuttingDown` / `AskError::ShuttingDown`), lets every
    /// actor drain its mailbox (messages already queued ARE handled), calls `stop()`, and
    /// resolves when every actor task has ended. Safe to call more than once, concurrently.
    pub async fn shutdown(&self) {
        debug!("actor registry shutting down");
        self.inner.begin_shutdown();
        self.inner.tracker.wait().await;
        debug!("actor registry shut down");
    }

    /// Enqueues without waiting, holding the map's read guard only for the `try_send`.
    fn try_send_now(&self, key: &A::Key, message: A::Message) -> FastPath<A::Message> {
        let Some(slot) = self.inner.map.get(key) else {
            return FastPath::Missing(message);
        };
        match slot.sender.try_send(message) {
            Ok(()) => FastPath::Sent,
            Err(mpsc::error::TrySendError::Full(message)) => {
                FastPath::Full(message, slot.sender.clone())
            }
            Err(mpsc::error::TrySendError::Closed(message)) => FastPath::Missing(message),
        }
    }

    /// Returns an open mailbox for `key`, spawning a new actor if there is none or the current
    /// one is passivating. `None` once shutdown has started.
    fn open_mailbox(&self, key: &A::Key) -> Option<mpsc::Sender<A::Message>> {
        let gate = self
            .inner
            .activation_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let (sender, task, added) = match self.inner.map.entry(key.clone()) {
            // Checked inside the critical section: see `activation_gate`.
            _ if self.is_shutting_down() => return None,
            Entry::Occupied(mut occupied) => {
                if occupied.get().sender.is_closed() {
                    // The actor is draining. Its successor queues messages at once but
                    // activates only after it has ended.
                    let predecessor = occupied.get().lifecycle.terminated.clone();
                    let (slot, task) = self.new_slot(key.clone(), Some(predecessor));
                    let sender = slot.sender.clone();
                    occupied.insert(slot);
                    (sender, Some(task), false)
                } else {
                    (occupied.get().sender.clone(), None, false)
                }
            }
            Entry::Vacant(vacant) => {
                let (slot, task) = self.new_slot(key.clone(), None);
                let sender = slot.sender.clone();
                vacant.insert(slot);
                self.inner.slots.fetch_add(1, Ordering::Relaxed);
                (sender, Some(task), true)
            }
        };
        // Spawned after the map guard is released (a runtime that is shutting down drops the
        // task at once, and its cleanup takes the same shard lock), but under the gate, so
        // shutdown cannot start waiting on the tracker before this task is in it.
        if let Some(task) = task {
            // The slot is in the map and may take messages, passivation requests or a
            // successor before its task exists.
            rt::switch();
            rt::spawn(self.inner.tracker.track_future(actor::run(task)));
        }
        drop(gate);
        if added {
            self.evict_if_over_cap();
        }
        Some(sender)
    }

    /// Creates a mailbox, and the task that will own it once spawned.
    fn new_slot(
        &self,
        key: A::Key,
        predecessor: Option<CancellationToken>,
    ) -> (Slot<A::Message>, ActorTask<A>) {
        let (sender, mailbox) = mpsc::channel(self.inner.config.mailbox_capacity);
        let lifecycle = Arc::new(Lifecycle::new(self.inner.tick()));
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let task = ActorTask {
            inner: Arc::clone(&self.inner.0),
            key,
            generation,
            mailbox,
            lifecycle: Arc::clone(&lifecycle),
            predecessor,
        };
        let slot = Slot {
            sender,
            generation,
            lifecycle,
        };
        (slot, task)
    }

    /// Above the cap, asks the least recently used idle actors to passivate. Evicts down to
    /// 15/16 of the cap so that the scan of the map is paid once per several activations.
    fn evict_if_over_cap(&self) {
        let Some(cap) = self.inner.config.max_live_actors else {
            return;
        };
        let live = self.live_count();
        if live <= cap || self.inner.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let mut leaving = 0;
        let mut idle: Vec<(u64, Arc<Lifecycle>)> = Vec::new();
        for slot in self.inner.map.iter() {
            if slot.is_leaving() {
                leaving += 1;
            } else if slot.is_evictable() {
                let lifecycle = &slot.lifecycle;
                idle.push((
                    lifecycle.last_active.load(Ordering::Relaxed),
                    Arc::clone(lifecycle),
                ));
            }
        }
        // Actors already on their way out count as gone, or every activation while they
        // drain would evict more.
        let excess = live.saturating_sub(leaving).saturating_sub(cap * 15 / 16);
        if idle.len() > excess {
            idle.select_nth_unstable_by_key(excess, |(last_active, _)| *last_active);
            idle.truncate(excess);
        }
        for (_, lifecycle) in &idle {
            lifecycle.passivate.cancel();
        }
        Counters::add(&self.inner.counters.evictions, idle.len() as u64);
        self.inner.evicting.store(false, Ordering::Release);
    }
}
