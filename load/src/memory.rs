//! `--workload idle-memory`: resident memory per idle live session.
//!
//! One engine on a fresh database, with `max_live_sessions` above N and a one-hour
//! `idle_timeout` so that nothing passivates. RSS is read from `/proc/self/statm` once the
//! engine has started (before any session exists), then N sessions are activated (create + one
//! append each, at most 256 in flight), the process waits until every mailbox is empty and
//! every session is live, lets it settle for two seconds, and reads RSS again.
//!
//! The figure is `(RSS after - RSS before) / N`, with nothing subtracted. It therefore includes,
//! per session: the actor's task and its bounded mailbox, the registry slot (DashMap entry and
//! its growth), the session's cached row (title, metadata, counters) and its message index,
//! the one cached message (`Arc<Message>`: struct, content string, id), plus whatever the run
//! left behind that is not per session but is divided by N anyway: allocator slack and
//! fragmentation from the activation burst, the growth of the writer stage's buffers and of
//! SQLite's/sqlx's caches. The benchmark itself keeps nothing per session once its activation
//! tasks (at most 256 at a time) have finished.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use soloist::uuid::Uuid;
use soloist::{Engine, NewMessage, SessionId};
use tokio::task::JoinSet;

use crate::db::{Database, DbKind};
use crate::error::LoadError;
use crate::settings::Settings;
use crate::workload::USER_ID;

/// Activations in flight at once.
const IN_FLIGHT: usize = 256;
/// The page size `/proc/self/statm` counts in (4 KiB on x86_64 and the usual aarch64 kernels).
const PAGE_SIZE: u64 = 4096;
/// The text of each session's one message.
const MESSAGE_TEXT: &str = "hello from an idle session";

/// The idle-memory measurement.
#[derive(Clone, Debug, Serialize)]
pub struct IdleMemory {
    /// The database the engine ran on.
    pub db: DbKind,
    /// Sessions activated.
    pub sessions: usize,
    /// Live sessions reported by the engine when RSS was read.
    pub live_sessions: u64,
    /// RSS after the engine started, before any session.
    pub rss_before_bytes: u64,
    /// RSS with every session live and idle.
    pub rss_after_bytes: u64,
    /// `(after - before) / sessions`.
    pub bytes_per_session: f64,
    /// Content bytes of each session's one message.
    pub message_content_bytes: usize,
    /// Seconds to create and append to every session.
    pub activation_s: f64,
    /// What the figure includes.
    pub includes: String,
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Result<u64, LoadError> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages = statm
        .split_whitespace()
        .nth(1)
        .and_then(|resident| resident.parse::<u64>().ok())
        .ok_or_else(|| LoadError::Config("cannot parse /proc/self/statm".into()))?;
    Ok(pages * PAGE_SIZE)
}

/// Activates `sessions` sessions in one engine on a fresh `db` and measures RSS per session.
pub async fn measure(
    db: DbKind,
    sessions: usize,
    settings: &Settings,
) -> Result<IdleMemory, LoadError> {
    let database = Database::provision(db, settings).await?;
    let measured = measure_on(&database, sessions, settings).await;
    database.dispose().await;
    measured
}

async fn measure_on(
    database: &Database,
    sessions: usize,
    settings: &Settings,
) -> Result<IdleMemory, LoadError> {
    let mut config = settings.engine_config(&database.url, database.kind == DbKind::Postgres);
    config.max_live_sessions = Some(sessions.saturating_mul(2).max(1000));
    config.idle_timeout = Duration::from_secs(3600);
    let engine = Engine::start(config).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes()?;

    let bar =
        ProgressBar::with_draw_target(Some(sessions as u64), ProgressDrawTarget::stderr_with_hz(5));
    if let Ok(style) = ProgressStyle::with_template("idle-memory [{bar:30}] {pos}/{len} sessions") {
        bar.set_style(style.progress_chars("=> "));
    }
    let started = Instant::now();
    let mut activating = JoinSet::new();
    let mut outcome = Ok(());
    for _ in 0..sessions {
        while activating.len() >= IN_FLIGHT {
            if let Some(done) = activating.join_next().await {
                record(&mut outcome, done, &bar);
            }
        }
        let session = engine.session(USER_ID, SessionId::new());
        activating.spawn(async move {
            session.create(None, None).await?;
            session
                .append(vec![NewMessage::user(MESSAGE_TEXT).with_id(Uuid::now_v7())])
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = activating.join_next().await {
        record(&mut outcome, done, &bar);
    }
    let activation = started.elapsed();
    bar.finish_and_clear();
    if let Err(error) = outcome {
        engine.shutdown().await;
        return Err(error);
    }

    // Settle: every mailbox empty, then two more seconds.
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    while engine.stats().mailbox_depth > 0 && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes()?;
    let live_sessions = engine.stats().live_sessions;
    engine.shutdown().await;

    let grown = rss_after.saturating_sub(rss_before);
    Ok(IdleMemory {
        db: database.kind,
        sessions,
        live_sessions,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_session: grown as f64 / sessions.max(1) as f64,
        message_content_bytes: MESSAGE_TEXT.len(),
        activation_s: activation.as_secs_f64(),
        includes: "everything the process grew by, divided by N: per session the actor task, \
                   its mailbox, the registry slot, the cached session row and message index, \
                   the one cached message; plus allocator slack from the activation burst and \
                   grown engine/driver buffers and caches (the benchmark keeps nothing per \
                   session)"
            .into(),
    })
}

fn record(
    outcome: &mut Result<(), LoadError>,
    done: Result<Result<(), soloist::Error>, tokio::task::JoinError>,
    bar: &ProgressBar,
) {
    bar.inc(1);
    let failed = match done {
        Ok(Ok(())) => return,
        Ok(Err(error)) => LoadError::from(error),
        Err(error) => LoadError::from(error),
    };
    if outcome.is_ok() {
        *outcome = Err(failed);
    }
}
