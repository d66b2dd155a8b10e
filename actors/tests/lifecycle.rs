//! Activation on demand, idle passivation, explicit passivation, and the registry's accessors.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use soloist_actors::{Actor, Registry, RegistryConfig, RegistryStats};
use tokio::sync::oneshot;

#[derive(Default)]
struct Counts {
    activations: AtomicU64,
    stops: AtomicU64,
}

/// Adds to the actor's running total and replies with it.
struct Add(u64, oneshot::Sender<u64>);

struct Total {
    total: u64,
    counts: Arc<Counts>,
}

impl Actor for Total {
    type Key = String;
    type Message = Add;
    type Context = Counts;

    async fn activate(_key: &String, counts: &Arc<Counts>) -> Self {
        counts.activations.fetch_add(1, Ordering::SeqCst);
        Self {
            total: 0,
            counts: Arc::clone(counts),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Add>) {
        for Add(amount, reply) in batch.drain(..) {
            self.total += amount;
            let _ = reply.send(self.total);
        }
    }

    async fn stop(self) {
        self.counts.stops.fetch_add(1, Ordering::SeqCst);
    }
}

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

fn registry(idle_timeout: Option<Duration>) -> Registry<Total> {
    Registry::new(
        Arc::new(Counts::default()),
        RegistryConfig {
            idle_timeout,
            ..RegistryConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_keeps_state_until_passivated() {
    let registry = registry(None);
    let key = "a".to_owned();
    assert!(!registry.is_live(&key));
    assert_eq!(
        registry.ask(key.clone(), |reply| Add(2, reply)).await,
        Ok(2)
    );
    assert_eq!(
        registry.ask(key.clone(), |reply| Add(3, reply)).await,
        Ok(5)
    );
    assert!(registry.is_live(&key));
    assert_eq!(registry.live_count(), 1);

    registry.passivate(&key);
    eventually("passivated", || !registry.is_live(&key)).await;
    assert_eq!(registry.context().stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        registry.ask(key.clone(), |reply| Add(1, reply)).await,
        Ok(1)
    );

    let stats = registry.stats();
    assert_eq!(
        stats,
        RegistryStats {
            live_actors: 1,
            mailbox_depth: 0,
            activations: 2,
            passivations: 1,
            evictions: 0,
            restarts: 0,
            batches: stats.batches,
            messages: 3,
        }
    );
    registry.shutdown().await;
    assert_eq!(registry.context().stops.load(Ordering::SeqCst), 2);
    assert_eq!(registry.stats().passivations, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actor_passivates_and_reactivates_on_demand() {
    let registry = registry(Some(Duration::from_millis(5)));
    let key = "idle".to_owned();
    assert_eq!(
        registry.ask(key.clone(), |reply| Add(4, reply)).await,
        Ok(4)
    );
    eventually("idle passivation", || !registry.is_live(&key)).await;
    assert_eq!(registry.context().stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        registry.ask(key.clone(), |reply| Add(4, reply)).await,
        Ok(4)
    );
    assert_eq!(registry.context().activations.load(Ordering::SeqCst), 2);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_independent_actors() {
    let registry = registry(None);
    let mut asks = Vec::new();
    for key in ["x", "y", "z"] {
        for _ in 0..10 {
            let registry = registry.clone();
            asks.push(tokio::spawn(async move {
                registry.ask(key.to_owned(), |reply| Add(1, reply)).await
            }));
        }
    }
    let mut totals = Vec::new();
    for ask in asks {
        totals.push(ask.await.expect("ask task").expect("answered"));
    }
    totals.sort_unstable();
    let expected: Vec<u64> = (1..=10).flat_map(|total| [total; 3]).collect();
    assert_eq!(totals, expected);
    assert_eq!(registry.live_count(), 3);
    registry.shutdown().await;
}

#[test]
fn errors_describe_themselves_without_debug_messages() {
    struct Opaque;
    let error = soloist_actors::SendError::Overloaded(Opaque);
    assert_eq!(format!("{error:?}"), "Overloaded(..)");
    assert_eq!(error.to_string(), "actor mailbox full: send timed out");
    let ask: soloist_actors::AskError = error.into();
    assert_eq!(ask, soloist_actors::AskError::Overloaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_actors() {
    let counts = Arc::new(Counts::default());
    let registry = Registry::<Total>::new(
        Arc::clone(&counts),
        RegistryConfig {
            idle_timeout: None,
            ..RegistryConfig::default()
        },
    );
    let clone = registry.clone();
    assert_eq!(
        registry.ask("a".to_owned(), |reply| Add(1, reply)).await,
        Ok(1)
    );
    assert_eq!(
        clone.ask("b".to_owned(), |reply| Add(1, reply)).await,
        Ok(1)
    );
    drop(registry);
    assert!(!clone.is_shutting_down(), "a clone is still alive");
    drop(clone);
    eventually("actors stopped", || {
        counts.stops.load(Ordering::SeqCst) == 2
    })
    .await;
}
