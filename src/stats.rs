//! What the engine counts and measures.
//!
//! Every event is recorded once, here, two ways: in the engine's own counters (read back with
//! [`Engine::stats`](crate::Engine::stats) as a [`Stats`], for tests and for programs that link
//! the library without a metrics exporter), and through the [`metrics`] facade, which does
//! nothing until the program installs a recorder (the server installs a Prometheus exporter).
//! The engine never formats metrics itself. [`describe`] lists every metric it emits with its
//! unit and help text; [`METRICS`] names them.
//!
//! Handles to the unlabelled metrics are taken when the engine is built, so a recorder must be
//! installed before [`Engine::new`](crate::Engine::new) for them to reach it (as with any
//! library that uses the facade).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Counter, Histogram, Unit, counter, histogram};
use serde::Serialize;
use soloist_actors::RegistryStats;

/// Buckets for the histograms of counts (commands per batch, sessions and rows per flush): the
/// upper bounds a Prometheus exporter should use for [`COUNT_HISTOGRAMS`].
pub const COUNT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Buckets, in seconds, for the latency histograms ([`LATENCY_HISTOGRAMS`]): from 50 µs (an
/// SQLite commit) to 10 s (a command timeout).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The engine's histograms of counts.
pub const COUNT_HISTOGRAMS: [&str; 3] = [FLUSH_SESSIONS, FLUSH_ROWS, BATCH_COMMANDS];

/// The engine's histograms of durations, in seconds.
pub const LATENCY_HISTOGRAMS: [&str; 4] = [
    COMMAND_SECONDS,
    MAILBOX_WAIT_SECONDS,
    FLUSH_SECONDS,
    FORWARD_SECONDS,
];

/// `soloist_commands_total{command}`: commands answered, by command (`append`, `create`, ...).
pub const COMMANDS: &str = "soloist_commands_total";
/// `soloist_command_errors_total{command, code}`: commands answered with an error, by command
/// and error code ([`Error::code`](crate::Error::code)).
pub const COMMAND_ERRORS: &str = "soloist_command_errors_total";
/// `soloist_command_seconds{command}`: from a command's arrival to its answer; for a write,
/// the answer comes after its batch committed (for `append`, append to commit).
pub const COMMAND_SECONDS: &str = "soloist_command_seconds";
/// `soloist_mailbox_wait_seconds`: from a command's sending to its actor taking it in a batch
/// (waiting for mailbox room, then in the mailbox).
pub const MAILBOX_WAIT_SECONDS: &str = "soloist_mailbox_wait_seconds";
/// `soloist_batch_commands`: commands per session batch.
pub const BATCH_COMMANDS: &str = "soloist_batch_commands";
/// `soloist_loads_total`: session loads from the database.
pub const LOADS: &str = "soloist_loads_total";
/// `soloist_flushes_total`: write transactions committed.
pub const FLUSHES: &str = "soloist_flushes_total";
/// `soloist_flushed_sessions_total`: session batches written by those transactions.
pub const FLUSHED_SESSIONS: &str = "soloist_flushed_sessions_total";
/// `soloist_rows_total`: message rows written.
pub const ROWS: &str = "soloist_rows_total";
/// `soloist_flush_seconds`: one write transaction, retries included, from its start to its
/// commit (or failure).
pub const FLUSH_SECONDS: &str = "soloist_flush_seconds";
/// `soloist_flush_sessions`: session batches per committed write transaction.
pub const FLUSH_SESSIONS: &str = "soloist_flush_sessions";
/// `soloist_flush_rows`: message rows per committed write transaction.
pub const FLUSH_ROWS: &str = "soloist_flush_rows";
/// `soloist_conflicts_total`: session batches refused because another writer changed the session.
pub const CONFLICTS: &str = "soloist_conflicts_total";
/// `soloist_fenced_total`: session batches refused because another process took the session over.
pub const FENCED: &str = "soloist_fenced_total";
/// `soloist_takeovers_total`: writes that took a session over from another process's running lease.
pub const TAKEOVERS: &str = "soloist_takeovers_total";
/// `soloist_conflict_retries_total`: reloads and restages after a conflict.
pub const CONFLICT_RETRIES: &str = "soloist_conflict_retries_total";
/// `soloist_transient_retries_total`: flushes retried after a transient database refusal.
pub const TRANSIENT_RETRIES: &str = "soloist_transient_retries_total";
/// `soloist_storage_errors_total`: flushes that failed.
pub const STORAGE_ERRORS: &str = "soloist_storage_errors_total";
/// `soloist_settled_outcomes_total`: failed flushes settled by reading the database.
pub const SETTLED_OUTCOMES: &str = "soloist_settled_outcomes_total";
/// `soloist_forwarded_total`: commands sent to their session's owner in another process.
pub const FORWARDED: &str = "soloist_forwarded_total";
/// `soloist_forward_errors_total`: forwards whose owner could not be reached or stopped answering.
pub const FORWARD_ERRORS: &str = "soloist_forward_errors_total";
/// `soloist_forward_seconds`: from sending a command to its owner to its answer.
pub const FORWARD_SECONDS: &str = "soloist_forward_seconds";
/// `soloist_purged_sessions_total`: expired sessions the purge erased.
pub const PURGED_SESSIONS: &str = "soloist_purged_sessions_total";
/// `soloist_live_sessions`: session actors alive (set by [`Engine::publish_gauges`]).
///
/// [`Engine::publish_gauges`]: crate::Engine::publish_gauges
pub const LIVE_SESSIONS: &str = "soloist_live_sessions";
/// `soloist_mailbox_depth`: commands queued in session mailboxes (a gauge, as above).
pub const MAILBOX_DEPTH: &str = "soloist_mailbox_depth";
/// `soloist_members`: live members in this process's view of the cluster (0: not a member).
pub const MEMBERS: &str = "soloist_members";
/// `soloist_activations_total`: session actor activations (published with the gauges).
pub const ACTIVATIONS: &str = "soloist_activations_total";
/// `soloist_passivations_total`: session actors passivated (published with the gauges).
pub const PASSIVATIONS: &str = "soloist_passivations_total";
/// `soloist_evictions_total`: session actors passivated to respect the cap.
pub const EVICTIONS: &str = "soloist_evictions_total";
/// `soloist_restarts_total`: session actors restarted after a panic.
pub const RESTARTS: &str = "soloist_restarts_total";

/// Every metric the engine emits, with its unit and help text: `(name, kind, unit, help)`.
pub const METRICS: [(&str, Kind, Unit, &str); 30] = [
    (COMMANDS, Kind::Counter, Unit::Count, "Commands answered."),
    (
        COMMAND_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Commands answered with an error, by code.",
    ),
    (
        COMMAND_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "From a command's arrival to its answer (a write's after its commit).",
    ),
    (
        MAILBOX_WAIT_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "From sending a command to its actor taking it.",
    ),
    (
        BATCH_COMMANDS,
        Kind::Histogram,
        Unit::Count,
        "Commands per session batch.",
    ),
    (
        LOADS,
        Kind::Counter,
        Unit::Count,
        "Session loads from the database.",
    ),
    (
        FLUSHES,
        Kind::Counter,
        Unit::Count,
        "Write transactions committed.",
    ),
    (
        FLUSHED_SESSIONS,
        Kind::Counter,
        Unit::Count,
        "Session batches written.",
    ),
    (ROWS, Kind::Counter, Unit::Count, "Message rows written."),
    (
        FLUSH_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "One write transaction, retries included.",
    ),
    (
        FLUSH_SESSIONS,
        Kind::Histogram,
        Unit::Count,
        "Session batches per committed write transaction.",
    ),
    (
        FLUSH_ROWS,
        Kind::Histogram,
        Unit::Count,
        "Message rows per committed write transaction.",
    ),
    (
        CONFLICTS,
        Kind::Counter,
        Unit::Count,
        "Session batches refused because another writer changed the session.",
    ),
    (
        FENCED,
        Kind::Counter,
        Unit::Count,
        "Session batches refused because another process had taken the session over.",
    ),
    (
        TAKEOVERS,
        Kind::Counter,
        Unit::Count,
        "Writes that took a session over from another process's running lease.",
    ),
    (
        CONFLICT_RETRIES,
        Kind::Counter,
        Unit::Count,
        "Reloads and restages after a conflict.",
    ),
    (
        TRANSIENT_RETRIES,
        Kind::Counter,
        Unit::Count,
        "Flushes retried after a transient database refusal.",
    ),
    (
        STORAGE_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Flushes that failed.",
    ),
    (
        SETTLED_OUTCOMES,
        Kind::Counter,
        Unit::Count,
        "Failed flushes settled by reading the database.",
    ),
    (
        FORWARDED,
        Kind::Counter,
        Unit::Count,
        "Commands sent to their session's owner in another process.",
    ),
    (
        FORWARD_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Forwards whose owner could not be reached or stopped answering.",
    ),
    (
        FORWARD_SECONDS,
        Kind::Histogram,
        Unit::Seconds,
        "From sending a command to its owner to its answer.",
    ),
    (
        PURGED_SESSIONS,
        Kind::Counter,
        Unit::Count,
        "Expired sessions the purge erased.",
    ),
    (
        LIVE_SESSIONS,
        Kind::Gauge,
        Unit::Count,
        "Session actors alive now.",
    ),
    (
        MAILBOX_DEPTH,
        Kind::Gauge,
        Unit::Count,
        "Commands queued in session mailboxes.",
    ),
    (
        MEMBERS,
        Kind::Gauge,
        Unit::Count,
        "Live members in this process's view of the cluster (0: not a member).",
    ),
    (
        ACTIVATIONS,
        Kind::Counter,
        Unit::Count,
        "Session actor activations.",
    ),
    (
        PASSIVATIONS,
        Kind::Counter,
        Unit::Count,
        "Session actors passivated.",
    ),
    (
        EVICTIONS,
        Kind::Counter,
        Unit::Count,
        "Session actors passivated to respect the cap.",
    ),
    (
        RESTARTS,
        Kind::Counter,
        Unit::Count,
        "Session actors restarted after a panic.",
    ),
];

/// The kind of a metric in [`METRICS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// Describes every metric in [`METRICS`] to the installed recorder (its help text and unit).
pub fn describe() {
    for (name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
    }
}

/// What a flush's outcomes other than plain commits were, for [`EngineStats::record_flush`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Refused {
    pub conflicts: u64,
    pub fenced: u64,
    /// Commits that took a live lease over (counted here as well, being part of the outcome).
    pub takeovers: u64,
}

/// The engine's live counters, and the facade's handles to its unlabelled metrics.
#[derive(Debug)]
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
    forwarded: AtomicU64,
    forward_errors: AtomicU64,
    purged_sessions: AtomicU64,
    emit: Emit,
    /// The facade's handles per command (`soloist_commands_total{command}`,
    /// `soloist_command_seconds{command}`), taken on a command's first answer.
    by_command: DashMap<&'static str, (Counter, Histogram)>,
}

/// Handles to the facade's unlabelled metrics, taken once (a lookup per event otherwise).
#[derive(Debug)]
struct Emit {
    loads: Counter,
    flushes: Counter,
    flushed_sessions: Counter,
    rows: Counter,
    conflicts: Counter,
    fenced: Counter,
    takeovers: Counter,
    conflict_retries: Counter,
    transient_retries: Counter,
    storage_errors: Counter,
    settled_outcomes: Counter,
    forwarded: Counter,
    forward_errors: Counter,
    purged_sessions: Counter,
    mailbox_wait: Histogram,
    batch_commands: Histogram,
    flush_seconds: Histogram,
    flush_sessions: Histogram,
    flush_rows: Histogram,
    forward_seconds: Histogram,
}

impl Default for Emit {
    fn default() -> Self {
        Self {
            loads: counter!(LOADS),
            flushes: counter!(FLUSHES),
            flushed_sessions: counter!(FLUSHED_SESSIONS),
            rows: counter!(ROWS),
            conflicts: counter!(CONFLICTS),
            fenced: counter!(FENCED),
            takeovers: counter!(TAKEOVERS),
            conflict_retries: counter!(CONFLICT_RETRIES),
            transient_retries: counter!(TRANSIENT_RETRIES),
            storage_errors: counter!(STORAGE_ERRORS),
            settled_outcomes: counter!(SETTLED_OUTCOMES),
            forwarded: counter!(FORWARDED),
            forward_errors: counter!(FORWARD_ERRORS),
            purged_sessions: counter!(PURGED_SESSIONS),
            mailbox_wait: histogram!(MAILBOX_WAIT_SECONDS),
            batch_commands: histogram!(BATCH_COMMANDS),
            flush_seconds: histogram!(FLUSH_SECONDS),
            flush_sessions: histogram!(FLUSH_SESSIONS),
            flush_rows: histogram!(FLUSH_ROWS),
            forward_seconds: histogram!(FORWARD_SECONDS),
        }
    }
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            commands: AtomicU64::new(0),
            command_errors: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flushed_sessions: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            conflict_retries: AtomicU64::new(0),
            transient_retries: AtomicU64::new(0),
            storage_errors: AtomicU64::new(0),
            settled_outcomes: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            batched_commands: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            forward_errors: AtomicU64::new(0),
            purged_sessions: AtomicU64::new(0),
            emit: Emit::default(),
            by_command: DashMap::new(),
        }
    }
}

/// Adds `by` to an engine counter and to its facade counter.
fn add(count: &AtomicU64, counter: &Counter, by: u64) {
    count.fetch_add(by, Relaxed);
    counter.increment(by);
}

impl EngineStats {
    /// A command answered here (`command`: its name), `took` after it arrived, with `error`'s
    /// code if it failed.
    pub fn record_command(
        &self,
        command: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        self.commands.fetch_add(1, Relaxed);
        // A read of the map for every command after its first (a write lock only then).
        let record = |(count, seconds): &(Counter, Histogram)| {
            count.increment(1);
            seconds.record(took);
        };
        match self.by_command.get(command) {
            Some(handles) => record(&handles),
            None => {
                let handles = (
                    counter!(COMMANDS, "command" => command),
                    histogram!(COMMAND_SECONDS, "command" => command),
                );
                record(&handles);
                self.by_command.insert(command, handles);
            }
        }
        if let Some(code) = error {
            self.command_errors.fetch_add(1, Relaxed);
            counter!(COMMAND_ERRORS, "command" => command, "code" => code).increment(1);
        }
    }

    /// A committed write transaction: its session batches and rows, what it refused, and how
    /// long it took.
    pub fn record_flush(&self, sessions: usize, rows: usize, refused: Refused, took: Duration) {
        let emit = &self.emit;
        add(&self.flushes, &emit.flushes, 1);
        add(
            &self.flushed_sessions,
            &emit.flushed_sessions,
            sessions as u64,
        );
        add(&self.rows, &emit.rows, rows as u64);
        add(&self.conflicts, &emit.conflicts, refused.conflicts);
        add(&self.fenced, &emit.fenced, refused.fenced);
        add(&self.takeovers, &emit.takeovers, refused.takeovers);
        emit.flush_sessions.record(sessions as f64);
        emit.flush_rows.record(rows as f64);
        emit.flush_seconds.record(took);
    }

    /// A write transaction that failed, after `took`.
    pub fn record_storage_error(&self, took: Duration) {
        add(&self.storage_errors, &self.emit.storage_errors, 1);
        self.emit.flush_seconds.record(took);
    }

    /// A batch of `commands` taken by an actor, the oldest of them sent `waited` ago each.
    pub fn record_batch(&self, commands: usize, waited: impl Iterator<Item = Duration>) {
        self.batched_commands.fetch_add(commands as u64, Relaxed);
        self.emit.batch_commands.record(commands as f64);
        for waited in waited {
            self.emit.mailbox_wait.record(waited);
        }
    }

    pub fn record_conflict_retry(&self) {
        add(&self.conflict_retries, &self.emit.conflict_retries, 1);
    }

    pub fn record_transient_retry(&self) {
        add(&self.transient_retries, &self.emit.transient_retries, 1);
    }

    pub fn record_settled_outcome(&self) {
        add(&self.settled_outcomes, &self.emit.settled_outcomes, 1);
    }

    /// A command sent to its owner: how long until its answer (or the failure), and whether
    /// the owner answered.
    pub fn record_forward(&self, took: Duration, answered: bool) {
        add(&self.forwarded, &self.emit.forwarded, 1);
        if !answered {
            add(&self.forward_errors, &self.emit.forward_errors, 1);
        }
        self.emit.forward_seconds.record(took);
    }

    /// An expired session erased by the purge.
    pub fn record_purged(&self) {
        add(&self.purged_sessions, &self.emit.purged_sessions, 1);
    }

    pub fn record_load(&self) {
        add(&self.loads, &self.emit.loads, 1);
    }

    pub fn snapshot(&self, runtime: RegistryStats, members: u64) -> Stats {
        Stats {
            members,
            forwarded: self.forwarded.load(Relaxed),
            forward_errors: self.forward_errors.load(Relaxed),
            purged_sessions: self.purged_sessions.load(Relaxed),
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
        }
    }
}

impl Stats {
    /// Sets the facade's gauges and the counters the actor runtime keeps (live sessions,
    /// mailbox depth, members, activations, passivations, evictions, restarts) to this
    /// snapshot's values: the events behind them happen in the runtime, which knows nothing of
    /// the facade, so they are published when read (a scrape calls this first).
    pub fn publish(&self) {
        metrics::gauge!(LIVE_SESSIONS).set(self.live_sessions as f64);
        metrics::gauge!(MAILBOX_DEPTH).set(self.mailbox_depth as f64);
        metrics::gauge!(MEMBERS).set(self.members as f64);
        counter!(ACTIVATIONS).absolute(self.activations);
        counter!(PASSIVATIONS).absolute(self.passivations);
        counter!(EVICTIONS).absolute(self.evictions);
        counter!(RESTARTS).absolute(self.restarts);
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
    /// Live members in this process's view (0 when it is not a member).
    pub members: u64,
    /// Commands sent to their session's owner in another process.
    pub forwarded: u64,
    /// Of those, the ones whose owner could not be reached or stopped answering (each
    /// unreachable owner is tried once; the command was then placed again).
    pub forward_errors: u64,
    /// Expired sessions the purge erased.
    pub purged_sessions: u64,
}
