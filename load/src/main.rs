//! # soloist-load
//!
//! The load benchmark: soloist under concurrent load, side by side with the
//! strategies it replaces, on the same database, schema and pool size, each run bounded in time.
//!
//! ```text
//! soloist-load --all                        # 3 workloads x {postgres, sqlite} x every strategy
//! soloist-load --workload hot --db postgres # one workload (--db both by default)
//! soloist-load --sweep --db postgres        # hot session, writers 1..64, every strategy, plot.svg
//! soloist-load --workload idle-memory       # RSS per idle live session (20,000 sessions)
//! soloist-load --cluster --processes 3 --routing sticky --workload many
//!                                           # 3 soloist-server processes, one database, HTTP
//! soloist-load --cluster-table              # 1 process / 3 sticky / 3 round-robin x 3 shapes
//! soloist-load --workload stream            # streamed replies: 200 sessions x 50 deltas/s,
//!                                           # soloist (server + SSE) vs rewrite per delta
//! soloist-load --quick ...                  # 3 s runs instead of 10 s
//! ```
//!
//! Output: a Markdown report on stdout, and `report.json`, `report.md` (and `plot.svg` for a
//! sweep) in `--out` (default `target/soloist-load/`). Live progress goes to stderr. The tool
//! only talks to PostgreSQL and Redis on 127.0.0.1 and refuses other hosts.
//!
//! **Cluster runs** measure soloist as deployed: `--cluster` starts `--processes` N
//! `soloist-server` processes (the binary next to this one, or `--server-bin`) on one fresh
//! PostgreSQL schema, each on a free port with only `--database-url` and `--listen`, waits
//! until they all see each other as members, creates the sessions over HTTP and drives the
//! workload over HTTP, each request to the process the `--routing` picks (`sticky`: a session
//! always to the process that owns it, as perfect session affinity would; `round-robin`: every
//! request to the next, as a plain balancer would, the servers forwarding each to its owner). Retryable answers
//! are retried with the same message id. The same
//! measures and correctness check as every run, plus retries and the servers' takeover (and
//! forwarding) counters from `GET /metrics`. `--cluster-table` runs the comparison in one go:
//! 1 process, N sticky, N round-robin, on hot (1 x 64), many200 (200 x 4) and many (1,000 x 4).
//! Build the server first: `cargo build --release -p soloist-server -p soloist-load`. Server
//! logs go to `<out>/servers/`.
//!
//! Modules: [`workload`] (what is written), [`strategy`] (how: soloist and the baselines),
//! [`run`] (one measured run), [`check`] (the correctness check), [`db`] (fresh databases),
//! [`memory`] (idle memory), [`stream`] (streamed replies), [`report`] and [`plot`] (output),
//! [`machine`] (machine info);
//! cluster runs: [`cluster`] (one run), [`servers`] (the processes), [`http`] (routing and
//! requests).

mod check;
mod cluster;
mod db;
mod error;
mod http;
mod machine;
mod memory;
mod plot;
mod report;
mod run;
mod servers;
mod settings;
mod strategy;
mod stream;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use crate::cluster::{ClusterOptions, ClusterSpec};
use crate::db::DbKind;
use crate::error::LoadError;
use crate::http::Routing;
use crate::machine::MachineInfo;
use crate::report::{Report, Sweep};
use crate::run::RunSpec;
use crate::settings::{DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL, Settings};
use crate::strategy::StrategyKind;
use crate::workload::Workload;

/// Writer counts of `--sweep`.
const SWEEP_WRITERS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Processes of a cluster run at most.
const MAX_PROCESSES: usize = 32;

/// What `--workload` can name: the three load workloads, or the idle-memory measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WorkloadArg {
    /// 1 session x 64 writers.
    Hot,
    /// 1,000 sessions x 4 writers.
    Many,
    /// 200 sessions x 2 writers: user message, history read, assistant message, usage.
    ChatTurn,
    /// RSS per idle live session.
    IdleMemory,
    /// Streamed replies: S sessions x --delta-rate deltas/s, --viewers SSE viewers each,
    /// soloist (a server, over HTTP) against the whole message rewritten per delta.
    Stream,
}

/// What `--db` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DbArg {
    /// PostgreSQL on 127.0.0.1:5432.
    Postgres,
    /// A temporary SQLite file.
    Sqlite,
    /// Both, PostgreSQL first.
    Both,
}

/// Load benchmark: soloist side by side with the strategies it replaces.
#[derive(Debug, Parser)]
#[command(name = "soloist-load", version)]
struct Cli {
    /// Workload to run (ignored by --all and --sweep).
    #[arg(long, value_enum, default_value_t = WorkloadArg::Hot)]
    workload: WorkloadArg,
    /// Database(s). Default: both for workloads and --all, postgres for --sweep, sqlite for
    /// idle-memory.
    #[arg(long, value_enum)]
    db: Option<DbArg>,
    /// Strategies, comma-separated (a, b, c, d are aliases). Default: every one the database
    /// supports ((d) is PostgreSQL only).
    #[arg(long, value_enum, value_delimiter = ',')]
    strategy: Vec<StrategyKind>,
    /// The whole matrix: every workload on both databases with every strategy.
    #[arg(long, conflicts_with = "sweep")]
    all: bool,
    /// The hot-session workload with 1, 2, 4, ... 64 writers, every strategy, and a plot.
    #[arg(long)]
    sweep: bool,
    /// Cluster run: --processes soloist-server processes on one fresh PostgreSQL database,
    /// --workload (hot or many) driven over HTTP with --routing.
    #[arg(long, conflicts_with_all = ["all", "sweep", "cluster_table"])]
    cluster: bool,
    /// The cluster comparison in one go: 1 process, --processes sticky, --processes round-robin,
    /// each on hot (1x64), many200 (200x4) and many (1,000x4); --sessions and --writers are
    /// ignored.
    #[arg(long, conflicts_with_all = ["all", "sweep"])]
    cluster_table: bool,
    /// Cluster runs: soloist-server processes.
    #[arg(long, default_value_t = 3)]
    processes: usize,
    /// Cluster runs: how requests are spread over the processes.
    #[arg(long, value_enum, default_value_t = Routing::Sticky)]
    routing: Routing,
    /// Cluster runs: the soloist-server binary (default: the one next to this executable).
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Seconds each run keeps starting operations.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// 3-second runs (overrides --duration).
    #[arg(long)]
    quick: bool,
    /// Writers per session (default: the workload's).
    #[arg(long)]
    writers: Option<usize>,
    /// Sessions (default: the workload's).
    #[arg(long)]
    sessions: Option<usize>,
    /// PostgreSQL connections per run, for soloist (split between writers and readers) and
    /// every baseline alike.
    #[arg(long, default_value_t = 8)]
    pool_size: u32,
    /// Rows per multi-row INSERT and commit of the limit strategy.
    #[arg(long, default_value_t = 100)]
    limit_batch: usize,
    /// --workload stream: deltas due per second per session.
    #[arg(long, default_value_t = 50.0)]
    delta_rate: f64,
    /// --workload stream: deltas per reply.
    #[arg(long, default_value_t = 250)]
    deltas_per_reply: usize,
    /// --workload stream: bytes per delta (at least 16).
    #[arg(long, default_value_t = 16)]
    delta_bytes: usize,
    /// --workload stream: the ways to run, comma-separated (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    stream_way: Vec<stream::StreamWay>,
    /// --workload stream: SSE viewers per session.
    #[arg(long, default_value_t = 1)]
    viewers: usize,
    /// Sessions activated by --workload idle-memory.
    #[arg(long, default_value_t = 20_000)]
    idle_sessions: usize,
    /// Strategy (c): milliseconds between two lock attempts.
    #[arg(long, default_value_t = 2)]
    lock_poll_ms: u64,
    /// Strategy (c): seconds to wait for the lock before giving up with an error.
    #[arg(long, default_value_t = 5)]
    lock_wait_secs: u64,
    /// Directory for report.json, report.md and plot.svg.
    #[arg(long, default_value = "target/soloist-load")]
    out: PathBuf,
    /// PostgreSQL database (loopback only); each run uses a fresh schema in it.
    #[arg(long, default_value = DEFAULT_POSTGRES_URL)]
    postgres_url: String,
    /// Redis for strategy (c) (loopback only).
    #[arg(long, default_value = DEFAULT_REDIS_URL)]
    redis_url: String,
}

impl Cli {
    fn settings(&self) -> Result<Settings, LoadError> {
        let seconds = if self.quick { 3.0 } else { self.duration };
        if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
            return Err(LoadError::Config(
                "--duration must be between 0 and 3600 seconds".into(),
            ));
        }
        let settings = Settings {
            postgres_url: self.postgres_url.clone(),
            redis_url: self.redis_url.clone(),
            postgres_pool: self.pool_size.max(2),
            sqlite_pool: settings::engine_default_sqlite_connections(),
            duration: Duration::from_secs_f64(seconds),
            limit_batch: self.limit_batch.max(1),
            lock_poll: Duration::from_millis(self.lock_poll_ms),
            lock_wait: Duration::from_secs(self.lock_wait_secs),
            lock_ttl: Duration::from_secs(60),
        };
        settings.check_loopback()?;
        Ok(settings)
    }

    fn dbs(&self, default: DbArg) -> Vec<DbKind> {
        match self.db.unwrap_or(default) {
            DbArg::Postgres => vec![DbKind::Postgres],
            DbArg::Sqlite => vec![DbKind::Sqlite],
            DbArg::Both => vec![DbKind::Postgres, DbKind::Sqlite],
        }
    }

    /// What cluster runs need, checked: PostgreSQL, a process count, the server binary.
    fn cluster_options(&self) -> Result<ClusterOptions, LoadError> {
        if matches!(self.db, Some(DbArg::Sqlite)) {
            return Err(LoadError::Config(
                "cluster runs share one PostgreSQL database: --db sqlite does not apply".into(),
            ));
        }
        if !(1..=MAX_PROCESSES).contains(&self.processes) {
            return Err(LoadError::Config(format!(
                "--processes must be between 1 and {MAX_PROCESSES}"
            )));
        }
        Ok(ClusterOptions {
            server_binary: servers::server_binary(self.server_bin.as_deref())?,
            log_root: self.out.join("servers"),
        })
    }

    /// The runs of `--cluster` or `--cluster-table`.
    fn cluster_specs(&self) -> Result<Vec<ClusterSpec>, LoadError> {
        if self.cluster_table {
            let shapes = [
                (Workload::Hot, 1, 64),
                (Workload::Many, 200, 4),
                (Workload::Many, 1_000, 4),
            ];
            let mut configurations = vec![(1, Routing::Sticky)];
            if self.processes > 1 {
                configurations.push((self.processes, Routing::Sticky));
                configurations.push((self.processes, Routing::RoundRobin));
            }
            return Ok(shapes
                .into_iter()
                .flat_map(|(workload, sessions, writers)| {
                    configurations
                        .iter()
                        .map(move |&(processes, routing)| ClusterSpec {
                            processes,
                            routing,
                            workload,
                            sessions,
                            writers,
                        })
                })
                .collect());
        }
        let workload = match self.workload {
            WorkloadArg::Hot => Workload::Hot,
            WorkloadArg::Many => Workload::Many,
            WorkloadArg::ChatTurn | WorkloadArg::IdleMemory | WorkloadArg::Stream => {
                return Err(LoadError::Config(
                    "--cluster runs --workload hot or many".into(),
                ));
            }
        };
        Ok(vec![ClusterSpec {
            processes: self.processes,
            routing: self.routing,
            workload,
            sessions: self.sessions.unwrap_or(workload.default_sessions()).max(1),
            writers: self.writers.unwrap_or(workload.default_writers()).max(1),
        }])
    }

    fn strategies(&self, db: DbKind) -> Vec<StrategyKind> {
        let chosen: &[StrategyKind] = if self.strategy.is_empty() {
            &StrategyKind::ALL
        } else {
            &self.strategy
        };
        chosen
            .iter()
            .copied()
            .filter(|strategy| strategy.supports(db))
            .collect()
    }

    fn spec(&self, workload: Workload, db: DbKind, strategy: StrategyKind) -> RunSpec {
        RunSpec {
            workload,
            db,
            strategy,
            sessions: self.sessions.unwrap_or(workload.default_sessions()).max(1),
            writers: self.writers.unwrap_or(workload.default_writers()).max(1),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let settings = cli.settings()?;
    let started = Instant::now();
    let started_at = machine::utc_now();
    let machine = MachineInfo::collect(&settings).await;

    // Checked before anything runs: a missing server binary fails here, not run by run.
    let cluster = if cli.cluster || cli.cluster_table {
        Some((cli.cluster_options()?, cli.cluster_specs()?))
    } else {
        None
    };

    let mode = if cli.cluster_table {
        "cluster-table"
    } else if cli.cluster {
        "cluster"
    } else if cli.sweep {
        "sweep"
    } else if cli.all {
        "all"
    } else if cli.workload == WorkloadArg::IdleMemory {
        "idle-memory"
    } else if cli.workload == WorkloadArg::Stream {
        "stream"
    } else {
        "workload"
    };
    let mut report = Report::new(mode, machine, settings.clone(), started_at);

    if let Some((options, specs)) = &cluster {
        for spec in specs {
            report
                .cluster
                .push(cluster::run(spec, &settings, options).await);
        }
    } else if cli.sweep {
        let db = cli.dbs(DbArg::Postgres)[0];
        for writers in SWEEP_WRITERS {
            for strategy in cli.strategies(db) {
                let spec = RunSpec {
                    workload: Workload::Hot,
                    db,
                    strategy,
                    sessions: 1,
                    writers,
                };
                report.runs.push(run::run(&spec, &settings).await);
            }
        }
        let plot_path = cli.out.join("plot.svg");
        std::fs::create_dir_all(&cli.out)?;
        let series: Vec<plot::Series> = cli
            .strategies(db)
            .into_iter()
            .map(|strategy| plot::Series {
                label: strategy.label_with_batch(settings.limit_batch),
                points: report
                    .runs
                    .iter()
                    .filter(|run| run.strategy == strategy && run.failed.is_none())
                    .map(|run| (run.writers_per_session, run.appends_per_s))
                    .collect(),
            })
            .collect();
        plot::draw(
            &plot_path,
            &format!(
                "soloist-load: one hot session on {}, {:.0} s per point",
                db.title(),
                settings.duration.as_secs_f64()
            ),
            &series,
        )?;
        report.sweep = Some(Sweep {
            db,
            writers: SWEEP_WRITERS.to_vec(),
            plot: plot_path.display().to_string(),
        });
    } else if cli.all {
        for workload in [Workload::Hot, Workload::Many, Workload::ChatTurn] {
            for db in cli.dbs(DbArg::Both) {
                for strategy in cli.strategies(db) {
                    report
                        .runs
                        .push(run::run(&cli.spec(workload, db, strategy), &settings).await);
                }
            }
        }
    } else if cli.workload == WorkloadArg::Stream {
        if !(cli.delta_rate.is_finite() && cli.delta_rate > 0.0) {
            return Err(LoadError::Config("--delta-rate must be above 0".into()).into());
        }
        let options = stream::options(cli.server_bin.as_deref(), &cli.out)?;
        let sessions = cli.sessions.unwrap_or(200).max(1);
        let plan = stream::StreamPlan {
            sessions,
            rate: cli.delta_rate,
            deltas_per_reply: cli.deltas_per_reply.max(1),
            delta_bytes: cli.delta_bytes,
            viewers: cli.viewers,
            ways: if cli.stream_way.is_empty() {
                vec![
                    stream::StreamWay::Soloist,
                    stream::StreamWay::Library,
                    stream::StreamWay::Rewrite,
                ]
            } else {
                cli.stream_way.clone()
            },
        };
        for db in cli.dbs(DbArg::Both) {
            while let Some(spec) = plan.next(db, &report.stream) {
                report
                    .stream
                    .push(stream::run(&spec, &settings, &options).await);
            }
        }
    } else if cli.workload == WorkloadArg::IdleMemory {
        let db = cli.dbs(DbArg::Sqlite)[0];
        report.idle_memory = Some(memory::measure(db, cli.idle_sessions.max(1), &settings).await?);
    } else {
        let workload = match cli.workload {
            WorkloadArg::Hot => Workload::Hot,
            WorkloadArg::Many => Workload::Many,
            WorkloadArg::ChatTurn | WorkloadArg::IdleMemory | WorkloadArg::Stream => {
                Workload::ChatTurn
            }
        };
        for db in cli.dbs(DbArg::Both) {
            for strategy in cli.strategies(db) {
                report
                    .runs
                    .push(run::run(&cli.spec(workload, db, strategy), &settings).await);
            }
        }
    }

    report.total_seconds = started.elapsed().as_secs_f64();
    report.analyze();
    let markdown = report.write(&cli.out)?;
    println!("{markdown}");
    eprintln!(
        "wrote {} and {} in {:.0} s",
        cli.out.join("report.json").display(),
        cli.out.join("report.md").display(),
        report.total_seconds
    );
    Ok(())
}
