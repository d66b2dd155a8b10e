//! What one command may add and take, on every backend: token counts bounded per command and
//! in total (a sum past the bound is refused and changes nothing; a counter a release before
//! the bounds stored out of range still reads, lists and erases), and the ids of keyed
//! creates, which no other user can compute or import under.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use soloist::{
    CreateSession, DeleteSession, EngineConfig, Error, FinishMessage, ImportSession, ListSessions,
    MAX_USAGE_DELTA, MAX_USAGE_TOTAL, MessageStatus, NewMessage, SessionId, Usage,
};
use soloist_testkit::{
    TestDb, created_session, on_every_backend, on_shared_backends, passivated, run_sql, stored_rows,
};
use uuid::Uuid;

fn usage(prompt_tokens: i64, completion_tokens: i64) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
    }
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: soloist::Result<T>, field: &str) {
    match result {
        Err(Error::InvalidInput { field: refused, .. }) => assert_eq!(refused, field),
        other => panic!("expected invalid {field}, got {other:?}"),
    }
}

/// A finish, an import and `add_usage` cannot take a counter past its bound, however their
/// numbers add up; a refused one changes nothing (the draft stays in progress).
async fn usage_is_bounded_per_command_and_in_total(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let (draft, _) = session
        .start_message(NewMessage::assistant("Hi"))
        .await
        .expect("start");
    let finish = |usage: Usage| FinishMessage {
        user_id: "alice".into(),
        session_id: session.id(),
        message_id: draft,
        status: MessageStatus::Completed,
        tool_calls: None,
        refusal: None,
        usage: Some(usage),
    };
    assert_invalid(
        engine
            .finish_message(finish(usage(MAX_USAGE_DELTA + 1, 0)))
            .await,
        "usage.prompt_tokens",
    );
    assert_invalid(
        engine.finish_message(finish(usage(0, i64::MAX))).await,
        "usage.completion_tokens",
    );
    assert_invalid(
        engine.finish_message(finish(usage(-1, 0))).await,
        "usage.prompt_tokens",
    );
    let page = session.get(None, None).await.expect("get");
    assert_eq!(page.messages[0].status, MessageStatus::InProgress);
    assert_eq!(page.session.usage, usage(0, 0));

    // An import brings totals: at most the total bound.
    let import = |usage: Usage| ImportSession {
        user_id: "alice".into(),
        session_id: SessionId::new(),
        usage,
        ..ImportSession::default()
    };
    assert_invalid(
        engine
            .import_session(import(usage(MAX_USAGE_TOTAL + 1, 0)))
            .await,
        "usage.prompt_tokens",
    );
    let near = engine
        .import_session(import(usage(MAX_USAGE_TOTAL - 5, 1)))
        .await
        .expect("an import at the bound");
    let near = engine.session("alice", near.session.id);
    assert_invalid(near.add_usage(6, 0).await, "usage.prompt_tokens");
    assert_eq!(
        near.add_usage(5, 2).await.ok(),
        Some(usage(MAX_USAGE_TOTAL, 3)),
        "up to the bound exactly"
    );
    assert_invalid(near.add_usage(1, 0).await, "usage.prompt_tokens");
    passivated(&engine, near.id()).await;
    let stored = near.get(None, None).await.expect("get");
    assert_eq!(stored.session.usage, usage(MAX_USAGE_TOTAL, 3));

    // Within the bounds, the finish goes through with its usage.
    let finished = engine
        .finish_message(finish(usage(MAX_USAGE_DELTA, 1)))
        .await
        .expect("finish");
    assert_eq!(finished.message.status, MessageStatus::Completed);
    let page = session.get(None, None).await.expect("get");
    assert_eq!(page.session.usage, usage(MAX_USAGE_DELTA, 1));
    engine.shutdown().await;
}

/// A counter that an earlier release let SQLite store as a REAL (an overflowed sum) reads as
/// the largest integer: the session, its owner's list and its erase all still work.
async fn a_counter_stored_out_of_range_still_reads_lists_and_erases(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    session.add_usage(1, 1).await.expect("usage");
    engine.shutdown().await;
    {
        use sqlx::Connection;
        let mut connection = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("connect");
        sqlx::query("UPDATE sessions SET prompt_tokens = 1.8e19 WHERE id = ?")
            .bind(session.id())
            .execute(&mut connection)
            .await
            .expect("poison");
    }
    let engine = db.engine().await.expect("engine");
    let handle = engine.session("alice", session.id());
    let page = handle.get(None, None).await.expect("the session reads");
    assert_eq!(page.session.usage, usage(i64::MAX, 1));
    assert_invalid(handle.add_usage(1, 0).await, "usage.prompt_tokens");
    let list = engine
        .list_sessions(ListSessions {
            user_id: "alice".into(),
            ..ListSessions::default()
        })
        .await
        .expect("the list reads");
    assert_eq!(list.sessions.len(), 1);
    engine
        .delete_session(DeleteSession {
            user_id: "alice".into(),
            session_id: session.id(),
            erase: true,
            ..DeleteSession::default()
        })
        .await
        .expect("the erase goes through");
    engine.shutdown().await;
}

/// The id a keyed create got before ids were derived with the server's secret: anyone could
/// compute it from the user and the key.
fn guessable_keyed_id(user: &str, key: &str) -> SessionId {
    let mut hash = Sha256::new();
    hash.update(b"soloist create\0");
    hash.update(user.as_bytes());
    hash.update(b"\0");
    hash.update(key.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    SessionId::from_uuid(Uuid::new_v8(bytes))
}

/// Bob cannot take the id alice's keyed create will get: it is not computable from the user
/// and the key, and an import may only create a keyed create's id (a UUIDv8) that the server
/// issued to the importer. Alice may import into hers.
async fn no_one_imports_under_another_user_s_keyed_id(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let guessed = guessable_keyed_id("alice", "new-chat-1");
    assert_invalid(
        engine
            .import_session(ImportSession {
                user_id: "bob".into(),
                session_id: guessed,
                ..ImportSession::default()
            })
            .await,
        "session_id",
    );
    let keyed = |user: &str| CreateSession {
        user_id: user.into(),
        idempotency_key: Some("new-chat-1".into()),
        ..CreateSession::default()
    };
    let created = engine.create_session(keyed("alice")).await.expect("create");
    assert!(created.created);
    let id = created.session.id;
    assert_ne!(id, guessed, "the id depends on the server's secret");
    assert_eq!(id.as_uuid().get_version_num(), 8);
    let again = engine.create_session(keyed("alice")).await.expect("retry");
    assert_eq!(again.session.id, id, "a retry reaches the same session");
    // The same key of another user's: another id, and bob cannot import under alice's.
    let bobs = engine.create_session(keyed("bob")).await.expect("create");
    assert_ne!(bobs.session.id, id);
    assert_invalid(
        engine
            .import_session(ImportSession {
                user_id: "bob".into(),
                session_id: id,
                ..ImportSession::default()
            })
            .await,
        "session_id",
    );
    // Alice's own keyed id passes the check: her import is a repeat into her session.
    let imported = engine
        .import_session(ImportSession {
            user_id: "alice".into(),
            session_id: id,
            ..ImportSession::default()
        })
        .await
        .expect("alice's import into her session");
    assert!(!imported.created);
    engine.shutdown().await;
}

/// The database refuses one session's row (a trigger stands for any value it cannot store)
/// in a flush it shares with fifteen other sessions: only that session's command fails, at
/// once and once, as a command that cannot succeed (`invalid_input`, not a retryable storage
/// error); the other fifteen commit, in the same round of the writer.
async fn a_refused_row_fails_only_its_own_command(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            max_sessions_per_flush: 64,
            ..db.config()
        })
        .await
        .expect("engine");
    let refuse: &[&str] = if db.url.starts_with("postgres") {
        &[
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'refused' USING ERRCODE = '22003'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON messages FOR EACH ROW \
             WHEN (NEW.name = 'poison') EXECUTE FUNCTION refuse_poison()",
        ]
    } else {
        &[
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON messages WHEN NEW.name = 'poison' \
           BEGIN SELECT RAISE(ABORT, 'refused'); END",
        ]
    };
    run_sql(&db.url, refuse).await.expect("trigger");
    let mut sessions = Vec::new();
    for _ in 0..16 {
        sessions.push(created_session(&engine).await);
    }
    let paused = engine.pause_writes().await;
    let appends: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(index, session)| {
            let session = session.clone();
            tokio::spawn(async move {
                let mut message = NewMessage::user(format!("message {index}"));
                if index == 5 {
                    message.name = Some("poison".into());
                }
                session.append(vec![message]).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = Instant::now();
    drop(paused);
    for (index, append) in appends.into_iter().enumerate() {
        let appended = append.await.expect("append");
        if index == 5 {
            assert!(
                matches!(&appended, Err(Error::InvalidInput { field, .. }) if field == "command"),
                "{appended:?}"
            );
        } else {
            assert_eq!(appended.ok(), Some(vec![0]), "session {index}");
        }
    }
    let took = released.elapsed();
    eprintln!("16 sessions, one refused: answered in {took:?}");
    // The refused one is not retried (each retry would back off for longer).
    assert!(took < Duration::from_secs(2), "{took:?}");
    for (index, session) in sessions.iter().enumerate() {
        let stored = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_eq!(stored.len(), usize::from(index != 5), "session {index}");
    }
    engine.shutdown().await;
}

mod shared {
    use super::*;

    on_shared_backends!(a_refused_row_fails_only_its_own_command);
}

/// A user's sessions are bounded: past `max_sessions_per_user`, a new session (created or
/// imported) is `QuotaExceeded`; a keyed create's retry and a repeated import still answer;
/// a deleted session makes room.
async fn a_user_s_sessions_are_bounded(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            max_sessions_per_user: Some(2),
            ..db.config()
        })
        .await
        .expect("engine");
    let create = |key: Option<&str>| CreateSession {
        user_id: "alice".into(),
        idempotency_key: key.map(Into::into),
        ..CreateSession::default()
    };
    let keyed = engine
        .create_session(create(Some("chat-1")))
        .await
        .expect("1");
    let plain = engine.create_session(create(None)).await.expect("2");
    assert!(matches!(
        engine.create_session(create(None)).await,
        Err(Error::QuotaExceeded { limit: 2 })
    ));
    let import = |session_id| ImportSession {
        user_id: "alice".into(),
        session_id,
        ..ImportSession::default()
    };
    assert!(matches!(
        engine.import_session(import(SessionId::new())).await,
        Err(Error::QuotaExceeded { limit: 2 })
    ));
    let retried = engine.create_session(create(Some("chat-1"))).await;
    assert_eq!(retried.expect("a retry").session.id, keyed.session.id);
    let repeated = engine.import_session(import(plain.session.id)).await;
    assert!(!repeated.expect("a repeat").created);
    engine
        .create_session(CreateSession {
            user_id: "bob".into(),
            ..CreateSession::default()
        })
        .await
        .expect("bob's own");
    engine
        .delete_session(DeleteSession {
            user_id: "alice".into(),
            session_id: plain.session.id,
            ..DeleteSession::default()
        })
        .await
        .expect("delete");
    engine
        .create_session(create(None))
        .await
        .expect("room again");
    engine.shutdown().await;
}

on_every_backend!(
    a_user_s_sessions_are_bounded,
    usage_is_bounded_per_command_and_in_total,
    no_one_imports_under_another_user_s_keyed_id,
);

mod sqlite_file_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_counter_stored_out_of_range_still_reads_lists_and_erases() {
        let db = soloist_testkit::TestDb::sqlite_file().expect("a database");
        super::a_counter_stored_out_of_range_still_reads_lists_and_erases(db).await;
    }
}
