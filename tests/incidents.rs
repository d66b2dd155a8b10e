//! Regression tests for the reference incidents listed in docs/guarantees.md: each reproduces the situation
//! against soloist and shows that it cannot happen.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use soloist::uuid::Uuid;
use soloist::{EngineConfig, Error, NewMessage, Role, SessionId};
use soloist_testkit::history::History;
use soloist_testkit::{
    Backend, TestDb, assert_contiguous, on_every_backend, on_shared_backends, stored_rows,
};

/// Incident 1: two processes (here two engines with separate pools) appending to the same
/// sessions at once used to collide on `UNIQUE(session_id, seq)`. With soloist no caller sees an
/// error and the database holds contiguous sequences with every acknowledged message once, at
/// its acknowledged sequence.
async fn sequence_race_across_processes(db: TestDb) {
    let engines = [
        db.engine().await.expect("engine"),
        db.engine().await.expect("engine"),
    ];
    let owner = "pod-user";
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let id = SessionId::new();
        engines[0]
            .session(owner, id)
            .create(None, None)
            .await
            .expect("create");
        sessions.push(id);
    }
    let history = History::new();
    let mut tasks = Vec::new();
    for (engine_index, engine) in engines.iter().enumerate() {
        for task in 0..16 {
            let engine = engine.clone();
            let sessions = sessions.clone();
            let client = history.client(format!("e{engine_index} t{task}"));
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for turn in 0..12 {
                    let session = sessions[(task + turn) % sessions.len()];
                    let id = Uuid::now_v7();
                    let sequences = client
                        .append(
                            &engine.session(owner, session),
                            vec![
                                NewMessage::user(format!("e{engine_index} t{task} #{turn}"))
                                    .with_id(id),
                            ],
                        )
                        .await
                        .expect("no error reaches the caller");
                    acked.push((session, sequences[0], id));
                }
                acked
            }));
        }
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    assert_eq!(acked.len(), 2 * 16 * 12);
    let mut conflicts = 0;
    for engine in &engines {
        conflicts += engine.stats().conflict_retries;
    }
    for &session in &sessions {
        let rows = stored_rows(&db.url, session).await.expect("rows");
        assert_contiguous(&rows);
        let stored: HashMap<Uuid, i64> = rows.iter().map(|&(seq, id)| (id, seq)).collect();
        let expected: Vec<_> = acked.iter().filter(|(s, _, _)| *s == session).collect();
        assert_eq!(
            rows.len(),
            expected.len(),
            "no message that was never acknowledged"
        );
        for (_, seq, id) in expected {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acked message at its acked sequence"
            );
        }
    }
    eprintln!(
        "incident 1: {} appends, {conflicts} conflicts resolved inside the engines",
        acked.len()
    );
    history.verify("incident 1", &db, &engines[0], owner).await;
    for engine in engines {
        engine.shutdown().await;
    }
}

/// Incident 2: a lock holder paused past its lease kept writing. soloist fences on the ownership
/// epoch (and the stored version) in the same statement as the write: a writer whose session
/// was taken over (here, engine A wrote the session, then engine B took it over and wrote) has
/// its write refused, reloads, and appends after B's messages; nothing of B's is overwritten or
/// reused. tests/fencing.rs pauses A mid-write past its lease.
async fn stale_writer_is_fenced(db: TestDb) {
    // A does not follow B's writes, so its copy is surely stale when it writes.
    let a = db
        .engine_with(EngineConfig {
            listen_for_changes: false,
            ..db.config()
        })
        .await
        .expect("engine");
    let b = db.engine().await.expect("engine");
    let history = History::new();
    let (a_client, b_client) = (history.client("a"), history.client("b"));
    let id = SessionId::new();
    a.session("u", id).create(None, None).await.expect("create");
    a_client
        .append(&a.session("u", id), vec![NewMessage::user("a0")])
        .await
        .expect("append");
    // B takes over while A still holds its copy of the session in memory.
    let b_ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
    let b_seqs = b_client
        .append(
            &b.session("u", id),
            b_ids
                .iter()
                .map(|&m| NewMessage::user("b").with_id(m))
                .collect(),
        )
        .await
        .expect("b appends");
    assert_eq!(b_seqs, vec![1, 2, 3, 4, 5]);
    // A wakes up and writes with its stale copy: refused by the fence, then reconciled.
    let fenced_before = a.stats().fenced;
    let a_seq = a_client
        .append(&a.session("u", id), vec![NewMessage::user("a1")])
        .await
        .expect("a appends");
    assert_eq!(a_seq, vec![6]);
    assert_eq!(
        a.stats().fenced - fenced_before,
        1,
        "A's stale write was refused once: B had taken the session over"
    );
    let rows = stored_rows(&db.url, id).await.expect("rows");
    assert_contiguous(&rows);
    for (seq, message) in b_seqs.iter().zip(&b_ids) {
        assert!(
            rows.contains(&(*seq, *message)),
            "B's message {seq} survived"
        );
    }
    history.verify("incident 2", &db, &a, "u").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Incident 3: one shared connection let one task's rollback erase another task's uncommitted
/// inserts. soloist's in-memory SQLite gives each flush its own connection and transaction:
/// with tasks whose appends are refused, abandoned midway (the caller goes away) or conflict,
/// every acknowledged message of every other task is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_memory_sqlite_keeps_every_acknowledged_write() {
    let db = TestDb::sqlite_memory();
    let engine = db
        .engine_with(EngineConfig {
            cached_messages: 0, // every read below comes from the database
            ..db.config()
        })
        .await
        .expect("engine");
    let mut sessions = Vec::new();
    for _ in 0..8 {
        let id = SessionId::new();
        engine
            .session("u", id)
            .create(None, None)
            .await
            .expect("create");
        sessions.push(id);
    }
    let history = History::new();
    let mut tasks = Vec::new();
    for task in 0..48usize {
        let engine = engine.clone();
        let session = sessions[task % sessions.len()];
        let client = history.client(format!("task {task}"));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for turn in 0..15usize {
                let handle = engine.session("u", session);
                match (task + turn) % 4 {
                    // Refused whole: the second message is invalid.
                    0 => {
                        let refused = client
                            .append(
                                &handle,
                                vec![
                                    NewMessage::user("valid"),
                                    NewMessage::new(Role::Tool, "missing tool_call_id"),
                                ],
                            )
                            .await;
                        assert!(matches!(refused, Err(Error::InvalidInput { .. })));
                    }
                    // Abandoned: the caller gives up after a moment.
                    1 => {
                        let append = client.append(&handle, vec![NewMessage::user("maybe")]);
                        let _ = tokio::time::timeout(Duration::from_micros(50), append).await;
                    }
                    _ => {
                        let id = Uuid::now_v7();
                        let sequences = client
                            .append(
                                &handle,
                                vec![NewMessage::user(format!("{task}/{turn}")).with_id(id)],
                            )
                            .await
                            .expect("append");
                        acked.push((session, sequences[0], id));
                    }
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    for &session in &sessions {
        let mut stored = HashMap::new();
        let mut after = None;
        let mut count = 0;
        loop {
            let page = engine
                .session("u", session)
                .get(after, Some(500))
                .await
                .expect("get");
            for message in &page.messages {
                assert_eq!(message.seq, count, "contiguous");
                count += 1;
                stored.insert(message.id, message.seq);
            }
            match page.next_after_seq {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        for (_, seq, id) in acked.iter().filter(|(s, _, _)| *s == session) {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "an acknowledged message vanished"
            );
        }
    }
    history.verify("incident 3", &db, &engine, "u").await;
    engine.shutdown().await;
}

/// Incident 4: a library kept "the current connection" on an object shared by all tasks, so
/// concurrent transactions failed or hung. 100 tasks appending and reading through one engine
/// all succeed.
async fn hundred_concurrent_tasks_all_succeed(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let id = SessionId::new();
        engine
            .session("u", id)
            .create(None, None)
            .await
            .expect("create");
        sessions.push(id);
    }
    let history = History::new();
    let mut tasks = Vec::new();
    for task in 0..100usize {
        let engine = engine.clone();
        let session = sessions[task % sessions.len()];
        let client = history.client(format!("task {task}"));
        tasks.push(tokio::spawn(async move {
            let handle = engine.session("u", session);
            for turn in 0..5 {
                let sequences = client
                    .append(&handle, vec![NewMessage::user(format!("{task}:{turn}"))])
                    .await?;
                let page = client.get(&handle, Some(sequences[0] - 1), Some(1)).await?;
                assert_eq!(page.messages[0].seq, sequences[0], "reads its own write");
            }
            Ok::<_, Error>(())
        }));
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(60), async {
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("task"));
        }
        outcomes
    })
    .await
    .expect("nothing hangs");
    let failures: Vec<_> = outcomes.into_iter().filter_map(Result::err).collect();
    assert!(failures.is_empty(), "failures: {failures:?}");
    for &session in &sessions {
        let page = engine
            .session("u", session)
            .get(None, Some(0))
            .await
            .expect("get");
        assert_eq!(page.session.message_count, 50);
    }
    history.verify("incident 4", &db, &engine, "u").await;
    engine.shutdown().await;
}

/// Incident 5: SELECT-then-INSERT upserts raced into integrity errors. Two engines creating
/// the same session, replacing its metadata and adding usage concurrently: no error, one
/// session, and usage totals equal to the sum of the deltas exactly.
async fn concurrent_upserts_and_deltas(db: TestDb) {
    let engines = [
        db.engine().await.expect("engine"),
        db.engine().await.expect("engine"),
    ];
    let id = SessionId::new();
    // Both engines create the same session at once: one creates, the other finds it.
    let (handle_a, handle_b) = (engines[0].session("u", id), engines[1].session("u", id));
    let (first, second) = tokio::join!(
        handle_a.create(Some("a".into()), None),
        handle_b.create(Some("b".into()), None),
    );
    let (first, second) = (first.expect("create a"), second.expect("create b"));
    assert_eq!(
        u32::from(first.created) + u32::from(second.created),
        1,
        "exactly one of the racing creates created the session"
    );
    let mut tasks = Vec::new();
    let mut expected = (0i64, 0i64);
    for task in 0..24u32 {
        let engine = engines[task as usize % 2].clone();
        let (prompt, completion) = (task * 7 + 1, task * 3 + 2);
        expected.0 += i64::from(prompt);
        expected.1 += i64::from(completion);
        tasks.push(tokio::spawn(async move {
            let handle = engine.session("u", id);
            handle.add_usage(prompt, completion).await?;
            handle
                .update(
                    Some(format!("title {task}")),
                    Some(json!({"writer": task}).into()),
                )
                .await?;
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await
            .expect("task")
            .expect("no error reaches the caller");
    }
    let page = engines[0]
        .get_session(soloist::GetSession {
            user_id: "u".into(),
            session_id: id,
            fresh: true,
            ..Default::default()
        })
        .await
        .expect("fresh read");
    assert_eq!(
        (
            page.session.usage.prompt_tokens,
            page.session.usage.completion_tokens
        ),
        expected,
        "usage totals are the exact sum of the deltas"
    );
    let writer = page.session.metadata.to_value()["writer"]
        .as_u64()
        .expect("metadata set");
    assert_eq!(
        page.session.title,
        Some(format!("title {writer}")),
        "last writer wins whole"
    );
    let listed = engines[1]
        .list_sessions(soloist::ListSessions {
            user_id: "u".into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.sessions.len(), 1);
    for engine in engines {
        engine.shutdown().await;
    }
}

on_shared_backends!(
    sequence_race_across_processes,
    stale_writer_is_fenced,
    concurrent_upserts_and_deltas,
);

mod every_backend {
    use super::*;
    on_every_backend!(hundred_concurrent_tasks_all_succeed);
    async fn hundred_concurrent_tasks_all_succeed(db: TestDb) {
        super::hundred_concurrent_tasks_all_succeed(db).await
    }
}

/// Freshness across processes (PostgreSQL LISTEN/NOTIFY): when engine B writes a session that
/// engine A also holds, A catches up by itself — its plain (not `fresh`) reads and its
/// subscribers see B's messages — without a read-time version check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_processes_writes_reach_live_sessions_and_subscribers() {
    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        return;
    };
    let a = db.engine().await.expect("engine");
    let b = db.engine().await.expect("engine");
    let history = History::new();
    let (a_client, b_client) = (history.client("a"), history.client("b"));
    let subscriber = history.client("a's subscriber");
    let id = SessionId::new();
    a.session("u", id).create(None, None).await.expect("create");
    a_client
        .append(&a.session("u", id), vec![NewMessage::user("from a")])
        .await
        .expect("append");
    let mut stream = a.session("u", id).subscribe(None).await.expect("subscribe");
    let first = subscriber.next(&mut stream).await.expect("backlog");
    assert_eq!(first.seq, 0);
    let b_seqs = b_client
        .append(
            &b.session("u", id),
            (0..3)
                .map(|i| NewMessage::user(format!("from b {i}")))
                .collect(),
        )
        .await
        .expect("b appends");
    assert_eq!(b_seqs, vec![1, 2, 3]);
    // A's subscriber sees B's messages, in order.
    for expected in 1..=3 {
        let message = tokio::time::timeout(Duration::from_secs(10), subscriber.next(&mut stream))
            .await
            .expect("B's message reaches A's subscriber")
            .expect("stream");
        assert_eq!(message.seq, expected);
        assert_eq!(
            message.text(),
            Some(format!("from b {}", expected - 1).as_str())
        );
    }
    // And A's ordinary read is current.
    let page = a_client
        .get(&a.session("u", id), None, None)
        .await
        .expect("read");
    assert_eq!(page.session.message_count, 4);
    history
        .verify("cross-process freshness", &db, &a, "u")
        .await;
    a.shutdown().await;
    b.shutdown().await;
}
