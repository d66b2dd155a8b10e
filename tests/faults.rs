//! Fault tests: connections killed under the writer, a flooded mailbox, and a batch
//! carrying one session that another writer changed. Each test states its pass criterion and
//! prints its figures.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use soloist::uuid::Uuid;
use soloist::{Engine, EngineConfig, Error, MessageStatus, NewMessage, SessionId};
use soloist_testkit::history::History;
use soloist_testkit::{
    Backend, TestDb, assert_contiguous, on_every_backend, postgres_base_url, stored_rows,
};
use sqlx::Connection;

/// Rows `(seq, message_id)` of a session: from the database when another connection can open
/// it, else (a private in-memory database) through the engine.
async fn rows_of(db: &TestDb, engine: &Engine, user: &str, session: SessionId) -> Vec<(i64, Uuid)> {
    if db.shareable() {
        stored_rows(&db.url, session).await.expect("rows")
    } else {
        let page = engine
            .session(user, session)
            .get(None, Some(1000))
            .await
            .expect("read through the engine");
        page.messages.iter().map(|m| (m.seq, m.id)).collect()
    }
}

/// `pg_terminate_backend` of the engine's connections at random points while 8 writers append
/// ~1,000 messages to 8 sessions, retrying failed appends with the same message ids.
///
/// Pass: every acknowledged `(seq, id)` is stored exactly once at its acknowledged sequence, no
/// duplicate message id, sequences contiguous, no stored message that was never sent, every
/// append eventually acknowledged, and the engine still serves an append and a read afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_terminate_backend_during_flushes() {
    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        eprintln!("SKIPPED: pg_terminate_backend_during_flushes needs PostgreSQL");
        return;
    };
    const WRITERS: usize = 8;
    const APPENDS_PER_WRITER: usize = 125;
    // Kills go on until the writers are done; the bound only keeps a broken run finite.
    const MAX_KILL_ROUNDS: usize = 2_000;
    const MAX_RETRIES: usize = 50;

    // The engine's connections carry a name of their own, so the admin kills only them and not
    // the connections of other tests running at the same time.
    let app_name = format!("soloist-fault-{}", Uuid::new_v4().simple());
    let config = EngineConfig::new(format!("{}&application_name={app_name}", db.url));
    let engine = db.engine_with(config).await.expect("engine");
    let user = "fault-user";
    let mut sessions = Vec::new();
    for _ in 0..WRITERS {
        let id = SessionId::new();
        engine
            .session(user, id)
            .create(None, None)
            .await
            .expect("create");
        sessions.push(id);
    }

    let done = Arc::new(AtomicBool::new(false));
    let admin = {
        let done = done.clone();
        let app_name = app_name.clone();
        tokio::spawn(async move {
            let mut admin = sqlx::PgConnection::connect(&format!(
                "{}?application_name=fault-admin",
                postgres_base_url()
            ))
            .await
            .expect("admin connection");
            let mut kills = 0usize;
            let mut rounds = 0usize;
            while !done.load(Ordering::Relaxed) && rounds < MAX_KILL_ROUNDS {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=40))).await;
                rounds += 1;
                let killed: Vec<(bool,)> = sqlx::query_as(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&app_name)
                .fetch_all(&mut admin)
                .await
                .expect("terminate query");
                kills += killed.iter().filter(|(ok,)| *ok).count();
            }
            (kills, rounds)
        })
    };

    let history = History::new();
    let mut writers = Vec::new();
    for (writer, &session) in sessions.iter().enumerate() {
        let engine = engine.clone();
        let client = history.client(format!("writer {writer}"));
        writers.push(tokio::spawn(async move {
            let handle = engine.session(user, session);
            let mut sent = Vec::new();
            let mut acked = Vec::new();
            let mut retried = 0usize;
            for turn in 0..APPENDS_PER_WRITER {
                let id = Uuid::now_v7();
                sent.push(id);
                let mut attempt = 0;
                loop {
                    let message = NewMessage::user(format!("w{writer} #{turn}")).with_id(id);
                    match client.append(&handle, vec![message]).await {
                        Ok(sequences) => {
                            assert_eq!(sequences.len(), 1);
                            acked.push((sequences[0], id));
                            break;
                        }
                        Err(error) if error.is_retryable() && attempt < MAX_RETRIES => {
                            attempt += 1;
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(error) => {
                            panic!(
                                "append w{writer} #{turn} failed after {attempt} retries: {error:?}"
                            )
                        }
                    }
                }
            }
            (session, sent, acked, retried)
        }));
    }
    let mut results = Vec::new();
    for writer in writers {
        results.push(writer.await.expect("writer task"));
    }
    done.store(true, Ordering::Relaxed);
    let (kills, rounds) = admin.await.expect("admin task");
    // The fault really hit: connections were killed, and appends failed because of it.
    assert!(kills > 0, "no connection of the engine was killed");

    let mut appends = 0;
    let mut retried = 0;
    for (session, sent, acked, session_retried) in &results {
        appends += acked.len();
        retried += session_retried;
        let rows = stored_rows(&db.url, *session).await.expect("rows");
        assert_contiguous(&rows);
        let sent: HashSet<Uuid> = sent.iter().copied().collect();
        for (_, id) in &rows {
            assert!(sent.contains(id), "stored message {id} was never sent");
        }
        let stored: HashMap<Uuid, i64> = rows.iter().map(|&(seq, id)| (id, seq)).collect();
        for (seq, id) in acked {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acknowledged {id} stored once at its acknowledged sequence"
            );
        }
        assert_eq!(
            rows.len(),
            acked.len(),
            "every append acknowledged, nothing else stored"
        );
    }
    assert_eq!(appends, WRITERS * APPENDS_PER_WRITER);
    assert!(
        retried > 0,
        "{kills} kills and not one append failed: the fault missed"
    );

    // The engine keeps serving after the kills.
    let handle = engine.session(user, sessions[0]);
    let last_writer = history.client("after the storm");
    let id = Uuid::now_v7();
    let mut final_append = None;
    for _ in 0..MAX_RETRIES {
        let message = NewMessage::user("after the storm").with_id(id);
        match last_writer.append(&handle, vec![message]).await {
            Ok(sequences) => {
                final_append = Some(sequences);
                break;
            }
            Err(error) if error.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(error) => panic!("final append: {error:?}"),
        }
    }
    let sequences = final_append.expect("final append acknowledged");
    assert_eq!(sequences, vec![APPENDS_PER_WRITER as i64]);
    let page = last_writer
        .get(&handle, Some(APPENDS_PER_WRITER as i64 - 1), None)
        .await
        .expect("final read");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].id, id);
    assert_contiguous(&stored_rows(&db.url, sessions[0]).await.expect("rows"));

    let stats = engine.stats();
    println!(
        "pg_terminate_backend_during_flushes: {kills} connections killed in {rounds} rounds, \
         {retried} retried errors, {appends} appends acknowledged, {} storage errors, {} \
         transient retries, {} flushes",
        stats.storage_errors, stats.transient_retries, stats.flushes
    );
    history
        .verify("pg_terminate_backend", &db, &engine, user)
        .await;
    engine.shutdown().await;
}

/// Overload: 500 concurrent appends to one session whose mailbox holds 4, with a 1 ms send
/// timeout.
///
/// Pass: every call answers once, either Ok or [`Error::Overloaded`] (at least one of those);
/// memory stays flat: the commands queued in the engine (sampled all through the flood) never
/// exceed the mailbox capacity; exactly the Ok ones are stored, each at its acknowledged
/// sequence, contiguous; a following append succeeds.
async fn overload_flood_is_typed_and_loses_nothing(db: TestDb) {
    const CALLS: usize = 500;
    let config = EngineConfig {
        mailbox_capacity: 4,
        send_timeout: Some(Duration::from_millis(1)),
        ..db.config()
    };
    let engine = db.engine_with(config).await.expect("engine");
    let user = "flood-user";
    let session = SessionId::new();
    engine
        .session(user, session)
        .create(None, None)
        .await
        .expect("create");
    let history = History::new();
    let started = Instant::now();
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (engine, flooding) = (engine.clone(), flooding.clone());
        tokio::spawn(async move {
            let (mut samples, mut deepest) = (0u64, 0u64);
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                deepest = deepest.max(engine.stats().mailbox_depth);
                samples += 1;
                tokio::task::yield_now().await;
            }
            (samples, deepest)
        })
    };
    let mut calls = Vec::new();
    for index in 0..CALLS {
        let handle = engine.session(user, session);
        let client = history.client(format!("call {index}"));
        calls.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            let message = NewMessage::user(format!("flood #{index}")).with_id(id);
            let result = client.append(&handle, vec![message]).await;
            (id, result)
        }));
    }
    let mut acked = HashMap::new();
    let mut overloaded = 0;
    for call in calls {
        let (id, result) = call.await.expect("call task");
        match result {
            Ok(sequences) => {
                assert_eq!(sequences.len(), 1);
                acked.insert(id, sequences[0]);
            }
            Err(Error::Overloaded(_)) => overloaded += 1,
            Err(error) => panic!("only Ok or Overloaded, got {error:?}"),
        }
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let (samples, deepest) = sampler.await.expect("sampler");
    assert!(samples > 0);
    assert!(
        deepest <= 4,
        "queued commands stay within the mailbox capacity: {deepest} > 4"
    );
    assert_eq!(acked.len() + overloaded, CALLS);
    assert!(
        overloaded > 0,
        "the flood overloaded the mailbox at least once"
    );
    let rows = rows_of(&db, &engine, user, session).await;
    assert_contiguous(&rows);
    assert_eq!(rows.len(), acked.len(), "exactly the Ok appends are stored");
    for (seq, id) in &rows {
        assert_eq!(
            acked.get(id),
            Some(seq),
            "stored at its acknowledged sequence"
        );
    }
    let next = history
        .client("after the flood")
        .append(
            &engine.session(user, session),
            vec![NewMessage::user("after the flood")],
        )
        .await
        .expect("append after the flood");
    assert_eq!(next, vec![acked.len() as i64]);
    println!(
        "overload_flood ({:?}): {} ok, {overloaded} overloaded of {CALLS} in {:?}; \
         at most {deepest} queued in {samples} samples",
        db.backend,
        acked.len(),
        started.elapsed()
    );
    history.verify("overload flood", &db, &engine, user).await;
    engine.shutdown().await;
}

on_every_backend!(overload_flood_is_typed_and_loses_nothing);

/// A batch carrying S1, S2 and S3, with S1 advanced behind the engine's back by another engine.
///
/// The three are made to share one write transaction: A has one writer, held (test hook
/// `pause_writes`) with a fourth session's write in hand while S1, S2 and S3 queue behind it.
///
/// Pass: the three went out in one flush (A flushes three times: the blocker, S1+S2+S3, S1's
/// retry); exactly one conflict retry (S1's), S1 lands at sequence 2, S2 and S3 commit once each
/// (message_count 2, four session batches flushed in all), and the rows in the database are
/// contiguous with the expected ids.
async fn a_batch_with_a_planted_conflict_reconciles_only_that_session(db: TestDb) {
    planted_conflict(db, false).await;
}

/// The scenario of [`a_batch_with_a_planted_conflict_reconciles_only_that_session`];
/// `check_rows_stat` also checks that `Stats::rows` ("message rows written") counts only the
/// committed rows.
async fn planted_conflict(db: TestDb, check_rows_stat: bool) {
    // A does not follow B's writes, so its copy of S1 is surely stale when it flushes.
    // One writer, so what queues behind its flush goes out together.
    let a = db
        .engine_with(soloist::EngineConfig {
            listen_for_changes: false,
            writer_connections: 1,
            ..db.config()
        })
        .await
        .expect("engine");
    let b = db.engine().await.expect("engine");
    let history = History::new();
    let (a_client, b_client) = (history.client("a"), history.client("b"));
    let user = "batch-user";
    let ids = [SessionId::new(), SessionId::new(), SessionId::new()];
    let [s1, s2, s3] = ids.map(|id| a.session(user, id));
    let blocker = a.session(user, SessionId::new());
    for session in [&s1, &s2, &s3, &blocker] {
        session.create(None, None).await.expect("create");
        assert_eq!(
            a_client
                .append(session, vec![NewMessage::user("warm")])
                .await
                .expect("warm"),
            vec![0]
        );
    }
    let planted = Uuid::now_v7();
    assert_eq!(
        b_client
            .append(
                &b.session(user, ids[0]),
                vec![NewMessage::user("planted").with_id(planted)]
            )
            .await
            .expect("planted write"),
        vec![1]
    );
    let before = a.stats();
    let new_ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    let paused = a.pause_writes().await;
    let (r0, (r1, r2, r3), ()) = tokio::join!(
        a_client.append(&blocker, vec![NewMessage::user("blocker")]),
        async {
            // The writer has taken the blocker's write and waits at the gate; these three
            // queue behind it, and the gate opens once they are in the queue.
            tokio::time::sleep(Duration::from_millis(50)).await;
            tokio::join!(
                a_client.append(&s1, vec![NewMessage::user("s1").with_id(new_ids[0])]),
                a_client.append(&s2, vec![NewMessage::user("s2").with_id(new_ids[1])]),
                a_client.append(&s3, vec![NewMessage::user("s3").with_id(new_ids[2])]),
            )
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(paused);
        },
    );
    assert_eq!(r0.expect("blocker"), vec![1]);
    assert_eq!(r1.expect("S1 reconciles"), vec![2]);
    assert_eq!(r2.expect("S2"), vec![1]);
    assert_eq!(r3.expect("S3"), vec![1]);
    let after = a.stats();
    assert_eq!(
        after.conflict_retries - before.conflict_retries,
        1,
        "only S1 reconciled"
    );
    // B's planted write took S1 over, so A's stale write is refused by the ownership epoch.
    assert_eq!(after.fenced - before.fenced, 1, "one refused batch");
    assert_eq!(after.conflicts - before.conflicts, 0, "refused as fenced");
    assert_eq!(
        after.flushes - before.flushes,
        3,
        "the blocker, then S1, S2 and S3 in one flush, then S1's retry"
    );
    // `flushed_sessions` counts the session batches written: the refused one is not.
    assert_eq!(
        after.flushed_sessions - before.flushed_sessions,
        4,
        "the blocker, S1 after reconciling, S2 and S3 committed once each"
    );
    if check_rows_stat {
        assert_eq!(
            after.rows - before.rows,
            4,
            "Stats::rows counts the rows written, not those of a refused batch"
        );
    }
    for (index, session) in [&s2, &s3].into_iter().enumerate() {
        let page = session.get(None, None).await.expect("get");
        assert_eq!(page.session.message_count, 2);
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_contiguous(&rows);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], (1, new_ids[index + 1]));
    }
    let rows = stored_rows(&db.url, ids[0]).await.expect("rows");
    assert_contiguous(&rows);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1], (1, planted));
    assert_eq!(rows[2], (2, new_ids[0]));
    assert_eq!(
        s1.get(None, None).await.expect("get").session.message_count,
        3
    );
    println!(
        "planted conflict ({:?}): conflicts +{}, conflict retries +{}, flushes +{}, flushed \
         sessions +{}",
        db.backend,
        after.conflicts - before.conflicts,
        after.conflict_retries - before.conflict_retries,
        after.flushes - before.flushes,
        after.flushed_sessions - before.flushed_sessions
    );
    history.verify("planted conflict", &db, &a, user).await;
    b.shutdown().await;
    a.shutdown().await;
}

mod a_batch_with_a_planted_conflict_reconciles_only_that_session {
    use soloist_testkit::{Backend, TestDb};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_file() {
        let db = TestDb::sqlite_file().expect("database");
        super::a_batch_with_a_planted_conflict_reconciles_only_that_session(db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        if let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") {
            super::a_batch_with_a_planted_conflict_reconciles_only_that_session(db).await;
        }
    }
}

/// `Stats::rows` counts the message rows written, not those of a batch refused by a conflict:
/// the planted-conflict scenario writes 3 rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_rows_count_only_committed_rows() {
    let db = TestDb::sqlite_file().expect("database");
    planted_conflict(db, true).await;
}

/// A session actor that panics while handling a batch: the commands of that batch get
/// `ActorFailed`, the actor restarts from the database, and the commands queued behind it
/// succeed, at the right sequences.
async fn a_panicking_session_actor_restarts(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    let history = History::new();
    history
        .client("first")
        .append(&session, vec![NewMessage::user("zero")])
        .await
        .expect("append");
    engine.inject_panic(session.id(), std::time::Duration::from_millis(300));
    let doomed = tokio::spawn({
        let session = session.clone();
        let client = history.client("doomed");
        async move {
            client
                .append(&session, vec![NewMessage::user("in flight")])
                .await
        }
    });
    // Queue more behind the batch that is about to fail (it pauses 300 ms before failing).
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let queued: Vec<_> = (0..4)
        .map(|index| {
            let session = session.clone();
            let client = history.client(format!("queued {index}"));
            tokio::spawn(async move {
                client
                    .append(&session, vec![NewMessage::user(format!("queued {index}"))])
                    .await
            })
        })
        .collect();
    assert!(
        matches!(doomed.await.expect("task"), Err(Error::ActorFailed)),
        "the in-flight command fails"
    );
    let mut sequences = Vec::new();
    for task in queued {
        sequences.extend(task.await.expect("task").expect("queued commands succeed"));
    }
    sequences.sort();
    assert_eq!(
        sequences,
        vec![1, 2, 3, 4],
        "the restarted actor continues after seq 0"
    );
    assert_eq!(engine.stats().restarts, 1);
    let page = session.get(None, None).await.expect("get");
    assert_eq!(page.session.message_count, 5);
    history.verify("panicking actor", &db, &engine, "u").await;
    engine.shutdown().await;
}

mod panicking_actor {
    use super::*;
    on_every_backend!(a_panicking_session_actor_restarts);
    async fn a_panicking_session_actor_restarts(db: TestDb) {
        super::a_panicking_session_actor_restarts(db).await
    }
}

/// SQLite full (`max_page_count`): the append that does not fit gets a storage error, is not
/// acknowledged and leaves nothing behind; once there is room again (another session deleted),
/// appends go through at the next sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_disk_full_is_typed_and_recovers() {
    let db = TestDb::sqlite_file().expect("database");
    let engine = db
        .engine_with(soloist::EngineConfig {
            sqlite_max_pages: Some(64),
            max_conflict_retries: 1,
            ..db.config()
        })
        .await
        .expect("engine");
    let filler = engine.session("u", SessionId::new());
    filler.create(None, None).await.expect("create");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    session
        .append(vec![NewMessage::user("first")])
        .await
        .expect("append");
    // Fill the file.
    let big = "x".repeat(16 * 1024);
    let mut filled = false;
    for _ in 0..64 {
        match filler.append(vec![NewMessage::user(big.clone())]).await {
            Ok(_) => {}
            Err(Error::Storage(error)) => {
                assert!(error.to_string().contains("full"), "{error}");
                filled = true;
                break;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(filled, "64 pages never filled up");
    let refused = session.append(vec![NewMessage::user(big.clone())]).await;
    assert!(matches!(refused, Err(Error::Storage(_))), "{refused:?}");
    let rows = stored_rows(&db.url, session.id()).await.expect("rows");
    assert_eq!(rows.len(), 1, "nothing partial was stored");
    // Room again: the filler goes away (its messages are deleted).
    filler.delete().await.expect("delete frees pages");
    let sequences = session
        .append(vec![NewMessage::user("after")])
        .await
        .expect("works again once there is room");
    assert_eq!(sequences, vec![1]);
    assert_contiguous(&stored_rows(&db.url, session.id()).await.expect("rows"));
    engine.shutdown().await;
}

/// A process stalled inside a transaction that holds a session's row lock (a paused process, an
/// operator's open `psql` transaction) cannot wedge the engine: its flushes of that session give
/// up waiting for the lock after `database_timeout` (PostgreSQL `lock_timeout`), the caller gets
/// a typed retryable error in bounded time, other sessions keep committing meanwhile, and the
/// retry with the same message id lands once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_lock_holder_cannot_wedge_the_engine() {
    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        eprintln!("SKIPPED: a_stuck_lock_holder_cannot_wedge_the_engine needs PostgreSQL");
        return;
    };
    let engine = db
        .engine_with(EngineConfig {
            database_timeout: Duration::from_millis(500),
            command_timeout: Some(Duration::from_secs(60)),
            ..db.config()
        })
        .await
        .expect("engine");
    let user = "lock-user";
    let (stuck, free) = (
        engine.session(user, SessionId::new()),
        engine.session(user, SessionId::new()),
    );
    for session in [&stuck, &free] {
        session.create(None, None).await.expect("create");
        session
            .append(vec![NewMessage::user("warm")])
            .await
            .expect("warm");
    }

    let mut holder = sqlx::PgConnection::connect(&db.url).await.expect("holder");
    let mut transaction = holder.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
        .bind(stuck.id())
        .execute(&mut *transaction)
        .await
        .expect("lock the row");

    let id = Uuid::now_v7();
    let started = Instant::now();
    let (blocked, other) = tokio::join!(
        stuck.append(vec![NewMessage::user("behind the lock").with_id(id)]),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let started = Instant::now();
            let appended = free.append(vec![NewMessage::user("elsewhere")]).await;
            (appended, started.elapsed())
        },
    );
    let waited = started.elapsed();
    let error = blocked.expect_err("the row is locked all along");
    assert!(error.is_retryable(), "typed and retryable: {error:?}");
    assert!(
        waited < Duration::from_secs(15),
        "bounded by the lock timeout and the retries: {waited:?}"
    );
    let (appended, other_took) = other;
    assert_eq!(
        appended.expect("another session commits meanwhile"),
        vec![1]
    );
    assert_eq!(rows_of(&db, &engine, user, stuck.id()).await.len(), 1);

    transaction.rollback().await.expect("release");
    assert_eq!(
        stuck
            .append(vec![NewMessage::user("behind the lock").with_id(id)])
            .await
            .expect("retry once the lock is gone"),
        vec![1]
    );
    let rows = stored_rows(&db.url, stuck.id()).await.expect("rows");
    assert_contiguous(&rows);
    assert_eq!(rows[1], (1, id));
    println!(
        "a_stuck_lock_holder_cannot_wedge_the_engine: {error} after {waited:?}; another \
         session committed in {other_took:?}; {} transient retries",
        engine.stats().transient_retries
    );
    engine.shutdown().await;
}

/// Retries `attempt` while it fails with a retryable error (at most 50 times, 5 ms apart).
async fn retried<T, F: Future<Output = soloist::Result<T>>>(
    mut attempt: impl FnMut() -> F,
) -> soloist::Result<T> {
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(error) if error.is_retryable() && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            done => return done,
        }
    }
}

/// Streams under faults: 4 drafts grow by 30 deltas each while their actors are
/// made to panic at random (and, on PostgreSQL, the engine's connections are terminated);
/// every failed delta, start and finish is retried with the same offset and id, and a reader
/// per draft reads it all along.
///
/// Pass: the history checker's report is clean, drafts included (no acknowledged delta lost,
/// no byte never sent, no read of a draft going back, no finished draft changing), and each
/// draft ends completed with exactly the text streamed.
async fn drafts_stream_through_faults(db: TestDb) {
    const STREAMS: usize = 4;
    const TOKENS: usize = 30;
    let app_name = format!("soloist-drafts-{}", Uuid::new_v4().simple());
    let config = match db.backend {
        Backend::Postgres => EngineConfig::new(format!("{}&application_name={app_name}", db.url)),
        _ => db.config(),
    };
    let engine = db.engine_with(config).await.expect("engine");
    let user = "stream-user";
    let history = History::new();
    let done = Arc::new(AtomicBool::new(false));
    let mut sessions = Vec::new();
    for _ in 0..STREAMS {
        let session = engine.session(user, SessionId::new());
        session.create(None, None).await.expect("create");
        sessions.push(session);
    }
    let faults = {
        let (engine, done, ids) = (engine.clone(), done.clone(), sessions.clone());
        let postgres = db.backend == Backend::Postgres;
        tokio::spawn(async move {
            let mut admin = None;
            if postgres {
                let url = format!("{}?application_name=drafts-admin", postgres_base_url());
                admin = Some(sqlx::PgConnection::connect(&url).await.expect("admin"));
            }
            let (mut panics, mut kills) = (0usize, 0usize);
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=30))).await;
                let session = &ids[fastrand::usize(..ids.len())];
                engine.inject_panic(session.id(), Duration::from_millis(1));
                panics += 1;
                if let Some(admin) = admin.as_mut() {
                    let killed: Vec<(bool,)> = sqlx::query_as(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&app_name)
                    .fetch_all(&mut *admin)
                    .await
                    .expect("terminate query");
                    kills += killed.iter().filter(|(ok,)| *ok).count();
                }
            }
            (panics, kills)
        })
    };
    let mut readers = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        let (client, session, done) = (
            history.client(format!("reader {index}")),
            session.clone(),
            done.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let _ = client.get(&session, None, None).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let mut writers = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        let (client, session) = (history.client(format!("writer {index}")), session.clone());
        writers.push(tokio::spawn(async move {
            let id = Uuid::now_v7();
            let start = || client.start_message(&session, NewMessage::assistant("").with_id(id));
            retried(start).await.expect("start");
            let mut text = String::new();
            for token in 0..TOKENS {
                let delta = format!("s{index}t{token} ");
                let offset = text.len() as u64;
                let length = retried(|| client.append_delta(&session, id, offset, &delta))
                    .await
                    .expect("delta");
                text.push_str(&delta);
                assert_eq!(
                    length,
                    text.len() as u64,
                    "the draft's length after the delta"
                );
            }
            let finish = || client.finish_message(&session, id, MessageStatus::Completed, None);
            let finished = retried(finish).await.expect("finish");
            assert_eq!(finished.text(), Some(text.as_str()));
            (session.id(), id, text)
        }));
    }
    let mut streamed = Vec::new();
    for writer in writers {
        streamed.push(writer.await.expect("writer task"));
    }
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.expect("reader task");
    }
    let (panics, kills) = faults.await.expect("fault task");
    // A panic still armed fails the session's next batch: let it fail on a read of its own.
    for session in &sessions {
        retried(|| session.get(None, Some(1))).await.expect("read");
    }
    let report = history
        .verify("drafts through faults", &db, &engine, user)
        .await;
    let drafts = history
        .final_drafts(&db, &engine, user)
        .await
        .expect("final drafts");
    for (session, id, text) in &streamed {
        assert_eq!(
            drafts.get(&(*session, *id)),
            Some(&(MessageStatus::Completed, text.clone())),
            "the draft ends completed with the text streamed"
        );
    }
    assert!(report.acknowledged_deltas >= STREAMS * (TOKENS + 1));
    assert!(report.finishes >= STREAMS && report.draft_reads > 0);
    println!(
        "drafts_stream_through_faults ({:?}): {panics} panics injected, {kills} connections \
         killed, {} actor restarts",
        db.backend,
        engine.stats().restarts
    );
    engine.shutdown().await;
}

mod drafts {
    use super::*;
    on_every_backend!(drafts_stream_through_faults);
    async fn drafts_stream_through_faults(db: TestDb) {
        super::drafts_stream_through_faults(db).await
    }
}
