//! The counters a server exports, and the two levels of group commit they make visible.

use soloist::SessionId;
use soloist::{EngineConfig, NewMessage};
use soloist_testkit::history::History;
use soloist_testkit::{Backend, TestDb, assert_contiguous, on_every_backend, stored_rows};

/// Many sessions written at once share transactions (cross-session group commit), and the
/// counters add up: rows written equal messages appended, every command is counted.
async fn stats_show_cross_session_group_commit(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            max_live_sessions: Some(10_000),
            ..db.config()
        })
        .await
        .expect("engine");
    let sessions: Vec<SessionId> = (0..64).map(|_| SessionId::new()).collect();
    for &id in &sessions {
        engine
            .session("u", id)
            .create(None, None)
            .await
            .expect("create");
    }
    let before = engine.stats();
    let history = History::new();
    let mut tasks = Vec::new();
    for (index, &id) in sessions.iter().enumerate() {
        let handle = engine.session("u", id);
        let client = history.client(format!("task {index}"));
        tasks.push(tokio::spawn(async move {
            for turn in 0..10 {
                client
                    .append(&handle, vec![NewMessage::user(format!("{index}/{turn}"))])
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let after = engine.stats();
    assert_eq!(
        after.rows - before.rows,
        640,
        "one row per appended message"
    );
    assert_eq!(after.commands - before.commands, 640);
    assert_eq!(after.command_errors, 0);
    assert_eq!(after.live_sessions, 64);
    let flushes = after.flushes - before.flushes;
    let flushed_sessions = after.flushed_sessions - before.flushed_sessions;
    assert!(
        flushes < flushed_sessions,
        "transactions combine sessions: {flushes} transactions for {flushed_sessions} session batches"
    );
    assert_eq!(after.storage_errors, 0);
    assert_eq!(after.conflicts, 0, "one engine never conflicts with itself");
    history
        .verify("cross-session group commit", &db, &engine, "u")
        .await;
    engine.shutdown().await;
    let stopped = engine.stats();
    assert_eq!(
        stopped.live_sessions, 0,
        "shutdown passivated every session"
    );
    assert!(stopped.passivations >= 64);
}

/// Idle sessions passivate and come back on the next command, with their state reloaded.
async fn idle_sessions_passivate_and_reload(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            idle_timeout: std::time::Duration::from_millis(50),
            ..db.config()
        })
        .await
        .expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    session
        .append(vec![NewMessage::user("one")])
        .await
        .expect("append");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.stats().live_sessions > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle session never passivated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let loads = engine.stats().loads;
    let sequences = session
        .append(vec![NewMessage::user("two")])
        .await
        .expect("append");
    assert_eq!(
        sequences,
        vec![1],
        "the reloaded session continues where it was"
    );
    assert_eq!(engine.stats().loads, loads + 1);
    engine.shutdown().await;
}

on_every_backend!(
    stats_show_cross_session_group_commit,
    idle_sessions_passivate_and_reload
);

/// A flush that fails without committing (here: another process holds SQLite's write lock
/// past the busy timeout) is settled by reading the session back — nothing moved, so the
/// engine retries — instead of surfacing a storage error while the database is merely busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_flushes_are_settled_from_the_database() {
    use sqlx::Connection;
    let db = TestDb::sqlite_file().expect("database");
    let engine = db
        .engine_with(EngineConfig {
            busy_timeout: std::time::Duration::from_millis(10),
            ..db.config()
        })
        .await
        .expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    let history = History::new();
    let client = history.client("writer");
    client
        .append(&session, vec![NewMessage::user("before")])
        .await
        .expect("append");

    // Another process takes the write lock and keeps it for a while.
    let mut other = sqlx::SqliteConnection::connect(&db.url)
        .await
        .expect("connect");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("lock");
    let append = tokio::spawn({
        let (session, client) = (session.clone(), client.clone());
        async move {
            client
                .append(&session, vec![NewMessage::user("during")])
                .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("unlock");
    let sequences = append
        .await
        .expect("task")
        .expect("the append goes through once the lock is gone");
    assert_eq!(sequences, vec![1]);
    let stats = engine.stats();
    assert!(
        stats.storage_errors >= 1,
        "the first flushes did fail: {stats:?}"
    );
    assert!(
        stats.settled_outcomes >= 1,
        "and were settled, not surfaced: {stats:?}"
    );
    let rows = stored_rows(&db.url, session.id()).await.expect("rows");
    assert_eq!(rows.len(), 2);
    assert_contiguous(&rows);
    history.verify("settled flushes", &db, &engine, "u").await;
    engine.shutdown().await;
}

/// A flush whose outcome is lost is never taken for committed because of another process's
/// write: here a write that carries no message rows (a title update), whose connection is killed
/// while it waits for a lock held by "another process" that writes the very version the update
/// expected to produce. Only the owner and epoch the update would have left identify it, so the
/// engine answers a retryable storage error rather than acknowledging a title that was never
/// stored, forgets its copy, serves what is stored, and a retry stores the title.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_write_is_never_settled_as_ours() {
    use sqlx::Connection;
    use std::time::Duration;

    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        return;
    };
    let engine = db
        .engine_with(EngineConfig {
            listen_for_changes: false,
            ..db.config()
        })
        .await
        .expect("engine");
    let id = SessionId::new();
    let session = engine.session("u", id);
    session
        .create(Some("t0".into()), None)
        .await
        .expect("create");

    // "Another process": writes the next version (taking the session over, as any other writer
    // must) and locks the table until the update below has lost its connection.
    let mut other = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    sqlx::raw_sql("BEGIN")
        .execute(&mut other)
        .await
        .expect("begin");
    sqlx::query(
        "UPDATE sessions SET version = version + 1, title = 'by B', epoch = epoch + 1, \
         owner = gen_random_uuid() WHERE id = $1",
    )
    .bind(id)
    .execute(&mut other)
    .await
    .expect("foreign write");
    sqlx::raw_sql("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut other)
        .await
        .expect("lock");

    let update = tokio::spawn({
        let session = session.clone();
        async move { session.update(Some("by A".into()), None).await }
    });
    // Kill the engine's connection while its flush waits for the lock: the outcome is lost.
    let mut killer = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut killed = 0i64;
    for _ in 0..1000 {
        killed = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND wait_event_type = 'Lock' \
             AND query LIKE '%WITH w AS%'",
        )
        .fetch_one(&mut killer)
        .await
        .expect("kill");
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed > 0, "the engine's flush never waited for the lock");
    // Let the engine's settling read queue behind the lock, then commit the foreign write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut other)
        .await
        .expect("commit");

    let result = update.await.expect("join");
    assert!(
        matches!(&result, Err(soloist::Error::Storage(_))),
        "not acknowledged: {result:?}"
    );
    let stored: String = sqlx::query_scalar("SELECT title FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut killer)
        .await
        .expect("read title");
    assert_eq!(stored, "by B");
    let page = session.get(None, Some(0)).await.expect("read");
    assert_eq!(
        page.session.title.as_deref(),
        Some("by B"),
        "serves what is stored"
    );
    let retried = session
        .update(Some("by A".into()), None)
        .await
        .expect("the retry succeeds");
    assert_eq!(retried.title.as_deref(), Some("by A"));
    let stored: String = sqlx::query_scalar("SELECT title FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(&mut killer)
        .await
        .expect("read title");
    assert_eq!(stored, "by A");
    engine.shutdown().await;
}
