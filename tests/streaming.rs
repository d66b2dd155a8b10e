//! Streaming assistant replies, on every backend: a draft takes its sequence when it starts,
//! grows by deltas that are idempotent by their offset, is stored as chunks (one per flush,
//! not a rewrite of the message), reads back with its content so far from memory and from the
//! database, and finishes once (its chunks compacted into the message row, its usage added in
//! the same commit). One draft streams at a time.

use std::time::Duration;

use futures::StreamExt;
use soloist::uuid::Uuid;
use soloist::{
    AppendDeltas, AppendMessages, Delta, Error, MessageStatus, MessageStream, NewMessage, OnBusy,
    Role, SessionHandle, StreamEvent, Usage,
};
use soloist_testkit::{TestDb, created_session, on_every_backend, passivated, stored_chunks};

/// A result with the error as its debug text, to compare.
fn plain<T>(result: soloist::Result<T>) -> Result<T, String> {
    result.map_err(|error| format!("{error:?}"))
}

/// `error` as [`plain`] shows it.
fn err<T>(error: Error) -> Result<T, String> {
    Err(format!("{error:?}"))
}

/// The message at `seq` as the session reads it now: `(status, text)`.
async fn read(session: &SessionHandle, seq: i64) -> (MessageStatus, Option<String>) {
    let page = session.get(Some(seq - 1), Some(1)).await.expect("read");
    let message = page.messages.first().expect("the message");
    (message.status, message.text().map(str::to_owned))
}

async fn a_draft_streams_resends_nothing_twice_and_finishes_once(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
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
    passivated(&engine, session.id()).await;
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
    passivated(&engine, session.id()).await;
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
    let session = created_session(&engine).await;
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
    // `on_busy: interrupt` finishes the running draft incomplete and starts the new one, in
    // one commit.
    assert_eq!(
        plain(session.append_delta(first, 0, "partial").await),
        Ok(7)
    );
    let mut next = NewMessage::assistant("");
    next.status = Some(MessageStatus::InProgress);
    let interrupting = engine
        .append(AppendMessages {
            user_id: "alice".into(),
            session_id: session.id(),
            messages: vec![next],
            if_version: None,
            on_busy: OnBusy::Interrupt,
        })
        .await
        .expect("interrupt");
    assert_eq!(interrupting.sequences, vec![1]);
    passivated(&engine, session.id()).await;
    let page = session.get(None, None).await.expect("read");
    assert_eq!(
        (page.messages[0].status, page.messages[0].text()),
        (MessageStatus::Incomplete, Some("partial"))
    );
    assert_eq!(page.messages[1].status, MessageStatus::InProgress);
    assert_eq!(
        plain(session.append_delta(first, 7, "!").await),
        err(Error::MessageFinished {
            status: MessageStatus::Incomplete
        })
    );
    if db.shareable() {
        let chunks = stored_chunks(&db.url, session.id()).await.expect("chunks");
        assert!(
            chunks.is_empty(),
            "the interrupted draft was compacted: {chunks:?}"
        );
    }
}

/// Deltas that queue up while a flush is in flight share the next one: fewer chunks than
/// deltas, and the draft holds every delta once, in order. The client pipelines as a streaming
/// one would: up to 32 deltas in flight, each sent once the ones before it were (fewer than
/// the mailbox holds, so they arrive in order).
async fn deltas_share_flushes(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
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
    passivated(&engine, session.id()).await;
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

/// The next event of `stream`, within 5 s.
async fn event(stream: &mut MessageStream) -> StreamEvent {
    tokio::time::timeout(Duration::from_secs(5), stream.next_event())
        .await
        .expect("an event within 5 s")
        .expect("an event")
}

/// What a subscriber sees: whole messages, a draft created with its content so far, each
/// durable delta at its offset, the finish; and one that resumes from a position mid-draft
/// gets the rest of the draft from that byte, with no gap and no repeat.
async fn subscribers_follow_drafts_and_resume_mid_draft(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let mut stream = session.subscribe(None).await.expect("subscribe");
    session
        .append(vec![NewMessage::user("Hi")])
        .await
        .expect("question");
    let StreamEvent::Message(question) = event(&mut stream).await else {
        panic!("a whole message first");
    };
    assert_eq!(question.text(), Some("Hi"));
    let (draft, seq) = session
        .start_message(NewMessage::assistant("He"))
        .await
        .expect("start");
    match event(&mut stream).await {
        StreamEvent::Created(message) => {
            assert_eq!((message.seq, message.text()), (seq, Some("He")));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stream.position().to_string(), format!("{seq}:2"));
    session.append_delta(draft, 2, "llo").await.expect("delta");
    assert_eq!(
        event(&mut stream).await,
        StreamEvent::Delta {
            seq,
            offset: 2,
            content: "llo".into()
        }
    );
    let resume_at = stream.position();
    assert_eq!(resume_at.to_string(), format!("{seq}:5"));
    session
        .append_delta(draft, 5, ", wor")
        .await
        .expect("delta");
    // A user message while the reply streams, then more of the reply.
    session
        .append(vec![NewMessage::user("(meanwhile)")])
        .await
        .expect("meanwhile");
    session.append_delta(draft, 10, "ld").await.expect("delta");
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(event(&mut stream).await);
    }
    assert_eq!(
        seen[0],
        StreamEvent::Delta {
            seq,
            offset: 5,
            content: ", wor".into()
        }
    );
    assert!(matches!(&seen[1], StreamEvent::Message(message) if message.seq == seq + 1));
    assert_eq!(
        seen[2],
        StreamEvent::Delta {
            seq,
            offset: 10,
            content: "ld".into()
        }
    );
    assert_eq!(
        stream.position().to_string(),
        format!("{}/{seq}:12", seq + 1)
    );

    // Connecting now: the draft with its content so far, then the rest.
    let mut late = session.subscribe(Some(seq - 1)).await.expect("late");
    match event(&mut late).await {
        StreamEvent::Created(message) => assert_eq!(message.text(), Some("Hello, world")),
        other => panic!("{other:?}"),
    }
    session
        .finish_message(draft, MessageStatus::Completed, None)
        .await
        .expect("finish");
    assert!(
        matches!(event(&mut stream).await, StreamEvent::Finished(message) if message.status == MessageStatus::Completed)
    );
    assert_eq!(stream.position().to_string(), format!("{}", seq + 1));

    // Resuming from a position mid-draft, after the draft ended (and the session was let go,
    // so everything comes from the database): the rest of the draft from that byte, its
    // finish, then the messages after it.
    passivated(&engine, session.id()).await;
    let mut resumed = session.subscribe_from(resume_at).await.expect("resume");
    assert_eq!(
        event(&mut resumed).await,
        StreamEvent::Delta {
            seq,
            offset: 5,
            content: ", world".into()
        }
    );
    assert!(
        matches!(event(&mut resumed).await, StreamEvent::Finished(message) if message.text() == Some("Hello, world"))
    );
    assert!(
        matches!(event(&mut resumed).await, StreamEvent::Message(message) if message.seq == seq + 1)
    );
}

/// A draft stays the session's, whatever `cached_messages` is: messages appended while it
/// streams do not push it out of reach of its deltas, its finish or the one-turn rule, a
/// reload finds it however old it is, and a finish sent again after the cache moved on
/// answers the same.
async fn a_draft_older_than_the_cache_streams_and_finishes(db: TestDb) {
    let small = soloist::EngineConfig {
        cached_messages: 2,
        ..db.config()
    };
    let engine = db.engine_with(small).await.expect("engine");
    let session = created_session(&engine).await;
    let (draft, seq) = session
        .start_message(NewMessage::assistant("Once"))
        .await
        .expect("start");
    let meanwhile: Vec<NewMessage> = (0..5).map(|i| NewMessage::user(format!("m{i}"))).collect();
    session.append(meanwhile).await.expect("meanwhile");
    assert_eq!(plain(session.append_delta(draft, 4, " upon").await), Ok(9));
    assert!(
        matches!(
            session.start_message(NewMessage::assistant("second")).await,
            Err(Error::TurnInProgress { id }) if id == draft
        ),
        "the old draft still holds the turn"
    );
    passivated(&engine, session.id()).await;
    assert_eq!(
        plain(session.append_delta(draft, 9, " a time").await),
        Ok(16),
        "reloaded: the draft came back with the tail though older than it"
    );
    let finished = session
        .finish_message(draft, MessageStatus::Completed, None)
        .await
        .expect("finish");
    assert_eq!(finished.text(), Some("Once upon a time"));
    let more: Vec<NewMessage> = (0..5).map(|i| NewMessage::user(format!("n{i}"))).collect();
    session.append(more).await.expect("more");
    let again = session
        .finish_message(draft, MessageStatus::Completed, None)
        .await
        .expect("the same finish, long after");
    assert_eq!((again.seq, again.text()), (seq, Some("Once upon a time")));
    assert!(matches!(
        session.append_delta(draft, 16, "!").await,
        Err(Error::MessageFinished {
            status: MessageStatus::Completed
        })
    ));
    engine.shutdown().await;
}

/// An interrupting start shows the interrupted draft ended at once, from memory; a refused
/// delta tells the draft's length as it stands, not with the command's earlier deltas.
async fn an_interrupt_shows_at_once_and_refusals_tell_the_stored_length(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let (first, seq) = session
        .start_message(NewMessage::assistant("ab"))
        .await
        .expect("start");
    let refused = engine
        .append_deltas(AppendDeltas {
            user_id: "alice".into(),
            session_id: session.id(),
            message_id: first,
            deltas: vec![
                Delta {
                    offset: 2,
                    content: "cd".into(),
                },
                Delta {
                    offset: 9,
                    content: "x".into(),
                },
            ],
        })
        .await;
    assert!(
        matches!(refused, Err(Error::OffsetGap { length: 2 })),
        "{refused:?}"
    );
    let mut interrupting = NewMessage::assistant("new turn");
    interrupting.status = Some(MessageStatus::InProgress);
    engine
        .append(AppendMessages {
            user_id: "alice".into(),
            session_id: session.id(),
            messages: vec![interrupting, NewMessage::user("and a question")],
            if_version: None,
            on_busy: OnBusy::Interrupt,
        })
        .await
        .expect("interrupt");
    assert_eq!(
        read(&session, seq).await,
        (MessageStatus::Incomplete, Some("ab".into()))
    );
    engine.shutdown().await;
}

/// Another user's command loads the session as that user may see it (no messages); its owner's
/// commands right after are not answered from that copy.
async fn a_strangers_load_is_not_served_to_the_owner(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let (draft, _) = session
        .start_message(NewMessage::assistant("x"))
        .await
        .expect("start");
    let stranger = engine.session("mallory", session.id());
    let mut length = 1;
    for round in 0..20 {
        passivated(&engine, session.id()).await;
        let text = format!("{round:02}");
        let (theirs, ours) = tokio::join!(
            stranger.append_delta(draft, length, "zz"),
            session.append_delta(draft, length, &text)
        );
        assert!(theirs.is_err(), "a stranger's delta is refused");
        length += 2;
        assert_eq!(plain(ours), Ok(length), "round {round}");
    }
    engine.shutdown().await;
}

on_every_backend!(
    subscribers_follow_drafts_and_resume_mid_draft,
    a_draft_streams_resends_nothing_twice_and_finishes_once,
    one_reply_streams_at_a_time,
    deltas_share_flushes,
    a_draft_older_than_the_cache_streams_and_finishes,
    an_interrupt_shows_at_once_and_refusals_tell_the_stored_length,
    a_strangers_load_is_not_served_to_the_owner
);

/// Waits until the message at `seq` is no longer in progress (at most 5 s).
async fn ended(session: &SessionHandle, seq: i64) -> (MessageStatus, Option<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = read(session, seq).await;
        if now.0 != MessageStatus::InProgress || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A draft that gets no delta for `draft_timeout` is finished `incomplete`, keeping its text;
/// one left in progress by a process that stopped is finished so by the next process that
/// activates its session, once its timeout passed there with no delta.
async fn abandoned_drafts_end_incomplete(db: TestDb) {
    let quick = soloist::EngineConfig {
        draft_timeout: Duration::from_millis(200),
        ..db.config()
    };
    let engine = db.engine_with(quick.clone()).await.expect("engine");
    let session = created_session(&engine).await;
    let (draft, seq) = session
        .start_message(NewMessage::assistant("half a"))
        .await
        .expect("start");
    assert_eq!(
        plain(session.append_delta(draft, 6, " reply").await),
        Ok(12)
    );
    let started = std::time::Instant::now();
    assert_eq!(
        ended(&session, seq).await,
        (MessageStatus::Incomplete, Some("half a reply".into()))
    );
    assert!(started.elapsed() >= Duration::from_millis(200));

    // A process that stops with a draft streaming leaves it in progress in the database.
    let patient = soloist::EngineConfig {
        draft_timeout: Duration::from_secs(3600),
        ..db.config()
    };
    let first = db.engine_with(patient).await.expect("first engine");
    let orphaned = created_session(&first).await;
    let (_, seq) = orphaned
        .start_message(NewMessage::assistant("cut"))
        .await
        .expect("start");
    first.shutdown().await;
    drop(first);
    let next = db.engine_with(quick).await.expect("next engine");
    let orphaned = next.session("alice", orphaned.id());
    assert_eq!(
        read(&orphaned, seq).await,
        (MessageStatus::InProgress, Some("cut".into())),
        "still in progress when found"
    );
    assert_eq!(
        ended(&orphaned, seq).await,
        (MessageStatus::Incomplete, Some("cut".into()))
    );
    next.shutdown().await;
    engine.shutdown().await;
}

/// A draft left in progress by a process that stopped writing is finished `incomplete` by
/// another process once the first one's lease on its session has run out, although nobody
/// activates the session: the draft and its chunks do not wait for the next command on it.
async fn an_orphaned_draft_ends_without_an_activation(db: TestDb) {
    let lease = Duration::from_millis(200);
    let stopped = db
        .engine_with(soloist::EngineConfig {
            draft_timeout: Duration::from_secs(3600),
            ownership_lease: lease,
            ..db.config()
        })
        .await
        .expect("the process that stops");
    let session = created_session(&stopped).await;
    let (draft, seq) = session
        .start_message(NewMessage::assistant("half"))
        .await
        .expect("start");
    assert_eq!(
        plain(session.append_delta(draft, 4, " a reply").await),
        Ok(12)
    );
    let other = db
        .engine_with(soloist::EngineConfig {
            draft_timeout: Duration::from_millis(300),
            ownership_lease: lease,
            ..db.config()
        })
        .await
        .expect("another process");
    let started = std::time::Instant::now();
    loop {
        let statuses = soloist_testkit::stored_statuses(&db.url, session.id())
            .await
            .expect("statuses");
        if statuses
            .get(seq as usize)
            .is_some_and(|(_, status)| status == "incomplete")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {statuses:?} after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the orphaned draft ended after {:?}", started.elapsed());
    let page = other
        .session("alice", session.id())
        .get(None, None)
        .await
        .expect("read");
    assert_eq!(page.messages[seq as usize].text(), Some("half a reply"));
    assert_eq!(
        page.messages[seq as usize].status,
        MessageStatus::Incomplete
    );
    assert!(
        soloist_testkit::stored_chunks(&db.url, session.id())
            .await
            .expect("chunks")
            .is_empty(),
        "its chunks were folded into the message"
    );
    other.shutdown().await;
    stopped.shutdown().await;
}

/// Two engines on one database: the backends they can share.
mod shared {
    use super::*;
    soloist_testkit::on_shared_backends!(
        abandoned_drafts_end_incomplete,
        an_orphaned_draft_ends_without_an_activation,
    );
}

/// A draft that grows and ends through another process reaches this process's subscribers as
/// it happens (PostgreSQL's change feed: the copy here catches up and tells what became of the
/// drafts it had in progress), not only at their next re-subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draft_grown_elsewhere_reaches_subscribers_here() {
    let Some(db) = TestDb::new(soloist_testkit::Backend::Postgres)
        .await
        .expect("database")
    else {
        return;
    };
    let here = db.engine().await.expect("engine");
    let elsewhere = db.engine().await.expect("engine");
    let session = created_session(&here).await;
    let (draft, seq) = session
        .start_message(NewMessage::assistant("Hel"))
        .await
        .expect("start");
    let mut stream = session.subscribe(None).await.expect("subscribe");
    let next = event;
    assert!(matches!(next(&mut stream).await, StreamEvent::Created(message) if message.seq == seq));
    let there = elsewhere.session("alice", session.id());
    assert_eq!(plain(there.append_delta(draft, 3, "lo").await), Ok(5));
    assert_eq!(
        next(&mut stream).await,
        StreamEvent::Delta {
            seq,
            offset: 3,
            content: "lo".into()
        }
    );
    there
        .finish_message(draft, MessageStatus::Completed, None)
        .await
        .expect("finish");
    assert!(matches!(
        next(&mut stream).await,
        StreamEvent::Finished(message) if message.text() == Some("Hello")
    ));
    elsewhere.shutdown().await;
    here.shutdown().await;
}
