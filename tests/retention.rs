//! Retention and erasure, on every backend: a session's time to live runs from its last write,
//! the purge erases what expired (and only that), an erase removes the content a delete keeps
//! and can be repeated, and a user's sessions can all be erased at once.

use std::time::{Duration, Instant};

use soloist::{
    CreateSession, DeleteSession, Engine, EngineConfig, Error, ListSessions, NewMessage, RawJson,
    SessionId, UpdateSession,
};
use soloist_testkit::{
    StoredSession, TestDb, on_every_backend, on_shared_backends, passivated, stored_rows,
    stored_session,
};

/// Creates a session of `user` with a title, metadata and `ttl_seconds`.
async fn create(engine: &Engine, user: &str, ttl_seconds: Option<i64>) -> SessionId {
    let created = engine
        .create_session(CreateSession {
            user_id: user.into(),
            title: Some("private title".into()),
            metadata: Some(RawJson::from(serde_json::json!({"topic": "private"}))),
            ttl_seconds,
            ..CreateSession::default()
        })
        .await
        .expect("create");
    created.session.id
}

/// Gives `session` messages, usage and an idempotency record.
async fn fill(engine: &Engine, user: &str, session: SessionId) {
    let handle = engine.session(user, session);
    handle
        .append(vec![
            NewMessage::user("secret"),
            NewMessage::assistant("reply"),
        ])
        .await
        .expect("append");
    handle.add_usage(7, 9).await.expect("usage");
    engine
        .update_session(UpdateSession {
            user_id: user.into(),
            session_id: session,
            title: Some("renamed".into()),
            idempotency_key: Some("rename-1".into()),
            ..UpdateSession::default()
        })
        .await
        .expect("keyed update");
}

/// The session's row as stored, where another connection can read the database (not an
/// in-memory SQLite database, which only the engine's connection sees): a stand-in with every
/// assertion's expectation otherwise, so that the engine-level assertions run on every
/// backend and the row-level ones wherever they can.
async fn row(db: &TestDb, session: SessionId) -> Option<StoredSession> {
    if !db.shareable() {
        return None;
    }
    let row = stored_session(&db.url, session).await.expect("read");
    Some(row.expect("the row stays"))
}

/// Asserts `check` on the stored row, where it can be read.
async fn stored(db: &TestDb, session: SessionId, check: impl FnOnce(&StoredSession)) {
    if let Some(row) = row(db, session).await {
        check(&row);
    }
}

/// What an erased session's row holds: no content, a tombstone.
fn assert_erased(row: &StoredSession) {
    assert_eq!(
        row,
        &StoredSession {
            title: None,
            metadata: "{}".into(),
            tokens: (0, 0),
            deleted: true,
            erased: true,
            ttl_seconds: row.ttl_seconds,
            expires_at: None,
            keys: 0,
            messages: 0,
            chunks: 0,
        }
    );
}

fn erase(user: &str, session: SessionId) -> DeleteSession {
    DeleteSession {
        user_id: user.into(),
        session_id: session,
        erase: true,
        ..DeleteSession::default()
    }
}

/// A delete keeps the title, metadata, usage and idempotency records with the tombstone; an
/// erase clears them, on a live session or on one deleted before, and again without error.
async fn an_erase_removes_what_a_delete_keeps(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let deleted = create(&engine, "alice", None).await;
    fill(&engine, "alice", deleted).await;
    engine
        .session("alice", deleted)
        .delete()
        .await
        .expect("delete");
    stored(&db, deleted, |kept| {
        assert_eq!(
            kept.title.as_deref(),
            Some("renamed"),
            "a delete keeps the title"
        );
        assert_eq!((kept.tokens, kept.keys), ((7, 9), 1));
        assert!(kept.deleted && !kept.erased);
    })
    .await;

    // Erasing the tombstone clears it; so does erasing a live session, whose actor is live.
    let erased = engine.delete_session(erase("alice", deleted)).await;
    erased.expect("erase a tombstone");
    stored(&db, deleted, assert_erased).await;
    let live = create(&engine, "alice", None).await;
    fill(&engine, "alice", live).await;
    engine
        .delete_session(erase("alice", live))
        .await
        .expect("erase");
    stored(&db, live, assert_erased).await;
    let read = engine.session("alice", live).get(None, None).await;
    assert!(matches!(read, Err(Error::NotFound)), "{read:?}");
    // Again, from memory and after a reload: done already, nothing to tell.
    let again = engine.delete_session(erase("alice", live)).await;
    again.expect("erase again");
    passivated(&engine, live).await;
    let reloaded = engine.delete_session(erase("alice", live)).await;
    reloaded.expect("erase after a reload");
    stored(&db, live, assert_erased).await;
    // Not someone else's: another user's erase finds nothing, and changes nothing.
    let bobs = create(&engine, "bob", None).await;
    let foreign = engine.delete_session(erase("alice", bobs)).await;
    assert!(matches!(foreign, Err(Error::NotFound)), "{foreign:?}");
    let bob = engine
        .session("bob", bobs)
        .get(None, None)
        .await
        .expect("bob's");
    assert_eq!(bob.session.title.as_deref(), Some("private title"));
    // The id stays taken.
    let again = engine
        .create_session(CreateSession {
            user_id: "alice".into(),
            session_id: Some(live),
            ..CreateSession::default()
        })
        .await;
    assert!(matches!(again, Err(Error::SessionIdTaken)), "{again:?}");
    engine.shutdown().await;
}

/// `erase_user_sessions` erases every session of the user, live, passivated or deleted, and
/// nobody else's; a second call erases nothing.
async fn a_user_s_sessions_are_erased_at_once(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let mut alices = Vec::new();
    for _ in 0..5 {
        let session = create(&engine, "alice", None).await;
        fill(&engine, "alice", session).await;
        alices.push(session);
    }
    engine
        .session("alice", alices[0])
        .delete()
        .await
        .expect("delete");
    passivated(&engine, alices[1]).await;
    let bobs = create(&engine, "bob", None).await;
    fill(&engine, "bob", bobs).await;

    // Bounded calls: 2, then the 3 left, then nothing.
    let erased = |max| engine.erase_user_sessions("alice", max);
    let first = erased(2).await.expect("erase");
    assert_eq!((first.erased, first.more), (2, true));
    let rest = erased(usize::MAX).await.expect("erase");
    assert_eq!((rest.erased, rest.more), (3, false));
    for &session in &alices {
        stored(&db, session, assert_erased).await;
        let read = engine.session("alice", session).get(None, None).await;
        assert!(matches!(read, Err(Error::NotFound)), "{read:?}");
    }
    let again = erased(usize::MAX).await.expect("again");
    assert_eq!((again.erased, again.more), (0, false));
    stored(&db, bobs, |bob| assert!(!bob.deleted && bob.keys == 1)).await;
    let bob = engine
        .session("bob", bobs)
        .get(None, None)
        .await
        .expect("bob's");
    assert_eq!(bob.messages.len(), 2);
    assert_eq!(bob.session.title.as_deref(), Some("renamed"));
    engine.shutdown().await;
}

/// Whether alice's listing shows `session`.
async fn listed(engine: &Engine, session: SessionId) -> bool {
    let list = engine
        .list_sessions(ListSessions {
            user_id: "alice".into(),
            ..ListSessions::default()
        })
        .await
        .expect("list");
    list.sessions.iter().any(|listed| listed.id == session)
}

/// The session as the engine shows it (after a reload, so as stored): `(ttl, expiry in µs)`.
async fn expiry(engine: &Engine, session: SessionId) -> (Option<i64>, Option<i64>) {
    passivated(engine, session).await;
    let info = engine
        .session("alice", session)
        .get(None, None)
        .await
        .expect("get")
        .session;
    (
        info.ttl_seconds,
        info.expires_at.map(|at| at.timestamp_micros()),
    )
}

/// A time to live runs from the last write: the expiry moves with every write, PATCH changes
/// or removes it, and the engine's default applies to sessions created without one.
async fn the_expiry_follows_the_last_write(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            default_session_ttl: Some(Duration::from_secs(3600)),
            purge_interval: None,
            ..db.config()
        })
        .await
        .expect("engine");
    let defaulted = create(&engine, "alice", None).await;
    let (ttl, first_expiry) = expiry(&engine, defaulted).await;
    assert_eq!(ttl, Some(3600), "the engine's default");
    let first_expiry = first_expiry.expect("an expiry");
    stored(&db, defaulted, |row| {
        assert_eq!(row.expires_at, Some(first_expiry))
    })
    .await;
    let never = create(&engine, "alice", Some(0)).await;
    assert_eq!(
        expiry(&engine, never).await,
        (None, None),
        "0: never expires"
    );

    tokio::time::sleep(Duration::from_millis(20)).await;
    let handle = engine.session("alice", defaulted);
    let appended = handle.append(vec![NewMessage::user("hi")]).await;
    appended.expect("append");
    let shown = handle
        .get(None, None)
        .await
        .expect("get")
        .session
        .expires_at;
    let (_, moved) = expiry(&engine, defaulted).await;
    let moved = moved.expect("an expiry");
    assert!(moved > first_expiry, "a write pushes the expiry back");
    assert_eq!(
        shown.map(|at| at.timestamp_micros()),
        Some(moved),
        "memory = stored"
    );

    let patch = |ttl_seconds| UpdateSession {
        user_id: "alice".into(),
        session_id: defaulted,
        ttl_seconds: Some(ttl_seconds),
        ..UpdateSession::default()
    };
    let updated = engine.update_session(patch(60)).await.expect("patch");
    assert_eq!(updated.ttl_seconds, Some(60));
    let updated_expiry = updated.expires_at.map(|at| at.timestamp_micros());
    assert_eq!(expiry(&engine, defaulted).await, (Some(60), updated_expiry));
    assert!(updated_expiry < Some(moved), "60 s from now, not an hour");
    let cleared = engine.update_session(patch(0)).await.expect("patch");
    assert_eq!((cleared.ttl_seconds, cleared.expires_at), (None, None));
    assert_eq!(expiry(&engine, defaulted).await, (None, None));

    for bad in [-1, soloist::command::MAX_TTL_SECONDS + 1] {
        let refused = engine
            .create_session(CreateSession {
                user_id: "alice".into(),
                ttl_seconds: Some(bad),
                ..CreateSession::default()
            })
            .await;
        assert!(
            matches!(refused, Err(Error::InvalidInput { ref field, .. }) if field == "ttl_seconds"),
            "{refused:?}"
        );
    }
    // Expired, a session is gone before any purge: not found, not listed, not written; its
    // owner may still erase it.
    let brief = create(&engine, "alice", Some(1)).await;
    assert!(listed(&engine, brief).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let read = engine.session("alice", brief).get(None, None).await;
    assert!(matches!(read, Err(Error::NotFound)), "{read:?}");
    let late = vec![NewMessage::user("late")];
    let write = engine.session("alice", brief).append(late).await;
    assert!(matches!(write, Err(Error::NotFound)), "{write:?}");
    assert!(
        !listed(&engine, brief).await,
        "an expired session is not listed"
    );
    let erased = engine.delete_session(erase("alice", brief)).await;
    erased.expect("the owner erases an expired session");
    stored(&db, brief, assert_erased).await;

    // The purge's conditional erase refuses a session that has not expired.
    let refused = engine
        .delete_session(DeleteSession {
            only_if_expired: true,
            ..erase("alice", never)
        })
        .await;
    assert!(
        matches!(refused, Err(Error::PreconditionFailed { .. })),
        "{refused:?}"
    );
    assert!(engine.session("alice", never).get(None, None).await.is_ok());
    engine.shutdown().await;
}

/// The purge erases sessions whose time to live ran out since their last write, and leaves
/// the ones written meanwhile and the ones without one.
async fn the_purge_erases_what_expired(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            purge_interval: Some(Duration::from_millis(50)),
            purge_batch: 2,
            ..db.config()
        })
        .await
        .expect("engine");
    let mut expiring = Vec::new();
    for _ in 0..5 {
        let session = create(&engine, "alice", Some(1)).await;
        fill(&engine, "alice", session).await;
        expiring.push(session);
    }
    let kept_alive = create(&engine, "alice", Some(1)).await;
    let forever = create(&engine, "alice", None).await;
    fill(&engine, "alice", forever).await;
    // Keep one session written past its first expiry.
    let start = Instant::now();
    let mut writes = 0;
    while start.elapsed() < Duration::from_millis(1800) {
        writes += 1;
        let handle = engine.session("alice", kept_alive);
        let appended = handle.append(vec![NewMessage::user("still here")]).await;
        appended.expect("append");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each expired session is erased within a few purge rounds of its expiry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().purged_sessions < 5 {
        assert!(
            Instant::now() < deadline,
            "not purged: {:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for &session in &expiring {
        let read = engine.session("alice", session).get(None, None).await;
        assert!(matches!(read, Err(Error::NotFound)), "{read:?}");
        stored(&db, session, assert_erased).await;
        if db.shareable() {
            let rows = stored_rows(&db.url, session).await.expect("rows");
            assert!(rows.is_empty(), "{rows:?}");
        }
    }
    let kept = engine.session("alice", kept_alive).get(None, None).await;
    assert_eq!(
        kept.expect("written meanwhile: kept").messages.len(),
        writes
    );
    let forever = engine.session("alice", forever).get(None, None).await;
    assert_eq!(forever.expect("no time to live: kept").messages.len(), 2);
    engine.shutdown().await;
}

/// An erase queued behind a delta of a streaming draft, in the same batch: every row of the
/// session but its tombstone is gone after the erase answered, the delta's chunk too (it used
/// to be written after the erase's deletes, in the same transaction, and outlived them).
async fn an_erase_behind_a_delta_leaves_no_draft_text(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = create(&engine, "alice", None).await;
    let handle = engine.session("alice", session);
    let (draft, _) = handle
        .start_message(NewMessage::assistant("Hel"))
        .await
        .expect("start");
    assert_eq!(handle.append_delta(draft, 3, "lo").await.ok(), Some(5));
    // Writes held back: the next delta is staged and waits for its write, and the delta and
    // the erase sent meanwhile queue behind it, to be staged together as one batch.
    let paused = engine.pause_writes().await;
    let first = tokio::spawn({
        let handle = handle.clone();
        async move { handle.append_delta(draft, 5, ", ").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn({
        let handle = handle.clone();
        async move { handle.append_delta(draft, 7, "world").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let erased = tokio::spawn({
        let engine = engine.clone();
        async move { engine.delete_session(erase("alice", session)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(paused);
    assert_eq!(first.await.expect("first delta").ok(), Some(7));
    assert_eq!(second.await.expect("second delta").ok(), Some(12));
    erased.await.expect("erase").expect("erased");
    stored(&db, session, assert_erased).await;
    passivated(&engine, session).await;
    assert!(matches!(handle.get(None, None).await, Err(Error::NotFound)));
    stored(&db, session, assert_erased).await;
    engine.shutdown().await;
}

on_every_backend!(
    an_erase_behind_a_delta_leaves_no_draft_text,
    an_erase_removes_what_a_delete_keeps,
    a_user_s_sessions_are_erased_at_once,
    the_expiry_follows_the_last_write,
    the_purge_erases_what_expired,
);

/// Two engines on one database (two processes): what one erases, the other, whose actor holds
/// the session in memory, stops serving and cannot write over; erasing from both is fine.
async fn an_erase_in_one_process_reaches_the_other(db: TestDb) {
    let first = db.engine().await.expect("first engine");
    let second = db.engine().await.expect("second engine");
    let session = create(&first, "alice", None).await;
    fill(&first, "alice", session).await;
    // Live in the first process, with its messages cached.
    let page = first
        .session("alice", session)
        .get(None, None)
        .await
        .expect("get");
    assert_eq!(page.messages.len(), 2);

    second
        .delete_session(erase("alice", session))
        .await
        .expect("erase in the second");
    stored(&db, session, assert_erased).await;
    // The first process's copy is stale: a fresh read and a write both find it gone (the write
    // is fenced by the version and reloads), and a plain read follows once the change is seen.
    let fresh = first
        .get_session(soloist::GetSession {
            user_id: "alice".into(),
            session_id: session,
            fresh: true,
            ..soloist::GetSession::default()
        })
        .await;
    assert!(matches!(fresh, Err(Error::NotFound)), "{fresh:?}");
    let write = first
        .session("alice", session)
        .append(vec![NewMessage::user("over it")])
        .await;
    assert!(matches!(write, Err(Error::NotFound)), "{write:?}");
    let read = first.session("alice", session).get(None, None).await;
    assert!(matches!(read, Err(Error::NotFound)), "{read:?}");
    stored(&db, session, assert_erased).await;
    if db.shareable() {
        let rows = stored_rows(&db.url, session).await.expect("rows");
        assert!(rows.is_empty(), "{rows:?}");
    }
    // Erasing again, from either process, is done.
    first
        .delete_session(erase("alice", session))
        .await
        .expect("again in the first");
    second
        .delete_session(erase("alice", session))
        .await
        .expect("again in the second");
    let all = first.erase_user_sessions("alice", 10).await.expect("all");
    assert_eq!((all.erased, all.more), (0, false));
    first.shutdown().await;
    second.shutdown().await;
}

/// What needs a second engine on the same database: not `sqlite::memory:`.
mod shared {
    use super::*;

    on_shared_backends!(an_erase_in_one_process_reaches_the_other);
}
