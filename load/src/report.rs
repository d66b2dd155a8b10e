//! The report: every number in `report.json`, the tables in `report.md` (also printed).
//!
//! Runs are grouped by workload, database and shape (sessions x writers); each group is one
//! table with every strategy, followed by soloist's ratio to (d) (appends/s) and to the limit
//! (rows/s). The targets are checked against the groups of the default shapes.
//!
//! Cluster runs (several server processes over HTTP) get one table of their own: a row per
//! processes x routing x workload.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::cluster::ClusterResult;
use crate::db::DbKind;
use crate::error::LoadError;
use crate::machine::MachineInfo;
use crate::memory::IdleMemory;
use crate::run::RunResult;
use crate::settings::Settings;
use crate::strategy::StrategyKind;
use crate::stream::StreamResult;
use crate::workload::Workload;

/// soloist against (d) and the limit in one group.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The workload.
    pub workload: Workload,
    /// The database.
    pub db: DbKind,
    /// Sessions.
    pub sessions: usize,
    /// Writers per session.
    pub writers_per_session: usize,
    /// soloist's acknowledged appends/s.
    pub soloist_appends_per_s: Option<f64>,
    /// (d)'s acknowledged appends/s.
    pub advisory_appends_per_s: Option<f64>,
    /// soloist / (d), appends/s.
    pub soloist_vs_advisory: Option<f64>,
    /// The limit's rows/s.
    pub limit_rows_per_s: Option<f64>,
    /// The limit's rows per multi-row `INSERT` and commit, at which `limit_rows_per_s` was
    /// measured.
    pub limit_batch: Option<usize>,
    /// soloist's rows/s / the limit's rows/s.
    pub soloist_fraction_of_limit: Option<f64>,
}

/// One of the targets, checked.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCheck {
    /// What is measured.
    pub target: String,
    /// The goal.
    pub goal: String,
    /// What this report measured.
    pub measured: String,
    /// Whether the goal was met.
    pub met: bool,
}

/// A sweep's configuration (its runs are in [`Report::runs`]).
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// The database swept.
    pub db: DbKind,
    /// Writer counts.
    pub writers: Vec<usize>,
    /// Where the plot was written.
    pub plot: String,
}

/// Everything one invocation measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// `soloist-load`.
    pub tool: &'static str,
    /// `all`, `sweep`, `workload` or `idle-memory`.
    pub mode: String,
    /// The arguments the tool was run with.
    pub command_line: Vec<String>,
    /// When the invocation started (UTC).
    pub started_at_utc: String,
    /// Wall-clock seconds of the whole invocation.
    pub total_seconds: f64,
    /// The machine.
    pub machine: MachineInfo,
    /// Shared settings.
    pub settings: Settings,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// soloist against (d) and the limit, per group.
    pub comparisons: Vec<Comparison>,
    /// The targets that this invocation measured.
    pub targets: Vec<TargetCheck>,
    /// The sweep, in sweep mode.
    pub sweep: Option<Sweep>,
    /// The idle-memory measurement, in idle-memory mode.
    pub idle_memory: Option<IdleMemory>,
    /// Cluster runs: several server processes on one database, over HTTP.
    pub cluster: Vec<ClusterResult>,
    /// Stream runs: streamed replies, soloist against the usual way.
    pub stream: Vec<StreamResult>,
}

type GroupKey = (Workload, DbKind, usize, usize);

fn group_key(run: &RunResult) -> GroupKey {
    (run.workload, run.db, run.sessions, run.writers_per_session)
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(numerator), Some(denominator)) if denominator > 0.0 => Some(numerator / denominator),
        _ => None,
    }
}

impl Report {
    /// An empty report.
    pub fn new(mode: &str, machine: MachineInfo, settings: Settings, started_at: String) -> Self {
        Self {
            tool: "soloist-load",
            mode: mode.to_owned(),
            command_line: std::env::args().collect(),
            started_at_utc: started_at,
            total_seconds: 0.0,
            machine,
            settings,
            runs: Vec::new(),
            comparisons: Vec::new(),
            targets: Vec::new(),
            sweep: None,
            idle_memory: None,
            cluster: Vec::new(),
            stream: Vec::new(),
        }
    }

    fn groups(&self) -> BTreeMap<GroupKey, Vec<&RunResult>> {
        let mut groups: BTreeMap<GroupKey, Vec<&RunResult>> = BTreeMap::new();
        for run in &self.runs {
            groups.entry(group_key(run)).or_default().push(run);
        }
        groups
    }

    /// Computes the comparisons and target checks from the runs.
    pub fn analyze(&mut self) {
        let mut comparisons = Vec::new();
        let mut targets = Vec::new();
        for ((workload, db, sessions, writers), runs) in self.groups() {
            let find = |strategy: StrategyKind| {
                runs.iter()
                    .find(|run| run.strategy == strategy && run.failed.is_none())
                    .copied()
            };
            let soloist = find(StrategyKind::Soloist);
            let advisory = find(StrategyKind::AdvisoryLock);
            let limit = find(StrategyKind::Limit);
            let comparison = Comparison {
                workload,
                db,
                sessions,
                writers_per_session: writers,
                soloist_appends_per_s: soloist.map(|run| run.appends_per_s),
                advisory_appends_per_s: advisory.map(|run| run.appends_per_s),
                soloist_vs_advisory: ratio(
                    soloist.map(|run| run.appends_per_s),
                    advisory.map(|run| run.appends_per_s),
                ),
                limit_rows_per_s: limit.map(|run| run.rows_per_s),
                limit_batch: limit.and_then(|run| run.limit_batch),
                soloist_fraction_of_limit: ratio(
                    soloist.map(|run| run.rows_per_s),
                    limit.map(|run| run.rows_per_s),
                ),
            };
            let shape = format!("{} on {}", workload.title(), db.title());
            let default_shape =
                sessions == workload.default_sessions() && writers == workload.default_writers();
            let (vs_advisory_goal, limit_goal) = match (workload, db) {
                (Workload::Hot, DbKind::Postgres) => (Some(20.0), Some(0.60)),
                (Workload::Many, DbKind::Postgres) => (Some(10.0), Some(0.50)),
                (Workload::Many, DbKind::Sqlite) => (None, Some(0.50)),
                _ => (None, None),
            };
            if default_shape {
                if let (Some(goal), Some(measured)) =
                    (vs_advisory_goal, comparison.soloist_vs_advisory)
                {
                    targets.push(TargetCheck {
                        target: format!("{shape}: soloist appends/s vs (d)"),
                        goal: format!(">= {goal:.0}x"),
                        measured: format!("{measured:.1}x"),
                        met: measured >= goal,
                    });
                }
                if let (Some(goal), Some(measured)) =
                    (limit_goal, comparison.soloist_fraction_of_limit)
                {
                    targets.push(TargetCheck {
                        target: format!(
                            "{shape}: soloist rows/s vs the limit ({}-row batches)",
                            comparison.limit_batch.unwrap_or(self.settings.limit_batch)
                        ),
                        goal: format!(">= {:.0}%", goal * 100.0),
                        measured: format!("{:.0}%", measured * 100.0),
                        met: measured >= goal,
                    });
                }
                if let (Workload::Hot, DbKind::Postgres, Some(run)) = (workload, db, soloist) {
                    targets.push(TargetCheck {
                        target: format!("{shape}: errors surfaced to soloist's callers"),
                        goal: "0".into(),
                        measured: run.errors_total.to_string(),
                        met: run.errors_total == 0,
                    });
                }
            }
            comparisons.push(comparison);
        }
        let soloist_runs: Vec<&RunResult> = self
            .runs
            .iter()
            .filter(|run| run.strategy == StrategyKind::Soloist && run.failed.is_none())
            .collect();
        if !soloist_runs.is_empty() {
            let (lost, duplicated) = soloist_runs
                .iter()
                .filter_map(|run| run.check.as_ref())
                .fold((0, 0), |(lost, duplicated), check| {
                    (lost + check.lost, duplicated + check.duplicated)
                });
            targets.push(TargetCheck {
                target: format!("every soloist row ({} runs)", soloist_runs.len()),
                goal: "0 lost, 0 duplicated".into(),
                measured: format!("{lost} lost, {duplicated} duplicated"),
                met: lost == 0 && duplicated == 0,
            });
        }
        let cluster_runs: Vec<&ClusterResult> = self
            .cluster
            .iter()
            .filter(|run| run.failed.is_none())
            .collect();
        if !cluster_runs.is_empty() {
            let (lost, duplicated) = cluster_runs
                .iter()
                .filter_map(|run| run.check.as_ref())
                .fold((0, 0), |(lost, duplicated), check| {
                    (lost + check.lost, duplicated + check.duplicated)
                });
            targets.push(TargetCheck {
                target: format!(
                    "every acknowledged append of the cluster runs ({} runs)",
                    cluster_runs.len()
                ),
                goal: "0 lost, 0 duplicated".into(),
                measured: format!("{lost} lost, {duplicated} duplicated"),
                met: lost == 0 && duplicated == 0,
            });
        }
        if let Some(memory) = &self.idle_memory {
            let goal = 4096.0;
            targets.push(TargetCheck {
                target: "memory per idle live session".into(),
                goal: format!(
                    "<= 4 KB plus its messages ({} B of content)",
                    memory.message_content_bytes
                ),
                measured: format!("{:.0} B", memory.bytes_per_session),
                met: memory.bytes_per_session <= goal + memory.message_content_bytes as f64,
            });
        }
        self.comparisons = comparisons;
        self.targets = targets;
    }

    /// Writes `report.json` and `report.md` into `dir`; answers the Markdown.
    pub fn write(&self, dir: &Path) -> Result<String, LoadError> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json + "\n")?;
        let markdown = self.markdown();
        std::fs::write(dir.join("report.md"), &markdown)?;
        Ok(markdown)
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# soloist-load: {}\n", self.mode);
        self.write_context(&mut out);
        if !self.targets.is_empty() {
            let _ = writeln!(out, "## Targets\n");
            let _ = writeln!(out, "| target | goal | measured | met |");
            let _ = writeln!(out, "|---|---|---|---|");
            for target in &self.targets {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    target.target,
                    target.goal,
                    target.measured,
                    if target.met { "yes" } else { "**no**" }
                );
            }
            out.push('\n');
        }
        if let Some(sweep) = &self.sweep {
            self.write_sweep(&mut out, sweep);
        } else {
            for ((workload, db, sessions, writers), runs) in self.groups() {
                let _ = writeln!(
                    out,
                    "## {} on {}: {sessions} session{} x {writers} writer{}\n",
                    workload.title(),
                    db.title(),
                    if sessions == 1 { "" } else { "s" },
                    if writers == 1 { "" } else { "s" },
                );
                write_run_table(&mut out, &runs, false, self.settings.limit_batch);
                self.write_comparison(&mut out, workload, db, sessions, writers, &runs);
            }
        }
        if let Some(memory) = &self.idle_memory {
            write_idle_memory(&mut out, memory);
        }
        if !self.cluster.is_empty() {
            write_cluster(&mut out, &self.cluster);
            let _ = writeln!(out, "{}", CLUSTER_LEGEND);
        }
        if !self.stream.is_empty() {
            out.push_str(&crate::stream::markdown(&self.stream));
        }
        if !self.runs.is_empty() || (self.cluster.is_empty() && self.stream.is_empty()) {
            let _ = writeln!(out, "{}", LEGEND);
        }
        out
    }

    fn write_context(&self, out: &mut String) {
        let machine = &self.machine;
        let settings = &self.settings;
        let memory = machine
            .memory_total_bytes
            .map(|bytes| format!(", {:.1} GiB RAM", bytes as f64 / (1u64 << 30) as f64))
            .unwrap_or_default();
        let unknown = || "unknown".to_owned();
        let _ = writeln!(
            out,
            "- **when:** {} UTC, {:.0} s in all",
            self.started_at_utc, self.total_seconds
        );
        let _ = writeln!(
            out,
            "- **machine:** {} cores ({}){memory}, Linux {}",
            machine.nproc,
            machine.cpu_model.clone().unwrap_or_else(unknown),
            machine.kernel.clone().unwrap_or_else(unknown)
        );
        let _ = writeln!(
            out,
            "- **databases:** {} (synchronous_commit={}); SQLite {} (WAL, synchronous=FULL); Redis {}",
            machine.postgres_version.clone().unwrap_or_else(unknown),
            machine
                .postgres_synchronous_commit
                .clone()
                .unwrap_or_else(unknown),
            machine.sqlite_version.clone().unwrap_or_else(unknown),
            machine.redis_version.clone().unwrap_or_else(unknown)
        );
        let _ = writeln!(
            out,
            "- **build:** engine and benchmark built from git {}{}, {} build; HEAD when run: {}{}",
            machine.build_commit,
            match machine.build_engine_dirty.as_str() {
                "true" => " plus uncommitted engine changes",
                "false" => "",
                _ => " (engine changes unknown)",
            },
            if machine.release_build {
                "release"
            } else {
                "debug"
            },
            machine.git_commit.clone().unwrap_or_else(unknown),
            if machine.git_dirty == Some(true) {
                " (tree with uncommitted changes)"
            } else {
                ""
            }
        );
        if let Some(run) = self.cluster.first() {
            let _ = writeln!(
                out,
                "- **cluster runs:** {:.0} s per run; each process is `{} --database-url <fresh \
                 schema> --listen 127.0.0.1:<free port>` with `RUST_LOG=warn` and its default \
                 pools; requests over HTTP/1.1 keep-alive connections from this process; a \
                 retryable answer is sent again with the same message id, at most {} times; \
                 server logs under `{}`",
                settings.duration.as_secs_f64(),
                run.server_binary,
                crate::http::MAX_RETRIES,
                Path::new(&run.logs)
                    .parent()
                    .map_or_else(|| run.logs.clone(), |dir| dir.display().to_string())
            );
        }
        let postgres_writers = (settings.postgres_pool / 2).max(1);
        if !self.runs.is_empty() || self.cluster.is_empty() {
            let _ = writeln!(
                out,
                "- **settings:** {:.0} s per run; PostgreSQL: {} connections per run (soloist: {} \
             writer + {} reader); SQLite: {} connections (soloist: 1 writer + {} readers, its \
             default; baselines: a pool of {}, busy_timeout 5 s); limit: {} rows per INSERT and \
             commit; Redis lock: SET NX PX {} ms, polled every {} ms, given up after {} s",
                settings.duration.as_secs_f64(),
                settings.postgres_pool,
                postgres_writers,
                settings
                    .postgres_pool
                    .saturating_sub(postgres_writers)
                    .max(1),
                settings.sqlite_pool,
                settings.sqlite_pool.saturating_sub(1),
                settings.sqlite_pool,
                settings.limit_batch,
                settings.lock_ttl.as_millis(),
                settings.lock_poll.as_millis(),
                settings.lock_wait.as_secs()
            );
        }
        let fsyncs: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|run| run.fsync_ms)
            .chain(self.cluster.iter().filter_map(|run| run.fsync_ms))
            .collect();
        if !fsyncs.is_empty() || machine.fsync_ms_at_start.is_some() {
            let (low, high) = if fsyncs.is_empty() {
                let at_start = machine.fsync_ms_at_start.unwrap_or_default();
                (at_start, at_start)
            } else {
                (
                    fsyncs.iter().copied().fold(f64::INFINITY, f64::min),
                    fsyncs.iter().copied().fold(0.0, f64::max),
                )
            };
            let _ = writeln!(
                out,
                "- **disk:** a durable 8 KiB write (write + fdatasync) took {low:.2} to \
                 {high:.2} ms (median of 25, probed before each run; the `fsync ms` column): \
                 every durable rate here follows it"
            );
        }
        let others: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|run| run.other_cpu_share)
            .chain(self.cluster.iter().filter_map(|run| run.other_cpu_share))
            .collect();
        if !others.is_empty() {
            let _ = writeln!(
                out,
                "- **other work on the machine during the runs:** {:.0}% to {:.0}% of its CPU \
                 (processes other than this one and its servers, PostgreSQL and Redis; per run \
                 in report.json as `other_cpu_share`)",
                others.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
                others.iter().copied().fold(0.0, f64::max) * 100.0,
            );
        }
        let _ = writeln!(out, "- **command:** `{}`\n", self.command_line.join(" "));
    }

    fn write_comparison(
        &self,
        out: &mut String,
        workload: Workload,
        db: DbKind,
        sessions: usize,
        writers: usize,
        runs: &[&RunResult],
    ) {
        let Some(comparison) = self.comparisons.iter().find(|comparison| {
            comparison.workload == workload
                && comparison.db == db
                && comparison.sessions == sessions
                && comparison.writers_per_session == writers
        }) else {
            return;
        };
        let mut parts = Vec::new();
        if let Some(ratio) = comparison.soloist_vs_advisory {
            parts.push(format!("**{ratio:.1}x** (d)'s appends/s"));
        }
        if let Some(fraction) = comparison.soloist_fraction_of_limit {
            parts.push(format!(
                "**{:.0}%** of the limit's rows/s ({}-row batches)",
                fraction * 100.0,
                comparison.limit_batch.unwrap_or(self.settings.limit_batch)
            ));
        }
        if let Some(stats) = runs
            .iter()
            .find(|run| run.strategy == StrategyKind::Soloist)
            .and_then(|run| run.engine_stats.as_ref())
        {
            let sessions_per_flush = if stats.flushes > 0 {
                stats.flushed_sessions as f64 / stats.flushes as f64
            } else {
                0.0
            };
            parts.push(format!(
                "engine: {} write transactions, {:.1} session batches each, {} conflicts, {} \
                 transient retries",
                stats.flushes, sessions_per_flush, stats.conflicts, stats.transient_retries
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "soloist: {}.\n", parts.join("; "));
        }
    }

    fn write_sweep(&self, out: &mut String, sweep: &Sweep) {
        let _ = writeln!(
            out,
            "## Sweep: hot session on {}, appends/s by writers per session\n",
            sweep.db.title()
        );
        let _ = writeln!(out, "Plot: `{}`\n", sweep.plot);
        let strategies: Vec<StrategyKind> = StrategyKind::ALL
            .into_iter()
            .filter(|strategy| self.runs.iter().any(|run| run.strategy == *strategy))
            .collect();
        let mut header = String::from("| writers |");
        let mut rule = String::from("|---:|");
        for strategy in &strategies {
            let _ = write!(
                header,
                " {} |",
                strategy.label_with_batch(self.settings.limit_batch)
            );
            rule.push_str("---:|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for &writers in &sweep.writers {
            let mut line = format!("| {writers} |");
            for &strategy in &strategies {
                let cell = self
                    .runs
                    .iter()
                    .find(|run| run.strategy == strategy && run.writers_per_session == writers)
                    .map_or_else(String::new, |run| {
                        if run.failed.is_some() {
                            "failed".to_owned()
                        } else if run.errors_total > 0 {
                            format!(
                                "{} ({} errors)",
                                thousands(run.appends_per_s),
                                thousands(run.errors_total as f64)
                            )
                        } else {
                            thousands(run.appends_per_s)
                        }
                    });
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
        let _ = writeln!(out, "### Every sweep run\n");
        let runs: Vec<&RunResult> = self.runs.iter().collect();
        write_run_table(out, &runs, true, self.settings.limit_batch);
    }
}

fn write_idle_memory(out: &mut String, memory: &IdleMemory) {
    let _ = writeln!(
        out,
        "## Memory per idle live session ({})\n",
        memory.db.title()
    );
    let _ = writeln!(
        out,
        "| sessions | live | RSS before | RSS after | per session | activation |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| {} | {} | {:.1} MiB | {:.1} MiB | **{:.0} B** ({:.2} KiB) | {:.1} s |\n",
        thousands(memory.sessions as f64),
        thousands(memory.live_sessions as f64),
        memory.rss_before_bytes as f64 / 1_048_576.0,
        memory.rss_after_bytes as f64 / 1_048_576.0,
        memory.bytes_per_session,
        memory.bytes_per_session / 1024.0,
        memory.activation_s
    );
    let _ = writeln!(
        out,
        "Each session holds one message of {} content bytes. The figure is (RSS after - RSS \
         before) / sessions, nothing subtracted: {}.\n",
        memory.message_content_bytes, memory.includes
    );
}

const LEGEND: &str = "\
**Columns.** appends/s: appends acknowledged to writers per second (`limit`: rows committed, \
at the rows per batch its label states). \
rows/s: message rows in the database afterwards per second. commits: durable write commits \
(soloist: the engine's write transactions). Latency: per acknowledged append, µs (`limit`: the \
batch's commit, once per row). errors: errors surfaced to writers, by kind. lost / dup / \
misplaced / gaps / drift: the correctness check read from the database afterwards \
(acknowledged but not stored; stored twice; stored elsewhere than acknowledged; missing \
sequence numbers; sessions whose message_count differs from their rows). other CPU: share of \
the machine's CPU used during the run by processes other than this one, PostgreSQL and Redis \
(other people's builds and benchmarks); a run with a high share is skewed. fsync ms: median \
durable 8 KiB write just before the run. Rates divide by the \
time until the last writer finished (the deadline plus the operations in flight then).
";

const CLUSTER_LEGEND: &str = "\
**Cluster columns.** processes: `soloist-server` processes on one PostgreSQL database, \
each started with `--worker-threads` set to its share of the machine's cores (cores / \
processes, at least 1), as a CPU limit per process would give it. routing: how the benchmark spreads requests over them (`sticky`: each session always to the \
process that owns it, as perfect session affinity would; `round-robin`: every request to the \
next process, which forwards it to the owner unless it is the owner). appends/s: \
appends acknowledged over HTTP per second. Latency: per acknowledged append, from its first \
attempt to its acknowledgement (retries included), µs. errors: appends that failed for good \
(not retryable, or still failing after the retries), by HTTP status and error code. retries: \
requests sent again with the same message id after a retryable answer. lost / dup / \
misplaced / gaps: the correctness check read from the database afterwards. takeovers: the \
servers' `soloist_takeovers_total` over the run, all processes together (a write that took \
a session over from another process's running lease: one session's requests reaching several \
processes); per session: divided by the sessions. forwarded: the servers' counters with \
`forward` in their names over the run (commands forwarded to their session's owner). other CPU: share \
of the machine's CPU used by processes other than this one, its servers and PostgreSQL. \
fsync ms: median durable 8 KiB write just before the run.
";

fn write_cluster(out: &mut String, runs: &[ClusterResult]) {
    let _ = writeln!(
        out,
        "## Cluster: several server processes on one PostgreSQL database, over HTTP\n"
    );
    let _ = writeln!(
        out,
        "| processes | routing | workload | appends/s | p50 µs | p99 µs | max µs | errors | \
         retries | lost | dup | misplaced | gaps | takeovers | takeovers/session | forwarded | \
         other CPU | fsync ms |"
    );
    let _ = writeln!(
        out,
        "|---:|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    );
    for run in runs {
        let line = format!(
            "| {} | {} | {} {}x{} |",
            run.processes,
            run.routing_label(),
            run.workload.name(),
            thousands(run.sessions as f64),
            run.writers_per_session
        );
        if let Some(reason) = &run.failed {
            let reason = reason.replace('|', "/").replace('\n', " ");
            let _ = writeln!(out, "{line} failed: {reason} |");
            continue;
        }
        let latency = run.latency_us.clone().unwrap_or_default();
        let check = run.check.clone().unwrap_or_default();
        let forwarded = if run.forwarding.is_empty() {
            "0".to_owned()
        } else {
            run.forwarding
                .iter()
                .map(|(name, count)| {
                    format!(
                        "{} {}",
                        name.trim_start_matches("soloist_"),
                        thousands(*count as f64)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{line} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} |",
            thousands(run.appends_per_s),
            thousands(latency.p50 as f64),
            thousands(latency.p99 as f64),
            thousands(latency.max as f64),
            counted(
                run.errors_total,
                &run.errors,
                run.errors_total + run.appends
            ),
            counted(run.retries, &run.retried, 0),
            check.lost,
            check.duplicated,
            check.misplaced,
            check.gaps,
            thousands(run.takeovers as f64),
            run.takeovers_per_session,
            forwarded,
            run.other_cpu_share
                .map_or_else(|| "-".to_owned(), |share| format!("{:.0}%", share * 100.0)),
            run.fsync_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}")),
        );
    }
    out.push('\n');
}

/// `total (kind n, kind n)`, with the share of `attempts` when it is not 0.
fn counted(total: u64, kinds: &BTreeMap<String, u64>, attempts: u64) -> String {
    if total == 0 {
        return "0".to_owned();
    }
    let mut kinds: Vec<(&String, &u64)> = kinds.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1));
    let detail: Vec<String> = kinds
        .iter()
        .map(|(kind, count)| format!("{kind} {}", thousands(**count as f64)))
        .collect();
    if attempts > 0 {
        format!(
            "{} ({:.0}% failed: {})",
            thousands(total as f64),
            total as f64 / attempts as f64 * 100.0,
            detail.join(", ")
        )
    } else {
        format!("{} ({})", thousands(total as f64), detail.join(", "))
    }
}

fn write_run_table(out: &mut String, runs: &[&RunResult], with_writers: bool, limit_batch: usize) {
    let chat = runs.iter().any(|run| run.turns.is_some());
    let mut header = String::from("| strategy |");
    let mut rule = String::from("|---|");
    if with_writers {
        header.push_str(" writers |");
        rule.push_str("---:|");
    }
    header.push_str(
        " appends/s | rows/s | commits | rows/commit | p50 µs | p90 µs | p99 µs | max µs |",
    );
    rule.push_str("---:|---:|---:|---:|---:|---:|---:|---:|");
    if chat {
        header.push_str(" turns/s | turn p50 µs | turn p99 µs |");
        rule.push_str("---:|---:|---:|");
    }
    header.push_str(
        " errors surfaced | lost | dup | misplaced | gaps | drift | other CPU | fsync ms |",
    );
    rule.push_str("---|---:|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(out, "{header}\n{rule}");
    for run in runs {
        let mut line = format!(
            "| {} |",
            run.strategy
                .label_with_batch(run.limit_batch.unwrap_or(limit_batch))
        );
        if with_writers {
            let _ = write!(line, " {} |", run.writers_per_session);
        }
        if let Some(reason) = &run.failed {
            let _ = writeln!(out, "{line} failed: {} |", reason.replace('|', "/"));
            continue;
        }
        let latency = run.latency_us.clone().unwrap_or_default();
        let _ = write!(
            line,
            " {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(run.appends_per_s),
            thousands(run.rows_per_s),
            thousands(run.commits as f64),
            run.rows_per_commit()
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.1}")),
            thousands(latency.p50 as f64),
            thousands(latency.p90 as f64),
            thousands(latency.p99 as f64),
            thousands(latency.max as f64),
        );
        if chat {
            match (run.turns, &run.turn_latency_us) {
                (Some(turns), Some(turn_latency)) => {
                    let _ = write!(
                        line,
                        " {} | {} | {} |",
                        thousands(turns as f64 / run.elapsed_s),
                        thousands(turn_latency.p50 as f64),
                        thousands(turn_latency.p99 as f64)
                    );
                }
                (Some(turns), None) => {
                    let _ = write!(
                        line,
                        " {} | - | - |",
                        thousands(turns as f64 / run.elapsed_s)
                    );
                }
                _ => line.push_str(" - | - | - |"),
            }
        }
        let check = run.check.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{line} {} | {} | {} | {} | {} | {} | {} | {} |",
            errors_cell(run),
            check.lost,
            check.duplicated,
            check.misplaced,
            check.gaps,
            check.count_drift,
            run.other_cpu_share
                .map_or_else(|| "-".to_owned(), |share| format!("{:.0}%", share * 100.0)),
            run.fsync_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}"))
        );
    }
    out.push('\n');
}

fn errors_cell(run: &RunResult) -> String {
    if run.errors_total == 0 {
        return "0".to_owned();
    }
    let mut kinds: Vec<(&String, &u64)> = run.errors.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1));
    let detail: Vec<String> = kinds
        .iter()
        .map(|(kind, count)| format!("{kind} {}", thousands(**count as f64)))
        .collect();
    let share = run.errors_total as f64 / (run.errors_total + run.appends).max(1) as f64;
    format!(
        "{} ({:.0}% failed: {})",
        thousands(run.errors_total as f64),
        share * 100.0,
        detail.join(", ")
    )
}

/// `1234567.8` as `1,234,568`.
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    let rounded = value.round().abs() as u128;
    let digits = rounded.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 && rounded > 0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(-4321.0), "-4,321");
    }
}
