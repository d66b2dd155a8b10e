//! A full mailbox either makes senders wait (backpressure) or, with a send timeout, fails them
//! with `Overloaded` and hands the message back.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use soloist_actors::{Actor, AskError, Registry, RegistryConfig, SendError};
use tokio::sync::oneshot;

#[derive(Default)]
struct Handled(Mutex<Vec<u32>>);

enum Command {
    Block {
        started: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    Work(u32, Option<oneshot::Sender<u32>>),
}

struct Worker {
    handled: Arc<Handled>,
}

impl Actor for Worker {
    type Key = u32;
    type Message = Command;
    type Context = Handled;

    async fn activate(_key: &u32, handled: &Arc<Handled>) -> Self {
        Self {
            handled: Arc::clone(handled),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Command>) {
        for command in batch.drain(..) {
            match command {
                Command::Block { started, release } => {
                    let _ = started.send(());
                    let _ = release.await;
                }
                Command::Work(value, reply) => {
                    self.handled.0.lock().expect("handled lock").push(value);
                    if let Some(reply) = reply {
                        let _ = reply.send(value);
                    }
                }
            }
        }
    }
}

/// Sends a blocking command and waits until the actor is inside it.
async fn block(registry: &Registry<Worker>, key: u32) -> oneshot::Sender<()> {
    let (started, has_started) = oneshot::channel();
    let (release, released) = oneshot::channel();
    registry
        .send(
            key,
            Command::Block {
                started,
                release: released,
            },
        )
        .await
        .expect("send block");
    has_started.await.expect("actor started blocking");
    release
}

fn registry(send_timeout: Option<Duration>) -> (Arc<Handled>, Registry<Worker>) {
    let handled = Arc::new(Handled::default());
    let registry = Registry::new(
        Arc::clone(&handled),
        RegistryConfig {
            mailbox_capacity: 1,
            send_timeout,
            ..RegistryConfig::default()
        },
    );
    (handled, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_with_send_timeout_is_overloaded() {
    let (handled, registry) = registry(Some(Duration::from_millis(10)));
    let release = block(&registry, 1).await;

    registry
        .send(1, Command::Work(1, None))
        .await
        .expect("fills the one mailbox slot");
    match registry.send(1, Command::Work(2, None)).await {
        Err(error @ SendError::Overloaded(_)) => {
            assert!(matches!(error.into_inner(), Command::Work(2, None)));
        }
        other => panic!("expected Overloaded, got {:?}", other.err()),
    }
    assert_eq!(
        registry.ask(1, |reply| Command::Work(3, Some(reply))).await,
        Err(AskError::Overloaded)
    );
    assert_eq!(registry.stats().mailbox_depth, 1);

    release.send(()).expect("actor is waiting");
    assert_eq!(
        registry.ask(1, |reply| Command::Work(4, Some(reply))).await,
        Ok(4)
    );
    assert_eq!(*handled.0.lock().expect("handled lock"), vec![1, 4]);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_without_send_timeout_applies_backpressure() {
    let (handled, registry) = registry(None);
    let release = block(&registry, 1).await;

    let waiting: Vec<_> = (0..4)
        .map(|value| {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry
                    .ask(1, |reply| Command::Work(value, Some(reply)))
                    .await
            })
        })
        .collect();
    release.send(()).expect("actor is waiting");
    for (value, ask) in (0..4).zip(waiting) {
        assert_eq!(ask.await.expect("ask task"), Ok(value));
    }
    assert_eq!(handled.0.lock().expect("handled lock").len(), 4);
    registry.shutdown().await;
}
