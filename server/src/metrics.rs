//! The engine's counters in the Prometheus text exposition format.

use std::fmt::Write;

use soloist::Stats;
use soloist::stats::{BATCH_BUCKETS, LATENCY_BUCKETS_MICROS};

/// Renders `stats` as Prometheus text.
pub fn render(stats: &Stats) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP soloist_{name} {help}");
        let _ = writeln!(out, "# TYPE soloist_{name} {kind}");
        let _ = writeln!(out, "soloist_{name} {value}");
    };
    metric(
        "live_sessions",
        "gauge",
        "Session actors alive now.",
        stats.live_sessions,
    );
    metric(
        "mailbox_depth",
        "gauge",
        "Commands queued in session mailboxes.",
        stats.mailbox_depth,
    );
    metric(
        "activations_total",
        "counter",
        "Session actor activations.",
        stats.activations,
    );
    metric(
        "passivations_total",
        "counter",
        "Session actors passivated.",
        stats.passivations,
    );
    metric(
        "evictions_total",
        "counter",
        "Session actors passivated to respect the cap.",
        stats.evictions,
    );
    metric(
        "restarts_total",
        "counter",
        "Session actors restarted after a panic.",
        stats.restarts,
    );
    metric(
        "commands_total",
        "counter",
        "Commands answered.",
        stats.commands,
    );
    metric(
        "command_errors_total",
        "counter",
        "Commands answered with an error.",
        stats.command_errors,
    );
    metric(
        "loads_total",
        "counter",
        "Session loads from the database.",
        stats.loads,
    );
    metric(
        "flushes_total",
        "counter",
        "Write transactions committed.",
        stats.flushes,
    );
    metric(
        "flushed_sessions_total",
        "counter",
        "Session batches written.",
        stats.flushed_sessions,
    );
    metric("rows_total", "counter", "Message rows written.", stats.rows);
    metric(
        "conflicts_total",
        "counter",
        "Session batches refused because another writer changed the session.",
        stats.conflicts,
    );
    metric(
        "fenced_total",
        "counter",
        "Session batches refused because another process had taken the session over.",
        stats.fenced,
    );
    metric(
        "takeovers_total",
        "counter",
        "Writes that took a session over from another process's running lease.",
        stats.takeovers,
    );
    metric(
        "conflict_retries_total",
        "counter",
        "Reloads and restages after a conflict.",
        stats.conflict_retries,
    );
    metric(
        "transient_retries_total",
        "counter",
        "Flushes retried after a transient database refusal.",
        stats.transient_retries,
    );
    metric(
        "storage_errors_total",
        "counter",
        "Flushes that failed.",
        stats.storage_errors,
    );
    metric(
        "settled_outcomes_total",
        "counter",
        "Failed flushes settled by reading the database.",
        stats.settled_outcomes,
    );
    metric(
        "members",
        "gauge",
        "Live members in this process's view of the cluster (0: not a member).",
        stats.members,
    );
    metric(
        "forwarded_total",
        "counter",
        "Commands sent to their session's owner in another process.",
        stats.forwarded,
    );
    metric(
        "forward_errors_total",
        "counter",
        "Forwards whose owner could not be reached or stopped answering.",
        stats.forward_errors,
    );
    let counts = |bounds: &[u64]| bounds.iter().map(u64::to_string).collect::<Vec<_>>();
    histogram(
        &mut out,
        "flush_sessions",
        "Sessions per write transaction.",
        &counts(&BATCH_BUCKETS),
        &stats.flush_sessions,
        &stats.flushed_sessions.to_string(),
    );
    histogram(
        &mut out,
        "batch_commands",
        "Commands per session batch.",
        &counts(&BATCH_BUCKETS),
        &stats.batch_commands,
        &stats.batched_commands.to_string(),
    );
    let seconds = |micros: u64| format!("{}", micros as f64 / 1e6);
    histogram(
        &mut out,
        "forward_seconds",
        "Time from sending a command to its owner to its answer.",
        &LATENCY_BUCKETS_MICROS.map(seconds),
        &stats.forward_latency,
        &seconds(stats.forward_micros),
    );
    out
}

/// A histogram from per-bucket counts (the last bucket is everything above the last bound).
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[String],
    counts: &[u64],
    sum: &str,
) {
    let _ = writeln!(out, "# HELP soloist_{name} {help}");
    let _ = writeln!(out, "# TYPE soloist_{name} histogram");
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        let _ = writeln!(out, "soloist_{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "soloist_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "soloist_{name}_sum {sum}");
    let _ = writeln!(out, "soloist_{name}_count {cumulative}");
}
