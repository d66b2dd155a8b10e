//! Shutdown refuses new messages, handles every accepted one, stops every actor, then returns.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use soloist_actors::{Actor, AskError, Registry, RegistryConfig, SendError};
use tokio::sync::oneshot;

const KEYS: u32 = 32;
const QUEUED_PER_KEY: u64 = 20;

#[derive(Default)]
struct Counts {
    activations: AtomicU64,
    handled: AtomicU64,
    stops: AtomicU64,
}

struct Work {
    reply: Option<oneshot::Sender<()>>,
}

struct Slow {
    counts: Arc<Counts>,
}

impl Actor for Slow {
    type Key = u32;
    type Message = Work;
    type Context = Counts;

    async fn activate(_key: &u32, counts: &Arc<Counts>) -> Self {
        counts.activations.fetch_add(1, Ordering::SeqCst);
        Self {
            counts: Arc::clone(counts),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Work>) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        for work in batch.drain(..) {
            self.counts.handled.fetch_add(1, Ordering::SeqCst);
            if let Some(reply) = work.reply {
                let _ = reply.send(());
            }
        }
    }

    async fn stop(self) {
        self.counts.stops.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_every_accepted_message_and_refuses_the_rest() {
    let counts = Arc::new(Counts::default());
    let registry = Registry::<Slow>::new(
        Arc::clone(&counts),
        RegistryConfig {
            max_batch: 1,
            ..RegistryConfig::default()
        },
    );
    for key in 0..KEYS {
        for _ in 0..QUEUED_PER_KEY {
            registry
                .send(key, Work { reply: None })
                .await
                .expect("accepted before shutdown");
        }
    }

    // Askers keep asking while shutdown runs; each ask is either answered or refused.
    let askers: Vec<_> = (0..KEYS)
        .map(|key| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut answered = 0u64;
                loop {
                    match registry.ask(key, |reply| Work { reply: Some(reply) }).await {
                        Ok(()) => answered += 1,
                        Err(AskError::ShuttingDown) => return answered,
                        Err(other) => panic!("accepted ask failed: {other}"),
                    }
                }
            })
        })
        .collect();
    let shutdowns: Vec<_> = (0..2)
        .map(|_| {
            let registry = registry.clone();
            tokio::spawn(async move { registry.shutdown().await })
        })
        .collect();
    for shutdown in shutdowns {
        shutdown.await.expect("shutdown task");
    }

    // Every actor has ended by the time shutdown returns.
    assert!(registry.is_shutting_down());
    assert_eq!(registry.live_count(), 0);
    let activations = counts.activations.load(Ordering::SeqCst);
    assert!(activations >= u64::from(KEYS));
    assert_eq!(counts.stops.load(Ordering::SeqCst), activations);
    let handled_at_shutdown = counts.handled.load(Ordering::SeqCst);

    let mut answered = 0;
    for asker in askers {
        answered += asker.await.expect("asker task");
    }
    assert_eq!(
        handled_at_shutdown,
        u64::from(KEYS) * QUEUED_PER_KEY + answered,
        "every accepted message was handled before shutdown returned"
    );
    assert_eq!(registry.stats().mailbox_depth, 0);

    assert_eq!(
        registry.ask(0, |reply| Work { reply: Some(reply) }).await,
        Err(AskError::ShuttingDown)
    );
    let refused = registry.send(1, Work { reply: None }).await;
    assert!(matches!(refused, Err(SendError::ShuttingDown(_))));
    assert!(!registry.is_live(&1), "no actor is spawned after shutdown");
    registry.shutdown().await;
}
