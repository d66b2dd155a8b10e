//! Counters kept by a registry, and the snapshot of them callers read.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a registry's state and lifetime counters, from
/// [`Registry::stats`](crate::Registry::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Actors in the registry's map right now: running, draining, or waiting to activate.
    pub live_actors: u64,
    /// Messages queued in the mailboxes of those actors, summed.
    pub mailbox_depth: u64,
    /// Successful calls to `Actor::activate`, including re-activations after a panic.
    pub activations: u64,
    /// Actors that stopped normally: idle, asked to passivate, evicted, or shut down.
    pub passivations: u64,
    /// Passivations requested to keep the number of live actors under the configured cap.
    pub evictions: u64,
    /// Batches (or activations) that panicked, after which the actor was rebuilt.
    pub restarts: u64,
    /// Calls to `Actor::handle`.
    pub batches: u64,
    /// Messages handed to `Actor::handle`, over all batches.
    pub messages: u64,
}

/// Lifetime counters, bumped by actor tasks without locking.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// See [`RegistryStats::activations`].
    pub(crate) activations: AtomicU64,
    /// See [`RegistryStats::passivations`].
    pub(crate) passivations: AtomicU64,
    /// See [`RegistryStats::evictions`].
    pub(crate) evictions: AtomicU64,
    /// See [`RegistryStats::restarts`].
    pub(crate) restarts: AtomicU64,
    /// See [`RegistryStats::batches`].
    pub(crate) batches: AtomicU64,
    /// See [`RegistryStats::messages`].
    pub(crate) messages: AtomicU64,
}

impl Counters {
    /// Adds `amount` to `counter`; counters are statistics, so no ordering is needed.
    pub(crate) fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    /// Copies the counters into a snapshot; the caller fills in the gauges.
    pub(crate) fn snapshot(&self) -> RegistryStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RegistryStats {
            live_actors: 0,
            mailbox_depth: 0,
            activations: read(&self.activations),
            passivations: read(&self.passivations),
            evictions: read(&self.evictions),
            restarts: read(&self.restarts),
            batches: read(&self.batches),
            messages: read(&self.messages),
        }
    }
}
