//! Cluster runs: N `soloist-server` processes on one fresh PostgreSQL database, driven over
//! HTTP, to measure what spreading one workload over several processes costs.
//!
//! 1. provision a fresh schema (as every PostgreSQL run), start the processes on it
//!    ([`crate::servers`]), wait until they all see each other as members, and create the
//!    workload's sessions over HTTP (see [`Cluster::create_sessions`]); `CHECKPOINT`;
//! 2. read every process's takeover and forwarding counters (`GET /metrics`), then start the
//!    writers: each loops until the deadline, appending one user message per request to the
//!    process the routing picks, retrying a retryable answer with the same message id
//!    ([`crate::http`]);
//! 3. measure as every run does: acknowledged appends/s, the HDR latency of each acknowledged
//!    append (its retries included), errors surfaced by kind, retries by kind, the CPU other
//!    work used (the servers count as the benchmark's own);
//! 4. read the counters again (the run's figures are the differences), stop the processes
//!    (SIGTERM) and run the [correctness check](crate::check) on the database; drop the schema.
//!
//! Takeovers are the engine's `soloist_takeovers_total`: writes that took a session over while
//! another process's lease on it was running, i.e. requests for one session reaching several
//! processes at once. Counters with `forward` in their name (commands forwarded to their
//! session's owner, and the failures) are reported as they are; absent counters count 0.
//!
//! Each process runs with its share of the machine's cores as worker threads
//! ([`crate::servers::threads_per_process`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use serde::Serialize;
use soloist::uuid::Uuid;
use tokio::task::JoinHandle;

use crate::check::{self, Ack, CheckResult};
use crate::db::{Database, DbKind};
use crate::error::LoadError;
use crate::http::{self, Attempts, Cluster, Routing};
use crate::machine::CpuSample;
use crate::run::{self, Latency, Progress};
use crate::servers::Servers;
use crate::settings::Settings;
use crate::workload::{Outgoing, Workload};

/// Sessions created at once before a run.
const CREATE_PARALLEL: usize = 32;
/// What the counters read from `/metrics` must contain in their names.
const COUNTER_NEEDLES: [&str; 2] = ["takeover", "forward"];

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct ClusterSpec {
    /// Server processes.
    pub processes: usize,
    /// How requests are spread over them.
    pub routing: Routing,
    /// The workload (hot or many).
    pub workload: Workload,
    /// Sessions.
    pub sessions: usize,
    /// Concurrent writers per session.
    pub writers: usize,
}

impl ClusterSpec {
    /// The routing as tables show it: `-` for a single process, where there is no choice.
    pub fn routing_label(&self) -> &'static str {
        if self.processes == 1 {
            "-"
        } else {
            self.routing.name()
        }
    }

    /// `cluster 3x sticky many (200x4)` for progress lines.
    pub fn label(&self) -> String {
        format!(
            "cluster {}x {} {} ({}x{})",
            self.processes,
            self.routing_label(),
            self.workload.name(),
            self.sessions,
            self.writers
        )
    }

    /// A file-name-safe name for the run's log directory.
    fn slug(&self) -> String {
        format!(
            "{}-{}x{}-{}p-{}",
            self.workload.name(),
            self.sessions,
            self.writers,
            self.processes,
            self.routing.name()
        )
    }
}

/// What a cluster run needs besides the shared settings.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The `soloist-server` binary.
    pub server_binary: PathBuf,
    /// Where the servers' logs go (a directory per run inside).
    pub log_root: PathBuf,
}

/// Everything measured in one cluster run.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterResult {
    /// Server processes.
    pub processes: usize,
    /// How requests were spread over them.
    pub routing: Routing,
    /// The workload.
    pub workload: Workload,
    /// Sessions.
    pub sessions: usize,
    /// Concurrent writers per session.
    pub writers_per_session: usize,
    /// Seconds from the first writer's start to the last writer's end.
    pub elapsed_s: f64,
    /// Appends acknowledged to writers (one message each).
    pub appends: u64,
    /// `appends / elapsed_s`.
    pub appends_per_s: f64,
    /// Message rows stored in the database after the run.
    pub rows: u64,
    /// Latency of acknowledged appends, µs, from the first attempt to the answer that
    /// acknowledged it.
    pub latency_us: Option<Latency>,
    /// Appends that failed for good (not retryable, or still failing after the retries).
    pub errors_total: u64,
    /// The same, by kind (`503 timeout`, `409 conflict`, `connect`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Requests sent again after a retryable answer (with the same message id).
    pub retries: u64,
    /// The same, by the kind of answer that was retried.
    pub retried: BTreeMap<String, u64>,
    /// The correctness check.
    pub check: Option<CheckResult>,
    /// Takeovers during the run, all processes together (`soloist_takeovers_total`).
    pub takeovers: u64,
    /// `takeovers / sessions`.
    pub takeovers_per_session: f64,
    /// Counters with `forward` in their names during the run, summed over the processes
    /// (empty while the servers do not forward).
    pub forwarding: BTreeMap<String, u64>,
    /// Per process, every counter read with `takeover` or `forward` in its name, as the
    /// difference over the run.
    pub process_counters: Vec<BTreeMap<String, u64>>,
    /// Share of the machine's CPU (all cores, 0..1) that processes other than this one, its
    /// servers and PostgreSQL used during the run.
    pub other_cpu_share: Option<f64>,
    /// Median ms of a durable 8 KiB write just before the run.
    pub fsync_ms: Option<f64>,
    /// The server binary that ran.
    pub server_binary: String,
    /// The directory of the servers' logs.
    pub logs: String,
    /// Why the run could not be measured, if it could not.
    pub failed: Option<String>,
}

impl ClusterResult {
    fn failed(spec: &ClusterSpec, options: &ClusterOptions, logs: &Path, reason: String) -> Self {
        Self {
            processes: spec.processes,
            routing: spec.routing,
            workload: spec.workload,
            sessions: spec.sessions,
            writers_per_session: spec.writers,
            elapsed_s: 0.0,
            appends: 0,
            appends_per_s: 0.0,
            rows: 0,
            latency_us: None,
            errors_total: 0,
            errors: BTreeMap::new(),
            retries: 0,
            retried: BTreeMap::new(),
            check: None,
            takeovers: 0,
            takeovers_per_session: 0.0,
            forwarding: BTreeMap::new(),
            process_counters: Vec::new(),
            other_cpu_share: None,
            fsync_ms: None,
            server_binary: options.server_binary.display().to_string(),
            logs: logs.display().to_string(),
            failed: Some(reason),
        }
    }

    /// The routing as tables show it.
    pub fn routing_label(&self) -> &'static str {
        ClusterSpec {
            processes: self.processes,
            routing: self.routing,
            workload: self.workload,
            sessions: self.sessions,
            writers: self.writers_per_session,
        }
        .routing_label()
    }
}

/// What one writer task measured.
#[derive(Default)]
struct Outcome {
    acked: Vec<Ack>,
    /// µs per acknowledged append.
    latency: Vec<u32>,
    errors: BTreeMap<String, u64>,
    retried: BTreeMap<String, u64>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.acked.extend(other.acked);
        self.latency.extend(other.latency);
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        for (kind, count) in other.retried {
            *self.retried.entry(kind).or_default() += count;
        }
    }
}

/// Runs `spec` on a fresh PostgreSQL schema and measures it. A run that cannot be measured (no
/// server binary, a server that does not start, PostgreSQL down) comes back with `failed` set,
/// so the rest of a table still runs; its servers are stopped either way.
pub async fn run(
    spec: &ClusterSpec,
    settings: &Settings,
    options: &ClusterOptions,
) -> ClusterResult {
    let logs = options.log_root.join(spec.slug());
    let database = match Database::provision(DbKind::Postgres, settings).await {
        Ok(database) => database,
        Err(error) => return ClusterResult::failed(spec, options, &logs, error.to_string()),
    };
    let measured = measure(spec, options, &database, &logs, settings).await;
    database.dispose().await;
    let result = measured
        .unwrap_or_else(|error| ClusterResult::failed(spec, options, &logs, error.to_string()));
    eprintln!("{}", summary_line(spec, &result));
    result
}

fn summary_line(spec: &ClusterSpec, result: &ClusterResult) -> String {
    if let Some(reason) = &result.failed {
        return format!("{}: FAILED: {reason}", spec.label());
    }
    let check = result.check.clone().unwrap_or_default();
    format!(
        "{}: {} appends in {:.1} s = {:.0}/s, {} errors, {} retries, {} takeovers; check {}: \
         {} rows, lost {}, duplicated {}, misplaced {}, gaps {}, count drift {}",
        spec.label(),
        result.appends,
        result.elapsed_s,
        result.appends_per_s,
        result.errors_total,
        result.retries,
        result.takeovers,
        if check.is_clean() {
            "clean"
        } else {
            "FOUND PROBLEMS"
        },
        check.rows,
        check.lost,
        check.duplicated,
        check.misplaced,
        check.gaps,
        check.count_drift
    )
}

async fn measure(
    spec: &ClusterSpec,
    options: &ClusterOptions,
    database: &Database,
    logs: &Path,
    settings: &Settings,
) -> Result<ClusterResult, LoadError> {
    match std::fs::remove_dir_all(logs) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
        _ => {}
    }
    let client = http::client()?;
    // Stopped on every path: `stop` below, or the guard's drop on an early return.
    let servers = Servers::start(
        &options.server_binary,
        &database.url,
        spec.processes.max(1),
        logs,
        &client,
    )
    .await?;
    let members = servers.converge(&client).await?;
    let cluster = Arc::new(Cluster::new(
        client.clone(),
        servers.urls(),
        members,
        spec.routing,
    ));
    let sessions = cluster
        .create_sessions(Uuid::now_v7(), spec.sessions.max(1), CREATE_PARALLEL)
        .await?;
    database.checkpoint().await?;
    let before = servers.counters(&client, &COUNTER_NEEDLES).await?;
    let progress = Arc::new(Progress::default());

    let pids = servers.pids();
    let fsync_ms = crate::machine::fsync_probe_ms();
    let cpu_before = CpuSample::take_with(&pids);
    let started = Instant::now();
    let deadline = started + settings.duration;
    let mut tasks: Vec<JoinHandle<Outcome>> = Vec::new();
    for (index, &session_id) in sessions.iter().enumerate() {
        let session =
            u32::try_from(index).map_err(|_| LoadError::Config("too many sessions".into()))?;
        for writer_index in 0..spec.writers.max(1) {
            tasks.push(tokio::spawn(writer_task(
                cluster.clone(),
                session_id,
                session,
                writer_index,
                deadline,
                progress.clone(),
            )));
        }
    }

    let bar = run::progress_bar(spec.label(), settings.duration);
    let ticker = tokio::spawn(run::tick(
        bar.clone(),
        progress.clone(),
        started,
        settings.duration,
    ));
    let mut total = Outcome::default();
    let mut joined = Ok(());
    for task in tasks {
        match task.await {
            Ok(outcome) => total.merge(outcome),
            Err(error) => joined = Err(LoadError::from(error)),
        }
    }
    let elapsed = started.elapsed();
    let other_cpu_share = cpu_before
        .zip(CpuSample::take_with(&pids))
        .map(|(before, after)| before.other_share(&after));
    ticker.abort();
    bar.finish_and_clear();
    joined?;

    let after = servers.counters(&client, &COUNTER_NEEDLES).await?;
    for warning in servers.stop().await {
        eprintln!("warning: {warning}");
    }
    let process_counters = counter_deltas(&before, &after);

    let check_pool = database.pool(2).await?;
    let checked = check::verify(&check_pool, &sessions, &total.acked).await;
    check_pool.close().await;
    let check = checked?;

    let mut latency = run::histogram()?;
    for &micros in &total.latency {
        latency.saturating_record(u64::from(micros));
    }
    let takeovers = sum_matching(&process_counters, "takeover");
    let mut forwarding = BTreeMap::new();
    for counters in &process_counters {
        for (name, &value) in counters.iter().filter(|(name, _)| name.contains("forward")) {
            *forwarding.entry(name.clone()).or_insert(0) += value;
        }
    }
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let appends = total.acked.len() as u64;
    Ok(ClusterResult {
        processes: spec.processes,
        routing: spec.routing,
        workload: spec.workload,
        sessions: spec.sessions,
        writers_per_session: spec.writers,
        elapsed_s: seconds,
        appends,
        appends_per_s: appends as f64 / seconds,
        rows: check.rows,
        latency_us: Latency::of(&latency),
        errors_total: total.errors.values().sum(),
        errors: total.errors,
        retries: total.retried.values().sum(),
        retried: total.retried,
        check: Some(check),
        takeovers,
        takeovers_per_session: takeovers as f64 / spec.sessions.max(1) as f64,
        forwarding,
        process_counters,
        other_cpu_share,
        fsync_ms,
        server_binary: options.server_binary.display().to_string(),
        logs: logs.display().to_string(),
        failed: None,
    })
}

/// One writer: appends one user message at a time to its session until the deadline.
async fn writer_task(
    cluster: Arc<Cluster>,
    session_id: Uuid,
    session: u32,
    writer_index: usize,
    deadline: Instant,
    progress: Arc<Progress>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut turn = 0u64;
    while Instant::now() < deadline {
        turn += 1;
        let message = Outgoing::user(writer_index, turn);
        let mut attempts = Attempts::default();
        let started = Instant::now();
        let appended = cluster.append(session_id, &message, &mut attempts).await;
        for kind in attempts.retried {
            *outcome.retried.entry(kind).or_default() += 1;
        }
        match appended {
            Ok(seq) => {
                outcome.latency.push(run::sample(started.elapsed()));
                outcome.acked.push(Ack {
                    session,
                    seq,
                    id: message.id,
                });
                progress.acked.fetch_add(1, Relaxed);
            }
            Err(failure) => {
                *outcome.errors.entry(failure.kind).or_default() += 1;
                progress.errors.fetch_add(1, Relaxed);
            }
        }
    }
    outcome
}

/// Per process, `after - before` for every counter read (a counter absent before counts 0).
pub fn counter_deltas(
    before: &[BTreeMap<String, f64>],
    after: &[BTreeMap<String, f64>],
) -> Vec<BTreeMap<String, u64>> {
    after
        .iter()
        .enumerate()
        .map(|(process, counters)| {
            counters
                .iter()
                .map(|(name, &value)| {
                    let earlier = before
                        .get(process)
                        .and_then(|counters| counters.get(name))
                        .copied()
                        .unwrap_or(0.0);
                    (name.clone(), (value - earlier).max(0.0).round() as u64)
                })
                .collect()
        })
        .collect()
}

/// The sum over processes of the counters whose names contain `needle`.
pub fn sum_matching(counters: &[BTreeMap<String, u64>], needle: &str) -> u64 {
    counters
        .iter()
        .flat_map(|counters| counters.iter())
        .filter(|(name, _)| name.contains(needle))
        .map(|(_, &value)| value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs
            .iter()
            .map(|&(name, value)| (name.to_owned(), value))
            .collect()
    }

    #[test]
    fn takeovers_are_the_run_s_difference_summed_over_processes() {
        let before = vec![
            counters(&[("soloist_takeovers_total", 2.0)]),
            counters(&[("soloist_takeovers_total", 0.0)]),
        ];
        let after = vec![
            counters(&[("soloist_takeovers_total", 5.0)]),
            counters(&[
                ("soloist_takeovers_total", 4.0),
                ("soloist_forwarded_total", 9.0),
            ]),
        ];
        let deltas = counter_deltas(&before, &after);
        assert_eq!(deltas[0].get("soloist_takeovers_total"), Some(&3));
        assert_eq!(deltas[1].get("soloist_takeovers_total"), Some(&4));
        // Absent before (e.g. a counter that appears on first use) counts from 0.
        assert_eq!(deltas[1].get("soloist_forwarded_total"), Some(&9));
        assert_eq!(sum_matching(&deltas, "takeover"), 7);
        assert_eq!(sum_matching(&deltas, "forward"), 9);
        // No counters at all: 0, not an error.
        assert_eq!(sum_matching(&counter_deltas(&[], &[]), "takeover"), 0);
    }
}
