//! The journal contract of a session, on every backend: paging bounds and walks, unknown and
//! deleted sessions, and a highest sequence that never goes down.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use soloist::uuid::Uuid;
use soloist::{
    Engine, EngineConfig, Error, GetSession, Limits, ListSessions, Message, NewMessage, Role,
    SessionHandle, SessionId, SessionPage,
};
use soloist_testkit::history::History;
use soloist_testkit::{Backend, TestDb, assert_contiguous, on_every_backend, stored_rows};

/// Asserts that `result` failed with the error variant `pattern`.
macro_rules! assert_err {
    ($result:expr, $pattern:pat, $($what:tt)+) => {{
        let result = $result;
        assert!(
            matches!(result, Err($pattern)),
            "{}: expected {}, got {result:?}",
            format!($($what)+),
            stringify!($pattern)
        );
    }};
}

fn seqs(page: &SessionPage) -> Vec<i64> {
    page.messages.iter().map(|message| message.seq).collect()
}

/// A new session owned by `user`.
async fn new_session(engine: &Engine, user: &str) -> SessionHandle {
    let session = engine.session(user, SessionId::new());
    let created = session
        .create(Some("journal".into()), None)
        .await
        .expect("create a session");
    assert!(created.created, "a new id creates a session");
    session
}

/// Appends `count` user messages with contents `m{seq}` in appends of 1, 2, 3, 1, 2, 3...
/// messages, checking the sequences, and returns their ids in order.
async fn append_numbered(session: &SessionHandle, first: i64, count: i64) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut seq = first;
    let mut size = 1;
    while seq < first + count {
        let take = size.min(first + count - seq);
        let batch: Vec<(i64, Uuid)> = (seq..seq + take).map(|s| (s, Uuid::now_v7())).collect();
        let messages = batch
            .iter()
            .map(|(s, id)| NewMessage::user(format!("m{s}")).with_id(*id))
            .collect();
        let sequences = session.append(messages).await.expect("append");
        let expected: Vec<i64> = batch.iter().map(|(s, _)| *s).collect();
        assert_eq!(sequences, expected, "appended at the next sequences");
        ids.extend(batch.iter().map(|(_, id)| *id));
        seq += take;
        size = size % 3 + 1;
    }
    ids
}

/// Reads the whole session page by page with `limit`, checking each page's shape.
async fn walk(session: &SessionHandle, limit: Option<usize>, max_page: usize) -> Vec<Arc<Message>> {
    let page_size = limit.unwrap_or(100).min(max_page);
    assert!(page_size > 0, "a walk needs pages of at least one message");
    let mut messages = Vec::new();
    let mut after = None;
    for _ in 0..1000 {
        let page = session.get(after, limit).await.expect("read a page");
        let count = page.session.message_count;
        let start = after.map_or(0, |after| after + 1);
        let expected_len = (count - start).clamp(0, page_size as i64);
        assert_eq!(
            page.messages.len() as i64,
            expected_len,
            "page after {after:?} with limit {limit:?} of a session of {count}"
        );
        let expected_seqs: Vec<i64> = (start..start + expected_len).collect();
        assert_eq!(
            seqs(&page),
            expected_seqs,
            "a page is contiguous from after_seq + 1"
        );
        let last = page.messages.last().map(|message| message.seq);
        let expected_next = last.filter(|&last| last + 1 < count);
        assert_eq!(page.next_after_seq, expected_next, "next_after_seq");
        messages.extend(page.messages);
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => return messages,
        }
    }
    panic!("a walk that never ends");
}

/// Waits until every session actor of `engine` has passivated (a tiny `idle_timeout` makes
/// them), so that the next command reloads its session from the database.
async fn wait_for_passivation(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while engine.stats().live_sessions > 0 {
        assert!(
            Instant::now() < deadline,
            "session actors never passivated: {:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn paging_config(db: &TestDb, cached_messages: usize) -> EngineConfig {
    EngineConfig {
        cached_messages,
        limits: Limits {
            max_page_size: 5,
            ..Limits::default()
        },
        ..db.config()
    }
}

/// after_seq and limit at and past their bounds, with the messages in memory and (with a
/// cache of 2) mostly in the database.
async fn paging_bounds(db: TestDb) {
    for cached in [1000, 2] {
        let engine = db
            .engine_with(paging_config(&db, cached))
            .await
            .expect("engine");
        let session = new_session(&engine, "u").await;

        let empty = session.get(None, None).await.expect("get an empty session");
        assert!(empty.messages.is_empty());
        assert_eq!(empty.next_after_seq, None);
        assert_eq!(empty.session.message_count, 0);
        let empty = session.get(Some(-1), Some(3)).await.expect("get");
        assert_eq!((seqs(&empty), empty.next_after_seq), (vec![], None));

        append_numbered(&session, 0, 7).await;
        let case = |after: Option<i64>, limit: Option<usize>| {
            let session = session.clone();
            async move {
                let page = session.get(after, limit).await.expect("get a page");
                assert_eq!(page.session.message_count, 7, "metadata with every page");
                for message in &page.messages {
                    assert_eq!(
                        message.text(),
                        Some(format!("m{}", message.seq).as_str()),
                        "content of {}",
                        message.seq
                    );
                }
                (seqs(&page), page.next_after_seq)
            }
        };
        let none: Vec<i64> = Vec::new();
        // Past the end: nothing, and no next page.
        assert_eq!(
            case(Some(6), None).await,
            (none.clone(), None),
            "after the last"
        );
        assert_eq!(
            case(Some(7), Some(3)).await,
            (none.clone(), None),
            "after the end"
        );
        assert_eq!(
            case(Some(1000), Some(3)).await,
            (none.clone(), None),
            "far past the end"
        );
        // Negative: from the start.
        for after in [None, Some(-1), Some(-2), Some(-1000), Some(i64::MIN)] {
            assert_eq!(
                case(after, Some(3)).await,
                (vec![0, 1, 2], Some(2)),
                "after_seq {after:?}"
            );
        }
        // limit 0: metadata only.
        assert_eq!(case(None, Some(0)).await, (none.clone(), None), "limit 0");
        assert_eq!(
            case(Some(2), Some(0)).await,
            (none.clone(), None),
            "limit 0 midway"
        );
        // Over max_page_size (5), or the default of 100: clamped.
        assert_eq!(
            case(None, Some(50)).await,
            (vec![0, 1, 2, 3, 4], Some(4)),
            "limit 50"
        );
        assert_eq!(
            case(None, None).await,
            (vec![0, 1, 2, 3, 4], Some(4)),
            "default limit"
        );
        assert_eq!(
            case(Some(0), Some(usize::MAX)).await,
            (vec![1, 2, 3, 4, 5], Some(5)),
            "limit usize::MAX"
        );
        // A page that ends exactly at the last message has no next page.
        assert_eq!(
            case(Some(4), Some(2)).await,
            (vec![5, 6], None),
            "exactly to the end"
        );
        assert_eq!(
            case(Some(3), Some(2)).await,
            (vec![4, 5], Some(5)),
            "one short of the end"
        );
        assert_eq!(
            case(Some(5), Some(1)).await,
            (vec![6], None),
            "the last message"
        );
        assert_eq!(
            case(Some(2), Some(5)).await,
            (vec![3, 4, 5, 6], None),
            "a short last page"
        );
        engine.shutdown().await;
    }
}

/// Following `next_after_seq` yields every message once, in order, whatever the page size;
/// with a cache of 4, the early pages come from the database. Also while the session grows
/// during the walk, and through a second engine that has nothing cached.
async fn walking_pages_yields_every_message_once(db: TestDb) {
    let config = EngineConfig {
        cached_messages: 4,
        limits: Limits {
            max_page_size: 3,
            ..Limits::default()
        },
        ..db.config()
    };
    let engine = db.engine_with(config.clone()).await.expect("engine");
    let session = new_session(&engine, "u").await;
    let ids = append_numbered(&session, 0, 23).await;
    let check = |messages: &[Arc<Message>], what: &str| {
        let seqs: Vec<i64> = messages.iter().map(|message| message.seq).collect();
        assert_eq!(
            seqs,
            (0..23).collect::<Vec<i64>>(),
            "{what}: every sequence once"
        );
        let walked: Vec<Uuid> = messages.iter().map(|message| message.id).collect();
        assert_eq!(walked, ids, "{what}: every message id at its sequence");
        for message in messages {
            assert_eq!(
                message.text(),
                Some(format!("m{}", message.seq).as_str()),
                "{what}"
            );
        }
    };
    for limit in [None, Some(1), Some(2), Some(3), Some(100)] {
        check(&walk(&session, limit, 3).await, &format!("limit {limit:?}"));
    }
    if db.shareable() {
        let other = db.engine_with(config).await.expect("engine");
        let fresh = other.session("u", session.id());
        for limit in [Some(2), None] {
            check(
                &walk(&fresh, limit, 3).await,
                &format!("second engine, limit {limit:?}"),
            );
        }
        other.shutdown().await;
    }

    // The session grows while it is walked: still contiguous, nothing twice.
    let mut seen = Vec::new();
    let mut after = None;
    let mut next_new = 23;
    for _ in 0..100 {
        let page = session.get(after, Some(2)).await.expect("get");
        seen.extend(seqs(&page));
        if next_new < 35 {
            let sequences = session
                .append(vec![NewMessage::user(format!("m{next_new}"))])
                .await
                .expect("append during the walk");
            assert_eq!(sequences, vec![next_new]);
            next_new += 1;
        }
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..next_new).collect::<Vec<i64>>(),
        "a walk of a growing session sees every message once, in order"
    );
    engine.shutdown().await;
}

/// A session id nobody created: every command but create answers `NotFound`, and none of them
/// leaves anything behind.
async fn unknown_session_is_not_found(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let id: SessionId = SessionId::new();
    let session = engine.session("u", id);
    assert_err!(session.get(None, None).await, Error::NotFound, "get");
    assert_err!(
        engine
            .get_session(GetSession {
                user_id: "u".into(),
                session_id: id,
                fresh: true,
                ..GetSession::default()
            })
            .await,
        Error::NotFound,
        "fresh get"
    );
    assert_err!(
        session.append(vec![NewMessage::user("hi")]).await,
        Error::NotFound,
        "append"
    );
    assert_err!(
        session.update(Some("title".into()), None).await,
        Error::NotFound,
        "update"
    );
    assert_err!(session.add_usage(1, 2).await, Error::NotFound, "add_usage");
    assert_err!(session.delete().await, Error::NotFound, "delete");
    // Still nothing: the refused commands created no row, so the id is free...
    let listed = engine
        .list_sessions(ListSessions {
            user_id: "u".into(),
            ..ListSessions::default()
        })
        .await
        .expect("list");
    assert!(listed.sessions.is_empty(), "{listed:?}");
    if db.shareable() {
        assert!(stored_rows(&db.url, id).await.expect("rows").is_empty());
    }
    // ...and creating it starts from nothing.
    let created = session.create(None, None).await.expect("create");
    assert!(created.created);
    assert_eq!(created.session.message_count, 0);
    assert_eq!(created.session.usage, soloist::Usage::default());
    assert_eq!(created.session.title, None);
    let sequences = session
        .append(vec![NewMessage::user("first")])
        .await
        .expect("append");
    assert_eq!(sequences, vec![0]);
    engine.shutdown().await;
}

/// Checks that `id` behaves as a deleted session through `engine`.
async fn assert_deleted(engine: &Engine, id: SessionId, resent: Uuid, context: &str) {
    let session = engine.session("owner", id);
    // Reads first: they write nothing, so the database cannot catch a stale actor for them.
    assert_err!(
        session.get(None, None).await,
        Error::NotFound,
        "{context}: get"
    );
    assert_err!(
        session.get(Some(1), Some(0)).await,
        Error::NotFound,
        "{context}: get metadata only"
    );
    assert_err!(
        engine
            .get_session(GetSession {
                user_id: "owner".into(),
                session_id: id,
                fresh: true,
                ..GetSession::default()
            })
            .await,
        Error::NotFound,
        "{context}: fresh get"
    );
    assert_err!(
        session.append(vec![NewMessage::user("late")]).await,
        Error::NotFound,
        "{context}: append"
    );
    assert_err!(
        session
            .append(vec![NewMessage::user("m0").with_id(resent)])
            .await,
        Error::NotFound,
        "{context}: re-sent message id"
    );
    assert_err!(
        session.update(Some("again".into()), None).await,
        Error::NotFound,
        "{context}: update"
    );
    assert_err!(
        session.add_usage(1, 1).await,
        Error::NotFound,
        "{context}: add_usage"
    );
    assert_err!(
        session.delete().await,
        Error::NotFound,
        "{context}: delete again"
    );
    assert_err!(
        session.create(Some("reborn".into()), None).await,
        Error::SessionIdTaken,
        "{context}: re-create by the owner"
    );
    assert_err!(
        engine.session("someone else", id).create(None, None).await,
        Error::SessionIdTaken,
        "{context}: re-create by another user"
    );
    let listed = engine
        .list_sessions(ListSessions {
            user_id: "owner".into(),
            ..ListSessions::default()
        })
        .await
        .expect("list");
    assert!(
        listed.sessions.iter().all(|session| session.id != id),
        "{context}: a deleted session is not listed: {listed:?}"
    );
    assert_eq!(
        listed.sessions.len(),
        1,
        "{context}: the other session is listed"
    );
}

/// A deleted session refuses everything, cannot be re-created, leaves the list, and stays so
/// after its actor passivated and through a new engine; its neighbour is untouched.
async fn deleted_session_stays_deleted(db: TestDb) {
    let config = EngineConfig {
        idle_timeout: Duration::from_millis(5),
        cached_messages: 2,
        ..db.config()
    };
    let engine = db.engine_with(config.clone()).await.expect("engine");
    let doomed = new_session(&engine, "owner").await;
    let neighbour = new_session(&engine, "owner").await;
    let doomed_ids = append_numbered(&doomed, 0, 5).await;
    append_numbered(&neighbour, 0, 3).await;
    doomed.add_usage(3, 4).await.expect("usage");
    doomed.delete().await.expect("delete");

    assert_deleted(&engine, doomed.id(), doomed_ids[0], "just deleted").await;
    wait_for_passivation(&engine).await;
    let loads = engine.stats().loads;
    assert_deleted(&engine, doomed.id(), doomed_ids[0], "after passivation").await;
    assert!(
        engine.stats().loads > loads,
        "the deleted session was reloaded"
    );
    if db.shareable() {
        assert!(
            stored_rows(&db.url, doomed.id())
                .await
                .expect("rows")
                .is_empty(),
            "a deleted session's messages are gone"
        );
        let other = db.engine_with(config).await.expect("engine");
        assert_deleted(&other, doomed.id(), doomed_ids[0], "through a new engine").await;
        other.shutdown().await;
    }
    let page = neighbour
        .get(None, None)
        .await
        .expect("the neighbour is intact");
    assert_eq!(seqs(&page), vec![0, 1, 2]);
    assert_eq!(page.session.message_count, 3);
    engine.shutdown().await;
}

/// What one observation of the session showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark {
    message_count: i64,
    max_seq: Option<i64>,
    version: i64,
}

/// The highest sequence and the message count never go down, whatever happens in between:
/// appends through two engines, idempotent re-sends, refused appends, deletes of other sessions
/// (some in the same transaction), and passivation.
async fn highest_sequence_never_goes_down(db: TestDb) {
    let config = EngineConfig {
        idle_timeout: Duration::from_millis(5),
        cached_messages: 2,
        max_live_sessions: Some(2),
        limits: Limits {
            max_content_bytes: 64,
            ..Limits::default()
        },
        ..db.config()
    };
    let first = db.engine_with(config.clone()).await.expect("engine");
    let second = if db.shareable() {
        Some(db.engine_with(config).await.expect("engine"))
    } else {
        None
    };
    let engines: Vec<&Engine> = std::iter::once(&first).chain(second.as_ref()).collect();
    // One client per engine: it writes and reads through that engine only.
    let history = History::new();
    let clients: Vec<_> = (0..engines.len())
        .map(|index| history.client(format!("engine {index}")))
        .collect();
    let main = new_session(&first, "u").await;
    let mut others = Vec::new();
    for _ in 0..8 {
        let other = new_session(&first, "u").await;
        append_numbered(&other, 0, 2).await;
        others.push(other);
    }

    let mut count = 0i64;
    // Client ids sent so far, with the sequence each was stored at.
    let mut ids: Vec<(Uuid, i64)> = Vec::new();
    let mut last: Vec<Option<Mark>> = vec![None; engines.len()];
    for step in 0..36usize {
        let engine = engines[step % engines.len()];
        let client = &clients[step % engines.len()];
        let through = engine.session("u", main.id());
        let what = format!("step {step}");
        match step % 9 {
            0 | 5 => {
                let id = Uuid::now_v7();
                let sequences = client
                    .append(
                        &through,
                        vec![
                            NewMessage::user(format!("m{count}")).with_id(id),
                            NewMessage::assistant(format!("m{}", count + 1)),
                        ],
                    )
                    .await
                    .expect("append");
                assert_eq!(sequences, vec![count, count + 1], "{what}");
                ids.push((id, count));
                count += 2;
            }
            1 => {
                // Re-send an old message (usually outside the cached tail) with a new one.
                let (old, old_seq) = ids[step % ids.len()];
                let new = Uuid::now_v7();
                let sequences = client
                    .append(
                        &through,
                        vec![
                            NewMessage::user(format!("m{old_seq}")).with_id(old),
                            NewMessage::user(format!("m{count}")).with_id(new),
                        ],
                    )
                    .await
                    .expect("resend");
                assert_eq!(
                    sequences,
                    vec![old_seq, count],
                    "{what}: the re-sent id keeps its sequence, the new message is next"
                );
                ids.push((new, count));
                count += 1;
            }
            2 => {
                let refused = vec![
                    NewMessage::user("fine"),
                    NewMessage::new(Role::Tool, "no tool_call_id"),
                ];
                assert_err!(
                    client.append(&through, refused).await,
                    Error::InvalidInput { .. },
                    "{what}"
                );
                assert_err!(
                    client
                        .append(&through, vec![NewMessage::user("x".repeat(65))])
                        .await,
                    Error::TooLarge { .. },
                    "{what}"
                );
                assert_err!(
                    client
                        .append(
                            &engine.session("intruder", main.id()),
                            vec![NewMessage::user("hi")]
                        )
                        .await,
                    Error::NotFound,
                    "{what}"
                );
            }
            3 | 7 => {
                // Delete another session while appending here: often one transaction.
                let other = others.pop().expect("a session left to delete");
                let other = engine.session("u", other.id());
                let (appended, deleted) = tokio::join!(
                    client.append(&through, vec![NewMessage::user(format!("m{count}"))]),
                    other.delete(),
                );
                assert_eq!(appended.expect("append"), vec![count], "{what}");
                deleted.expect("delete another session");
                count += 1;
            }
            4 => {
                // Re-send the latest ids all at once: nothing new.
                let tail: Vec<NewMessage> = ids
                    .iter()
                    .rev()
                    .take(3)
                    .map(|(id, seq)| NewMessage::user(format!("m{seq}")).with_id(*id))
                    .collect();
                let expected: Vec<i64> = ids.iter().rev().take(3).map(|(_, seq)| *seq).collect();
                let sequences = client.append(&through, tail).await.expect("resend");
                assert_eq!(sequences, expected, "{what}: re-sent ids only");
            }
            6 => {
                for engine in &engines {
                    wait_for_passivation(engine).await;
                }
            }
            _ => {
                through.add_usage(1, 1).await.expect("usage");
            }
        }
        // Observe through every engine; a fresh read sees the other engine's writes.
        for (index, engine) in engines.iter().enumerate() {
            let read = GetSession {
                user_id: "u".into(),
                session_id: main.id(),
                after_seq: Some(count - 2),
                limit: Some(10),
                fresh: true,
            };
            let page = clients[index]
                .get_session(engine, read)
                .await
                .expect("fresh read");
            let mark = Mark {
                message_count: page.session.message_count,
                max_seq: page.messages.last().map(|message| message.seq),
                version: page.session.version,
            };
            assert_eq!(mark.message_count, count, "{what}: engine {index} count");
            assert_eq!(
                mark.max_seq,
                (count > 0).then_some(count - 1),
                "{what}: engine {index} highest sequence"
            );
            if let Some(previous) = last[index] {
                assert!(
                    mark.message_count >= previous.message_count
                        && mark.max_seq >= previous.max_seq
                        && mark.version >= previous.version,
                    "{what}: engine {index} went back from {previous:?} to {mark:?}"
                );
            }
            last[index] = Some(mark);
        }
    }
    assert_eq!(count, 28, "four rounds of 2 + 1 + 2 + 1 + 1 new messages");
    assert_eq!(walk(&main, None, 1000).await.len() as i64, count);
    if db.shareable() {
        let rows = stored_rows(&db.url, main.id()).await.expect("rows");
        assert_eq!(rows.len() as i64, count);
        assert_contiguous(&rows);
    }
    history.verify("highest sequence", &db, &first, "u").await;
    for engine in engines {
        engine.shutdown().await;
    }
}

on_every_backend!(
    paging_bounds,
    walking_pages_yields_every_message_once,
    unknown_session_is_not_found,
    deleted_session_stays_deleted,
    highest_sequence_never_goes_down,
);

/// The backends, for the tests below that loop over them themselves.
const BACKENDS: [Backend; 3] = [
    Backend::SqliteFile,
    Backend::SqliteMemory,
    Backend::Postgres,
];

/// `after_seq` is the caller's number: the largest one must read past the end like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_after_the_largest_sequence_is_past_the_end() {
    for backend in BACKENDS {
        let Some(db) = TestDb::new(backend).await.expect("database") else {
            continue;
        };
        let engine = db.engine().await.expect("engine");
        let session = new_session(&engine, "u").await;
        append_numbered(&session, 0, 3).await;
        let page = session
            .get(Some(i64::MAX), None)
            .await
            .expect("after_seq = i64::MAX is past the end, not a failure");
        assert_eq!(
            (seqs(&page), page.next_after_seq),
            (vec![], None),
            "{backend:?}"
        );
        assert_eq!(page.session.message_count, 3, "{backend:?}");
        assert_eq!(
            engine.stats().restarts,
            0,
            "{backend:?}: no session actor panicked"
        );
        engine.shutdown().await;
    }
}

/// A read that arrives together with a delete is answered either before the delete (the whole
/// page) or after it (`NotFound`), never with a page that contradicts its own metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_batched_with_a_delete_is_not_torn() {
    for backend in BACKENDS {
        let Some(db) = TestDb::new(backend).await.expect("database") else {
            continue;
        };
        let engine = db.engine().await.expect("engine");
        let mut pages = 0;
        for round in 0..20 {
            let session = new_session(&engine, "u").await;
            append_numbered(&session, 0, 3).await;
            // Usually one batch: the append's write is in flight while the read and the delete
            // queue behind it, or all three are received together.
            let (appended, read, deleted) = tokio::join!(
                session.append(vec![NewMessage::user("m3")]),
                session.get(None, None),
                session.delete(),
            );
            assert_eq!(
                appended.expect("append"),
                vec![3],
                "{backend:?} round {round}"
            );
            deleted.expect("delete");
            match read {
                Ok(page) => {
                    pages += 1;
                    let count = page.session.message_count;
                    assert!(
                        count == 3 || count == 4,
                        "{backend:?} round {round}: {count}"
                    );
                    assert_eq!(
                        seqs(&page),
                        (0..count).collect::<Vec<i64>>(),
                        "{backend:?} round {round}: a page of all {count} messages"
                    );
                }
                Err(Error::NotFound) => {}
                Err(other) => panic!("{backend:?} round {round}: {other:?}"),
            }
        }
        assert!(
            pages > 0,
            "{backend:?}: some reads were answered before the delete"
        );
        engine.shutdown().await;
    }
}
