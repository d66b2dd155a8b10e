//! Exact retries and conditional writes, on every backend: idempotency keys on the commands
//! that carry no message ids, message ids that come back with other content, commands
//! conditional on the session's version, and reads that must leave nothing behind.

use std::time::Duration;

use soloist::SessionId;
use soloist::uuid::Uuid;
use soloist::{
    AddUsage, CreateSession, DeleteSession, EngineConfig, Error, ListSessions, NewMessage,
    SessionHandle, UpdateSession,
};
use soloist_testkit::{TestDb, created_session, on_every_backend, on_shared_backends, passivated};

fn usage(session: &SessionHandle, key: &str, prompt: u32) -> AddUsage {
    AddUsage {
        user_id: "alice".into(),
        session_id: session.id(),
        prompt_tokens: prompt,
        completion_tokens: 1,
        idempotency_key: Some(key.into()),
    }
}

async fn a_keyed_usage_applies_once(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let first = engine
        .add_usage(usage(&session, "k1", 5))
        .await
        .expect("first");
    let replay = engine
        .add_usage(usage(&session, "k1", 5))
        .await
        .expect("replay");
    assert_eq!(replay, first, "a replay answers the first answer");

    // 32 concurrent sends of one new key: many share a batch, the rest find the record.
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let engine = engine.clone();
            let command = usage(&session, "k2", 7);
            tokio::spawn(async move { engine.add_usage(command).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task").expect("keyed usage"));
    }
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );

    // The same key with another body is refused and changes nothing.
    assert!(matches!(
        engine.add_usage(usage(&session, "k1", 6)).await,
        Err(Error::IdempotencyKeyReused)
    ));
    let stored = session.get(None, Some(0)).await.expect("get").session;
    assert_eq!(
        (stored.usage.prompt_tokens, stored.usage.completion_tokens),
        (12, 2)
    );

    // The record outlives the actor: a fresh activation reads it from the database.
    passivated(&engine, session.id()).await;
    let after = engine
        .add_usage(usage(&session, "k1", 5))
        .await
        .expect("replay");
    assert_eq!(after, first);
    let stored = session.get(None, Some(0)).await.expect("get").session;
    assert_eq!(stored.usage.prompt_tokens, 12);

    // Another user's command with the same key is theirs, not a replay: here, refused.
    let foreign = AddUsage {
        user_id: "mallory".into(),
        ..usage(&session, "k1", 5)
    };
    assert!(matches!(
        engine.add_usage(foreign).await,
        Err(Error::NotFound)
    ));
    engine.shutdown().await;
}

async fn a_timed_out_keyed_usage_retried_applies_once(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            command_timeout: Some(Duration::from_millis(200)),
            ..db.config()
        })
        .await
        .expect("engine");
    let session = created_session(&engine).await;
    let paused = engine.pause_writes().await;
    // Not acknowledged, but queued: it commits once the writes resume.
    assert!(matches!(
        engine.add_usage(usage(&session, "slow", 3)).await,
        Err(Error::Timeout(_))
    ));
    drop(paused);
    let mut retried = None;
    for _ in 0..50 {
        match engine.add_usage(usage(&session, "slow", 3)).await {
            Ok(answer) => {
                retried = Some(answer);
                break;
            }
            Err(Error::Timeout(_)) => {}
            Err(other) => panic!("retry: {other:?}"),
        }
    }
    let retried = retried.expect("the retry is answered");
    assert_eq!(retried.prompt_tokens, 3, "applied once: {retried:?}");
    let stored = session.get(None, Some(0)).await.expect("get").session;
    assert_eq!(stored.usage.prompt_tokens, 3);
    engine.shutdown().await;
}

async fn keyed_create_update_and_delete_replay(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let create = || CreateSession {
        user_id: "alice".into(),
        title: Some("first".into()),
        idempotency_key: Some("create-1".into()),
        ..CreateSession::default()
    };
    let first = engine.create_session(create()).await.expect("create");
    let again = engine.create_session(create()).await.expect("replay");
    assert!(
        first.created && again.created,
        "a replay answers as the first did"
    );
    assert_eq!(
        again.session.id, first.session.id,
        "a keyed create reaches one session"
    );
    let other = CreateSession {
        title: Some("other".into()),
        ..create()
    };
    assert!(matches!(
        engine.create_session(other).await,
        Err(Error::IdempotencyKeyReused)
    ));
    let listed = engine
        .list_sessions(ListSessions {
            user_id: "alice".into(),
            ..ListSessions::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.sessions.len(), 1);

    let id = first.session.id;
    let update = |title: &str, key: &str| UpdateSession {
        user_id: "alice".into(),
        session_id: id,
        title: Some(title.into()),
        idempotency_key: Some(key.into()),
        ..UpdateSession::default()
    };
    let renamed = engine
        .update_session(update("a", "u1"))
        .await
        .expect("update");
    engine
        .update_session(update("b", "u2"))
        .await
        .expect("update");
    let replayed = engine
        .update_session(update("a", "u1"))
        .await
        .expect("replay");
    assert_eq!(
        replayed, renamed,
        "the first answer, not the session as it is now"
    );
    let now = engine
        .session("alice", id)
        .get(None, Some(0))
        .await
        .expect("get");
    assert_eq!(
        now.session.title.as_deref(),
        Some("b"),
        "the replay changed nothing"
    );

    let delete = || DeleteSession {
        user_id: "alice".into(),
        session_id: id,
        idempotency_key: Some("d1".into()),
        ..DeleteSession::default()
    };
    engine.delete_session(delete()).await.expect("delete");
    engine
        .delete_session(delete())
        .await
        .expect("a replayed delete is answered as the first");
    let unkeyed = DeleteSession {
        idempotency_key: None,
        ..delete()
    };
    assert!(matches!(
        engine.delete_session(unkeyed).await,
        Err(Error::NotFound)
    ));
    engine.shutdown().await;
}

async fn writes_honour_the_version_they_read(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let version = session
        .get(None, Some(0))
        .await
        .expect("get")
        .session
        .version;
    let conditional = |title: String| UpdateSession {
        user_id: "alice".into(),
        session_id: session.id(),
        title: Some(title),
        if_version: Some(version),
        ..UpdateSession::default()
    };
    // Eight writers read the same version; exactly one may write on top of it.
    let tasks: Vec<_> = (0..8)
        .map(|writer| {
            let engine = engine.clone();
            let command = conditional(format!("writer {writer}"));
            tokio::spawn(async move { engine.update_session(command).await })
        })
        .collect();
    let (mut won, mut refused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(info) => {
                assert_eq!(info.version, version + 1);
                won += 1;
            }
            Err(Error::PreconditionFailed { current }) => {
                assert!(current > version);
                refused += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((won, refused), (1, 7));

    // An append on a stale version is refused whole; a resend of stored messages is not
    // (it changes nothing, and answers the original sequences).
    let stale = Some(version);
    let id = Uuid::now_v7();
    let message = NewMessage::user("hello").with_id(id);
    let append = |messages: Vec<NewMessage>, if_version| soloist::AppendMessages {
        user_id: "alice".into(),
        session_id: session.id(),
        messages,
        if_version,
        on_busy: Default::default(),
    };
    assert!(matches!(
        engine.append(append(vec![message.clone()], stale)).await,
        Err(Error::PreconditionFailed { .. })
    ));
    let current = session
        .get(None, Some(0))
        .await
        .expect("get")
        .session
        .version;
    let sequences = engine
        .append(append(vec![message.clone()], Some(current)))
        .await
        .expect("append")
        .sequences;
    assert_eq!(sequences, vec![0]);
    let resent = engine
        .append(append(vec![message], stale))
        .await
        .expect("resend");
    assert_eq!(resent.sequences, vec![0]);

    let delete = DeleteSession {
        user_id: "alice".into(),
        session_id: session.id(),
        if_version: stale,
        ..DeleteSession::default()
    };
    assert!(matches!(
        engine.delete_session(delete).await,
        Err(Error::PreconditionFailed { .. })
    ));
    assert_eq!(
        session
            .get(None, None)
            .await
            .expect("still there")
            .messages
            .len(),
        1
    );
    engine.shutdown().await;
}

async fn a_message_id_comes_back_only_with_its_message(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            cached_messages: 2,
            ..db.config()
        })
        .await
        .expect("engine");
    let session = created_session(&engine).await;
    let first = Uuid::now_v7();
    session
        .append(vec![NewMessage::user("original").with_id(first)])
        .await
        .expect("append");
    for turn in 0..5 {
        session
            .append(vec![NewMessage::user(format!("turn {turn}"))])
            .await
            .expect("append");
    }
    // Past the two cached messages: the engine learns the stored one from the database.
    let resend = session
        .append(vec![NewMessage::user("original").with_id(first)])
        .await;
    assert_eq!(resend.expect("resend"), vec![0]);
    let fresh = Uuid::now_v7();
    let reused = session
        .append(vec![
            NewMessage::user("new").with_id(fresh),
            NewMessage::user("changed").with_id(first),
        ])
        .await;
    assert!(
        matches!(reused, Err(Error::MessageIdReused { id }) if id == first),
        "{reused:?}"
    );
    let page = session.get(None, None).await.expect("get");
    assert_eq!(
        page.messages.len(),
        6,
        "nothing of the refused append is stored"
    );
    assert_eq!(page.messages[0].text(), Some("original"));

    // Twice in one append is a client error, before anything is queued.
    let twice = session
        .append(vec![
            NewMessage::user("a").with_id(fresh),
            NewMessage::user("a").with_id(fresh),
        ])
        .await;
    assert!(
        matches!(twice, Err(Error::InvalidInput { .. })),
        "{twice:?}"
    );

    // Concurrent appends of one new id with different content: one lands, the rest are told.
    let contested = Uuid::now_v7();
    let tasks: Vec<_> = (0..8)
        .map(|writer| {
            let session = session.clone();
            tokio::spawn(async move {
                session
                    .append(vec![
                        NewMessage::user(format!("w{writer}")).with_id(contested),
                    ])
                    .await
            })
        })
        .collect();
    let (mut landed, mut reused) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(sequences) => {
                assert_eq!(sequences, vec![6]);
                landed += 1;
            }
            Err(Error::MessageIdReused { .. }) => reused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((landed, reused), (1, 7));
    engine.shutdown().await;
}

async fn reads_of_missing_and_foreign_sessions_leave_nothing_live(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let owned = created_session(&engine).await;
    owned
        .append(vec![NewMessage::user("kept")])
        .await
        .expect("append");
    passivated(&engine, owned.id()).await;
    for round in 0..500 {
        let missing = engine.session("mallory", SessionId::new());
        assert!(matches!(
            missing.get(None, None).await,
            Err(Error::NotFound)
        ));
        if round % 10 == 0 {
            // Someone else's session, cold: refused, and not kept.
            let foreign = engine.session("mallory", owned.id());
            assert!(matches!(
                foreign.get(None, None).await,
                Err(Error::NotFound)
            ));
        }
    }
    // Passivation is asynchronous: give the last ones a moment.
    let mut live = engine.stats().live_sessions;
    for _ in 0..200 {
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        live = engine.stats().live_sessions;
    }
    assert_eq!(live, 0, "no actor stays for a missing or foreign session");
    // The owner's session works as before.
    assert_eq!(owned.get(None, None).await.expect("get").messages.len(), 1);
    assert!(engine.is_live(owned.id()));
    engine.shutdown().await;
}

/// Expiry needs a second connection to the database: the backends it can share.
mod expiry {
    use super::*;

    /// Idempotency records stored with the session.
    async fn stored_keys(url: &str) -> i64 {
        use sqlx::Connection;
        if url.starts_with("postgres") {
            let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
            sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
                .fetch_one(&mut connection)
                .await
                .expect("count")
        } else {
            let mut connection = sqlx::SqliteConnection::connect(url).await.expect("connect");
            sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
                .fetch_one(&mut connection)
                .await
                .expect("count")
        }
    }

    async fn expired_keys_are_forgotten_and_purged(db: TestDb) {
        let engine = db
            .engine_with(EngineConfig {
                idempotency_retention: Duration::from_millis(400),
                ..db.config()
            })
            .await
            .expect("engine");
        let session = created_session(&engine).await;
        // A session that never stores a key again: only the engine's purge can delete its record.
        engine
            .add_usage(usage(&session, "old", 2))
            .await
            .expect("usage");
        assert_eq!(stored_keys(&db.url).await, 1);
        let mut left = 1;
        for _ in 0..100 {
            left = stored_keys(&db.url).await;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(left, 0, "the purge deleted the expired record");
        // Past the retention a key is new again.
        let again = engine
            .add_usage(usage(&session, "old", 2))
            .await
            .expect("usage");
        assert_eq!(again.prompt_tokens, 4);
        engine.shutdown().await;
    }

    on_shared_backends!(expired_keys_are_forgotten_and_purged);
}

on_every_backend!(
    a_keyed_usage_applies_once,
    a_timed_out_keyed_usage_retried_applies_once,
    keyed_create_update_and_delete_replay,
    writes_honour_the_version_they_read,
    a_message_id_comes_back_only_with_its_message,
    reads_of_missing_and_foreign_sessions_leave_nothing_live,
);
