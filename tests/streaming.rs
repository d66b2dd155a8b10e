//! Streaming assistant replies, on every backend: a draft takes its sequence when it starts,
//! grows by deltas that are idempotent by their offset, is stored as chunks (one per flush,
//! not a rewrite of the message), reads back with its content so far from memory and from the
//! database, and finishes once (its chunks compacted into the message row, its usage added in
//! the same commit). One draft streams at a time.

use std::time::Duration;

use futures::StreamExt;
use soloist::uuid::Uuid;
use soloist::{
    AppendDeltas, Delta, Engine, Error, MessageStatus, NewMessage, Role, SessionHandle, SessionId,
    Usage,
};
use soloist_testkit::{TestDb, on_every_backend, stored_chunks};

/// A result with the error as its debug text, to compare.
fn plain<T>(result: soloist::Result<T>) -> Result<T, String> {
    result.map_err(|error| format!("{error:?}"))
}

/// `error` as [`plain`] shows it.
fn err<T>(error: Error) -> Result<T, String> {
    Err(format!("{error:?}"))
}

async fn created(engine: &Engine) -> SessionHandle {
    let session = engine.session("alice", SessionId::new());
    session.create(None, None).await.expect("create");
    session
}

/// Lets the session go, so that the next read loads it from the database.
async fn passivated(engine: &Engine, session: &SessionHandle) {
    engine.passivate(session.id());
    while engine.is_live(session.id()) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The message at `seq` as the session reads it now: `(status, text)`.
async fn read(session: &SessionHandle, seq: i64) -> (MessageStatus, Option<String>) {
    let page = session.get(Some(seq - 1), Some(1)).await.expect("read");
    let message = page.messages.first().expect("the message");
    (message.status, message.text().map(str::to_owned))
}

async fn a_draft_streams_resends_nothing_twice_and_finishes_once(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created(&engine).await;
    session
        .append(vec![NewMessage::user("Say hello")])
        .await
        .expect("question");
    let (draft, seq) = session
        .start_message(NewMessage::assistant("He"))
        .await
        .expect("start");
    assert_eq!(seq, 1, "the draft takes its sequence when it starts");
    // A user message sent while it streams orders after it.
    let later = session
        .append(vec![NewMessage::user("(typing meanwhile)")])
        .await
        .expect("meanwhile");
    assert_eq!(later, vec![2]);

    assert_eq!(plain(session.append_delta(draft, 2, "llo").await), Ok(5));
    assert_eq!(
        plain(session.append_delta(draft, 2, "llo").await),
        Ok(5),
        "a resend of what is there answers the length and changes nothing"
    );
    assert_eq!(
        plain(session.append_delta(draft, 3, "lo, wor").await),
        Ok(10),
        "overlapping text that matches: only the new part is added"
    );
    assert_eq!(
        plain(session.append_delta(draft, 11, "!").await),
        err(Error::OffsetGap { length: 10 })
    );
    assert_eq!(
        plain(session.append_delta(draft, 1, "a").await),
        err(Error::OffsetConflict { length: 10 })
    );
    assert_eq!(
        read(&session, 1).await,
        (MessageStatus::InProgress, Some("Hello, wor".into()))
    );
    passivated(&engine, &session).await;
    assert_eq!(
        read(&session, 1).await,
        (MessageStatus::InProgress, Some("Hello, wor".into())),
        "the draft loaded from the database: its row and its chunks"
    );
    if db.shareable() {
        let chunks = stored_chunks(&db.url, session.id()).await.expect("chunks");
        assert_eq!(
            chunks,
            vec![(1, 2, 3), (1, 5, 5)],
            "a chunk per accepted delta"
        );
    }
    assert_eq!(plain(session.append_delta(draft, 10, "ld").await), Ok(12));

    let usage = Usage {
        prompt_tokens: 7,
        completion_tokens: 3,
    };
    let finished = session
        .finish_message(draft, MessageStatus::Completed, Some(usage))
        .await
        .expect("finish");
    assert_eq!(finished.status, MessageStatus::Completed);
    assert_eq!(finished.text(), Some("Hello, world"));
    let again = session
        .finish_message(draft, MessageStatus::Completed, Some(usage))
        .await
        .expect("the same finish again");
    assert_eq!(again, finished, "answers the same");
    assert_eq!(
        plain(
            session
                .finish_message(draft, MessageStatus::Aborted, None)
                .await
        ),
        err(Error::FinishConflict {
            status: MessageStatus::Completed
        })
    );
    assert_eq!(
        plain(session.append_delta(draft, 12, "?").await),
        err(Error::MessageFinished {
            status: MessageStatus::Completed
        })
    );
    assert_eq!(
        plain(session.append_delta(Uuid::now_v7(), 0, "?").await),
        err(Error::MessageNotFound)
    );
    passivated(&engine, &session).await;
    let page = session.get(None, None).await.expect("read");
    assert_eq!(page.session.usage, usage, "added once");
    assert_eq!(page.session.message_count, 3);
    let reply = &page.messages[1];
    assert_eq!(
        (reply.role, reply.status, reply.text()),
        (
            Role::Assistant,
            MessageStatus::Completed,
            Some("Hello, world")
        )
    );
    if db.shareable() {
        let chunks = stored_chunks(&db.url, session.id()).await.expect("chunks");
        assert!(chunks.is_empty(), "compacted at finish: {chunks:?}");
    }
}

async fn one_reply_streams_at_a_time(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created(&engine).await;
    let start = NewMessage::assistant("").with_id(Uuid::now_v7());
    let (first, seq) = session.start_message(start.clone()).await.expect("start");
    assert_eq!(
        session.start_message(start).await.expect("resend"),
        (first, seq),
        "the same start again answers its sequence"
    );
    let second = session.start_message(NewMessage::assistant("")).await;
    assert_eq!(plain(second), err(Error::TurnInProgress { id: first }));
    // Drafts are assistant replies, their content text, their tool calls for the finish.
    let mut user = NewMessage::user("hi");
    user.status = Some(MessageStatus::InProgress);
    let refused = session.append(vec![user]).await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput { field, .. }) if field == "messages[0].status"),
        "{refused:?}"
    );
    let mut done = NewMessage::assistant("x");
    done.status = Some(MessageStatus::Incomplete);
    let refused = session.append(vec![done]).await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput { field, .. }) if field == "messages[0].status"),
        "{refused:?}"
    );
    session
        .finish_message(first, MessageStatus::Incomplete, None)
        .await
        .expect("finish");
    let (next, seq) = session
        .start_message(NewMessage::assistant(""))
        .await
        .expect("the next turn");
    assert_eq!(seq, 1);
    assert_ne!(next, first);
    let page = session.get(None, None).await.expect("read");
    assert_eq!(page.messages[0].status, MessageStatus::Incomplete);
    assert_eq!(page.messages[1].status, MessageStatus::InProgress);
}

/// Deltas that queue up while a flush is in flight share the next one: fewer chunks than
/// deltas, and the draft holds every delta once, in order. The client pipelines as a streaming
/// one would: up to 32 deltas in flight, each sent once the ones before it were (fewer than
/// the mailbox holds, so they arrive in order).
async fn deltas_share_flushes(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created(&engine).await;
    let (draft, seq) = session
        .start_message(NewMessage::assistant(""))
        .await
        .expect("start");
    let tokens: Vec<String> = (0..400).map(|index| format!("t{index:03} ")).collect();
    let mut offset = 0u64;
    let sends = tokens.iter().map(|token| {
        let delta = AppendDeltas {
            user_id: "alice".into(),
            session_id: session.id(),
            message_id: draft,
            deltas: vec![Delta {
                offset,
                content: token.clone(),
            }],
        };
        offset += token.len() as u64;
        let engine = engine.clone();
        async move { engine.append_deltas(delta).await }
    });
    let answers: Vec<_> = futures::stream::iter(sends).buffered(32).collect().await;
    let whole: String = tokens.concat();
    for answer in &answers {
        // Each answer is the length once its delta was durable: in order, they only grow.
        assert!(answer.is_ok(), "{answer:?}");
    }
    let lengths: Vec<u64> = answers
        .into_iter()
        .map(|answer| answer.map_or(0, |appended| appended.length))
        .collect();
    assert!(lengths.windows(2).all(|pair| pair[0] <= pair[1]));
    assert_eq!(lengths.last().copied(), Some(whole.len() as u64));
    passivated(&engine, &session).await;
    assert_eq!(
        read(&session, seq).await,
        (MessageStatus::InProgress, Some(whole.clone()))
    );
    if db.shareable() {
        let chunks = stored_chunks(&db.url, session.id()).await.expect("chunks");
        let bytes: i64 = chunks.iter().map(|(_, _, bytes)| bytes).sum();
        assert_eq!(bytes, whole.len() as i64, "every byte stored once");
        assert!(
            chunks.len() < tokens.len(),
            "{} chunks for {} deltas",
            chunks.len(),
            tokens.len()
        );
    }
}

on_every_backend!(
    a_draft_streams_resends_nothing_twice_and_finishes_once,
    one_reply_streams_at_a_time,
    deltas_share_flushes
);
