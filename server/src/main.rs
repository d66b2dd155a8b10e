//! `soloist-server`: the chat server binary. See the crate docs of `soloist_server` for the API.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use soloist::{Engine, EngineConfig, SqliteSync};
use soloist_server::{AppState, BodyLimits, ServeConfig, app, default_max_connections, serve};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// A chat server on the soloist engine.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Database: an SQLite file (created if missing), `sqlite::memory:`, or a PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://soloist.db")]
    database_url: String,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "SOLOIST_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The URL other server processes on the same database reach this one at; this process
    /// registers itself under it (default: `http://` and the listen address; set it where that
    /// address is not reachable from the peers, e.g. in containers).
    #[arg(long, env = "SOLOIST_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
    /// SQLite only: trade the last commits on power loss for speed (`synchronous=NORMAL`).
    #[arg(long)]
    sqlite_normal_sync: bool,
    /// How long a request waits for room in a full session mailbox before a 429.
    #[arg(long, default_value = "5000", value_name = "MS")]
    send_timeout_ms: u64,
    /// The longest a request may wait for its command's answer (e.g. while the database is
    /// unreachable) before a 503 with code `timeout`; retry with the same message ids.
    #[arg(long, default_value = "30000", value_name = "MS")]
    command_timeout_ms: u64,
    /// Commands a session's mailbox holds before requests wait (then get 429).
    #[arg(long, default_value = "256")]
    mailbox_capacity: usize,
    /// Seconds an idle session stays in memory.
    #[arg(long, default_value = "300", value_name = "SECONDS")]
    idle_timeout: u64,
    /// Answer 403 to a user who asks for someone else's session, instead of the default 404
    /// that makes a foreign session indistinguishable from a missing one.
    #[arg(long)]
    reveal_foreign_sessions: bool,
    /// PostgreSQL: write transactions in flight at once.
    #[arg(long, default_value = "4")]
    writer_connections: u32,
    /// Connections for reads.
    #[arg(long, default_value = "4")]
    read_connections: u32,
    /// How long an `Idempotency-Key` is remembered: a retry with it within this time replays
    /// the first answer.
    #[arg(
        long,
        env = "SOLOIST_IDEMPOTENCY_RETENTION_SECS",
        default_value = "86400",
        value_name = "SECONDS"
    )]
    idempotency_retention_secs: u64,
    /// Largest body of an append (`POST /v1/sessions/{id}/messages`); larger ones get 413
    /// before they are read. Other routes' limits follow from what their bodies may hold.
    #[arg(
        long,
        env = "SOLOIST_MAX_APPEND_BODY_BYTES",
        default_value = "8388608",
        value_name = "BYTES"
    )]
    max_append_body_bytes: usize,
    /// Request body bytes all requests in flight may hold at once; a request that finds no
    /// room within 5 s gets 503 `busy`.
    #[arg(
        long,
        env = "SOLOIST_BODY_MEMORY_BYTES",
        default_value = "134217728",
        value_name = "BYTES"
    )]
    body_memory_bytes: usize,
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
    /// Connections open at once; past it the longest-idle connection is closed, or, when every
    /// connection has a request in flight, the new one gets a 503 `too_many_connections`.
    /// Default: the open-file limit less 128 (at least half of it).
    #[arg(long, env = "SOLOIST_MAX_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// At shutdown, how long in-flight requests may take before their connections are cut.
    #[arg(
        long,
        env = "SOLOIST_SHUTDOWN_TIMEOUT_MS",
        default_value = "30000",
        value_name = "MS"
    )]
    shutdown_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "soloist-server failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Bound first: the address this process advertises to its peers is the one it got.
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let address = listener.local_addr()?;
    let config = EngineConfig {
        advertise_url: Some(
            args.advertise_url
                .clone()
                .unwrap_or_else(|| format!("http://{address}")),
        ),
        sqlite_sync: if args.sqlite_normal_sync {
            SqliteSync::Normal
        } else {
            SqliteSync::Full
        },
        send_timeout: Some(Duration::from_millis(args.send_timeout_ms)),
        command_timeout: Some(Duration::from_millis(args.command_timeout_ms)),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        mailbox_capacity: args.mailbox_capacity,
        hide_foreign_sessions: !args.reveal_foreign_sessions,
        writer_connections: args.writer_connections,
        read_pool_size: args.read_connections,
        idempotency_retention: Duration::from_secs(args.idempotency_retention_secs),
        ..EngineConfig::new(&args.database_url)
    };
    let engine = Engine::start(config).await?;
    let shutdown = CancellationToken::new();
    // Tests and scripts read this line to find the port.
    println!("listening on http://{address}");
    info!(%address, "soloist-server listening");

    let mut body_limits = BodyLimits::for_engine(&engine.config().limits);
    body_limits.append_bytes = args.max_append_body_bytes;
    body_limits.memory_bytes = args.body_memory_bytes.max(args.max_append_body_bytes);
    body_limits.grace = Duration::from_millis(args.body_timeout_ms);
    body_limits.min_bytes_per_second = args.min_body_rate.max(1);
    let router = app(AppState::with_body_limits(
        engine.clone(),
        shutdown.clone(),
        body_limits,
    ));
    let serve_config = ServeConfig {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        keep_alive_timeout: Duration::from_millis(args.keep_alive_timeout_ms),
        max_connections: args
            .max_connections
            .map_or_else(default_max_connections, |max| {
                usize::try_from(max).unwrap_or(usize::MAX)
            }),
        shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
    };
    info!(
        max_connections = serve_config.max_connections,
        "connection cap"
    );
    let stop = shutdown.clone();
    let report = serve(listener, router, serve_config, async move {
        wait_for_signal().await;
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
