//! Micro-benchmarks of the engine through its public API, one caller at a time.
//!
//! - `read_live_session`: `SessionHandle::get(None, Some(1000))` on a live session of 1,000
//!   messages. The engine keeps the newest `cached_messages` (default 1,000) in the session actor,
//!   so this read is served from memory and never reaches the database: it runs on
//!   `sqlite::memory:` only, and would measure the same on any backend.
//! - `activation`: the cold load of a 1,000- and of a 100,000-message session. Each iteration asks the
//!   session to passivate, waits (untimed) until it is no longer live, then times the first
//!   `get(None, Some(1))`, which spawns the actor and loads the session row and its 1,000 newest
//!   messages from the database. SQLite file and PostgreSQL.
//! - `flush/<backend>/<n>`: one `append` of `n` = 1, 16 or 256 messages to one session, answered
//!   once committed; sequential, so each append is one transaction. SQLite file (the default
//!   `synchronous=FULL`), `sqlite::memory:` and PostgreSQL. Throughput is in messages.
//!
//! Each caller runs as a task on a 2-worker multi-thread runtime and times its own loop
//! (`iter_custom`), so building inputs and waiting for passivation stay out of the numbers.
//! PostgreSQL is `postgres://postgres@127.0.0.1:5432/test` unless `SOLOIST_TEST_POSTGRES` names
//! another server; each engine gets a fresh schema, dropped afterwards. When PostgreSQL does not
//! answer, its benchmarks are skipped with a message.
//!
//! Run with `cargo bench --bench engine`.

use std::{
    hint::black_box,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use soloist::{Engine, NewMessage, SessionHandle};
use sqlx::Connection;
use tokio::runtime::Runtime;
use uuid::Uuid;

/// Messages in the sessions that the read and activation benchmarks use.
const SESSION_MESSAGES: usize = 1000;

/// Messages per append while seeding (the default limit per append is 256).
const SEED_CHUNK: usize = 250;

/// The databases the benchmarks run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// An SQLite file in WAL mode with the default `synchronous=FULL`.
    SqliteFile,
    /// `sqlite::memory:`, shared by the engine's connections.
    SqliteMemory,
    /// PostgreSQL, one fresh schema per engine.
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::SqliteFile => "sqlite_file",
            Backend::SqliteMemory => "sqlite_memory",
            Backend::Postgres => "postgres",
        }
    }
}

/// A fresh database, and what to remove once the engine on it has shut down.
struct Database {
    url: String,
    cleanup: Cleanup,
}

/// What a [`Database`] leaves behind.
enum Cleanup {
    /// Nothing (in-memory).
    Nothing,
    /// The SQLite file's directory.
    Directory(PathBuf),
    /// The PostgreSQL schema.
    Schema(String),
}

fn postgres_base_url() -> String {
    std::env::var("SOLOIST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether PostgreSQL answers; asked once per run, and a missing server is reported once.
async fn postgres_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    if let Some(&available) = AVAILABLE.get() {
        return available;
    }
    let connect = sqlx::PgConnection::connect(&postgres_base_url());
    let available = matches!(
        tokio::time::timeout(Duration::from_secs(5), connect).await,
        Ok(Ok(_))
    );
    if !available {
        eprintln!(
            "SKIPPED: PostgreSQL benchmarks: PostgreSQL is not answering at {}",
            postgres_base_url()
        );
    }
    *AVAILABLE.get_or_init(|| available)
}

impl Database {
    /// A fresh database; `None` when PostgreSQL is not reachable.
    async fn new(backend: Backend) -> Option<Database> {
        match backend {
            Backend::SqliteFile => {
                // Under target/: on the build's disk, so `synchronous=FULL` pays real syncs.
                let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                    .join(format!("soloist-bench-{}", Uuid::new_v4()));
                std::fs::create_dir_all(&dir).expect("create the SQLite bench directory");
                Some(Database {
                    url: format!("sqlite://{}", dir.join("bench.db").display()),
                    cleanup: Cleanup::Directory(dir),
                })
            }
            Backend::SqliteMemory => Some(Database {
                url: "sqlite::memory:".to_owned(),
                cleanup: Cleanup::Nothing,
            }),
            Backend::Postgres => {
                if !postgres_available().await {
                    return None;
                }
                let schema = format!("bench_{}", Uuid::new_v4().simple());
                let mut connection = sqlx::PgConnection::connect(&postgres_base_url())
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut connection)
                    .await
                    .expect("create the bench schema");
                Some(Database {
                    url: format!(
                        "{}?options=-c%20search_path%3D{schema}",
                        postgres_base_url()
                    ),
                    cleanup: Cleanup::Schema(schema),
                })
            }
        }
    }

    /// Starts an engine with the default configuration on this database.
    async fn engine(&self) -> Engine {
        Engine::connect(&self.url).await.expect("start the engine")
    }

    /// Removes the database; call after the engine on it has shut down.
    async fn remove(self) {
        match self.cleanup {
            Cleanup::Nothing => {}
            Cleanup::Directory(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Schema(schema) => {
                let mut connection = sqlx::PgConnection::connect(&postgres_base_url())
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .execute(&mut connection)
                    .await
                    .expect("drop the bench schema");
            }
        }
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}

/// Runs `timed_loop` as a task on `runtime` (where a server's request handler would run) and
/// returns the duration it measured.
fn on_runtime(
    runtime: &Runtime,
    timed_loop: impl Future<Output = Duration> + Send + 'static,
) -> Duration {
    runtime.block_on(async move {
        tokio::spawn(timed_loop)
            .await
            .expect("benchmark task completes")
    })
}

/// A chat-sized message (about 200 bytes of text), alternating user and assistant.
fn message(index: usize) -> NewMessage {
    let text = format!(
        "message {index}: a chat turn of about two hundred bytes, which is what a short question \
         or a short answer weighs once it has been typed, sent, stored and read back again."
    );
    if index % 2 == 0 {
        NewMessage::user(text)
    } else {
        NewMessage::assistant(text)
    }
}

/// A new session holding `SESSION_MESSAGES` messages.
async fn seeded_session(engine: &Engine) -> SessionHandle {
    seeded_session_of(engine, SESSION_MESSAGES).await
}

/// A new session holding `count` messages.
async fn seeded_session_of(engine: &Engine, count: usize) -> SessionHandle {
    let session = engine.session("bench-user", Uuid::now_v7());
    session
        .create(Some("bench".into()), None)
        .await
        .expect("create the session");
    for chunk_start in (0..count).step_by(SEED_CHUNK) {
        let chunk_end = (chunk_start + SEED_CHUNK).min(count);
        session
            .append((chunk_start..chunk_end).map(message).collect())
            .await
            .expect("seed the session");
    }
    session
}

fn read_live_session(c: &mut Criterion) {
    let runtime = runtime();
    let database = runtime
        .block_on(Database::new(Backend::SqliteMemory))
        .expect("SQLite is always available");
    let engine = runtime.block_on(database.engine());
    let session = runtime.block_on(seeded_session(&engine));

    let mut group = c.benchmark_group("read_live_session");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(SESSION_MESSAGES as u64));
    group.bench_function(
        BenchmarkId::new("get_1000", Backend::SqliteMemory.name()),
        |b| {
            b.iter_custom(|iters| {
                let session = session.clone();
                on_runtime(&runtime, async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let page = session
                            .get(None, Some(SESSION_MESSAGES))
                            .await
                            .expect("read the session");
                        assert_eq!(page.messages.len(), SESSION_MESSAGES);
                        black_box(page);
                    }
                    start.elapsed()
                })
            });
        },
    );
    group.finish();

    runtime.block_on(async {
        engine.shutdown().await;
        database.remove().await;
    });
}

fn activation(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("activation");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    // Activation loads the session row and the newest `cached_messages` (1,000) messages
    // only, so a 100,000-message session should load about as fast as a 1,000-message one.
    for backend in [Backend::SqliteFile, Backend::Postgres] {
        let Some(database) = runtime.block_on(Database::new(backend)) else {
            continue;
        };
        let engine = runtime.block_on(database.engine());
        for count in [SESSION_MESSAGES, 100 * SESSION_MESSAGES] {
            let session = runtime.block_on(seeded_session_of(&engine, count));
            let id = BenchmarkId::new(format!("first_get_{count}_messages"), backend.name());
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let engine = engine.clone();
                    let session = session.clone();
                    on_runtime(&runtime, async move {
                        let mut loading = Duration::ZERO;
                        for _ in 0..iters {
                            engine.passivate(session.id());
                            while engine.is_live(session.id()) {
                                tokio::time::sleep(Duration::from_micros(200)).await;
                            }
                            let start = Instant::now();
                            let page = session
                                .get(None, Some(1))
                                .await
                                .expect("activate the session");
                            loading += start.elapsed();
                            assert_eq!(page.session.message_count, count as i64);
                            black_box(page);
                        }
                        loading
                    })
                });
            });
        }
        runtime.block_on(async {
            engine.shutdown().await;
            database.remove().await;
        });
    }
    group.finish();
}

fn flush(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("flush");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for backend in [
        Backend::SqliteFile,
        Backend::SqliteMemory,
        Backend::Postgres,
    ] {
        let Some(database) = runtime.block_on(Database::new(backend)) else {
            continue;
        };
        let engine = runtime.block_on(database.engine());
        for messages in [1_usize, 16, 256] {
            let session = engine.session("bench-user", Uuid::now_v7());
            runtime
                .block_on(session.create(None, None))
                .expect("create the session");
            // Without ids, so every append stores new messages (the engine assigns the ids).
            let batch: Vec<NewMessage> = (0..messages).map(message).collect();
            group.throughput(Throughput::Elements(messages as u64));
            group.bench_function(BenchmarkId::new(backend.name(), messages), |b| {
                b.iter_custom(|iters| {
                    let session = session.clone();
                    let batch = batch.clone();
                    on_runtime(&runtime, async move {
                        let mut appending = Duration::ZERO;
                        for _ in 0..iters {
                            let batch = batch.clone();
                            let start = Instant::now();
                            let sequences = session.append(batch).await.expect("append");
                            appending += start.elapsed();
                            black_box(sequences);
                        }
                        appending
                    })
                });
            });
        }
        runtime.block_on(async {
            engine.shutdown().await;
            database.remove().await;
        });
    }
    group.finish();
}

// `main` by hand rather than `criterion_group!`/`criterion_main!`, whose generated public function
// cannot carry the doc comment the workspace lints ask for.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    read_live_session(&mut criterion);
    activation(&mut criterion);
    flush(&mut criterion);
    criterion.final_summary();
}
