//! `--workload stream`: streamed assistant replies, soloist against the usual way.
//!
//! **soloist** runs as deployed: one `soloist-server` process on a fresh database, driven over
//! HTTP. Each of S sessions streams replies back to back: a draft (`POST .../messages` with
//! `"status": "in_progress"`), then N deltas (`POST .../messages/{id}/deltas`), then a finish
//! (`POST .../finish` with usage). Meanwhile V viewers per session follow the session over
//! SSE (`GET .../events`), as browsers would.
//!
//! **The usual way** keeps the reply in memory and, for every delta, rewrites the whole
//! message (`UPDATE messages SET content = <everything so far>`), one commit per delta, from
//! this process through a pool of the same size as the server's, on the same schema. It has
//! no viewers: it has no feed to follow.
//!
//! **The producer.** Tokens of a reply are due at a fixed rate (`--delta-rate` per session)
//! from the reply's start, as a model would emit them. A producer sends one request at a time
//! and waits for its answer: soloist's producer sends every token due by then in one request
//! (`{"deltas": [...]}`, at most [`MAX_DELTAS_PER_CALL`]), as a server relaying a model's
//! stream would send what arrived while the previous write was in flight; the usual way's
//! writes the message once per token, as it is defined. A producer that falls behind
//! stays behind: the achieved delta rate is what the strategy sustains. Without a rate, tokens
//! are due as soon as the previous one is answered (one per request).
//!
//! **Measures.** Each token's text starts with the microsecond it was due (padded to
//! `--delta-bytes`), so a viewer knows each token's age when it arrives.
//! - *delta ack*: from a token's due time to the answer that made it durable;
//! - *viewer lag*: from a token's due time to its arrival at a viewer;
//! - *viewer gaps / repeats*: a delta event whose offset is past / before the end of what the
//!   viewer had of that message;
//! - *bytes written*: PostgreSQL: the WAL written during the run (`pg_current_wal_lsn()`,
//!   the whole cluster; nothing else runs); SQLite: `write_bytes` of `/proc/<pid>/io` of the
//!   writing process (the server, or this one for the usual way), the WAL and the
//!   checkpoints together. *Per reply* scales it to one reply of N deltas by the content
//!   bytes acknowledged (`bytes written * reply bytes / content bytes`);
//! - *commits*: soloist: the server's `soloist_flushes_total`; the usual way: its own commits;
//! - *check* (soloist): after the run, every message read back over HTTP holds every byte
//!   acknowledged for it and nothing that was not sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use soloist::uuid::Uuid;
use soloist::{
    AppendDeltas, Delta, Engine, MessageStatus, NewMessage, Position, StreamEvent, Usage,
};
use tokio::task::JoinHandle;
use tokio::time::Instant as TokioInstant;

use crate::db::{Database, DbKind, Pool};
use crate::error::LoadError;
use crate::http::{self, Attempts, Cluster, Routing};
use crate::machine::CpuSample;
use crate::run::{self, Latency, Progress};
use crate::servers::{self, Servers};
use crate::settings::Settings;
use crate::strategy::OpError;
use crate::workload::{USER_ID, now_micros};

/// Tokens one delta request of soloist's producer carries at most.
pub const MAX_DELTAS_PER_CALL: usize = 64;
/// Digits of the due time at the start of each token.
const STAMP_DIGITS: usize = 15;
/// Sessions created at a time.
const CREATE_PARALLEL: usize = 32;
/// How long viewers keep reading after the producers stop.
const VIEWER_GRACE: Duration = Duration::from_secs(1);
/// Messages read per page by the check.
const CHECK_PAGE: usize = 1000;

/// How a stream run writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StreamWay {
    /// Drafts and deltas through a `soloist-server`, viewers over SSE.
    Soloist,
    /// Drafts and deltas through the engine linked in, viewers on its subscriptions.
    Library,
    /// The whole message rewritten per delta, one commit each.
    Rewrite,
}

impl StreamWay {
    /// The name used in tables.
    pub fn label(self) -> &'static str {
        match self {
            StreamWay::Soloist => "soloist server (HTTP, SSE)",
            StreamWay::Library => "soloist library (in process)",
            StreamWay::Rewrite => "usual way: rewrite per delta",
        }
    }
}

/// One stream run.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSpec {
    /// The database.
    pub db: DbKind,
    /// How it writes.
    pub way: StreamWay,
    /// Sessions, each with one producer.
    pub sessions: usize,
    /// Deltas due per second per session; `None`: each as soon as the previous is answered.
    pub rate: Option<f64>,
    /// Deltas per reply.
    pub deltas_per_reply: usize,
    /// Bytes per delta (at least [`STAMP_DIGITS`] + 1).
    pub delta_bytes: usize,
    /// SSE viewers per session (soloist only).
    pub viewers: usize,
    /// Why this run is in the table.
    pub purpose: String,
}

impl StreamSpec {
    /// Deltas offered per second, all sessions together, when paced.
    pub fn offered_per_s(&self) -> Option<f64> {
        self.rate.map(|rate| rate * self.sessions as f64)
    }

    fn label(&self) -> String {
        format!(
            "stream {} {} {}x{}",
            self.db.name(),
            match self.way {
                StreamWay::Soloist => "server",
                StreamWay::Library => "library",
                StreamWay::Rewrite => "rewrite",
            },
            self.sessions,
            self.rate
                .map_or_else(|| "max".to_owned(), |rate| format!("{rate:.0}/s")),
        )
    }
}

/// What a stream run needs besides the shared settings.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The `soloist-server` binary.
    pub server_binary: PathBuf,
    /// Where the server's logs go.
    pub log_root: PathBuf,
}

/// Everything measured in one stream run.
#[derive(Clone, Debug, Serialize)]
pub struct StreamResult {
    /// What ran.
    pub spec: StreamSpec,
    /// Seconds from the first producer's start to the last one's end.
    pub elapsed_s: f64,
    /// Deltas acknowledged.
    pub deltas: u64,
    /// `deltas / elapsed_s`.
    pub deltas_per_s: f64,
    /// Requests (soloist) or statements (the usual way) that carried them.
    pub delta_calls: u64,
    /// Replies finished as completed.
    pub replies: u64,
    /// Write transactions committed.
    pub commits: u64,
    /// `commits / elapsed_s`.
    pub commits_per_s: f64,
    /// Bytes the database wrote during the run (see the module docs).
    pub bytes_written: Option<u64>,
    /// Content bytes acknowledged.
    pub content_bytes: u64,
    /// Bytes written per reply of `deltas_per_reply` deltas.
    pub bytes_per_reply: Option<f64>,
    /// Content bytes of one reply.
    pub reply_bytes: u64,
    /// From each token's due time to its acknowledgement, µs.
    pub ack_us: Option<Latency>,
    /// From each token's due time to its arrival at a viewer, µs.
    pub viewer_lag_us: Option<Latency>,
    /// Tokens the viewers received.
    pub viewer_tokens: u64,
    /// Delta events past the end of what the viewer had.
    pub viewer_gaps: u64,
    /// Delta events before the end of what the viewer had.
    pub viewer_repeats: u64,
    /// Failed requests, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Requests sent again after a retryable answer.
    pub retries: u64,
    /// Messages read back by the check.
    pub checked_messages: Option<u64>,
    /// Messages missing acknowledged bytes, or holding bytes never sent.
    pub check_failures: Option<u64>,
    /// Share of the machine's CPU used by other processes during the run.
    pub other_cpu_share: Option<f64>,
    /// Why the run could not be measured, if it could not.
    pub failed: Option<String>,
}

impl StreamResult {
    fn failed(spec: &StreamSpec, reason: String) -> Self {
        Self {
            spec: spec.clone(),
            elapsed_s: 0.0,
            deltas: 0,
            deltas_per_s: 0.0,
            delta_calls: 0,
            replies: 0,
            commits: 0,
            commits_per_s: 0.0,
            bytes_written: None,
            content_bytes: 0,
            bytes_per_reply: None,
            reply_bytes: 0,
            ack_us: None,
            viewer_lag_us: None,
            viewer_tokens: 0,
            viewer_gaps: 0,
            viewer_repeats: 0,
            errors: BTreeMap::new(),
            retries: 0,
            checked_messages: None,
            check_failures: None,
            other_cpu_share: None,
            failed: Some(reason),
        }
    }
}

/// The text of one token: the µs it was due (since the run's epoch), then dots up to `bytes`.
fn token(due_us: u64, bytes: usize) -> String {
    let mut text = format!("{due_us:0STAMP_DIGITS$}");
    text.truncate(STAMP_DIGITS);
    while text.len() < bytes {
        text.push('.');
    }
    text
}

/// The due times (µs since the epoch) of the whole tokens in `content`, which starts at byte
/// `offset` of its message.
fn stamps(content: &str, offset: u64, bytes: usize) -> impl Iterator<Item = u64> + '_ {
    let bytes = bytes.max(1);
    let skip = (bytes - (offset as usize % bytes)) % bytes;
    content
        .as_bytes()
        .get(skip..)
        .unwrap_or_default()
        .chunks_exact(bytes)
        .filter_map(|chunk| {
            std::str::from_utf8(chunk.get(..STAMP_DIGITS)?)
                .ok()?
                .parse()
                .ok()
        })
}

/// Runs `spec` on a fresh database and measures it; a run that cannot be measured comes back
/// with `failed` set.
pub async fn run(spec: &StreamSpec, settings: &Settings, options: &StreamOptions) -> StreamResult {
    let database = match Database::provision(spec.db, settings).await {
        Ok(database) => database,
        Err(error) => return StreamResult::failed(spec, error.to_string()),
    };
    let measured = match spec.way {
        StreamWay::Soloist => measure_soloist(spec, settings, options, &database).await,
        StreamWay::Library => measure_library(spec, settings, &database).await,
        StreamWay::Rewrite => measure_rewrite(spec, settings, &database).await,
    };
    database.dispose().await;
    let result = measured.unwrap_or_else(|error| StreamResult::failed(spec, error.to_string()));
    eprintln!("{}", summary_line(&result));
    result
}

fn summary_line(result: &StreamResult) -> String {
    if let Some(reason) = &result.failed {
        return format!("{}: FAILED: {reason}", result.spec.label());
    }
    format!(
        "{}: {:.0} deltas/s, {:.0} commits/s, {} bytes/reply, ack p99 {} µs, lag p99 {} µs, \
         errors {}, gaps {}, repeats {}, check failures {}",
        result.spec.label(),
        result.deltas_per_s,
        result.commits_per_s,
        result
            .bytes_per_reply
            .map_or_else(|| "-".to_owned(), |bytes| format!("{bytes:.0}")),
        result.ack_us.as_ref().map_or(0, |latency| latency.p99),
        result
            .viewer_lag_us
            .as_ref()
            .map_or(0, |latency| latency.p99),
        result.errors.values().sum::<u64>(),
        result.viewer_gaps,
        result.viewer_repeats,
        result.check_failures.unwrap_or(0),
    )
}

/// What one producer measured.
#[derive(Default)]
struct Produced {
    deltas: u64,
    calls: u64,
    replies: u64,
    commits: u64,
    content_bytes: u64,
    /// µs from due to acknowledgement, per token.
    ack: Vec<u32>,
    errors: BTreeMap<String, u64>,
    retries: u64,
    /// Per message: what was sent, and how many bytes of it were acknowledged.
    sent: Vec<(Uuid, String, usize)>,
}

impl Produced {
    fn merge(&mut self, other: Produced) {
        self.deltas += other.deltas;
        self.calls += other.calls;
        self.replies += other.replies;
        self.commits += other.commits;
        self.content_bytes += other.content_bytes;
        self.ack.extend(other.ack);
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.retries += other.retries;
        self.sent.extend(other.sent);
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// The schedule of one reply's tokens.
struct Schedule {
    epoch: Instant,
    start: Instant,
    interval: Option<Duration>,
    bytes: usize,
}

impl Schedule {
    /// When token `index` of the reply is due (`None`: when it is asked for).
    fn due(&self, index: usize) -> Option<Instant> {
        self.interval
            .map(|interval| self.start + interval.mul_f64(index as f64))
    }

    fn token(&self, due: Instant) -> String {
        token(
            u64::try_from(due.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(u64::MAX),
            self.bytes,
        )
    }
}

fn interval(spec: &StreamSpec) -> Option<Duration> {
    spec.rate
        .filter(|rate| rate.is_finite() && *rate > 0.0)
        .map(|rate| Duration::from_secs_f64(1.0 / rate))
}

fn elapsed_us(from: Instant, to: Instant) -> u32 {
    run::sample(to.saturating_duration_since(from))
}

// ---------------------------------------------------------------------------------------------
// soloist

#[derive(Serialize)]
struct DraftBody<'a> {
    messages: [&'a NewMessage; 1],
}

#[derive(Serialize)]
struct DeltaItem<'a> {
    offset: u64,
    content: &'a str,
}

#[derive(Serialize)]
struct DeltasBody<'a> {
    deltas: Vec<DeltaItem<'a>>,
}

#[derive(Deserialize)]
struct DeltasAnswer {
    length: u64,
}

#[derive(Serialize)]
struct FinishBody {
    status: MessageStatus,
    usage: UsageBody,
}

#[derive(Serialize)]
struct UsageBody {
    prompt_tokens: u32,
    completion_tokens: u32,
}

async fn measure_soloist(
    spec: &StreamSpec,
    settings: &Settings,
    options: &StreamOptions,
    database: &Database,
) -> Result<StreamResult, LoadError> {
    let logs = options.log_root.join(spec.label().replace(' ', "-"));
    match std::fs::remove_dir_all(&logs) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
        _ => {}
    }
    let client = http::client()?;
    let servers = Servers::start(&options.server_binary, &database.url, 1, &logs, &client).await?;
    let members = servers.converge(&client).await?;
    let cluster = Arc::new(Cluster::new(
        client.clone(),
        servers.urls(),
        members,
        Routing::Sticky,
    ));
    let sessions = cluster
        .create_sessions(Uuid::now_v7(), spec.sessions.max(1), CREATE_PARALLEL)
        .await?;
    database.checkpoint().await?;
    let pids = servers.pids();
    let before = servers.counters(&client, &["flushes_total"]).await?;

    let driven = drive(
        Producer::Soloist(Writer::Http(cluster.clone())),
        &sessions,
        spec,
        settings,
        database,
        &pids,
    )
    .await?;
    let after = servers.counters(&client, &["flushes_total"]).await?;
    let check = check_soloist(&Writer::Http(cluster), &sessions, &driven.produced.sent).await?;
    for warning in servers.stop().await {
        eprintln!("warning: {warning}");
    }
    let flushes = |counters: &[BTreeMap<String, f64>]| {
        counters
            .iter()
            .flat_map(|counters| counters.get("soloist_flushes_total"))
            .sum::<f64>()
    };
    let commits = (flushes(&after) - flushes(&before)).max(0.0) as u64;
    driven.finish(spec, commits, Some(check))
}

/// soloist linked in: the engine in this process, its viewers on the engine's subscriptions
/// (what a server's SSE endpoint serves from).
async fn measure_library(
    spec: &StreamSpec,
    settings: &Settings,
    database: &Database,
) -> Result<StreamResult, LoadError> {
    let engine =
        Engine::start(settings.engine_config(&database.url, database.kind == DbKind::Postgres))
            .await?;
    let mut sessions = Vec::with_capacity(spec.sessions);
    for index in 0..spec.sessions.max(1) {
        let id = Uuid::now_v7();
        engine
            .session(USER_ID, id.into())
            .create(Some(format!("load session {index}")), None)
            .await?;
        sessions.push(id);
    }
    database.checkpoint().await?;
    let flushes_before = engine.stats().flushes;
    let driven = drive(
        Producer::Soloist(Writer::Engine(engine.clone())),
        &sessions,
        spec,
        settings,
        database,
        &[std::process::id()],
    )
    .await;
    let commits = engine.stats().flushes.saturating_sub(flushes_before);
    let checked = match &driven {
        Ok(driven) => {
            check_soloist(
                &Writer::Engine(engine.clone()),
                &sessions,
                &driven.produced.sent,
            )
            .await
        }
        Err(_) => Ok((0, 0)),
    };
    engine.shutdown().await;
    driven?.finish(spec, commits, Some(checked?))
}

/// What a soloist run measured, before the counters only its caller can read.
struct Driven {
    elapsed: Duration,
    produced: Produced,
    viewed: Viewed,
    written: Option<(u64, u64)>,
    other_cpu_share: Option<f64>,
}

impl Driven {
    fn finish(
        self,
        spec: &StreamSpec,
        commits: u64,
        check: Option<(u64, u64)>,
    ) -> Result<StreamResult, LoadError> {
        finish(
            spec,
            self.elapsed,
            self.produced,
            commits,
            self.written,
            self.viewed,
            check,
            self.other_cpu_share,
        )
    }
}

/// Starts soloist's viewers (over SSE, or on the engine's subscriptions) and lets them
/// connect, then runs one producer per session until the run's end, and collects what
/// producers and viewers measured. `pids`: the processes that write the database (for
/// SQLite's byte count and the CPU accounting).
async fn drive(
    producer: Producer,
    sessions: &[Uuid],
    spec: &StreamSpec,
    settings: &Settings,
    database: &Database,
    pids: &[u32],
) -> Result<Driven, LoadError> {
    // Viewers connect first, so that they see every reply from its draft on.
    let sse = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()?;
    let epoch = Instant::now();
    let stop = TokioInstant::now() + settings.duration + VIEWER_GRACE + Duration::from_secs(2);
    let bytes = spec.delta_bytes;
    let mut viewers: Vec<JoinHandle<Result<Viewed, LoadError>>> = Vec::new();
    if let Producer::Soloist(writer) = &producer {
        for &session in sessions {
            for _ in 0..spec.viewers {
                viewers.push(match writer {
                    Writer::Http(cluster) => {
                        let url = format!("{}/events", cluster.session_url(session));
                        tokio::spawn(view_sse(sse.clone(), url, epoch, bytes, stop))
                    }
                    Writer::Engine(engine) => {
                        tokio::spawn(view_engine(engine.clone(), session, epoch, bytes, stop))
                    }
                });
            }
        }
    }
    if !viewers.is_empty() {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let written_before = bytes_written(database, pids).await;
    let duration = settings.duration;
    let progress = Arc::new(Progress::default());
    let cpu_before = CpuSample::take_with(pids);
    let started = Instant::now();
    let deadline = started + duration;
    let producers: Vec<_> = sessions
        .iter()
        .map(|&session| {
            let (spec, progress) = (spec.clone(), progress.clone());
            match &producer {
                Producer::Soloist(writer) => tokio::spawn(produce_soloist(
                    writer.clone(),
                    session,
                    spec,
                    epoch,
                    deadline,
                    progress,
                )),
                Producer::Rewrite(pool) => tokio::spawn(produce_rewrite(
                    pool.clone(),
                    session,
                    spec,
                    epoch,
                    deadline,
                    progress,
                )),
            }
        })
        .collect();
    let bar = run::progress_bar(spec.label(), duration);
    let ticker = tokio::spawn(run::tick(bar.clone(), progress.clone(), started, duration));
    let mut produced = Produced::default();
    for producer in producers {
        produced.merge(producer.await?);
    }
    let elapsed = started.elapsed();
    let other_cpu_share = cpu_before
        .zip(CpuSample::take_with(pids))
        .map(|(before, after)| before.other_share(&after));
    ticker.abort();
    bar.finish_and_clear();
    let written_after = bytes_written(database, pids).await;
    let mut viewed = Viewed::default();
    for viewer in viewers {
        viewed.merge(viewer.await??);
    }
    Ok(Driven {
        elapsed,
        produced,
        viewed,
        written: written_before.zip(written_after),
        other_cpu_share,
    })
}

/// What writes a stream run's replies.
enum Producer {
    /// soloist, through a server or the engine linked in.
    Soloist(Writer),
    /// The usual way: the whole message rewritten per delta, through this pool.
    Rewrite(Pool),
}

/// How a soloist producer reaches the engine: a server over HTTP, or the engine linked in.
#[derive(Clone)]
enum Writer {
    /// `soloist-server`, through the benchmark's HTTP client.
    Http(Arc<Cluster>),
    /// The engine in this process, as a chat server linking the library calls it.
    Engine(Engine),
}

/// A failed request, by kind.
type Failed = String;

impl Writer {
    /// Starts draft `message_id`; requests sent again after a retryable failure are counted in
    /// `retries`.
    async fn start(
        &self,
        session: Uuid,
        message_id: Uuid,
        retries: &mut u64,
    ) -> Result<(), Failed> {
        let mut draft = NewMessage::assistant("").with_id(message_id);
        draft.status = Some(MessageStatus::InProgress);
        match self {
            Writer::Http(cluster) => {
                let body = serde_json::to_vec(&DraftBody { messages: [&draft] })
                    .map_err(|_| "encoding".to_owned())?;
                send(cluster, session, "messages", body, retries)
                    .await
                    .map(|_| ())
            }
            Writer::Engine(engine) => engine
                .session(USER_ID, session.into())
                .start_message(draft)
                .await
                .map(|_| ())
                .map_err(|error| OpError::engine(&error).kind),
        }
    }

    /// Appends `texts` to draft `message_id` from byte `offset` on; answers the length.
    async fn deltas(
        &self,
        session: Uuid,
        message_id: Uuid,
        offset: u64,
        texts: &[String],
        retries: &mut u64,
    ) -> Result<u64, Failed> {
        let mut at = offset;
        let mut deltas = Vec::with_capacity(texts.len());
        for text in texts {
            deltas.push((at, text.as_str()));
            at += text.len() as u64;
        }
        match self {
            Writer::Http(cluster) => {
                let items = deltas
                    .into_iter()
                    .map(|(offset, content)| DeltaItem { offset, content })
                    .collect();
                let body = serde_json::to_vec(&DeltasBody { deltas: items })
                    .map_err(|_| "encoding".to_owned())?;
                let path = format!("messages/{message_id}/deltas");
                let answer = send(cluster, session, &path, body, retries).await?;
                serde_json::from_slice::<DeltasAnswer>(&answer)
                    .map(|answer| answer.length)
                    .map_err(|_| "unreadable_answer".to_owned())
            }
            Writer::Engine(engine) => engine
                .append_deltas(AppendDeltas {
                    user_id: USER_ID.to_owned(),
                    session_id: session.into(),
                    message_id,
                    deltas: deltas
                        .into_iter()
                        .map(|(offset, content)| Delta {
                            offset,
                            content: content.to_owned(),
                        })
                        .collect(),
                })
                .await
                .map(|appended| appended.length)
                .map_err(|error| OpError::engine(&error).kind),
        }
    }

    /// Finishes draft `message_id` as `status`, `deltas` tokens long.
    async fn finish(
        &self,
        session: Uuid,
        message_id: Uuid,
        status: MessageStatus,
        deltas: usize,
        retries: &mut u64,
    ) -> Result<(), Failed> {
        let usage = UsageBody {
            prompt_tokens: 100,
            completion_tokens: u32::try_from(deltas).unwrap_or(u32::MAX),
        };
        match self {
            Writer::Http(cluster) => {
                let body = serde_json::to_vec(&FinishBody { status, usage })
                    .map_err(|_| "encoding".to_owned())?;
                let path = format!("messages/{message_id}/finish");
                send(cluster, session, &path, body, retries)
                    .await
                    .map(|_| ())
            }
            Writer::Engine(engine) => engine
                .session(USER_ID, session.into())
                .finish_message(
                    message_id,
                    status,
                    Some(Usage {
                        prompt_tokens: i64::from(usage.prompt_tokens),
                        completion_tokens: i64::from(usage.completion_tokens),
                    }),
                )
                .await
                .map(|_| ())
                .map_err(|error| OpError::engine(&error).kind),
        }
    }
}

/// One POST through the cluster client, retried as it retries.
async fn send(
    cluster: &Cluster,
    session: Uuid,
    path: &str,
    body: Vec<u8>,
    retries: &mut u64,
) -> Result<Vec<u8>, Failed> {
    let mut attempts = Attempts::default();
    let answer = cluster.send(session, path, body, &mut attempts).await;
    *retries += attempts.retried.len() as u64;
    answer.map_err(|failure| failure.kind)
}

/// One session's producer: replies back to back until the deadline.
async fn produce_soloist(
    writer: Writer,
    session: Uuid,
    spec: StreamSpec,
    epoch: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
) -> Produced {
    let mut produced = Produced::default();
    while Instant::now() < deadline {
        let message_id = Uuid::now_v7();
        if let Err(kind) = writer
            .start(session, message_id, &mut produced.retries)
            .await
        {
            produced.error(kind);
            progress.errors.fetch_add(1, Relaxed);
            continue;
        }
        let schedule = Schedule {
            epoch,
            start: Instant::now(),
            interval: interval(&spec),
            bytes: spec.delta_bytes,
        };
        let mut content = String::new();
        let mut acked = 0usize;
        let mut next = 0usize;
        let mut broken = false;
        while next < spec.deltas_per_reply && Instant::now() < deadline {
            if let Some(due) = schedule.due(next) {
                tokio::time::sleep_until(due.into()).await;
            }
            let now = Instant::now();
            let mut dues = Vec::new();
            while next + dues.len() < spec.deltas_per_reply && dues.len() < MAX_DELTAS_PER_CALL {
                match schedule.due(next + dues.len()) {
                    Some(due) if due <= now => dues.push(due),
                    Some(_) => break,
                    None => {
                        dues.push(now);
                        break;
                    }
                }
            }
            let texts: Vec<String> = dues.iter().map(|&due| schedule.token(due)).collect();
            let offset = content.len() as u64;
            let answer = writer
                .deltas(session, message_id, offset, &texts, &mut produced.retries)
                .await;
            produced.calls += 1;
            let answered = Instant::now();
            // Sent, whatever the answer: an unanswered request may have been applied.
            for text in &texts {
                content.push_str(text);
            }
            let sent = content.len() - acked;
            match answer {
                Ok(length) if length == content.len() as u64 => {
                    acked = content.len();
                    for &due in &dues {
                        produced.ack.push(elapsed_us(due, answered));
                    }
                    produced.deltas += dues.len() as u64;
                    produced.content_bytes += sent as u64;
                    progress.acked.fetch_add(dues.len() as u64, Relaxed);
                    next += dues.len();
                }
                Ok(_) => {
                    produced.error("unexpected_length".into());
                    broken = true;
                }
                Err(kind) => {
                    produced.error(kind);
                    broken = true;
                }
            }
            if broken {
                progress.errors.fetch_add(1, Relaxed);
                break;
            }
        }
        let complete = !broken && next == spec.deltas_per_reply;
        let status = if complete {
            MessageStatus::Completed
        } else {
            MessageStatus::Incomplete
        };
        produced.sent.push((message_id, content, acked));
        match writer
            .finish(session, message_id, status, next, &mut produced.retries)
            .await
        {
            Ok(()) if complete => produced.replies += 1,
            Ok(()) => {}
            Err(kind) => produced.error(kind),
        }
    }
    produced
}

/// What one viewer saw.
#[derive(Default)]
struct Viewed {
    /// µs from due to arrival, per token.
    lag: Vec<u32>,
    gaps: u64,
    repeats: u64,
    /// Per message streaming: the bytes of its content the viewer has (not merged).
    have: BTreeMap<i64, u64>,
}

impl Viewed {
    fn merge(&mut self, other: Viewed) {
        self.lag.extend(other.lag);
        self.gaps += other.gaps;
        self.repeats += other.repeats;
    }

    /// A draft appeared with `length` bytes of content.
    fn created(&mut self, seq: i64, length: u64) {
        self.have.insert(seq, length);
    }

    /// A draft grew by `content` at `offset`, which arrived at `arrived`.
    fn delta(&mut self, seq: i64, offset: u64, content: &str, arrived: u32, bytes: usize) {
        let had = self.have.entry(seq).or_insert(0);
        if offset > *had {
            self.gaps += 1;
        } else if offset < *had {
            self.repeats += 1;
        }
        *had = offset + content.len() as u64;
        for due in stamps(content, offset, bytes) {
            let due = u32::try_from(due).unwrap_or(u32::MAX);
            self.lag.push(arrived.saturating_sub(due));
        }
    }

    /// A message ended (or came whole).
    fn ended(&mut self, seq: i64) {
        self.have.remove(&seq);
    }
}

#[derive(Deserialize)]
struct DeltaEvent {
    seq: i64,
    offset: u64,
    content: String,
}

#[derive(Deserialize)]
struct MessageEvent {
    seq: i64,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// Follows `url` (a session's SSE events) until `stop`, timing every token that arrives.
async fn view_sse(
    client: reqwest::Client,
    url: String,
    epoch: Instant,
    bytes: usize,
    stop: TokioInstant,
) -> Result<Viewed, LoadError> {
    let mut viewed = Viewed::default();
    let mut response = client
        .get(&url)
        .header("x-user-id", USER_ID)
        .send()
        .await?
        .error_for_status()?;
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk?,
            () = tokio::time::sleep_until(stop) => break,
        };
        let Some(chunk) = chunk else { break };
        let arrived = elapsed_us(epoch, Instant::now());
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|pair| pair == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut name = "";
            let mut data = String::new();
            for line in text.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim_start();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            match name {
                "message.delta" => {
                    let delta: DeltaEvent = serde_json::from_str(&data)?;
                    viewed.delta(delta.seq, delta.offset, &delta.content, arrived, bytes);
                }
                "message.created" => {
                    let message: MessageEvent = serde_json::from_str(&data)?;
                    let length = match &message.content {
                        Some(serde_json::Value::String(text)) => text.len() as u64,
                        _ => 0,
                    };
                    viewed.created(message.seq, length);
                }
                "message.finished" | "message" => {
                    let message: MessageEvent = serde_json::from_str(&data)?;
                    viewed.ended(message.seq);
                }
                _ => {}
            }
        }
    }
    Ok(viewed)
}

/// Follows `session` through the engine's subscription until `stop`, timing every token.
async fn view_engine(
    engine: Engine,
    session: Uuid,
    epoch: Instant,
    bytes: usize,
    stop: TokioInstant,
) -> Result<Viewed, LoadError> {
    let mut viewed = Viewed::default();
    let mut stream = engine
        .session(USER_ID, session.into())
        .subscribe_from(Position::after(-1))
        .await?;
    loop {
        let event = tokio::select! {
            event = stream.next_event() => event?,
            () = tokio::time::sleep_until(stop) => break,
        };
        let arrived = elapsed_us(epoch, Instant::now());
        match event {
            StreamEvent::Delta {
                seq,
                offset,
                content,
            } => viewed.delta(seq, offset, &content, arrived, bytes),
            StreamEvent::Created(message) => {
                viewed.created(message.seq, message.text().map_or(0, str::len) as u64);
            }
            StreamEvent::Finished(message) | StreamEvent::Message(message) => {
                viewed.ended(message.seq);
            }
        }
    }
    Ok(viewed)
}

#[derive(Deserialize)]
struct Page {
    messages: Vec<PageMessage>,
    #[serde(default)]
    next_after_seq: Option<i64>,
}

#[derive(Deserialize)]
struct PageMessage {
    id: Uuid,
    #[serde(default)]
    content: Option<serde_json::Value>,
}

/// One page of `session`'s messages after `after` as (id, text content): over HTTP, or from
/// the engine.
async fn page_of(
    writer: &Writer,
    session: Uuid,
    after: Option<i64>,
) -> Result<(Vec<(Uuid, String)>, Option<i64>), LoadError> {
    match writer {
        Writer::Http(cluster) => {
            let mut url = format!("{}?limit={CHECK_PAGE}", cluster.session_url(session));
            if let Some(after) = after {
                url.push_str(&format!("&after_seq={after}"));
            }
            let page: Page = cluster
                .client()
                .get(&url)
                .header("x-user-id", USER_ID)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let messages = page
                .messages
                .into_iter()
                .map(|message| {
                    let text = match message.content {
                        Some(serde_json::Value::String(text)) => text,
                        _ => String::new(),
                    };
                    (message.id, text)
                })
                .collect();
            Ok((messages, page.next_after_seq))
        }
        Writer::Engine(engine) => {
            let page = engine
                .session(USER_ID, session.into())
                .get(after, Some(CHECK_PAGE))
                .await?;
            let messages = page
                .messages
                .iter()
                .map(|message| (message.id, message.text().unwrap_or_default().to_owned()))
                .collect();
            Ok((messages, page.next_after_seq))
        }
    }
}

/// Reads every session back and compares each message with what was sent and acknowledged:
/// answers (messages checked, messages that lost an acknowledged byte or hold one never sent,
/// or were acknowledged and are missing).
async fn check_soloist(
    writer: &Writer,
    sessions: &[Uuid],
    sent: &[(Uuid, String, usize)],
) -> Result<(u64, u64), LoadError> {
    let expected: BTreeMap<Uuid, (&str, usize)> = sent
        .iter()
        .map(|(id, content, acked)| (*id, (content.as_str(), *acked)))
        .collect();
    let mut checked = 0u64;
    let mut failures = 0u64;
    let mut found = 0usize;
    for &session in sessions {
        let mut after: Option<i64> = None;
        loop {
            let (messages, next) = page_of(writer, session, after).await?;
            for (id, stored) in &messages {
                checked += 1;
                match expected.get(id) {
                    Some((content, acked)) => {
                        found += 1;
                        if !content.starts_with(stored.as_str()) || stored.len() < *acked {
                            failures += 1;
                        }
                    }
                    None => failures += 1,
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    failures += expected.len().saturating_sub(found) as u64;
    Ok((checked, failures))
}

// ---------------------------------------------------------------------------------------------
// The usual way

async fn measure_rewrite(
    spec: &StreamSpec,
    settings: &Settings,
    database: &Database,
) -> Result<StreamResult, LoadError> {
    let sessions = database
        .create_sessions(spec.sessions.max(1), settings)
        .await?;
    let size = match spec.db {
        DbKind::Postgres => settings.postgres_pool,
        DbKind::Sqlite => settings.sqlite_pool,
    };
    let pool = database.pool(size).await?;
    database.checkpoint().await?;
    let driven = drive(
        Producer::Rewrite(pool.clone()),
        &sessions,
        spec,
        settings,
        database,
        &[std::process::id()],
    )
    .await;
    pool.close().await;
    let driven = driven?;
    let commits = driven.produced.commits;
    driven.finish(spec, commits, None)
}

/// One session's producer the usual way: insert the message, then rewrite it whole for every
/// token, then mark it completed and add the usage.
async fn produce_rewrite(
    pool: Pool,
    session: Uuid,
    spec: StreamSpec,
    epoch: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
) -> Produced {
    let mut produced = Produced::default();
    let mut seq = 0i64;
    while Instant::now() < deadline {
        let message_id = Uuid::now_v7();
        let now = now_micros();
        let inserted = crate::on_pool!(&pool, p => async {
            let mut tx = p.begin().await?;
            sqlx::query(
                "INSERT INTO messages (session_id, seq, message_id, role, content, status, \
                 created_at) VALUES ($1, $2, $3, 'assistant', $4, 'in_progress', $5)",
            )
            .bind(session)
            .bind(seq)
            .bind(message_id)
            .bind(&b""[..])
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE sessions SET message_count = message_count + 1, \
                 version = version + 1, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(session)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
        .await);
        if let Err(error) = inserted {
            produced.error(sql_kind(&error));
            progress.errors.fetch_add(1, Relaxed);
            return produced;
        }
        produced.commits += 1;
        let schedule = Schedule {
            epoch,
            start: Instant::now(),
            interval: interval(&spec),
            bytes: spec.delta_bytes,
        };
        let mut content = String::new();
        let mut next = 0usize;
        while next < spec.deltas_per_reply && Instant::now() < deadline {
            let due = match schedule.due(next) {
                Some(due) => {
                    tokio::time::sleep_until(due.into()).await;
                    due
                }
                None => Instant::now(),
            };
            content.push_str(&schedule.token(due));
            let updated = crate::on_pool!(&pool, p => sqlx::query(
                "UPDATE messages SET content = $1 WHERE session_id = $2 AND seq = $3",
            )
            .bind(content.as_bytes())
            .bind(session)
            .bind(seq)
            .execute(p)
            .await
            .map(|_| ()));
            if let Err(error) = updated {
                produced.error(sql_kind(&error));
                progress.errors.fetch_add(1, Relaxed);
                return produced;
            }
            produced.ack.push(elapsed_us(due, Instant::now()));
            produced.deltas += 1;
            produced.calls += 1;
            produced.commits += 1;
            produced.content_bytes += spec.delta_bytes as u64;
            progress.acked.fetch_add(1, Relaxed);
            next += 1;
        }
        let complete = next == spec.deltas_per_reply;
        let now = now_micros();
        let finished = crate::on_pool!(&pool, p => async {
            let mut tx = p.begin().await?;
            sqlx::query("UPDATE messages SET status = $1 WHERE session_id = $2 AND seq = $3")
                .bind(if complete { "completed" } else { "incomplete" })
                .bind(session)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE sessions SET prompt_tokens = prompt_tokens + 100, \
                 completion_tokens = completion_tokens + $1, version = version + 1, \
                 updated_at = $2 WHERE id = $3",
            )
            .bind(i64::try_from(next).unwrap_or(i64::MAX))
            .bind(now)
            .bind(session)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
        .await);
        if let Err(error) = finished {
            produced.error(sql_kind(&error));
            return produced;
        }
        produced.commits += 1;
        if complete {
            produced.replies += 1;
        }
        seq += 1;
    }
    produced
}

fn sql_kind(error: &sqlx::Error) -> String {
    match error.as_database_error().and_then(|error| error.code()) {
        Some(code) => format!("sql {code}"),
        None => "sql".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared

/// Bytes the database has written so far: PostgreSQL's WAL position, or `write_bytes` summed
/// over `pids` for SQLite. `None` when the counter cannot be read.
async fn bytes_written(database: &Database, pids: &[u32]) -> Option<u64> {
    match database.kind {
        DbKind::Postgres => {
            let pool = database.pool(1).await.ok()?;
            let position = crate::on_pool!(&pool, p => sqlx::query_scalar::<_, i64>(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            )
            .fetch_one(p)
            .await)
            .ok();
            pool.close().await;
            position.and_then(|position| u64::try_from(position).ok())
        }
        DbKind::Sqlite => pids.iter().map(|&pid| process_write_bytes(pid)).sum(),
    }
}

fn process_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|value| value.trim().parse().ok())
}

#[allow(clippy::too_many_arguments)]
fn finish(
    spec: &StreamSpec,
    elapsed: Duration,
    produced: Produced,
    commits: u64,
    written: Option<(u64, u64)>,
    viewed: Viewed,
    check: Option<(u64, u64)>,
    other_cpu_share: Option<f64>,
) -> Result<StreamResult, LoadError> {
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let reply_bytes = (spec.deltas_per_reply * spec.delta_bytes) as u64;
    let bytes_written = written.map(|(before, after)| after.saturating_sub(before));
    let mut ack = run::histogram()?;
    for &micros in &produced.ack {
        ack.saturating_record(u64::from(micros));
    }
    let mut lag = run::histogram()?;
    for &micros in &viewed.lag {
        lag.saturating_record(u64::from(micros));
    }
    Ok(StreamResult {
        spec: spec.clone(),
        elapsed_s: seconds,
        deltas: produced.deltas,
        deltas_per_s: produced.deltas as f64 / seconds,
        delta_calls: produced.calls,
        replies: produced.replies,
        commits,
        commits_per_s: commits as f64 / seconds,
        bytes_written,
        content_bytes: produced.content_bytes,
        bytes_per_reply: bytes_written
            .filter(|_| produced.content_bytes > 0)
            .map(|bytes| bytes as f64 * reply_bytes as f64 / produced.content_bytes as f64),
        reply_bytes,
        ack_us: Latency::of(&ack),
        viewer_lag_us: Latency::of(&lag),
        viewer_tokens: viewed.lag.len() as u64,
        viewer_gaps: viewed.gaps,
        viewer_repeats: viewed.repeats,
        errors: produced.errors,
        retries: produced.retries,
        checked_messages: check.map(|(checked, _)| checked),
        check_failures: check.map(|(_, failures)| failures),
        other_cpu_share,
        failed: None,
    })
}

/// What `--workload stream` was asked to run.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    /// Sessions, each with one producer.
    pub sessions: usize,
    /// Deltas due per second per session in the paced runs.
    pub rate: f64,
    /// Deltas per reply.
    pub deltas_per_reply: usize,
    /// Bytes per delta.
    pub delta_bytes: usize,
    /// SSE viewers per session.
    pub viewers: usize,
    /// The ways to run.
    pub ways: Vec<StreamWay>,
}

impl StreamPlan {
    /// The next run on `db`, after the runs `done`. In order: the usual way as fast as it goes
    /// (its sustainable rate), the usual way and soloist at `rate` per session, then soloist
    /// offered 20 times the usual way's sustainable rate (which the first run measures, so
    /// the runs are planned one by one); only the `ways` chosen.
    pub fn next(&self, db: DbKind, done: &[StreamResult]) -> Option<StreamSpec> {
        let StreamPlan {
            sessions,
            rate,
            deltas_per_reply,
            delta_bytes,
            viewers,
            ref ways,
        } = *self;
        let base = StreamSpec {
            db,
            way: StreamWay::Rewrite,
            sessions,
            rate: None,
            deltas_per_reply,
            delta_bytes: delta_bytes.max(STAMP_DIGITS + 1),
            viewers: 0,
            purpose: String::new(),
        };
        let ours: Vec<&StreamResult> = done.iter().filter(|run| run.spec.db == db).collect();
        let sustainable = ours
            .iter()
            .find(|run| run.spec.way == StreamWay::Rewrite && run.spec.rate.is_none())
            .filter(|run| run.failed.is_none() && run.deltas_per_s > 0.0)
            .map(|run| run.deltas_per_s);
        let rewrite = ways.contains(&StreamWay::Rewrite);
        let soloist_ways = [StreamWay::Soloist, StreamWay::Library]
            .into_iter()
            .filter(|way| ways.contains(way));
        let paced = soloist_ways.clone().map(|way| StreamSpec {
            way,
            rate: Some(rate),
            viewers,
            purpose: format!("at {rate:.0} deltas/s per session"),
            ..base.clone()
        });
        let twenty_fold = soloist_ways.filter_map(|way| {
            sustainable.map(|sustainable| StreamSpec {
                way,
                rate: Some(20.0 * sustainable / sessions.max(1) as f64),
                viewers,
                purpose: format!(
                    "offered 20x the usual way's sustainable rate ({} deltas/s)",
                    crate::report::thousands(20.0 * sustainable)
                ),
                ..base.clone()
            })
        });
        let plan = [
            rewrite.then(|| StreamSpec {
                purpose: "its sustainable rate: each token due once the previous one is written"
                    .into(),
                ..base.clone()
            }),
            rewrite.then(|| StreamSpec {
                rate: Some(rate),
                purpose: format!("at {rate:.0} deltas/s per session"),
                ..base.clone()
            }),
        ]
        .into_iter()
        .flatten()
        .chain(paced)
        .chain(twenty_fold);
        // The plan's runs in order, less those chosen away; the next is the first not yet done.
        plan.into_iter().nth(ours.len())
    }
}

/// The stream runs as a Markdown section.
pub fn markdown(runs: &[StreamResult]) -> String {
    use crate::report::thousands;
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "## Streaming replies (`--workload stream`)\n");
    let _ = writeln!(
        out,
        "| database | way | run | offered deltas/s | achieved deltas/s | requests/s | commits/s | \
         replies | bytes written / reply | ack p50 | ack p99 | viewer lag p50 | viewer lag p99 | \
         viewer tokens | gaps / repeats | errors | check |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
    );
    let ms = |micros: u64| format!("{:.1} ms", micros as f64 / 1000.0);
    for run in runs {
        let line = format!(
            "| {} | {} | {} |",
            run.spec.db.title(),
            run.spec.way.label(),
            run.spec.purpose
        );
        if let Some(reason) = &run.failed {
            let reason = reason.replace('|', "/").replace('\n', " ");
            let _ = writeln!(out, "{line} failed: {reason} |");
            continue;
        }
        let ack = run.ack_us.clone().unwrap_or_default();
        let lag = run.viewer_lag_us.clone();
        let errors: u64 = run.errors.values().sum();
        let _ = writeln!(
            out,
            "{line} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.spec
                .offered_per_s()
                .map_or_else(|| "max".to_owned(), thousands),
            thousands(run.deltas_per_s),
            thousands(run.delta_calls as f64 / run.elapsed_s),
            thousands(run.commits_per_s),
            thousands(run.replies as f64),
            run.bytes_per_reply.map_or_else(
                || "-".to_owned(),
                |bytes| format!(
                    "{} ({:.1}x its {} B)",
                    thousands(bytes),
                    bytes / run.reply_bytes.max(1) as f64,
                    thousands(run.reply_bytes as f64)
                )
            ),
            ms(ack.p50),
            ms(ack.p99),
            lag.as_ref()
                .map_or_else(|| "-".to_owned(), |lag| ms(lag.p50)),
            lag.as_ref()
                .map_or_else(|| "-".to_owned(), |lag| ms(lag.p99)),
            thousands(run.viewer_tokens as f64),
            if run.spec.viewers == 0 {
                "-".to_owned()
            } else {
                format!("{} / {}", run.viewer_gaps, run.viewer_repeats)
            },
            if errors == 0 {
                "0".to_owned()
            } else {
                format!("{errors} {:?}", run.errors)
            },
            match (run.checked_messages, run.check_failures) {
                (Some(checked), Some(0)) => format!("{checked} messages clean"),
                (Some(checked), Some(failures)) => {
                    format!("**{failures} of {checked} messages wrong**")
                }
                _ => "-".to_owned(),
            },
        );
    }
    let _ = writeln!(out);
    for db in [DbKind::Postgres, DbKind::Sqlite] {
        let ours: Vec<&StreamResult> = runs.iter().filter(|run| run.spec.db == db).collect();
        let sustainable = ours
            .iter()
            .find(|run| run.spec.way == StreamWay::Rewrite && run.spec.rate.is_none());
        for way in [StreamWay::Soloist, StreamWay::Library] {
            let best = ours
                .iter()
                .filter(|run| run.spec.way == way && run.failed.is_none())
                .max_by(|a, b| a.deltas_per_s.total_cmp(&b.deltas_per_s));
            let (Some(sustainable), Some(best)) = (sustainable, best) else {
                continue;
            };
            let offered = best.spec.offered_per_s().unwrap_or(f64::MAX);
            let _ = writeln!(
                out,
                "- {}, {}: {} deltas/s ({:.0}% of the {} offered), {:.1}x the usual way's \
                 sustainable {} deltas/s.",
                db.title(),
                way.label(),
                thousands(best.deltas_per_s),
                best.deltas_per_s / offered * 100.0,
                thousands(offered),
                best.deltas_per_s / sustainable.deltas_per_s.max(f64::EPSILON),
                thousands(sustainable.deltas_per_s),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nThe server way runs one `soloist-server` over HTTP, its viewers follow over SSE; the \
         library way runs the engine in this process, its viewers on the engine's \
         subscriptions; the usual way writes from this process with a pool of the engine's \
         size and has no viewers. Ack and lag run from each token's due time. Bytes written: \
         PostgreSQL's WAL, SQLite's `write_bytes` of the writing process, scaled to one \
         reply.\n"
    );
    out
}

/// Where the server binary is and where its logs go, checked.
pub fn options(server_bin: Option<&Path>, out: &Path) -> Result<StreamOptions, LoadError> {
    Ok(StreamOptions {
        server_binary: servers::server_binary(server_bin)?,
        log_root: out.join("servers"),
    })
}

#[cfg(test)]
mod tests {
    use super::{stamps, token};

    #[test]
    fn tokens_carry_their_due_time() {
        let first = token(42, 16);
        let second = token(1_234_567, 16);
        assert_eq!(first.len(), 16);
        let content = format!("{first}{second}");
        assert_eq!(
            stamps(&content, 0, 16).collect::<Vec<_>>(),
            vec![42, 1_234_567]
        );
        // A chunk starting mid-message, at a token boundary.
        assert_eq!(stamps(&second, 16, 16).collect::<Vec<_>>(), vec![1_234_567]);
        // A chunk starting inside a token skips to the next boundary.
        assert_eq!(
            stamps(&content[4..], 4, 16).collect::<Vec<_>>(),
            vec![1_234_567]
        );
    }
}
