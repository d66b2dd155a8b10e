//! The counters a server exports, and the two levels of group commit they make visible.

mod common;

use common::TestDb;
use common::history::History;
use soloist::uuid::Uuid;
use soloist::{EngineConfig, NewMessage};

/// Many sessions written at once share transactions (cross-session group commit), and the
/// counters add up: rows written equal messages appended, every command is counted.
async fn stats_show_cross_session_group_commit(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            max_live_sessions: Some(10_000),
            ..db.config()
        })
        .await;
    let sessions: Vec<Uuid> = (0..64).map(|_| Uuid::now_v7()).collect();
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
    assert!(
        after.flush_sessions.iter().skip(1).sum::<u64>() > 0,
        "some transaction carried more than one session: {:?}",
        after.flush_sessions
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
        .await;
    let session = engine.session("u", Uuid::now_v7());
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
    let db = TestDb::new(common::Backend::SqliteFile)
        .await
        .expect("sqlite");
    let engine = db
        .engine_with(EngineConfig {
            busy_timeout: std::time::Duration::from_millis(10),
            ..db.config()
        })
        .await;
    let session = engine.session("u", Uuid::now_v7());
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
    let rows = common::stored_rows(&db.url, session.id()).await;
    assert_eq!(rows.len(), 2);
    common::assert_contiguous(&rows);
    history.verify("settled flushes", &db, &engine, "u").await;
    engine.shutdown().await;
}
