//! Freshness across processes when the change feed fails (PostgreSQL).
//!
//! Engines follow each other's writes through LISTEN/NOTIFY. Notices are transient: one sent
//! while a listener is disconnected is lost. These tests disconnect engine A's listener (the
//! test hook `Engine::pause_change_feed`, equivalent to a lost connection) while engine B
//! writes, and show the fallbacks: while A is not listening, its reads check the stored version
//! (so a read through A never goes back behind a write acknowledged through B), and once it
//! listens again, its live sessions that missed a write catch up and their subscribers get the
//! missed messages — with no read or write on A to trigger it.

mod common;

use std::time::Duration;

use common::history::History;
use common::{Backend, TestDb};
use soloist::uuid::Uuid;
use soloist::{Engine, NewMessage};

/// Two engines on one fresh PostgreSQL schema, and a session A created with one message.
struct Setup {
    db: TestDb,
    a: Engine,
    b: Engine,
    history: std::sync::Arc<History>,
    id: Uuid,
}

impl Setup {
    async fn new() -> Option<Setup> {
        let db = TestDb::new(Backend::Postgres).await?;
        let (a, b) = (db.engine().await, db.engine().await);
        let history = History::new();
        let id = Uuid::now_v7();
        a.session("u", id).create(None, None).await.expect("create");
        history
            .client("setup")
            .append(&a.session("u", id), vec![NewMessage::user("from a")])
            .await
            .expect("append");
        Some(Setup {
            db,
            a,
            b,
            history,
            id,
        })
    }
}

/// While A's listener is down, a plain (not `fresh`) read through A sees B's acknowledged
/// writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_check_the_version_while_the_feed_is_down() {
    let Some(Setup {
        db,
        a,
        b,
        history,
        id,
    }) = Setup::new().await
    else {
        return;
    };
    let (a_client, b_client) = (history.client("a"), history.client("b"));
    let loads_before = a.stats().loads;

    let paused = a.pause_change_feed().await;
    for round in 0..3 {
        b_client
            .append(
                &b.session("u", id),
                vec![NewMessage::user(format!("from b {round}"))],
            )
            .await
            .expect("b appends");
        // A hears nothing of it, yet its next plain read is current.
        let page = a_client
            .get(&a.session("u", id), None, None)
            .await
            .expect("read through a");
        assert_eq!(page.session.message_count, 2 + round);
        assert_eq!(
            page.messages.last().and_then(|m| m.content.as_deref()),
            Some(format!("from b {round}").as_str())
        );
    }
    assert!(
        a.stats().loads >= loads_before + 3,
        "each read reloaded the stale copy"
    );
    drop(paused);
    history.verify("freshness, feed down", &db, &a, "u").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A subscriber on A gets B's messages written while A's listener was down, as soon as it
/// listens again, in order and without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscribers_catch_up_after_the_feed_reconnects() {
    let Some(Setup {
        db,
        a,
        b,
        history,
        id,
    }) = Setup::new().await
    else {
        return;
    };
    let b_client = history.client("b");
    let subscriber = history.client("a's subscriber");
    let mut stream = a.session("u", id).subscribe(None).await.expect("subscribe");
    assert_eq!(subscriber.next(&mut stream).await.expect("backlog").seq, 0);

    let paused = a.pause_change_feed().await;
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
    // Nothing reaches A while it is not listening...
    assert!(
        tokio::time::timeout(Duration::from_millis(300), subscriber.next(&mut stream))
            .await
            .is_err(),
        "no notice can arrive while the feed is down"
    );
    // ...and everything does once it listens again.
    drop(paused);
    for expected in 1..=3 {
        let message = tokio::time::timeout(Duration::from_secs(10), subscriber.next(&mut stream))
            .await
            .expect("B's message reaches A's subscriber after the reconnection")
            .expect("stream");
        assert_eq!(message.seq, expected);
        assert_eq!(
            message.content.as_deref(),
            Some(format!("from b {}", expected - 1).as_str())
        );
    }
    history.verify("freshness, reconnect", &db, &a, "u").await;
    a.shutdown().await;
    b.shutdown().await;
}
