//! Each guarantee listed in docs/guarantees.md, on every backend (SQLite file, SQLite in memory,
//! PostgreSQL).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;
use soloist::uuid::Uuid;
use soloist::{
    AppendMessages, Engine, EngineConfig, Error, GetSession, NewMessage, Role, SessionHandle,
    SessionId,
};
use soloist_testkit::history::History;
use soloist_testkit::{TestDb, assert_contiguous, on_every_backend, stored_rows};

/// Every message of a session, page by page (the first pages come from the database when the
/// session is longer than the cached tail).
async fn read_all(session: &SessionHandle) -> Vec<Arc<soloist::Message>> {
    let mut messages = Vec::new();
    let mut after = None;
    loop {
        let page = session.get(after, Some(300)).await.expect("get");
        messages.extend(page.messages);
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => return messages,
        }
    }
}

async fn new_session(engine: &Engine, user: &str) -> SessionHandle {
    let session = engine.session(user, SessionId::new());
    let created = session
        .create(Some("test".into()), None)
        .await
        .expect("create");
    assert!(created.created);
    session
}

/// Guarantee 1: whatever the number of concurrent writers, sequences are 0..n-1.
async fn order_is_contiguous_under_concurrency(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let writers = 32;
    let per_writer = 20;
    let history = History::new();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let session = session.clone();
        let client = history.client(format!("writer {writer}"));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for turn in 0..per_writer {
                let id = Uuid::now_v7();
                let messages = vec![
                    NewMessage::user(format!("w{writer} t{turn} a")).with_id(id),
                    NewMessage::assistant(format!("w{writer} t{turn} b")),
                ];
                let sequences = client.append(&session, messages).await.expect("append");
                assert_eq!(sequences.len(), 2);
                assert_eq!(sequences[1], sequences[0] + 1, "one append is contiguous");
                acked.push((sequences[0], id));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    let total = writers * per_writer * 2;
    let messages = read_all(&session).await;
    assert_eq!(messages.len(), total);
    let in_order = messages
        .iter()
        .enumerate()
        .all(|(index, m)| m.seq == index as i64);
    assert!(in_order, "sequences are 0..n-1 in order");
    let by_seq: HashMap<i64, Uuid> = messages.iter().map(|m| (m.seq, m.id)).collect();
    for (seq, id) in &acked {
        assert_eq!(
            by_seq.get(seq),
            Some(id),
            "acked message at its acked sequence"
        );
    }
    if db.shareable() {
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_eq!(rows.len(), writers * per_writer * 2);
        assert_contiguous(&rows);
    }
    let stats = engine.stats();
    assert!(
        stats.flushed_sessions < (writers * per_writer) as u64,
        "group commit: {} flushes for {} appends",
        stats.flushed_sessions,
        writers * per_writer
    );
    history.verify("order", &db, &engine, "u").await;
    engine.shutdown().await;
}

/// Guarantee 2: an acknowledged append is in the database, visible to a second engine with
/// its own connections (or, in memory, after the session's actor was passivated and reloaded).
async fn acknowledged_appends_are_durable(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let mut acked = Vec::new();
    for turn in 0..25 {
        let id = Uuid::now_v7();
        let sequences = session
            .append(vec![NewMessage::user(format!("turn {turn}")).with_id(id)])
            .await
            .expect("append");
        acked.push((sequences[0], id));
    }
    if db.shareable() {
        // Read straight from the database, with no shutdown (nothing left to flush later).
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_eq!(rows, acked);
        let other = db.engine().await.expect("engine");
        let page = other
            .session("u", session.id())
            .get(None, None)
            .await
            .expect("read through a second engine");
        assert_eq!(page.messages.len(), 25);
        other.shutdown().await;
    } else {
        // Tiny cache and a reload: the messages come back from the database.
        let page = session.get(Some(-1), Some(100)).await.expect("get");
        assert_eq!(page.messages.len(), 25);
    }
    engine.shutdown().await;
}

/// Guarantee 3: re-sending a message id returns its original sequence, never a second row.
async fn resending_a_message_id_is_idempotent(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let history = History::new();
    let client = history.client("main");
    let first = Uuid::now_v7();
    let second = Uuid::now_v7();
    let sequences = client
        .append(
            &session,
            vec![
                NewMessage::user("one").with_id(first),
                NewMessage::assistant("two").with_id(second),
            ],
        )
        .await
        .expect("append");
    assert_eq!(sequences, vec![0, 1]);

    // The same ids again, mixed with a new one: old ones keep their sequences.
    let third = Uuid::now_v7();
    let again = client
        .append(
            &session,
            vec![
                NewMessage::user("one").with_id(first),
                NewMessage::user("three").with_id(third),
                NewMessage::assistant("two").with_id(second),
            ],
        )
        .await
        .expect("resend");
    assert_eq!(again, vec![0, 2, 1]);

    // Many tasks racing to send the same id: one row, one sequence.
    let racing = Uuid::now_v7();
    let mut tasks = Vec::new();
    for racer in 0..16 {
        let session = session.clone();
        let client = history.client(format!("racer {racer}"));
        tasks.push(tokio::spawn(async move {
            client
                .append(
                    &session,
                    vec![NewMessage::user("retry storm").with_id(racing)],
                )
                .await
                .expect("append")[0]
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        seen.insert(task.await.expect("task"));
    }
    assert_eq!(seen, HashSet::from([3]));

    // After the actor is gone (a new engine, or a cache that no longer holds the id), the
    // database's unique constraint answers, and the engine still returns the original sequence.
    let config = EngineConfig {
        cached_messages: 1,
        ..db.config()
    };
    let engine_b = if db.shareable() {
        Some(db.engine_with(config).await.expect("engine"))
    } else {
        None
    };
    if let Some(engine_b) = &engine_b {
        let resent = history
            .client("engine b")
            .append(
                &engine_b.session("u", session.id()),
                vec![NewMessage::user("one").with_id(first)],
            )
            .await
            .expect("resend through another engine");
        assert_eq!(resent, vec![0]);
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_eq!(rows.len(), 4);
        assert_contiguous(&rows);
    }
    let page = client.get(&session, None, None).await.expect("get");
    assert_eq!(page.messages.len(), 4);
    history.verify("idempotent resend", &db, &engine, "u").await;
    if let Some(engine_b) = engine_b {
        engine_b.shutdown().await;
    }
    engine.shutdown().await;
}

/// Guarantee 4: a caller reads its own acknowledged writes; with `fresh`, a read through one
/// engine sees what was written through another.
async fn reads_see_acknowledged_writes(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let history = History::new();
    let (a, b) = (history.client("a"), history.client("b"));
    a.append(&session, vec![NewMessage::user("hello")])
        .await
        .expect("append");
    let page = a.get(&session, None, None).await.expect("get");
    assert_eq!(page.messages[0].text(), Some("hello"));
    if !db.shareable() {
        engine.shutdown().await;
        return;
    }
    let other = db.engine().await.expect("engine");
    let through_other = other.session("u", session.id());
    // Load the session into the second engine's memory first...
    let before = b.get(&through_other, None, None).await.expect("get");
    assert_eq!(before.messages.len(), 1);
    // ...then write through the first engine.
    a.append(&session, vec![NewMessage::assistant("world")])
        .await
        .expect("append");
    let fresh_read = GetSession {
        user_id: "u".into(),
        session_id: session.id(),
        fresh: true,
        ..GetSession::default()
    };
    let fresh = b.get_session(&other, fresh_read).await.expect("fresh read");
    assert_eq!(
        fresh.messages.len(),
        2,
        "a fresh read is never older than the last ack"
    );
    assert_eq!(
        fresh.session.version,
        a.get(&session, None, None)
            .await
            .expect("get")
            .session
            .version
    );
    // And the second engine can keep writing: it reloads on conflict instead of failing.
    let sequences = b
        .append(&through_other, vec![NewMessage::user("from b")])
        .await
        .expect("append through b");
    assert_eq!(sequences, vec![2]);
    let stale_engine_write = a
        .append(&session, vec![NewMessage::user("from a again")])
        .await
        .expect("append through a after b wrote");
    assert_eq!(stale_engine_write, vec![3]);
    assert_contiguous(&stored_rows(&db.url, session.id()).await.expect("rows"));
    history.verify("read your writes", &db, &engine, "u").await;
    other.shutdown().await;
    engine.shutdown().await;
}

/// Guarantee 5: every command gets exactly one reply, whether it succeeds or not.
async fn every_command_gets_one_reply(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let sessions: Vec<SessionHandle> = {
        let mut sessions = Vec::new();
        for _ in 0..4 {
            sessions.push(new_session(&engine, "owner").await);
        }
        sessions
    };
    let history = History::new();
    let mut tasks = Vec::new();
    for task in 0..40 {
        let engine = engine.clone();
        let session_id = sessions[task % sessions.len()].id();
        let client = history.client(format!("task {task}"));
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut refused = 0;
            for turn in 0..10 {
                // Every third command comes from the wrong user, every fifth is invalid.
                let user = if turn % 3 == 0 { "intruder" } else { "owner" };
                let role_message = if turn % 5 == 0 {
                    NewMessage {
                        role: Role::Tool,
                        content: Some("no tool_call_id".into()),
                        ..NewMessage::default()
                    }
                } else {
                    NewMessage::user("fine")
                };
                let command = AppendMessages {
                    user_id: user.into(),
                    session_id,
                    messages: vec![role_message],
                    if_version: None,
                    on_busy: Default::default(),
                };
                let result = client.append_command(&engine, command).await;
                match result {
                    Ok(_) => ok += 1,
                    Err(Error::NotFound | Error::InvalidInput { .. }) => refused += 1,
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for task in tasks {
        let (o, r) = task.await.expect("task");
        ok += o;
        refused += r;
    }
    assert_eq!(ok + refused, 400, "one reply per command");
    let mut stored = 0;
    for session in &sessions {
        stored += read_all(session).await.len();
    }
    assert_eq!(stored, ok, "exactly the acknowledged appends are stored");
    history.verify("one reply", &db, &engine, "owner").await;
    engine.shutdown().await;
}

/// Guarantee 6: each flush has its own connection and transaction; a failed or conflicting
/// session in a combined transaction does not take the others' writes with it.
async fn a_conflicting_session_does_not_fail_the_others(db: TestDb) {
    if !db.shareable() {
        return;
    }
    // This engine does not follow the other's writes, so its copy of A is surely stale.
    let engine = db
        .engine_with(EngineConfig {
            listen_for_changes: false,
            ..db.config()
        })
        .await
        .expect("engine");
    let a = new_session(&engine, "u").await;
    let b = new_session(&engine, "u").await;
    let c = new_session(&engine, "u").await;
    let history = History::new();
    let (client, other_client) = (history.client("engine"), history.client("other"));
    for session in [&a, &b, &c] {
        client
            .append(session, vec![NewMessage::user("first")])
            .await
            .expect("append");
    }
    // Another writer (a second engine) advances A behind the first engine's back.
    let other = db.engine().await.expect("engine");
    other_client
        .append(
            &other.session("u", a.id()),
            vec![NewMessage::user("planted")],
        )
        .await
        .expect("planted write");
    let before = engine.stats();
    let (ra, rb, rc) = tokio::join!(
        client.append(&a, vec![NewMessage::user("a2")]),
        client.append(&b, vec![NewMessage::user("b2")]),
        client.append(&c, vec![NewMessage::user("c2")]),
    );
    assert_eq!(ra.expect("a reconciles"), vec![2]);
    assert_eq!(rb.expect("b"), vec![1]);
    assert_eq!(rc.expect("c"), vec![1]);
    let after = engine.stats();
    assert_eq!(
        after.conflict_retries - before.conflict_retries,
        1,
        "only A reconciled"
    );
    for session in [&a, &b, &c] {
        assert_contiguous(&stored_rows(&db.url, session.id()).await.expect("rows"));
    }
    history.verify("isolation", &db, &engine, "u").await;
    other.shutdown().await;
    engine.shutdown().await;
}

/// Guarantee 8: bad input gets a typed error and leaves the session unchanged.
async fn bad_input_is_refused_and_changes_nothing(db: TestDb) {
    let config = EngineConfig {
        limits: soloist::Limits {
            max_content_bytes: 100,
            max_messages_per_append: 3,
            ..soloist::Limits::default()
        },
        hide_foreign_sessions: false,
        ..db.config()
    };
    let engine = db.engine_with(config).await.expect("engine");
    let session = new_session(&engine, "owner").await;
    session
        .append(vec![NewMessage::user("ok")])
        .await
        .expect("append");
    let before = session.get(None, None).await.expect("get");

    let too_long = session
        .append(vec![
            NewMessage::user("fine"),
            NewMessage::user("x".repeat(101)),
        ])
        .await;
    assert!(
        matches!(&too_long, Err(Error::TooLarge { field, size: 101, limit: 100 }) if field == "messages[1].content"),
        "{too_long:?}"
    );
    let too_many = session
        .append((0..4).map(|i| NewMessage::user(i.to_string())).collect())
        .await;
    assert!(
        matches!(
            too_many,
            Err(Error::TooLarge {
                size: 4,
                limit: 3,
                ..
            })
        ),
        "{too_many:?}"
    );
    assert!(matches!(
        session.append(vec![]).await,
        Err(Error::InvalidInput { .. })
    ));
    let tool_without_id = session
        .append(vec![NewMessage::new(Role::Tool, "result")])
        .await;
    assert!(
        matches!(&tool_without_id, Err(Error::InvalidInput { field, .. }) if field == "messages[0].tool_call_id")
    );
    let bad_tool_calls = session
        .append(vec![NewMessage {
            role: Role::Assistant,
            tool_calls: Some(json!({"not": "an array"}).into()),
            ..NewMessage::default()
        }])
        .await;
    assert!(matches!(bad_tool_calls, Err(Error::InvalidInput { .. })));
    let unknown_role = soloist::Command::from_json(
        r#"{"append_messages":{"user_id":"owner","session_id":"00000000-0000-7000-8000-000000000001","messages":[{"role":"wizard","content":"hi"}]}}"#,
    );
    assert!(matches!(unknown_role, Err(Error::InvalidInput { .. })));
    let nul_in_name = session
        .append(vec![NewMessage {
            name: Some("a\0b".into()),
            ..NewMessage::user("hi")
        }])
        .await;
    assert!(
        matches!(&nul_in_name, Err(Error::InvalidInput { field, .. }) if field == "messages[0].name"),
        "{nul_in_name:?}"
    );
    let nul_in_title = session.update(Some("a\0b".into()), None).await;
    assert!(
        matches!(nul_in_title, Err(Error::InvalidInput { .. })),
        "{nul_in_title:?}"
    );
    let bad_metadata = session.update(None, Some(json!([1, 2]).into())).await;
    assert!(matches!(bad_metadata, Err(Error::InvalidInput { .. })));

    let intruder = engine.session("intruder", session.id());
    assert!(matches!(
        intruder.append(vec![NewMessage::user("hi")]).await,
        Err(Error::Forbidden)
    ));
    assert!(matches!(
        intruder.get(None, None).await,
        Err(Error::Forbidden)
    ));
    assert!(matches!(intruder.delete().await, Err(Error::Forbidden)));
    assert!(matches!(
        intruder.add_usage(1, 1).await,
        Err(Error::Forbidden)
    ));
    let unknown = engine.session("owner", SessionId::new());
    assert!(matches!(
        unknown.append(vec![NewMessage::user("hi")]).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        engine.session("", session.id()).get(None, None).await,
        Err(Error::InvalidInput { .. })
    ));

    let after = session.get(None, None).await.expect("get");
    assert_eq!(before, after, "refused commands changed nothing");
    engine.shutdown().await;
}

/// By default a foreign session answers exactly like a missing one.
async fn foreign_sessions_look_missing_by_default(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "owner").await;
    let intruder = engine.session("intruder", session.id());
    assert!(matches!(
        intruder.get(None, None).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        intruder.append(vec![NewMessage::user("hi")]).await,
        Err(Error::NotFound)
    ));
    let taken = intruder.create(None, None).await;
    assert!(matches!(taken, Err(Error::SessionIdTaken)), "{taken:?}");
    // A deleted session of another user looks the same as a live one: missing to reads and
    // writes, and the same answer to a create of its id.
    let deleted = new_session(&engine, "owner").await;
    deleted.delete().await.expect("delete");
    let intruder_on_deleted = engine.session("intruder", deleted.id());
    assert!(matches!(
        intruder_on_deleted.get(None, None).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        intruder_on_deleted
            .append(vec![NewMessage::user("hi")])
            .await,
        Err(Error::NotFound)
    ));
    let taken_deleted = intruder_on_deleted.create(None, None).await;
    assert_eq!(
        format!("{taken_deleted:?}"),
        format!("{taken:?}"),
        "create of a foreign id: the same answer, deleted or not"
    );
    engine.shutdown().await;
}

/// Metadata, usage and the session list.
async fn metadata_usage_and_listing(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "lister").await;
    let updated = session
        .update(
            Some("renamed".into()),
            Some(json!({"model": "gpt", "n": 1}).into()),
        )
        .await
        .expect("update");
    assert_eq!(updated.title.as_deref(), Some("renamed"));
    let usage = session.add_usage(10, 5).await.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (10, 5));
    let usage = session.add_usage(1, 2).await.expect("usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (11, 7));
    let mut ids = vec![session.id()];
    for _ in 0..4 {
        ids.push(new_session(&engine, "lister").await.id());
    }
    let listed = engine
        .list_sessions(soloist::ListSessions {
            user_id: "lister".into(),
            limit: Some(3),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.sessions.len(), 3);
    let rest = engine
        .list_sessions(soloist::ListSessions {
            user_id: "lister".into(),
            limit: Some(3),
            before: listed.next_before,
        })
        .await
        .expect("list");
    assert_eq!(rest.sessions.len(), 2);
    assert!(rest.next_before.is_none());
    let listed_ids: Vec<SessionId> = listed
        .sessions
        .iter()
        .chain(&rest.sessions)
        .map(|s| s.id)
        .collect();
    ids.reverse();
    assert_eq!(listed_ids, ids, "newest first, no overlap between pages");
    let stored = listed_ids
        .iter()
        .position(|id| *id == session.id())
        .expect("listed");
    let listed_session = &listed
        .sessions
        .iter()
        .chain(&rest.sessions)
        .nth(stored)
        .expect("session")
        .clone();
    assert_eq!(listed_session.usage.prompt_tokens, 11);
    assert_eq!(listed_session.metadata, json!({"model": "gpt", "n": 1}));
    // Other users see none of them.
    let foreign = engine
        .list_sessions(soloist::ListSessions {
            user_id: "someone else".into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(foreign.sessions.is_empty());
    engine.shutdown().await;
}

/// Content and metadata round-trip exactly, including quotes, NUL and unusual Unicode.
async fn content_round_trips_exactly(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let tricky = "quote \" backslash \\ nul \u{0} emoji 🦀 rtl \u{202e} zero-width \u{200b} 中文";
    let tool_calls = json!([{"id": "call_1", "type": "function",
        "function": {"name": "lookup", "arguments": "{\"q\": \"a\\u0000b\"}"}}]);
    session
        .append(vec![
            NewMessage::user(tricky),
            NewMessage {
                role: Role::Assistant,
                tool_calls: Some(tool_calls.clone().into()),
                ..NewMessage::default()
            },
        ])
        .await
        .expect("append");
    session
        .update(None, Some(json!({"k": tricky}).into()))
        .await
        .expect("update");
    let check = |page: soloist::SessionPage| {
        assert_eq!(page.messages[0].text(), Some(tricky));
        assert_eq!(
            page.messages[1]
                .tool_calls
                .as_ref()
                .map(|json| json.to_value()),
            Some(tool_calls.clone())
        );
        assert_eq!(page.session.metadata, json!({"k": tricky}));
    };
    check(session.get(None, None).await.expect("get"));
    if db.shareable() {
        let other = db.engine().await.expect("engine");
        check(
            other
                .session("u", session.id())
                .get(None, None)
                .await
                .expect("get"),
        );
        other.shutdown().await;
    }
    engine.shutdown().await;
}

/// A command sent during shutdown is refused, and everything accepted before was written.
async fn shutdown_drains_and_refuses(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = new_session(&engine, "u").await;
    let engine_for_tasks = engine.clone();
    let history = History::new();
    let mut tasks = Vec::new();
    for writer in 0..16 {
        let session = session.clone();
        let client = history.client(format!("writer {writer}"));
        tasks.push(tokio::spawn(async move {
            let mut acked = 0;
            for turn in 0..50 {
                let message = NewMessage::user(format!("{writer}/{turn}"));
                match client.append(&session, vec![message]).await {
                    Ok(_) => acked += 1,
                    Err(Error::ShuttingDown) => break,
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            acked
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    engine_for_tasks.shutdown().await;
    let mut acked = 0;
    for task in tasks {
        acked += task.await.expect("task");
    }
    assert!(matches!(
        history
            .client("late")
            .append(&session, vec![NewMessage::user("late")])
            .await,
        Err(Error::ShuttingDown)
    ));
    if db.shareable() {
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_eq!(
            rows.len(),
            acked,
            "every acknowledged append and nothing else"
        );
        assert_contiguous(&rows);
    }
    // In memory, the final rows went with the engine: the history is checked on its own.
    history.verify("shutdown", &db, &engine, "u").await;
}

on_every_backend!(
    order_is_contiguous_under_concurrency,
    acknowledged_appends_are_durable,
    resending_a_message_id_is_idempotent,
    reads_see_acknowledged_writes,
    every_command_gets_one_reply,
    a_conflicting_session_does_not_fail_the_others,
    bad_input_is_refused_and_changes_nothing,
    foreign_sessions_look_missing_by_default,
    metadata_usage_and_listing,
    content_round_trips_exactly,
    shutdown_drains_and_refuses,
);
