//! `soloist-server`: the chat server binary. See the crate docs of `soloist_server` for the API.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use soloist::{Engine, EngineConfig, Limits, SqliteSync};
use soloist_server::cluster::{Inbound, Peers};
use soloist_server::{
    AppState, BodyLimits, ServeConfig, UserLimits, app, default_max_connections, serve,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// A chat server on the soloist engine. Every flag can also be set by the environment variable
/// named beside it; a flag given on the command line wins.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    sessions: SessionArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    traces: TraceArgs,
}

/// The engine's defaults, which the flags below show and keep.
fn defaults() -> EngineConfig {
    EngineConfig::new("")
}

/// `duration` in whole milliseconds, for a flag's default.
fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Where the server listens and runs.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Server")]
struct ServerArgs {
    /// Database: an SQLite file (created if missing), `sqlite::memory:`, or a PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://soloist.db")]
    database_url: String,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "SOLOIST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Threads that run requests and the engine. Default: the cores this process may use
    /// (its CPU limit, where a container sets one). Lower it when several processes share a
    /// machine's cores, to each process's share: threads beyond the cores only add switches
    /// between them.
    #[arg(long, env = "SOLOIST_WORKER_THREADS", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
    /// At shutdown, how long in-flight requests may take before their connections are cut.
    #[arg(
        long,
        env = "SOLOIST_SHUTDOWN_TIMEOUT_MS",
        default_value = "30000",
        value_name = "MS"
    )]
    shutdown_timeout_ms: u64,
}

/// What one connection and one request may take.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "HTTP")]
struct HttpArgs {
    /// How long a request waits for room in a full session mailbox before a 429.
    #[arg(
        long,
        env = "SOLOIST_SEND_TIMEOUT_MS",
        default_value = "5000",
        value_name = "MS"
    )]
    send_timeout_ms: u64,
    /// The longest a request may wait for its command's answer (e.g. while the database is
    /// unreachable) before a 503 with code `timeout`; retry with the same message ids.
    #[arg(long, env = "SOLOIST_COMMAND_TIMEOUT_MS", default_value_t = defaults().command_timeout.map_or(0, ms), value_name = "MS")]
    command_timeout_ms: u64,
    /// Largest body of an append (`POST /v1/sessions/{id}/messages`); larger ones get 413
    /// before they are read. Other routes' limits follow from what their bodies may hold.
    #[arg(
        long,
        env = "SOLOIST_MAX_APPEND_BODY_BYTES",
        default_value = "8388608",
        value_name = "BYTES"
    )]
    max_append_body_bytes: usize,
    /// Largest body of an import (`POST /v1/sessions/import`, a session's NDJSON export);
    /// larger ones get 413 before they are read. The parsed messages take about as much again
    /// while the import runs.
    #[arg(
        long,
        env = "SOLOIST_MAX_IMPORT_BODY_BYTES",
        default_value = "67108864",
        value_name = "BYTES"
    )]
    max_import_body_bytes: usize,
    /// Request body bytes all requests in flight may hold at once, counted as they arrive; a
    /// request whose next bytes find no room gets 503 `busy` at once.
    #[arg(
        long,
        env = "SOLOIST_BODY_MEMORY_BYTES",
        default_value = "134217728",
        value_name = "BYTES"
    )]
    body_memory_bytes: usize,
    /// Bytes of large answers (64 KiB or more: pages of long messages, lists of sessions with
    /// large metadata) all requests in flight may hold until they are sent; an answer that
    /// finds no room gets 503 `busy` at once. At least eight of the largest pages.
    #[arg(
        long,
        env = "SOLOIST_ANSWER_MEMORY_BYTES",
        default_value = "134217728",
        value_name = "BYTES"
    )]
    answer_memory_bytes: usize,
    /// Grace period of a request body: it must arrive within this long plus its size at the
    /// minimum rate, or the request gets 408.
    #[arg(
        long,
        env = "SOLOIST_BODY_TIMEOUT_MS",
        default_value = "10000",
        value_name = "MS"
    )]
    body_timeout_ms: u64,
    /// The slowest rate a request body may arrive at, after the grace period.
    #[arg(
        long,
        env = "SOLOIST_MIN_BODY_RATE",
        default_value = "65536",
        value_name = "BYTES_PER_SECOND"
    )]
    min_body_rate: u64,
    /// The longest a client may take to send a request's headers: from accept for the first
    /// request, from its first bytes for the next ones on a kept-alive connection.
    #[arg(long, env = "SOLOIST_HEADER_READ_TIMEOUT_MS", default_value = "10000", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// How long an answered connection may wait for its next request before it is closed. Keep
    /// it above the idle timeout of a load balancer or proxy in front (often 60 s), so that the
    /// proxy never sends a request on a connection this server is closing.
    #[arg(long, env = "SOLOIST_KEEP_ALIVE_TIMEOUT_MS", default_value = "75000", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    keep_alive_timeout_ms: u64,
    /// The longest an answer may wait for a client that reads none of it (the connection's
    /// buffers full): past it the connection is closed, giving back what the answer held (a
    /// stalled event stream's viewer resumes from its last event id).
    #[arg(long, env = "SOLOIST_STALLED_READER_TIMEOUT_MS", default_value = "30000", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    stalled_reader_timeout_ms: u64,
    /// Connections open at once; past it the longest-idle connection is closed, or, when every
    /// connection has a request in flight, the new one gets a 503 `too_many_connections`.
    /// Default: the open-file limit less 128 (at least half of it).
    #[arg(long, env = "SOLOIST_MAX_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Answer 403 to a user who asks for someone else's session, instead of the default 404
    /// that makes a foreign session indistinguishable from a missing one.
    #[arg(long, env = "SOLOIST_REVEAL_FOREIGN_SESSIONS")]
    reveal_foreign_sessions: bool,
    /// Requests a second each user (`x-user-id`) may make, sustained; past it a request gets
    /// 429 `rate_limited` with `Retry-After` before its body is read. 0: no limit.
    #[arg(
        long,
        env = "SOLOIST_RATE_LIMIT_PER_SECOND",
        default_value_t = 0,
        value_name = "N"
    )]
    rate_limit_per_second: u32,
    /// Requests a user may make at once, the rate's bucket. Default: one second's worth.
    #[arg(long, env = "SOLOIST_RATE_LIMIT_BURST", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit_burst: Option<u32>,
}

impl HttpArgs {
    /// The per-user limits the flags ask for, if any.
    fn user_limits(&self) -> Option<UserLimits> {
        let rate = NonZeroU32::new(self.rate_limit_per_second)?;
        let burst = self
            .rate_limit_burst
            .and_then(NonZeroU32::new)
            .unwrap_or(rate);
        Some(UserLimits::new(rate, burst))
    }
}

/// Sessions in memory.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Sessions")]
struct SessionArgs {
    /// Commands a session's mailbox holds before requests wait (then get 429).
    #[arg(long, env = "SOLOIST_MAILBOX_CAPACITY", default_value_t = defaults().mailbox_capacity, value_name = "N")]
    mailbox_capacity: usize,
    /// Seconds an idle session stays in memory.
    #[arg(long, env = "SOLOIST_IDLE_TIMEOUT", default_value_t = defaults().idle_timeout.as_secs(), value_name = "SECONDS")]
    idle_timeout: u64,
    /// Sessions live in memory at most; past it the least recently used idle ones are let go
    /// (0: no cap).
    #[arg(long, env = "SOLOIST_MAX_LIVE_SESSIONS", default_value_t = defaults().max_live_sessions.unwrap_or(0), value_name = "N")]
    max_live_sessions: usize,
    /// Newest messages kept in memory per live session; older pages are read from the
    /// database. A draft in progress stays in memory however old.
    #[arg(long, env = "SOLOIST_CACHED_MESSAGES", default_value_t = defaults().cached_messages, value_name = "N")]
    cached_messages: usize,
    /// A streamed reply (draft) that gets no delta for this long is finished `incomplete`.
    #[arg(
        long,
        env = "SOLOIST_DRAFT_TIMEOUT_MS",
        default_value_t = ms(defaults().draft_timeout),
        value_name = "MS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    draft_timeout_ms: u64,
    /// How long an `Idempotency-Key` is remembered: a retry with it within this time replays
    /// the first answer.
    #[arg(
        long,
        env = "SOLOIST_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = defaults().idempotency_retention.as_secs(),
        value_name = "SECONDS"
    )]
    idempotency_retention_secs: u64,
    /// Seconds a session created without `ttl_seconds` lives after its last write before the
    /// purge erases it; 0: such sessions never expire.
    #[arg(
        long,
        env = "SOLOIST_SESSION_TTL",
        default_value_t = 0,
        value_name = "SECONDS"
    )]
    session_ttl: u64,
    /// How often the purge erases expired sessions; 0 turns it off.
    #[arg(
        long,
        env = "SOLOIST_PURGE_INTERVAL_MS",
        default_value_t = defaults().purge_interval.map_or(0, ms),
        value_name = "MS"
    )]
    purge_interval_ms: u64,
    /// Expired sessions the purge reads at a time (it erases them one by one).
    #[arg(
        long,
        env = "SOLOIST_PURGE_BATCH",
        default_value_t = defaults().purge_batch as u64,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    purge_batch: u64,
    /// Sessions (not deleted) a user may have; a create or import of another is answered
    /// 403 `quota_exceeded`. Each new session counts the user's, up to this many. 0: no bound.
    #[arg(
        long,
        env = "SOLOIST_MAX_SESSIONS_PER_USER",
        default_value_t = 10_000,
        value_name = "N"
    )]
    max_sessions_per_user: u64,
}

/// The database and the writes.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Database")]
struct DatabaseArgs {
    /// PostgreSQL: write transactions in flight at once.
    #[arg(long, env = "SOLOIST_WRITER_CONNECTIONS", default_value_t = defaults().writer_connections, value_name = "N")]
    writer_connections: u32,
    /// Connections for reads.
    #[arg(long, env = "SOLOIST_READ_CONNECTIONS", default_value_t = defaults().read_pool_size, value_name = "N")]
    read_connections: u32,
    /// The longest a statement waits for a lock, and a transaction may sit idle
    /// (PostgreSQL), so a paused process cannot hold the others' writes up for longer.
    #[arg(long, env = "SOLOIST_DATABASE_TIMEOUT_MS", default_value_t = ms(defaults().database_timeout), value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    database_timeout_ms: u64,
    /// Sessions combined into one write transaction at most.
    #[arg(long, env = "SOLOIST_MAX_SESSIONS_PER_FLUSH", default_value_t = defaults().max_sessions_per_flush, value_name = "N")]
    max_sessions_per_flush: usize,
    /// Message rows written in one transaction at most (a larger batch is split).
    #[arg(long, env = "SOLOIST_MAX_ROWS_PER_FLUSH", default_value_t = defaults().max_rows_per_flush, value_name = "N")]
    max_rows_per_flush: usize,
    /// Payload bytes written in one transaction at most.
    #[arg(long, env = "SOLOIST_MAX_BYTES_PER_FLUSH", default_value_t = defaults().max_bytes_per_flush, value_name = "BYTES")]
    max_bytes_per_flush: usize,
    /// Attempts to resolve a conflict with another process before a 409 `conflict`.
    #[arg(long, env = "SOLOIST_MAX_CONFLICT_RETRIES", default_value_t = defaults().max_conflict_retries, value_name = "N")]
    max_conflict_retries: u32,
    /// SQLite only: trade the last commits on power loss for speed (`synchronous=NORMAL`).
    #[arg(long, env = "SOLOIST_SQLITE_NORMAL_SYNC")]
    sqlite_normal_sync: bool,
    /// SQLite only: how long a connection waits for a lock another process holds.
    #[arg(long, env = "SOLOIST_SQLITE_BUSY_TIMEOUT_MS", default_value_t = ms(defaults().busy_timeout), value_name = "MS")]
    sqlite_busy_timeout_ms: u64,
    /// SQLite only: the most 4 KiB pages the database file may grow to; writes past it fail
    /// and change nothing. Default: no cap beyond SQLite's own.
    #[arg(long, env = "SOLOIST_SQLITE_MAX_PAGES", value_name = "PAGES")]
    sqlite_max_pages: Option<u32>,
}

/// Several server processes on one PostgreSQL database.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Cluster")]
struct ClusterArgs {
    /// The URL other server processes on the same database reach this one at; this process
    /// registers itself under it (default: `http://` and the listen address; set it where that
    /// address is not reachable from the peers, e.g. in containers).
    #[arg(long, env = "SOLOIST_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
    /// The secret the server processes on one database authenticate the commands they forward
    /// to each other with. Default: the one stored in the database, generated by the first
    /// process, so that processes on one database share it with no setting. Set it to rotate
    /// it, or to keep it out of the database.
    #[arg(
        long,
        env = "SOLOIST_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// How long a process's claim on a session it wrote lasts; a write by another process
    /// within it counts as a takeover.
    #[arg(long, env = "SOLOIST_OWNERSHIP_LEASE_MS", default_value_t = ms(defaults().ownership_lease), value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    ownership_lease_ms: u64,
    /// How long a member stays listed without renewing its heartbeat (it renews three times
    /// per lease).
    #[arg(long, env = "SOLOIST_MEMBER_LEASE_MS", default_value_t = ms(defaults().member_lease), value_name = "MS",
          value_parser = clap::value_parser!(u64).range(3..))]
    member_lease_ms: u64,
    /// PostgreSQL: follow other processes' writes (LISTEN/NOTIFY), so that live sessions
    /// catch up at once (`false`: a stale copy is caught on its next write).
    #[arg(long, env = "SOLOIST_LISTEN_FOR_CHANGES", default_value_t = defaults().listen_for_changes,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    listen_for_changes: bool,
}

/// What one command may carry; larger input gets 413 and changes nothing.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Input limits")]
struct LimitArgs {
    /// Bytes of a message's `content` (and `refusal`).
    #[arg(long, env = "SOLOIST_MAX_CONTENT_BYTES", default_value_t = defaults().limits.max_content_bytes, value_name = "BYTES")]
    max_content_bytes: usize,
    /// Messages per append.
    #[arg(long, env = "SOLOIST_MAX_MESSAGES_PER_APPEND", default_value_t = defaults().limits.max_messages_per_append, value_name = "N")]
    max_messages_per_append: usize,
    /// Serialized bytes of a JSON field (`tool_calls`, `metadata`, ...).
    #[arg(long, env = "SOLOIST_MAX_JSON_BYTES", default_value_t = defaults().limits.max_json_bytes, value_name = "BYTES")]
    max_json_bytes: usize,
    /// Nesting of arrays and objects in a JSON field.
    #[arg(long, env = "SOLOIST_MAX_JSON_DEPTH", default_value_t = defaults().limits.max_json_depth, value_name = "N")]
    max_json_depth: usize,
    /// Bytes of a title, a name, a tool call id or a user id.
    #[arg(long, env = "SOLOIST_MAX_TEXT_BYTES", default_value_t = defaults().limits.max_text_bytes, value_name = "BYTES")]
    max_text_bytes: usize,
    /// Messages a read returns at most.
    #[arg(long, env = "SOLOIST_MAX_PAGE_SIZE", default_value_t = defaults().limits.max_page_size, value_name = "N")]
    max_page_size: usize,
    /// Payload bytes of the messages a read returns at most (a page ends early, with its
    /// cursor).
    #[arg(long, env = "SOLOIST_MAX_PAGE_BYTES", default_value_t = defaults().limits.max_page_bytes, value_name = "BYTES")]
    max_page_bytes: usize,
    /// Messages an import may carry (all written in one transaction).
    #[arg(long, env = "SOLOIST_MAX_IMPORT_MESSAGES", default_value_t = defaults().limits.max_import_messages, value_name = "N")]
    max_import_messages: usize,
}

/// Span export (OpenTelemetry).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Traces")]
struct TraceArgs {
    /// Export the server's and the engine's spans over OTLP/HTTP (protobuf) to the collector at
    /// this URL, e.g. `http://127.0.0.1:4318` (`/v1/traces` is added unless it ends with it); a
    /// request's `traceparent` header then becomes its span's parent. Default: no export.
    #[arg(long, env = "SOLOIST_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans.
    #[arg(
        long,
        env = "SOLOIST_OTLP_SERVICE_NAME",
        default_value = "soloist-server",
        value_name = "NAME"
    )]
    otlp_service_name: String,
}

impl Args {
    /// The engine's configuration from the flags; `address` is the one listened on.
    fn engine_config(&self, address: SocketAddr) -> EngineConfig {
        let (database, sessions, cluster, limits) =
            (&self.database, &self.sessions, &self.cluster, &self.limits);
        EngineConfig {
            advertise_url: Some(
                cluster
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{address}")),
            ),
            cluster_secret: cluster.cluster_secret.clone(),
            ownership_lease: Duration::from_millis(cluster.ownership_lease_ms),
            member_lease: Duration::from_millis(cluster.member_lease_ms),
            listen_for_changes: cluster.listen_for_changes,
            sqlite_sync: if database.sqlite_normal_sync {
                SqliteSync::Normal
            } else {
                SqliteSync::Full
            },
            busy_timeout: Duration::from_millis(database.sqlite_busy_timeout_ms),
            sqlite_max_pages: database.sqlite_max_pages,
            writer_connections: database.writer_connections,
            read_pool_size: database.read_connections,
            database_timeout: Duration::from_millis(database.database_timeout_ms),
            max_sessions_per_flush: database.max_sessions_per_flush,
            max_rows_per_flush: database.max_rows_per_flush,
            max_bytes_per_flush: database.max_bytes_per_flush,
            max_conflict_retries: database.max_conflict_retries,
            send_timeout: Some(Duration::from_millis(self.http.send_timeout_ms)),
            command_timeout: Some(Duration::from_millis(self.http.command_timeout_ms)),
            hide_foreign_sessions: !self.http.reveal_foreign_sessions,
            mailbox_capacity: sessions.mailbox_capacity,
            idle_timeout: Duration::from_secs(sessions.idle_timeout),
            max_live_sessions: (sessions.max_live_sessions > 0)
                .then_some(sessions.max_live_sessions),
            cached_messages: sessions.cached_messages,
            draft_timeout: Duration::from_millis(sessions.draft_timeout_ms),
            idempotency_retention: Duration::from_secs(sessions.idempotency_retention_secs),
            default_session_ttl: (sessions.session_ttl > 0)
                .then(|| Duration::from_secs(sessions.session_ttl)),
            purge_interval: (sessions.purge_interval_ms > 0)
                .then(|| Duration::from_millis(sessions.purge_interval_ms)),
            purge_batch: usize::try_from(sessions.purge_batch).unwrap_or(usize::MAX),
            max_sessions_per_user: (sessions.max_sessions_per_user > 0)
                .then_some(sessions.max_sessions_per_user),
            limits: Limits {
                max_content_bytes: limits.max_content_bytes,
                max_messages_per_append: limits.max_messages_per_append,
                max_json_bytes: limits.max_json_bytes,
                max_text_bytes: limits.max_text_bytes,
                max_page_size: limits.max_page_size,
                max_page_bytes: limits.max_page_bytes,
                max_json_depth: limits.max_json_depth,
                max_import_messages: limits.max_import_messages,
            },
            ..EngineConfig::new(&self.server.database_url)
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.server.worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("soloist-server: cannot start its runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve_until_stopped(args))
}

async fn serve_until_stopped(args: Args) -> std::process::ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let traces = match &args.traces.otlp_endpoint {
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .init();
            None
        }
        Some(endpoint) => match export_traces(endpoint, &args.traces, filter, ansi) {
            Ok(traces) => Some(traces),
            Err(error) => {
                eprintln!("soloist-server: {error}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "soloist-server failed");
            std::process::ExitCode::FAILURE
        }
    };
    // The spans of the shutdown itself included.
    if let Some(traces) = traces {
        traces.shutdown().await;
    }
    code
}

/// Installs the subscriber with two layers: the log lines as without export (filtered by
/// `RUST_LOG`), and the spans (and the events within them) at `info` and above exported over
/// OTLP, whatever `RUST_LOG` says.
#[cfg(feature = "otlp")]
fn export_traces(
    endpoint: &str,
    args: &TraceArgs,
    filter: tracing_subscriber::EnvFilter,
    ansi: bool,
) -> Result<soloist_server::otlp::Traces, Box<dyn std::error::Error>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let (spans, traces) = soloist_server::otlp::Traces::start(
        endpoint,
        &args.otlp_service_name,
        tokio::runtime::Handle::current(),
    )?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_filter(filter),
        )
        .with(spans.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .try_init()?;
    Ok(traces)
}

/// Without the `otlp` feature, `--otlp-endpoint` is refused.
#[cfg(not(feature = "otlp"))]
fn export_traces(
    _: &str,
    _: &TraceArgs,
    _: tracing_subscriber::EnvFilter,
    _: bool,
) -> Result<NoTraces, Box<dyn std::error::Error>> {
    Err("--otlp-endpoint: this build has no OTLP export (cargo feature `otlp`)".into())
}

/// The export pipeline of a build without the `otlp` feature: there is none.
#[cfg(not(feature = "otlp"))]
enum NoTraces {}

#[cfg(not(feature = "otlp"))]
impl NoTraces {
    async fn shutdown(self) {
        match self {}
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Bound first: the address this process advertises to its peers is the one it got.
    let listener = tokio::net::TcpListener::bind(args.server.listen).await?;
    let address = listener.local_addr()?;
    let config = args.engine_config(address);
    // Before the engine, which takes its metric handles when it starts.
    let metrics = soloist_server::install_metrics()?;
    let engine = Engine::start(config).await?;
    Peers::install(&engine);
    let shutdown = CancellationToken::new();
    // Tests and scripts read this line to find the port.
    println!("listening on http://{address}");
    info!(%address, "soloist-server listening");

    let http = &args.http;
    let mut body_limits = BodyLimits::for_engine(&engine.config().limits);
    body_limits.append_bytes = http.max_append_body_bytes;
    body_limits.import_bytes = http.max_import_body_bytes;
    // Room for the largest body of each kind, whatever the budget says.
    body_limits.memory_bytes = http
        .body_memory_bytes
        .max(http.max_append_body_bytes)
        .max(http.max_import_body_bytes);
    // Room for the largest pages as JSON (escaped text can take several bytes a byte),
    // whatever the budget says.
    body_limits.answer_memory_bytes = http
        .answer_memory_bytes
        .max(engine.config().limits.max_page_bytes.saturating_mul(8));
    body_limits.grace = Duration::from_millis(http.body_timeout_ms);
    body_limits.min_bytes_per_second = http.min_body_rate.max(1);
    let mut state = AppState::with_body_limits(engine.clone(), shutdown.clone(), body_limits)
        .with_metrics(metrics.clone());
    soloist_server::spawn_metrics_upkeep(metrics, shutdown.clone());
    if let Some(limits) = http.user_limits() {
        let limits = Arc::new(limits);
        state = state.with_user_limits(limits.clone());
        // Memory follows the users active lately: full buckets are dropped every minute.
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(60)) => limits.forget_idle(),
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    let router = app(state.clone());
    let peers = Inbound::new(engine.clone(), state.bodies.limits());
    let serve_config = ServeConfig {
        header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
        keep_alive_timeout: Duration::from_millis(http.keep_alive_timeout_ms),
        stalled_reader_timeout: Duration::from_millis(http.stalled_reader_timeout_ms),
        max_connections: http
            .max_connections
            .map_or_else(default_max_connections, |max| {
                usize::try_from(max).unwrap_or(usize::MAX)
            }),
        shutdown_timeout: Duration::from_millis(args.server.shutdown_timeout_ms),
    };
    info!(
        max_connections = serve_config.max_connections,
        "connection cap"
    );
    let stop = shutdown.clone();
    let leaving = engine.clone();
    let report = serve(listener, router, peers, serve_config, async move {
        wait_for_signal().await;
        // Hand the sessions over first, serving on meanwhile: the other members send commands
        // here until they next read the members, then to the sessions' new owners.
        if leaving.leave_cluster().await {
            let handover = leaving.config().member_lease / 3 + Duration::from_millis(500);
            info!(
                ?handover,
                "left the cluster; serving on while the others notice"
            );
            tokio::time::sleep(handover).await;
        }
        info!("shutting down: no new connections, finishing in-flight requests");
        // Ends the event streams, which would otherwise hold the drain open forever.
        stop.cancel();
    })
    .await;
    info!(
        accepted = report.accepted,
        evicted = report.evicted,
        refused = report.refused,
        cut = report.cut,
        "connections closed"
    );
    engine.shutdown().await;
    info!("soloist-server stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use clap::CommandFactory;

    use super::*;

    const ADDRESS: &str = "127.0.0.1:8080";

    #[test]
    fn every_flag_has_its_own_environment_variable() {
        let command = Args::command();
        let mut names = HashSet::new();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no environment variable"));
            assert!(names.insert(env.to_owned()), "{env:?} names two flags");
            let expected = match id {
                "database_url" => "DATABASE_URL".to_owned(),
                _ => format!("SOLOIST_{}", id.to_uppercase()),
            };
            assert_eq!(env, expected.as_str(), "--{id}'s variable");
            assert!(
                arg.get_help_heading().is_some(),
                "--{id} is in no group of --help"
            );
        }
        assert!(names.len() >= 40, "{} flags", names.len());
    }

    #[test]
    fn without_flags_the_engine_keeps_its_defaults() {
        let args = Args::try_parse_from(["soloist-server"]).expect("no flags");
        let config = args.engine_config(ADDRESS.parse().expect("address"));
        let engine = defaults();
        assert_eq!(config.cached_messages, engine.cached_messages);
        assert_eq!(config.max_live_sessions, engine.max_live_sessions);
        assert_eq!(config.database_timeout, engine.database_timeout);
        assert_eq!(config.ownership_lease, engine.ownership_lease);
        assert_eq!(config.member_lease, engine.member_lease);
        assert_eq!(config.max_rows_per_flush, engine.max_rows_per_flush);
        assert_eq!(config.command_timeout, engine.command_timeout);
        assert_eq!(config.draft_timeout, engine.draft_timeout);
        assert_eq!(config.listen_for_changes, engine.listen_for_changes);
        assert_eq!(
            format!("{:?}", config.limits),
            format!("{:?}", engine.limits)
        );
        assert_eq!(
            config.advertise_url.as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(args.traces.otlp_endpoint, None, "no span export by default");
        assert_eq!(args.traces.otlp_service_name, "soloist-server");
    }

    #[test]
    fn flags_reach_the_engine() {
        let args = Args::try_parse_from([
            "soloist-server",
            "--cached-messages",
            "7",
            "--max-live-sessions",
            "0",
            "--database-timeout-ms",
            "1500",
            "--listen-for-changes",
            "false",
            "--max-page-size",
            "50",
            "--max-json-depth",
            "20",
            "--max-import-messages",
            "500",
            "--sqlite-max-pages",
            "1000",
            "--ownership-lease-ms",
            "2000",
        ])
        .expect("flags");
        let config = args.engine_config(ADDRESS.parse().expect("address"));
        assert_eq!(config.cached_messages, 7);
        assert_eq!(config.max_live_sessions, None, "0: no cap");
        assert_eq!(config.database_timeout, Duration::from_millis(1500));
        assert!(!config.listen_for_changes);
        assert_eq!(config.limits.max_page_size, 50);
        assert_eq!(config.limits.max_json_depth, 20);
        assert_eq!(config.limits.max_import_messages, 500);
        assert_eq!(config.sqlite_max_pages, Some(1000));
        assert_eq!(config.ownership_lease, Duration::from_secs(2));
        assert!(
            Args::try_parse_from(["soloist-server", "--member-lease-ms", "0"]).is_err(),
            "a lease too short to renew is refused"
        );
    }
}
