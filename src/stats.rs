//! Counters a server can export: the engine's own plus the actor runtime's.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;
use soloist_actors::RegistryStats;

/// Upper bounds of the histogram buckets of [`Stats::flush_sessions`] and
/// [`Stats::batch_commands`]; the last bucket counts everything above the last bound.
pub const BATCH_BUCKETS: [u64; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Upper bounds, in microseconds, of the buckets of [`Stats::forward_latency`]; the last
/// bucket counts everything above the last bound.
pub const LATENCY_BUCKETS_MICROS: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// A fixed-bucket histogram that many tasks update without a lock: `N` counts, the last for
/// values above every bound.
#[derive(Debug)]
pub(crate) struct Histogram<const N: usize> {
    bounds: &'static [u64],
    counts: [AtomicU64; N],
}

/// Commands per batch, sessions per flush.
type BatchHistogram = Histogram<{ BATCH_BUCKETS.len() + 1 }>;

/// Forward latencies.
type LatencyHistogram = Histogram<{ LATENCY_BUCKETS_MICROS.len() + 1 }>;

impl Default for BatchHistogram {
    fn default() -> Self {
        Histogram {
            bounds: &BATCH_BUCKETS,
            counts: Default::default(),
        }
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Histogram {
            bounds: &LATENCY_BUCKETS_MICROS,
            counts: Default::default(),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn record(&self, value: u64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(N - 1);
        self.counts[bucket].fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|count| count.load(Relaxed))
            .collect()
    }
}

/// The engine's live counters.
/// What a flush's outcomes other than plain commits were, for [`EngineStats::record_flush`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Refused {
    pub conflicts: u64,
    pub fenced: u64,
    /// Commits that took a live lease over (counted here as well, being part of the outcome).
    pub takeovers: u64,
}

#[derive(Debug, Default)]
pub(crate) struct EngineStats {
    commands: AtomicU64,
    command_errors: AtomicU64,
    flushes: AtomicU64,
    flushed_sessions: AtomicU64,
    rows: AtomicU64,
    conflicts: AtomicU64,
    fenced: AtomicU64,
    takeovers: AtomicU64,
    conflict_retries: AtomicU64,
    transient_retries: AtomicU64,
    storage_errors: AtomicU64,
    settled_outcomes: AtomicU64,
    loads: AtomicU64,
    batched_commands: AtomicU64,
    flush_sessions: BatchHistogram,
    batch_commands: BatchHistogram,
    forwarded: AtomicU64,
    forward_errors: AtomicU64,
    forward_micros: AtomicU64,
    forward_latency: LatencyHistogram,
}

impl EngineStats {
    pub fn record_command(&self, ok: bool) {
        self.commands.fetch_add(1, Relaxed);
        if !ok {
            self.command_errors.fetch_add(1, Relaxed);
        }
    }

    pub fn record_flush(&self, sessions: usize, rows: usize, refused: Refused) {
        self.flushes.fetch_add(1, Relaxed);
        self.flushed_sessions.fetch_add(sessions as u64, Relaxed);
        self.rows.fetch_add(rows as u64, Relaxed);
        self.conflicts.fetch_add(refused.conflicts, Relaxed);
        self.fenced.fetch_add(refused.fenced, Relaxed);
        self.takeovers.fetch_add(refused.takeovers, Relaxed);
        self.flush_sessions.record(sessions as u64);
    }

    pub fn record_batch(&self, commands: usize) {
        self.batched_commands.fetch_add(commands as u64, Relaxed);
        self.batch_commands.record(commands as u64);
    }

    pub fn record_conflict_retry(&self) {
        self.conflict_retries.fetch_add(1, Relaxed);
    }

    pub fn record_transient_retry(&self) {
        self.transient_retries.fetch_add(1, Relaxed);
    }

    pub fn record_storage_error(&self) {
        self.storage_errors.fetch_add(1, Relaxed);
    }

    pub fn record_settled_outcome(&self) {
        self.settled_outcomes.fetch_add(1, Relaxed);
    }

    /// A command sent to its owner: how long until its answer (or the failure), and whether
    /// the owner answered.
    pub fn record_forward(&self, took: std::time::Duration, answered: bool) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.forwarded.fetch_add(1, Relaxed);
        if !answered {
            self.forward_errors.fetch_add(1, Relaxed);
        }
        self.forward_micros.fetch_add(micros, Relaxed);
        self.forward_latency.record(micros);
    }

    pub fn record_load(&self) {
        self.loads.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self, runtime: RegistryStats, members: u64) -> Stats {
        Stats {
            members,
            forwarded: self.forwarded.load(Relaxed),
            forward_errors: self.forward_errors.load(Relaxed),
            forward_micros: self.forward_micros.load(Relaxed),
            forward_latency: self.forward_latency.snapshot(),
            live_sessions: runtime.live_actors,
            mailbox_depth: runtime.mailbox_depth,
            activations: runtime.activations,
            passivations: runtime.passivations,
            evictions: runtime.evictions,
            restarts: runtime.restarts,
            commands: self.commands.load(Relaxed),
            command_errors: self.command_errors.load(Relaxed),
            loads: self.loads.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            flushed_sessions: self.flushed_sessions.load(Relaxed),
            rows: self.rows.load(Relaxed),
            conflicts: self.conflicts.load(Relaxed),
            fenced: self.fenced.load(Relaxed),
            takeovers: self.takeovers.load(Relaxed),
            conflict_retries: self.conflict_retries.load(Relaxed),
            transient_retries: self.transient_retries.load(Relaxed),
            storage_errors: self.storage_errors.load(Relaxed),
            settled_outcomes: self.settled_outcomes.load(Relaxed),
            batched_commands: self.batched_commands.load(Relaxed),
            flush_sessions: self.flush_sessions.snapshot(),
            batch_commands: self.batch_commands.snapshot(),
        }
    }
}

/// A snapshot of the engine's counters (all monotonic except the first two).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Session actors alive now.
    pub live_sessions: u64,
    /// Commands queued in session mailboxes now.
    pub mailbox_depth: u64,
    /// Session actor activations.
    pub activations: u64,
    /// Session actors passivated (idle, evicted or at shutdown).
    pub passivations: u64,
    /// Session actors passivated to stay under the live-session cap.
    pub evictions: u64,
    /// Session actors restarted after a panic.
    pub restarts: u64,
    /// Commands answered.
    pub commands: u64,
    /// Commands answered with an error.
    pub command_errors: u64,
    /// Session loads from the database (activations and reloads after a conflict).
    pub loads: u64,
    /// Write transactions committed.
    pub flushes: u64,
    /// Session batches written by those transactions.
    pub flushed_sessions: u64,
    /// Message rows written.
    pub rows: u64,
    /// Session batches refused in a flush because another writer changed the session.
    pub conflicts: u64,
    /// Session batches refused in a flush because another process had taken the session over
    /// (its ownership epoch moved); each is reloaded and restaged like a conflict.
    pub fenced: u64,
    /// Writes that took a session over while another process's lease on it was running: a
    /// sign that requests for one session reach several processes (see docs/operations.md).
    pub takeovers: u64,
    /// Times a session reloaded and restaged after a conflict.
    pub conflict_retries: u64,
    /// Flushes retried after the database refused them before committing (busy, deadlock).
    pub transient_retries: u64,
    /// Flushes that failed.
    pub storage_errors: u64,
    /// Failed flushes whose outcome the engine settled by reading the database (committed, or
    /// not committed and retried) instead of answering an error.
    pub settled_outcomes: u64,
    /// Commands handled in session batches (the sum behind [`Stats::batch_commands`]).
    pub batched_commands: u64,
    /// Histogram of sessions per write transaction, bucketed by [`BATCH_BUCKETS`]; its sum is
    /// [`Stats::flushed_sessions`].
    pub flush_sessions: Vec<u64>,
    /// Histogram of commands per session batch, bucketed by [`BATCH_BUCKETS`].
    pub batch_commands: Vec<u64>,
    /// Live members in this process's view (0 when it is not a member).
    pub members: u64,
    /// Commands sent to their session's owner in another process.
    pub forwarded: u64,
    /// Of those, the ones whose owner could not be reached or stopped answering (each
    /// unreachable owner is tried once; the command was then placed again).
    pub forward_errors: u64,
    /// The forwards' total time, in microseconds (with [`Stats::forwarded`], the mean).
    pub forward_micros: u64,
    /// Histogram of forward latencies, bucketed by [`LATENCY_BUCKETS_MICROS`].
    pub forward_latency: Vec<u64>,
}
