//! Messages that queue while an actor is busy reach it as one batch.

use std::sync::{Arc, Mutex};

use soloist_actors::{Actor, Registry, RegistryConfig};
use tokio::sync::oneshot;

#[derive(Default)]
struct BatchSizes(Mutex<Vec<usize>>);

enum Command {
    Block {
        started: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    Work(Option<oneshot::Sender<()>>),
}

struct Batcher {
    sizes: Arc<BatchSizes>,
}

impl Actor for Batcher {
    type Key = &'static str;
    type Message = Command;
    type Context = BatchSizes;

    async fn activate(_key: &&'static str, sizes: &Arc<BatchSizes>) -> Self {
        Self {
            sizes: Arc::clone(sizes),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Command>) {
        self.sizes.0.lock().expect("sizes lock").push(batch.len());
        for command in batch.drain(..) {
            match command {
                Command::Block { started, release } => {
                    let _ = started.send(());
                    let _ = release.await;
                }
                Command::Work(reply) => {
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_during_a_slow_batch_arrive_together() {
    let sizes = Arc::new(BatchSizes::default());
    let registry = Registry::<Batcher>::new(Arc::clone(&sizes), RegistryConfig::default());
    let (started, has_started) = oneshot::channel();
    let (release, released) = oneshot::channel();
    registry
        .send(
            "hot",
            Command::Block {
                started,
                release: released,
            },
        )
        .await
        .expect("send block");
    has_started.await.expect("actor started blocking");
    for _ in 0..9 {
        registry
            .send("hot", Command::Work(None))
            .await
            .expect("send work");
    }
    release.send(()).expect("actor is waiting");
    registry
        .ask("hot", |reply| Command::Work(Some(reply)))
        .await
        .expect("ask answered");

    let sizes = sizes.0.lock().expect("sizes lock").clone();
    assert_eq!(sizes[0], 1);
    assert!(sizes[1] >= 9, "queued messages were split: {sizes:?}");
    let stats = registry.stats();
    assert_eq!(stats.messages, 11);
    assert!(stats.batches <= 3);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_max_batch() {
    let sizes = Arc::new(BatchSizes::default());
    let registry = Registry::<Batcher>::new(
        Arc::clone(&sizes),
        RegistryConfig {
            max_batch: 4,
            ..RegistryConfig::default()
        },
    );
    let (started, has_started) = oneshot::channel();
    let (release, released) = oneshot::channel();
    registry
        .send(
            "hot",
            Command::Block {
                started,
                release: released,
            },
        )
        .await
        .expect("send block");
    has_started.await.expect("actor started blocking");
    for _ in 0..10 {
        registry
            .send("hot", Command::Work(None))
            .await
            .expect("send work");
    }
    release.send(()).expect("actor is waiting");
    registry
        .ask("hot", |reply| Command::Work(Some(reply)))
        .await
        .expect("ask answered");
    let sizes = sizes.0.lock().expect("sizes lock").clone();
    assert_eq!(&sizes[..3], &[1, 4, 4], "got {sizes:?}");
    registry.shutdown().await;
}
