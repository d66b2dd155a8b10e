//! `max_live_actors` keeps the number of live actors bounded by evicting the least recently used
//! idle ones; evicted actors come back on their next message.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use soloist_actors::{Actor, Registry, RegistryConfig};
use tokio::sync::oneshot;

const CAP: usize = 10;
const KEYS: u32 = 100;
const TOUCHERS: u32 = 4;

#[derive(Default)]
struct Counts {
    stops: AtomicU64,
}

struct Touch(oneshot::Sender<u32>);

struct Cached {
    key: u32,
    counts: Arc<Counts>,
}

impl Actor for Cached {
    type Key = u32;
    type Message = Touch;
    type Context = Counts;

    async fn activate(key: &u32, counts: &Arc<Counts>) -> Self {
        Self {
            key: *key,
            counts: Arc::clone(counts),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Touch>) {
        for Touch(reply) in batch.drain(..) {
            let _ = reply.send(self.key);
        }
    }

    async fn stop(self) {
        self.counts.stops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `condition` until it holds, failing the test after a generous deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_actors_stay_bounded_by_the_cap() {
    let counts = Arc::new(Counts::default());
    let registry = Registry::<Cached>::new(
        Arc::clone(&counts),
        RegistryConfig {
            idle_timeout: None,
            max_live_actors: Some(CAP),
            ..RegistryConfig::default()
        },
    );
    for _round in 0..2 {
        let touchers: Vec<_> = (0..TOUCHERS)
            .map(|toucher| {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let mut most_live = 0;
                    for key in (toucher..KEYS).step_by(TOUCHERS as usize) {
                        assert_eq!(registry.ask(key, Touch).await, Ok(key));
                        most_live = most_live.max(registry.live_count());
                    }
                    most_live
                })
            })
            .collect();
        for toucher in touchers {
            // Not asserted: evicted actors leave the map only once the scheduler runs them, so
            // the transient count depends on the machine.
            let most_live = toucher.await.expect("toucher task");
            println!("eviction test: at most {most_live} live actors seen while touching");
        }
    }
    // Slack: actors still busy (just answered) when the last activation scanned.
    let settled = CAP + TOUCHERS as usize;
    eventually("evictions settle", || registry.live_count() <= settled).await;

    let stats = registry.stats();
    println!("eviction test: {stats:?}");
    assert!(stats.evictions > 0);
    assert_eq!(stats.messages, 2 * u64::from(KEYS));
    // Every activation beyond those still live ended with `stop`.
    eventually("evicted actors stop", || {
        counts.stops.load(Ordering::SeqCst) + registry.live_count() as u64
            == registry.stats().activations
    })
    .await;
    registry.shutdown().await;
    assert_eq!(
        counts.stops.load(Ordering::SeqCst),
        registry.stats().activations
    );
}
