//! Ownership and fencing across processes (here: engines with their own pools on one database).
//!
//! A process takes a session over with its first write after loading it, bumping the session's
//! ownership epoch; each later write checks that epoch in the same statement. These tests pause
//! one owner between staging a write and sending it — the way a lock holder stalls in a garbage
//! collection pause or a network partition — let another process take the session over, and
//! show that the paused write cannot land.

use std::time::Duration;

use soloist::SessionId;
use soloist::uuid::Uuid;
use soloist::{Engine, EngineConfig, NewMessage};
use soloist_testkit::{TestDb, assert_contiguous, on_shared_backends, stored_rows};
use sqlx::Connection;

/// The ownership columns of a session: `(epoch, lease still running)`.
async fn ownership(url: &str, session: SessionId) -> (i64, bool) {
    if url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_as(
            "SELECT epoch, COALESCE(lease_until > (extract(epoch FROM now()) * 1000000)::int8, \
             false) FROM sessions WHERE id = $1",
        )
        .bind(session)
        .fetch_one(&mut connection)
        .await
        .expect("read ownership")
    } else {
        let mut connection = sqlx::SqliteConnection::connect(url).await.expect("connect");
        let (epoch, lease_until): (i64, Option<i64>) =
            sqlx::query_as("SELECT epoch, lease_until FROM sessions WHERE id = ?")
                .bind(session)
                .fetch_one(&mut connection)
                .await
                .expect("read ownership");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_micros() as i64;
        (epoch, lease_until.is_some_and(|until| until > now))
    }
}

/// Waits (up to 30 s) until `condition` holds.
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An engine that does not follow other processes' writes (so its copy surely goes stale, as a
/// paused process's would) and whose claims last `lease`.
async fn engine(db: &TestDb, lease: Duration) -> Engine {
    db.engine_with(EngineConfig {
        listen_for_changes: false,
        ownership_lease: lease,
        ..db.config()
    })
    .await
    .expect("engine")
}

/// The Redis-lock failure: A owns the session, stalls between staging a write and sending it
/// until well past its lease, B takes the session over and writes. A's stalled write is
/// refused by the epoch check (nothing of it lands at the sequence it staged); A reloads, takes
/// the session back and its commands — the stalled one and two queued behind it — land after
/// B's messages, in order.
async fn paused_owner_is_fenced_after_takeover(db: TestDb) {
    // A's lease is short, to run out while A is paused; B's is long, so that A's taking the
    // session back is surely a takeover of a running lease.
    let lease = Duration::from_millis(300);
    let a = engine(&db, lease).await;
    let b = engine(&db, Duration::from_secs(60)).await;
    let id = SessionId::new();
    let a0 = Uuid::now_v7();
    a.session("u", id).create(None, None).await.expect("create");
    let seqs = a
        .session("u", id)
        .append(vec![NewMessage::user("a0").with_id(a0)])
        .await
        .expect("a0");
    assert_eq!(seqs, vec![0]);
    assert_eq!(
        ownership(&db.url, id).await,
        (1, true),
        "A took the session"
    );

    // A stalls with its next write staged (at seq 1, epoch 1) and two more commands queued.
    let paused = a.pause_writes().await;
    let stalled_ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut stalled = Vec::new();
    let batches_before = a.stats().batched_commands;
    for (index, &message) in stalled_ids.iter().enumerate() {
        let session = a.session("u", id);
        stalled.push(tokio::spawn(async move {
            session
                .append(vec![
                    NewMessage::user(format!("a{}", index + 1)).with_id(message),
                ])
                .await
        }));
        // In order: the first is taken into a batch (staged, then held by the pause), the
        // others wait in the mailbox behind it.
        if index == 0 {
            wait_until("the first append is taken", || {
                a.stats().batched_commands > batches_before
            })
            .await;
        } else {
            wait_until("the append queues", || {
                a.stats().mailbox_depth == index as u64
            })
            .await;
        }
    }
    tokio::time::sleep(lease * 2).await;
    assert_eq!(
        ownership(&db.url, id).await,
        (1, false),
        "A's lease ran out"
    );

    // B takes the session over (bumping the epoch) and writes at seq 1.
    let b_ids: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    let b_seqs = b
        .session("u", id)
        .append(
            b_ids
                .iter()
                .map(|&m| NewMessage::user("b").with_id(m))
                .collect(),
        )
        .await
        .expect("b appends");
    assert_eq!(b_seqs, vec![1, 2]);
    assert_eq!(
        b.stats().takeovers,
        0,
        "A's lease had run out: no live takeover"
    );
    assert_eq!(
        ownership(&db.url, id).await,
        (2, true),
        "B owns the session"
    );

    // A resumes: its stalled write meets epoch 2 and is refused, then everything lands after B.
    let fenced_before = a.stats().fenced;
    drop(paused);
    let mut a_seqs = Vec::new();
    for task in stalled {
        a_seqs.extend(
            task.await
                .expect("join")
                .expect("a's appends succeed after reloading"),
        );
    }
    assert_eq!(
        a_seqs,
        vec![3, 4, 5],
        "A's commands land after B's, in order"
    );
    assert_eq!(
        a.stats().fenced - fenced_before,
        1,
        "the stalled write was fenced once"
    );
    assert_eq!(
        a.stats().takeovers,
        1,
        "A took the session back while B's lease ran"
    );
    assert_eq!(ownership(&db.url, id).await, (3, true), "A owns it again");

    let rows = stored_rows(&db.url, id).await.expect("rows");
    assert_contiguous(&rows);
    let expected: Vec<(i64, Uuid)> = [(0, a0), (1, b_ids[0]), (2, b_ids[1])]
        .into_iter()
        .chain((3..).zip(stalled_ids.iter().copied()))
        .collect();
    assert_eq!(
        rows, expected,
        "nothing of A's stalled write landed at seq 1"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Two processes writing one session in turns: each write after the other's takes the session
/// over (a live takeover, counted), and the other's next write is fenced, reloads and lands.
/// No caller sees an error and the stored sequence is the order of acknowledgements.
async fn alternating_owners_fence_each_other(db: TestDb) {
    let lease = Duration::from_secs(30);
    let engines = [engine(&db, lease).await, engine(&db, lease).await];
    let id = SessionId::new();
    engines[0]
        .session("u", id)
        .create(None, None)
        .await
        .expect("create");
    let mut acked = Vec::new();
    for round in 0..10 {
        let engine = &engines[round % 2];
        let message = Uuid::now_v7();
        let seqs = engine
            .session("u", id)
            .append(vec![NewMessage::user(format!("m{round}")).with_id(message)])
            .await
            .expect("append");
        acked.push((seqs[0], message));
    }
    assert_eq!(
        acked.iter().map(|&(seq, _)| seq).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let fenced: u64 = engines.iter().map(|engine| engine.stats().fenced).sum();
    let takeovers: u64 = engines.iter().map(|engine| engine.stats().takeovers).sum();
    // Round 0 is A's own session; every later round changes hands: 9 live takeovers, and every
    // round but the first of each engine finds its epoch moved.
    assert_eq!(takeovers, 9, "every change of hands took a live lease over");
    assert_eq!(fenced, 8, "every stale owner was fenced once");
    // The epoch: 1 for the create, then one claim per change of hands.
    assert_eq!(ownership(&db.url, id).await, (10, true));
    assert_eq!(stored_rows(&db.url, id).await.expect("rows"), acked);
    for engine in engines {
        engine.shutdown().await;
    }
}

/// Within one process, an owner keeps its epoch: writes after the first do not bump it, and a
/// passivated session taken up again by the same process claims it anew.
async fn one_owner_keeps_its_epoch(db: TestDb) {
    let engine = engine(&db, Duration::from_secs(30)).await;
    let id = SessionId::new();
    engine
        .session("u", id)
        .create(None, None)
        .await
        .expect("create");
    for round in 0..5 {
        engine
            .session("u", id)
            .append(vec![NewMessage::user(format!("m{round}"))])
            .await
            .expect("append");
    }
    assert_eq!(ownership(&db.url, id).await, (1, true));
    engine.passivate(id);
    while engine.is_live(id) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine
        .session("u", id)
        .append(vec![NewMessage::user("again")])
        .await
        .expect("append after reactivation");
    assert_eq!(
        ownership(&db.url, id).await,
        (2, true),
        "a new activation claims"
    );
    let stats = engine.stats();
    assert_eq!((stats.fenced, stats.takeovers), (0, 0));
    engine.shutdown().await;
}

/// The epoch check stands on its own: another owner's claim that did not move the session's
/// version (taken straight in the database here, as an operator or a process that claimed
/// and stalled before writing would) still refuses the old owner's next write, which reloads,
/// claims anew and lands after. Without the epoch condition in the flush this write would
/// land, since the version it expects is the stored one.
async fn a_claim_alone_fences_the_owner(db: TestDb) {
    let engine = engine(&db, Duration::from_secs(30)).await;
    let id = SessionId::new();
    let session = engine.session("u", id);
    session.create(None, None).await.expect("create");
    session
        .append(vec![NewMessage::user("first")])
        .await
        .expect("append");
    assert_eq!(ownership(&db.url, id).await, (1, true));
    let claim = "UPDATE sessions SET epoch = epoch + 1, owner = $1 WHERE id = $2";
    let intruder = Uuid::now_v7();
    if db.url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query(claim)
            .bind(intruder)
            .bind(id)
            .execute(&mut connection)
            .await
            .expect("claim");
    } else {
        let mut connection = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("connect");
        sqlx::query("UPDATE sessions SET epoch = epoch + 1, owner = ? WHERE id = ?")
            .bind(intruder)
            .bind(id)
            .execute(&mut connection)
            .await
            .expect("claim");
    }
    let before = engine.stats();
    assert_eq!(
        session
            .append(vec![NewMessage::user("second")])
            .await
            .expect("append after the claim"),
        vec![1]
    );
    let after = engine.stats();
    assert_eq!(
        after.fenced - before.fenced,
        1,
        "the write was refused once"
    );
    assert_eq!(ownership(&db.url, id).await, (3, true), "claimed back");
    let rows = stored_rows(&db.url, id).await.expect("rows");
    assert_contiguous(&rows);
    assert_eq!(rows.len(), 2);
    engine.shutdown().await;
}

on_shared_backends!(
    a_claim_alone_fences_the_owner,
    paused_owner_is_fenced_after_takeover,
    alternating_owners_fence_each_other,
    one_owner_keeps_its_epoch,
);
