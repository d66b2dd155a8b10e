//! One run: a fresh database, one strategy, one workload, for a bounded duration.
//!
//! 1. provision a fresh database and create the sessions through a soloist engine (which also
//!    runs the migrations), then shut that engine down; on PostgreSQL, `CHECKPOINT`;
//! 2. open the strategy (a new engine, or a raw pool of the same size) and start the writers;
//!    each writer loops until the deadline, then finishes the operation it is in;
//! 3. measure: acknowledged appends, latency of each append (raw samples, put into one HDR
//!    histogram at the end, µs), errors by
//!    kind, commits;
//! 4. shut the strategy down and run the [correctness check](crate::check) on the database;
//! 5. drop the database.
//!
//! Rates divide by the time from the first writer's start to the last writer's end, so the
//! operations in flight at the deadline are counted in both numerator and denominator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use soloist::Engine;
use soloist::uuid::Uuid;
use tokio::task::JoinHandle;

use crate::check::{self, Ack, CheckResult};
use crate::db::{Database, DbKind, Pool};
use crate::error::LoadError;
use crate::machine::CpuSample;
use crate::settings::Settings;
use crate::strategy::{Counters, Guard, OpError, RedisLock, StrategyKind, Writer, insert_batch};
use crate::workload::{HISTORY_MESSAGES, Outgoing, USER_ID, Workload};

/// Highest latency the histograms track (1 hour, in µs); anything above is clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Token usage each chat turn adds.
const TURN_USAGE: (u32, u32) = (120, 45);

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct RunSpec {
    /// The workload.
    pub workload: Workload,
    /// The database.
    pub db: DbKind,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Sessions.
    pub sessions: usize,
    /// Concurrent writers per session (the `limit` strategy always uses one).
    pub writers: usize,
}

impl RunSpec {
    /// `workload/db/strategy` for progress lines (the limit's with its rows per batch).
    pub fn label(&self, limit_batch: usize) -> String {
        format!(
            "{}/{}/{} ({}x{})",
            self.workload.name(),
            self.db.name(),
            self.strategy.label_with_batch(limit_batch),
            self.sessions,
            self.writers_used()
        )
    }

    /// Writers per session this run actually starts.
    pub fn writers_used(&self) -> usize {
        if self.strategy == StrategyKind::Limit {
            1
        } else {
            self.writers.max(1)
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

impl Latency {
    /// The percentiles of `histogram`, if it holds any sample.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        (!histogram.is_empty()).then(|| Self {
            count: histogram.len(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        })
    }
}

/// Everything measured in one run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The workload.
    pub workload: Workload,
    /// The database.
    pub db: DbKind,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Sessions.
    pub sessions: usize,
    /// Concurrent writers per session the workload asked for (the `limit` strategy always runs
    /// one task per session).
    pub writers_per_session: usize,
    /// `limit`: rows per multi-row `INSERT` and commit (`--limit-batch`); its rows/s are at
    /// this batch size. `None` for the other strategies.
    pub limit_batch: Option<usize>,
    /// Seconds from the first writer's start to the last writer's end.
    pub elapsed_s: f64,
    /// Appends acknowledged to writers (one message each; `limit`: rows committed).
    pub appends: u64,
    /// `appends / elapsed_s`.
    pub appends_per_s: f64,
    /// Message rows stored in the database after the run.
    pub rows: u64,
    /// `rows / elapsed_s`.
    pub rows_per_s: f64,
    /// Durable commits issued for writes (soloist: the engine's write transactions).
    pub commits: u64,
    /// Transactions retried after a unique violation.
    pub retries: u64,
    /// Chat turns completed (chat-turn workload).
    pub turns: Option<u64>,
    /// Latency of acknowledged appends, µs (`limit`: of the batch commit, once per row).
    pub latency_us: Option<Latency>,
    /// Latency of a whole chat turn, µs.
    pub turn_latency_us: Option<Latency>,
    /// Errors surfaced to writers.
    pub errors_total: u64,
    /// The same, by kind.
    pub errors: BTreeMap<String, u64>,
    /// The correctness check.
    pub check: Option<CheckResult>,
    /// The engine's counters at the end of a soloist run.
    pub engine_stats: Option<soloist::Stats>,
    /// Share of the machine's CPU (all cores, 0..1) that processes other than this one,
    /// PostgreSQL and Redis used during the run: other work on a shared machine skews a run.
    pub other_cpu_share: Option<f64>,
    /// Median ms of a durable 8 KiB write just before the run (the disk's commit cost then).
    pub fsync_ms: Option<f64>,
    /// Why the run could not be measured, if it could not.
    pub failed: Option<String>,
}

impl RunResult {
    fn failed(spec: &RunSpec, settings: &Settings, reason: String) -> Self {
        Self {
            workload: spec.workload,
            db: spec.db,
            strategy: spec.strategy,
            sessions: spec.sessions,
            writers_per_session: spec.writers,
            limit_batch: limit_batch(spec, settings),
            elapsed_s: 0.0,
            appends: 0,
            appends_per_s: 0.0,
            rows: 0,
            rows_per_s: 0.0,
            commits: 0,
            retries: 0,
            turns: None,
            latency_us: None,
            turn_latency_us: None,
            errors_total: 0,
            errors: BTreeMap::new(),
            check: None,
            engine_stats: None,
            other_cpu_share: None,
            fsync_ms: None,
            failed: Some(reason),
        }
    }

    /// Rows per durable commit.
    pub fn rows_per_commit(&self) -> Option<f64> {
        (self.commits > 0).then(|| self.rows as f64 / self.commits as f64)
    }
}

/// Live counters shared with the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    /// Appends acknowledged so far.
    pub acked: AtomicU64,
    /// Errors surfaced so far.
    pub errors: AtomicU64,
}

/// What one writer task measured. Latencies are kept as raw samples and put into one HDR
/// histogram at the end: a histogram per task (thousands of tasks) would cost far more memory
/// and time than the samples.
#[derive(Default)]
struct Outcome {
    acked: Vec<Ack>,
    /// `(µs, rows)`: one sample per acknowledged append, or per `limit` batch with its rows.
    latency: Vec<(u32, u32)>,
    /// µs per completed chat turn.
    turn_latency: Vec<u32>,
    errors: BTreeMap<String, u64>,
    counters: Counters,
    turns: u64,
}

/// An empty latency histogram (µs, 1 µs to 1 hour, 3 significant digits).
pub fn histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|error| LoadError::Histogram(error.to_string()))
}

/// A latency sample in µs, clamped to `u32`.
pub fn sample(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

impl Outcome {
    fn error(&mut self, error: OpError, progress: &Progress) {
        *self.errors.entry(error.kind).or_default() += 1;
        progress.errors.fetch_add(1, Relaxed);
    }

    fn merge(&mut self, other: Outcome) {
        self.acked.extend(other.acked);
        self.latency.extend(other.latency);
        self.turn_latency.extend(other.turn_latency);
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.counters.commits += other.counters.commits;
        self.counters.retries += other.counters.retries;
        self.turns += other.turns;
    }

    fn histograms(&self) -> Result<(Histogram<u64>, Histogram<u64>), LoadError> {
        let mut latency = histogram()?;
        for &(micros, rows) in &self.latency {
            latency.saturating_record_n(u64::from(micros), u64::from(rows));
        }
        let mut turns = histogram()?;
        for &micros in &self.turn_latency {
            turns.saturating_record(u64::from(micros));
        }
        Ok((latency, turns))
    }
}

/// Runs `spec` on a fresh database and measures it. A run that cannot be measured (a service
/// down, a provisioning failure) comes back with `failed` set rather than as an error, so the
/// rest of a matrix still runs.
pub async fn run(spec: &RunSpec, settings: &Settings) -> RunResult {
    let database = match Database::provision(spec.db, settings).await {
        Ok(database) => database,
        Err(error) => return RunResult::failed(spec, settings, error.to_string()),
    };
    let measured = measure(spec, settings, &database).await;
    database.dispose().await;
    let result =
        measured.unwrap_or_else(|error| RunResult::failed(spec, settings, error.to_string()));
    eprintln!("{}", summary_line(spec, settings, &result));
    result
}

fn limit_batch(spec: &RunSpec, settings: &Settings) -> Option<usize> {
    (spec.strategy == StrategyKind::Limit).then_some(settings.limit_batch.max(1))
}

fn summary_line(spec: &RunSpec, settings: &Settings, result: &RunResult) -> String {
    let label = spec.label(settings.limit_batch);
    if let Some(reason) = &result.failed {
        return format!("{label}: FAILED: {reason}");
    }
    let check = result.check.clone().unwrap_or_default();
    format!(
        "{}: {} appends in {:.1} s = {:.0}/s, {:.0} rows/s, {} errors; check {}: {} rows, \
         lost {}, duplicated {}, misplaced {}, gaps {}, count drift {}",
        label,
        result.appends,
        result.elapsed_s,
        result.appends_per_s,
        result.rows_per_s,
        result.errors_total,
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

fn pool_size(db: DbKind, settings: &Settings) -> u32 {
    match db {
        DbKind::Postgres => settings.postgres_pool,
        DbKind::Sqlite => settings.sqlite_pool,
    }
}

async fn measure(
    spec: &RunSpec,
    settings: &Settings,
    database: &Database,
) -> Result<RunResult, LoadError> {
    let sessions = database.create_sessions(spec.sessions, settings).await?;
    database.checkpoint().await?;
    let progress = Arc::new(Progress::default());

    // Open the strategy before the clock starts.
    let mut engine = None;
    let mut pool = None;
    let mut guard = None;
    match spec.strategy {
        StrategyKind::Soloist => {
            let config = settings.engine_config(&database.url, spec.db == DbKind::Postgres);
            engine = Some(Engine::start(config).await?);
        }
        strategy => {
            pool = Some(database.pool(pool_size(spec.db, settings)).await?);
            guard = match strategy {
                StrategyKind::Naive => Some(Guard::Naive),
                StrategyKind::MaxRetry => Some(Guard::MaxRetry),
                StrategyKind::RedisLock => Some(Guard::Redis(RedisLock::connect(settings).await?)),
                StrategyKind::AdvisoryLock => Some(Guard::Advisory),
                StrategyKind::Soloist | StrategyKind::Limit => None,
            };
        }
    }

    let fsync_ms = crate::machine::fsync_probe_ms();
    let cpu_before = CpuSample::take();
    let started = Instant::now();
    let deadline = started + settings.duration;
    let mut tasks: Vec<JoinHandle<Outcome>> = Vec::new();
    for (index, &session_id) in sessions.iter().enumerate() {
        let session =
            u32::try_from(index).map_err(|_| LoadError::Config("too many sessions".into()))?;
        if let (StrategyKind::Limit, Some(pool)) = (spec.strategy, &pool) {
            tasks.push(tokio::spawn(limit_task(
                pool.clone(),
                session_id,
                session,
                spec.workload,
                settings.limit_batch.max(1),
                deadline,
                progress.clone(),
                Outcome::default(),
            )));
            continue;
        }
        for writer_index in 0..spec.writers_used() {
            let writer = match (&engine, &pool, &guard) {
                (Some(engine), _, _) => Writer::Soloist(engine.session(USER_ID, session_id.into())),
                (None, Some(pool), Some(guard)) => {
                    Writer::sql(pool.clone(), session_id, guard.clone())
                }
                _ => return Err(LoadError::Config("strategy not opened".into())),
            };
            tasks.push(tokio::spawn(writer_task(
                writer,
                session,
                writer_index,
                spec.workload,
                deadline,
                progress.clone(),
                Outcome::default(),
            )));
        }
    }

    let bar = progress_bar(spec.label(settings.limit_batch), settings.duration);
    let ticker = tokio::spawn(tick(
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
        .zip(CpuSample::take())
        .map(|(before, after)| before.other_share(&after));
    ticker.abort();
    bar.finish_and_clear();

    let mut engine_stats = None;
    if let Some(engine) = engine {
        let stats = engine.stats();
        total.counters.commits = stats.flushes;
        engine_stats = Some(stats);
        engine.shutdown().await;
    }
    joined?;

    let check_pool = match pool {
        Some(pool) => pool,
        None => database.pool(2).await?,
    };
    let checked = check::verify(&check_pool, &sessions, &total.acked).await;
    check_pool.close().await;
    let check = checked?;

    let (latency, turn_latency) = total.histograms()?;
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let appends = total.acked.len() as u64;
    Ok(RunResult {
        workload: spec.workload,
        db: spec.db,
        strategy: spec.strategy,
        sessions: spec.sessions,
        writers_per_session: spec.writers,
        limit_batch: limit_batch(spec, settings),
        elapsed_s: seconds,
        appends,
        appends_per_s: appends as f64 / seconds,
        rows: check.rows,
        rows_per_s: check.rows as f64 / seconds,
        commits: total.counters.commits,
        retries: total.counters.retries,
        turns: (spec.workload == Workload::ChatTurn && spec.strategy != StrategyKind::Limit)
            .then_some(total.turns),
        latency_us: Latency::of(&latency),
        turn_latency_us: Latency::of(&turn_latency),
        errors_total: total.errors.values().sum(),
        errors: total.errors,
        check: Some(check),
        engine_stats,
        other_cpu_share,
        fsync_ms,
        failed: None,
    })
}

/// The live progress bar of a run on stderr, labelled `label`.
pub fn progress_bar(label: String, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(micros(duration) / 1000),
        ProgressDrawTarget::stderr_with_hz(5),
    );
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>4} {msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(label);
    bar
}

/// Updates `bar` from `progress` five times a second until aborted.
pub async fn tick(bar: ProgressBar, progress: Arc<Progress>, started: Instant, duration: Duration) {
    let mut interval = tokio::time::interval(Duration::from_millis(200));
    loop {
        interval.tick().await;
        let elapsed = started.elapsed();
        let acked = progress.acked.load(Relaxed);
        let errors = progress.errors.load(Relaxed);
        let rate = acked as f64 / elapsed.as_secs_f64().max(f64::EPSILON);
        bar.set_position(micros(elapsed.min(duration)) / 1000);
        let phase = if elapsed >= duration {
            " (draining)"
        } else {
            ""
        };
        bar.set_message(format!(
            "{acked} appends, {rate:.0}/s, {errors} errors{phase}"
        ));
    }
}

/// Appends `message`, recording the ack or the error. Answers the sequence on success.
async fn append_once(
    writer: &mut Writer,
    message: &Outgoing,
    session: u32,
    outcome: &mut Outcome,
    progress: &Progress,
) -> Option<i64> {
    let started = Instant::now();
    match writer.append(message, &mut outcome.counters).await {
        Ok(seq) => {
            outcome.latency.push((sample(started.elapsed()), 1));
            outcome.acked.push(Ack {
                session,
                seq,
                id: message.id,
            });
            progress.acked.fetch_add(1, Relaxed);
            Some(seq)
        }
        Err(error) => {
            outcome.error(error, progress);
            None
        }
    }
}

/// One writer of soloist or (a)–(d): loops until the deadline.
async fn writer_task(
    mut writer: Writer,
    session: u32,
    writer_index: usize,
    workload: Workload,
    deadline: Instant,
    progress: Arc<Progress>,
    mut outcome: Outcome,
) -> Outcome {
    let mut turn = 0u64;
    while Instant::now() < deadline {
        turn += 1;
        let user = Outgoing::user(writer_index, turn);
        match workload {
            Workload::Hot | Workload::Many => {
                append_once(&mut writer, &user, session, &mut outcome, &progress).await;
            }
            Workload::ChatTurn => {
                let turn_started = Instant::now();
                let Some(seq) =
                    append_once(&mut writer, &user, session, &mut outcome, &progress).await
                else {
                    continue;
                };
                if let Err(error) = writer.read_history(seq - HISTORY_MESSAGES as i64).await {
                    outcome.error(error, &progress);
                    continue;
                }
                let assistant = Outgoing::assistant(writer_index, turn);
                if append_once(&mut writer, &assistant, session, &mut outcome, &progress)
                    .await
                    .is_none()
                {
                    continue;
                }
                let (prompt, completion) = TURN_USAGE;
                if let Err(error) = writer
                    .add_usage(prompt, completion, &mut outcome.counters)
                    .await
                {
                    outcome.error(error, &progress);
                    continue;
                }
                outcome.turn_latency.push(sample(turn_started.elapsed()));
                outcome.turns += 1;
            }
        }
    }
    outcome
}

/// The `limit` strategy's one task per session: batches of rows at locally assigned sequences,
/// one multi-row insert and one commit per batch, until the deadline.
#[allow(clippy::too_many_arguments)]
async fn limit_task(
    pool: Pool,
    session_id: Uuid,
    session: u32,
    workload: Workload,
    batch: usize,
    deadline: Instant,
    progress: Arc<Progress>,
    mut outcome: Outcome,
) -> Outcome {
    let mut next_seq = 0i64;
    let mut turn = 0u64;
    while Instant::now() < deadline {
        let messages: Vec<Outgoing> = (0..batch)
            .map(|index| {
                turn += 1;
                if workload == Workload::ChatTurn && index % 2 == 1 {
                    Outgoing::assistant(0, turn)
                } else {
                    Outgoing::user(0, turn)
                }
            })
            .collect();
        let started = Instant::now();
        match insert_batch(&pool, session_id, next_seq, &messages).await {
            Ok(()) => {
                let rows = u32::try_from(messages.len()).unwrap_or(u32::MAX);
                outcome.latency.push((sample(started.elapsed()), rows));
                for (offset, message) in (0i64..).zip(&messages) {
                    outcome.acked.push(Ack {
                        session,
                        seq: next_seq + offset,
                        id: message.id,
                    });
                }
                next_seq += messages.len() as i64;
                outcome.counters.commits += 1;
                progress.acked.fetch_add(messages.len() as u64, Relaxed);
            }
            Err(error) => outcome.error(error, &progress),
        }
    }
    outcome
}
