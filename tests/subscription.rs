//! Following a session: backlog, then live messages, gap-free and in order, through slow
//! subscribers, passivation and deletion.

use std::time::Duration;

use soloist::SessionId;
use soloist::{Error, MessageStream, NewMessage};
use soloist_testkit::history::{Client, History};
use soloist_testkit::{TestDb, on_every_backend};

/// Reads the messages `seqs` from `stream`, through `subscriber` when they are to be recorded.
async fn expect_seqs(
    stream: &mut MessageStream,
    seqs: std::ops::Range<i64>,
    subscriber: Option<&Client>,
) {
    for expected in seqs {
        let next = async {
            match subscriber {
                Some(subscriber) => subscriber.next(stream).await,
                None => stream.next().await,
            }
        };
        let message = tokio::time::timeout(Duration::from_secs(20), next)
            .await
            .expect("a message within 20 s")
            .expect("stream");
        assert_eq!(message.seq, expected, "gap-free and in order");
    }
}

/// Backlog first, then every message committed by concurrent writers, in order.
async fn backlog_then_live_messages(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    let history = History::new();
    let subscriber = history.client("subscriber");
    let first: Vec<_> = (0..5).map(|i| NewMessage::user(format!("m{i}"))).collect();
    history
        .client("first")
        .append(&session, first)
        .await
        .expect("append");
    let mut stream = session.subscribe(Some(1)).await.expect("subscribe");
    expect_seqs(&mut stream, 2..5, Some(&subscriber)).await;
    let mut writers = Vec::new();
    for writer in 0..8 {
        let session = session.clone();
        let client = history.client(format!("writer {writer}"));
        writers.push(tokio::spawn(async move {
            for turn in 0..25 {
                client
                    .append(&session, vec![NewMessage::user(format!("{writer}/{turn}"))])
                    .await
                    .expect("append");
            }
        }));
    }
    expect_seqs(&mut stream, 5..205, Some(&subscriber)).await;
    for writer in writers {
        writer.await.expect("writer");
    }
    history.verify("backlog then live", &db, &engine, "u").await;
    engine.shutdown().await;
}

/// A subscriber that stops reading while far more than its buffer is committed, and an actor
/// that passivates mid-stream, still see every message once, in order.
async fn slow_subscriber_and_passivation_lose_nothing(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    let mut stream = session.subscribe(None).await.expect("subscribe");
    for chunk in 0..30 {
        let messages = (0..100)
            .map(|i| NewMessage::user(format!("{chunk}/{i}")))
            .collect();
        session.append(messages).await.expect("append");
    }
    expect_seqs(&mut stream, 0..3000, None).await;
    engine.passivate(session.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.is_live(session.id()) {
        assert!(std::time::Instant::now() < deadline, "never passivated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    session
        .append(vec![NewMessage::user("after passivation")])
        .await
        .expect("append");
    expect_seqs(&mut stream, 3000..3001, None).await;
    engine.shutdown().await;
}

/// Deleting the session ends its streams with NotFound; a foreign user cannot subscribe.
async fn delete_ends_the_stream(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = engine.session("u", SessionId::new());
    session.create(None, None).await.expect("create");
    assert!(matches!(
        engine
            .session("intruder", session.id())
            .subscribe(None)
            .await,
        Err(Error::NotFound)
    ));
    let mut stream = session.subscribe(None).await.expect("subscribe");
    session
        .append(vec![NewMessage::user("one")])
        .await
        .expect("append");
    expect_seqs(&mut stream, 0..1, None).await;
    session.delete().await.expect("delete");
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the stream ends");
    assert!(matches!(ended, Err(Error::NotFound)), "{ended:?}");
    engine.shutdown().await;
}

on_every_backend!(
    backlog_then_live_messages,
    slow_subscriber_and_passivation_lose_nothing,
    delete_ends_the_stream,
);
