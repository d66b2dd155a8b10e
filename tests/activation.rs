//! Tail-window activation: activating a session loads its row and its newest `cached_messages`
//! messages, never the whole conversation, so the memory an activation takes — what stays
//! allocated for the live session, and the peak on the way — does not grow with the length of
//! the conversation.
//!
//! Measured with a counting global allocator (bytes, not time, so the figures do not depend on
//! how busy the machine is): the same engine activates a 1,000-message and a 100,000-message
//! session, each three times, and the smallest figure of each is compared. Loading the whole
//! 100,000-message session would take about 100 times as much.

use std::time::Duration;

use peak_alloc::PeakAlloc;
use soloist::SessionId;
use soloist::{Engine, EngineConfig, NewMessage, SessionHandle};
use soloist_testkit::{Backend, TestDb};

/// Counts the bytes allocated and not yet freed, and their high-water mark.
#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

const CACHED: usize = 1_000;
const SEED_CHUNK: usize = 250;

async fn seeded(engine: &Engine, count: usize) -> SessionHandle {
    let session = engine.session("activation", SessionId::new());
    session.create(None, None).await.expect("create");
    for start in (0..count).step_by(SEED_CHUNK) {
        let end = (start + SEED_CHUNK).min(count);
        let messages = (start..end)
            .map(|index| NewMessage::user(format!("message {index}: {}", "x".repeat(64))))
            .collect();
        session.append(messages).await.expect("seed");
    }
    session
}

/// `(bytes still allocated after activating, peak bytes during it)`, over the allocation level
/// before: the smallest of three activations.
async fn activation_bytes(engine: &Engine, session: &SessionHandle) -> (isize, isize) {
    let mut best = (isize::MAX, isize::MAX);
    for _ in 0..3 {
        engine.passivate(session.id());
        while engine.is_live(session.id()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = ALLOCATOR.current_usage() as isize;
        ALLOCATOR.reset_peak_usage();
        let page = session.get(None, Some(1)).await.expect("activate");
        assert_eq!(page.messages.len(), 1);
        drop(page);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let retained = ALLOCATOR.current_usage() as isize - before;
        let peak = ALLOCATOR.peak_usage() as isize - before;
        best = (best.0.min(retained), best.1.min(peak));
    }
    best
}

async fn activation_memory_does_not_grow_with_the_conversation(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            cached_messages: CACHED,
            ..db.config()
        })
        .await
        .expect("engine");
    let short = seeded(&engine, CACHED).await;
    let long = seeded(&engine, 100 * CACHED).await;
    // Warm the pools and statement caches, so that neither measurement pays for them.
    activation_bytes(&engine, &short).await;
    let (short_retained, short_peak) = activation_bytes(&engine, &short).await;
    let (long_retained, long_peak) = activation_bytes(&engine, &long).await;
    println!(
        "activation ({:?}): 1,000 messages: {short_retained} B retained, {short_peak} B peak; \
         100,000 messages: {long_retained} B retained, {long_peak} B peak",
        db.backend
    );
    // Both hold the newest 1,000 messages (~100 KB here); the whole long session would be
    // ~10 MB. Allow for the counters' noise from the engine's background tasks.
    assert!(short_retained > 50_000, "the cached tail is in memory");
    assert!(
        long_retained < short_retained * 3 / 2,
        "retained: {long_retained} B vs {short_retained} B"
    );
    assert!(
        long_peak < short_peak * 3 / 2,
        "peak: {long_peak} B vs {short_peak} B"
    );
    engine.shutdown().await;
}

/// The allocator's counters are the whole process's: one measurement at a time, or the other
/// backend's allocations land in this one's figures.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite_file().expect("database");
    activation_memory_does_not_grow_with_the_conversation(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let _alone = ONE_AT_A_TIME.lock().await;
    if let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") {
        activation_memory_does_not_grow_with_the_conversation(db).await;
    }
}
