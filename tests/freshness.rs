//! Freshness across processes when the change feed fails (PostgreSQL).
//!
//! Engines follow each other's writes through LISTEN/NOTIFY. Notices are transient: one sent
//! while a listener is disconnected is lost. These tests disconnect engine A's listener (the
//! test hook `Engine::pause_change_feed`, equivalent to a lost connection) while engine B
//! writes, and show the fallbacks: while A is not listening, its reads check the stored version
//! (so a read through A never goes back behind a write acknowledged through B), and once it
//! listens again, its live sessions that missed a write catch up and their subscribers get the
//! missed messages — with no read or write on A to trigger it.

use std::time::Duration;

use soloist::SessionId;
use soloist::uuid::Uuid;
use soloist::{Engine, NewMessage};
use soloist_testkit::history::History;
use soloist_testkit::{Backend, TestDb, ci};

/// Two engines on one fresh PostgreSQL schema, and a session A created with one message.
struct Setup {
    db: TestDb,
    a: Engine,
    b: Engine,
    history: std::sync::Arc<History>,
    id: SessionId,
}

impl Setup {
    async fn new() -> Option<Setup> {
        let db = TestDb::new(Backend::Postgres).await.expect("database")?;
        let (a, b) = (
            db.engine().await.expect("engine"),
            db.engine().await.expect("engine"),
        );
        let history = History::new();
        let id = SessionId::new();
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
            page.messages.last().and_then(|m| m.text()),
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
            message.text(),
            Some(format!("from b {}", expected - 1).as_str())
        );
    }
    history.verify("freshness, reconnect", &db, &a, "u").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A listening connection that stays open but stops delivering (its server process stopped
/// with SIGSTOP: no error, no closed socket, as with a half-open TCP connection) is detected by
/// the listener's heartbeat; A reconnects, and its plain reads see B's write again.
///
/// Needs the PostgreSQL server on this machine (the backend is stopped by pid).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_listening_connection_is_detected() {
    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        return;
    };
    let app_name = format!("soloist-silent-{}", Uuid::new_v4().simple());
    let a = db
        .engine_with(soloist::EngineConfig::new(format!(
            "{}&application_name={app_name}",
            db.url
        )))
        .await
        .expect("engine");
    let b = db.engine().await.expect("engine");
    let id = SessionId::new();
    a.session("u", id).create(None, None).await.expect("create");
    a.session("u", id)
        .append(vec![NewMessage::user("from a")])
        .await
        .expect("append");

    // A's listening connection: the one of A's connections whose last statement was LISTEN.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .expect("admin");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND query LIKE 'LISTEN%'",
        )
        .bind(&app_name)
        .fetch_optional(&mut admin)
        .await
        .expect("find the listener");
        if let Some(pid) = pid {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "A never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            !ci(),
            "CI: the PostgreSQL server must run on this machine for this test"
        );
        eprintln!("SKIPPED: a_silent_listening_connection_is_detected needs a local server");
        return;
    }
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    };
    /// Resumes the stopped backend whatever happens to the test.
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &self.0.to_string()])
                .status();
        }
    }
    signal("STOP");
    let _resume = Resume(pid);

    b.session("u", id)
        .append(vec![NewMessage::user("from b")])
        .await
        .expect("b appends");
    // No notice reaches A; its heartbeat finds the connection silent within two beats, and
    // from then on its reads check the stored version.
    let started = std::time::Instant::now();
    loop {
        let page = a.session("u", id).get(None, None).await.expect("read");
        if page.session.message_count == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "A's plain reads stayed behind B's write for 30 s: the silent connection went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "a_silent_listening_connection_is_detected: A caught up {:?} after B's write",
        started.elapsed()
    );
    signal("CONT");
    a.shutdown().await;
    b.shutdown().await;
}
