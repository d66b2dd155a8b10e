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
//! Each engine gets a fresh database from `soloist_testkit` (an SQLite file under `target/`, or a
//! PostgreSQL schema of its own), removed afterwards. PostgreSQL is
//! `postgres://postgres@127.0.0.1:5432/test` unless `SOLOIST_TEST_POSTGRES` names another server;
//! when it does not answer, its benchmarks are skipped with a message (under `CI=true` they fail,
//! as the tests do).
//!
//! Run with `cargo bench --bench engine`.

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use soloist::{Engine, NewMessage, SessionHandle, SessionId};
use soloist_testkit::{Backend, TestDb};
use tokio::runtime::Runtime;

/// Messages in the sessions that the read and activation benchmarks use.
const SESSION_MESSAGES: usize = 1000;

/// Messages per append while seeding (the default limit per append is 256).
const SEED_CHUNK: usize = 250;

/// A fresh database on `backend`, removed when dropped (after the engine on it has shut down);
/// `None` when PostgreSQL is not answering (`TestDb` says so; under `CI=true` it fails).
fn fresh_database(runtime: &Runtime, backend: Backend) -> Option<TestDb> {
    let database = match backend {
        // Under target/: on the build's disk, so `synchronous=FULL` pays real syncs.
        Backend::SqliteFile => {
            TestDb::sqlite_file_in(Path::new(env!("CARGO_TARGET_TMPDIR"))).map(Some)
        }
        backend => runtime.block_on(TestDb::new(backend)),
    };
    database.expect("a fresh database")
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
    let session = engine.session("bench-user", SessionId::new());
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
    let database = TestDb::sqlite_memory();
    let engine = runtime
        .block_on(database.engine())
        .expect("start the engine");
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

    runtime.block_on(engine.shutdown());
    drop(database);
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
        let Some(database) = fresh_database(&runtime, backend) else {
            continue;
        };
        let engine = runtime
            .block_on(database.engine())
            .expect("start the engine");
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
        runtime.block_on(engine.shutdown());
        drop(database);
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
        let Some(database) = fresh_database(&runtime, backend) else {
            continue;
        };
        let engine = runtime
            .block_on(database.engine())
            .expect("start the engine");
        for messages in [1_usize, 16, 256] {
            let session = engine.session("bench-user", SessionId::new());
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
        runtime.block_on(engine.shutdown());
        drop(database);
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
