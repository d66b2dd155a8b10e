//! What the numbers were measured on: cores, memory, database versions, the git commit.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqlitePoolOptions;

use crate::settings::Settings;

/// The machine and software versions of a report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MachineInfo {
    /// Cores available to this process (`nproc`).
    pub nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub memory_total_bytes: Option<u64>,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: Option<String>,
    /// PostgreSQL's `SELECT version()`.
    pub postgres_version: Option<String>,
    /// PostgreSQL's `synchronous_commit` setting.
    pub postgres_synchronous_commit: Option<String>,
    /// SQLite's `sqlite_version()` (the bundled library).
    pub sqlite_version: Option<String>,
    /// Redis's `redis_version`.
    pub redis_version: Option<String>,
    /// `git rev-parse HEAD` of the working directory when the benchmark ran.
    pub git_commit: Option<String>,
    /// Whether `git status --porcelain` listed changes (the binary may differ from the commit).
    pub git_dirty: Option<bool>,
    /// Whether this binary was built with optimizations.
    pub release_build: bool,
    /// The git commit the binary (and so the engine in it) was built from.
    pub build_commit: String,
    /// Whether the engine's sources had uncommitted changes when the binary was built
    /// (`"true"`, `"false"` or `"unknown"`).
    pub build_engine_dirty: String,
    /// [`fsync_probe_ms`] when the invocation started.
    pub fsync_ms_at_start: Option<f64>,
}

impl MachineInfo {
    /// Collects what it can; anything unavailable stays `None`.
    pub async fn collect(settings: &Settings) -> Self {
        let (postgres_version, postgres_synchronous_commit) = postgres_versions(settings).await;
        Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find(|line| line.starts_with("model name"))
                        .and_then(|line| line.split(':').nth(1))
                        .map(|model| model.trim().to_owned())
                }),
            memory_total_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find(|line| line.starts_with("MemTotal:"))
                        .and_then(|line| line.split_whitespace().nth(1))
                        .and_then(|kib| kib.parse::<u64>().ok())
                        .map(|kib| kib * 1024)
                }),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|release| release.trim().to_owned()),
            postgres_version,
            postgres_synchronous_commit,
            sqlite_version: sqlite_version().await,
            redis_version: redis_version(settings).await,
            git_commit: git(&["rev-parse", "HEAD"]),
            git_dirty: git(&["status", "--porcelain"]).map(|status| !status.is_empty()),
            release_build: !cfg!(debug_assertions),
            build_commit: env!("SOLOIST_LOAD_BUILD_COMMIT").to_owned(),
            build_engine_dirty: env!("SOLOIST_LOAD_BUILD_ENGINE_DIRTY").to_owned(),
            fsync_ms_at_start: fsync_probe_ms(),
        }
    }
}

async fn postgres_versions(settings: &Settings) -> (Option<String>, Option<String>) {
    let Ok(pool) = PgPoolOptions::new()
        .max_connections(1)
        .connect(&settings.postgres_url)
        .await
    else {
        return (None, None);
    };
    let version = sqlx::query_scalar("SELECT version()")
        .fetch_one(&pool)
        .await
        .ok();
    let synchronous = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .ok();
    pool.close().await;
    (version, synchronous)
}

async fn sqlite_version() -> Option<String> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .ok()?;
    let version = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&pool)
        .await
        .ok();
    pool.close().await;
    version
}

async fn redis_version(settings: &Settings) -> Option<String> {
    let client = redis::Client::open(settings.redis_url.as_str()).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut connection)
        .await
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(|version| version.trim().to_owned())
}

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Median milliseconds of a durable 8 KiB write (`write` + `fdatasync`) in the temp directory,
/// over 25 tries: what one durable commit costs the disk at that moment. On a shared virtual
/// disk it varies a lot over time, and every durable rate of a run follows it.
pub fn fsync_probe_ms() -> Option<f64> {
    use std::io::Write as _;
    let path = std::env::temp_dir().join(format!("soloist-load-fsync-{}", std::process::id()));
    let mut file = std::fs::File::create(&path).ok()?;
    let block = [0x5au8; 8192];
    let mut samples = Vec::with_capacity(25);
    for _ in 0..25 {
        let started = std::time::Instant::now();
        if file
            .write_all(&block)
            .and_then(|()| file.sync_data())
            .is_err()
        {
            break;
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied()
}

/// CPU time counters for telling how much of the machine other work used during a run.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    /// Busy ticks of the whole machine (`/proc/stat`).
    machine_busy: u64,
    /// Ticks of this process, PostgreSQL's processes, Redis and the benchmark's own server
    /// processes (`/proc/<pid>/stat`).
    benchmark: u64,
    at: std::time::Instant,
}

impl CpuSample {
    /// Reads the counters now; `None` where `/proc` is unavailable.
    pub fn take() -> Option<Self> {
        Self::take_with(&[])
    }

    /// Reads the counters now, counting the processes `ours` (a cluster run's servers) as the
    /// benchmark's own.
    pub fn take_with(ours: &[u32]) -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let busy = fields.iter().take(8).sum::<u64>()
            - fields.get(3).copied().unwrap_or(0)
            - fields.get(4).copied().unwrap_or(0);
        let own = std::process::id().to_string();
        let mut benchmark = 0;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str() else { continue };
            if !pid.bytes().all(|byte| byte.is_ascii_digit()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ... utime stime: comm may hold spaces, so split after ')'.
            let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
                continue;
            };
            let comm = &text[open + 1..close];
            let is_ours = pid.parse::<u32>().is_ok_and(|pid| ours.contains(&pid));
            if pid != own && !is_ours && !comm.starts_with("postgres") && comm != "redis-server" {
                continue;
            }
            let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
            let ticks = |index: usize| {
                rest.get(index)
                    .and_then(|value| value.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            benchmark += ticks(11) + ticks(12);
        }
        Some(Self {
            machine_busy: busy,
            benchmark,
            at: std::time::Instant::now(),
        })
    }

    /// The share of the machine's CPU (0..1, all cores) that processes other than this one (and
    /// its servers), PostgreSQL and Redis used between `self` and `later`.
    pub fn other_share(&self, later: &CpuSample) -> f64 {
        const TICKS_PER_SECOND: f64 = 100.0;
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let seconds = later.at.duration_since(self.at).as_secs_f64().max(0.001);
        let machine = later.machine_busy.saturating_sub(self.machine_busy) as f64;
        let benchmark = later.benchmark.saturating_sub(self.benchmark) as f64;
        ((machine - benchmark).max(0.0) / (TICKS_PER_SECOND * seconds * cores)).min(1.0)
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let time = seconds % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
}
