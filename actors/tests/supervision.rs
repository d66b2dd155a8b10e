//! A panic in `handle` or `activate` restarts the actor on the same mailbox.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use soloist_actors::{Actor, AskError, Registry, RegistryConfig};
use tokio::sync::oneshot;

#[derive(Default)]
struct Counts {
    /// Completed activations so far; each actor remembers which one it is.
    activations: AtomicU64,
    /// `activate` panics while this is above zero, decrementing it.
    activation_panics: AtomicU64,
}

enum Command {
    /// Signals `started`, then holds the actor until `release` resolves.
    Block {
        started: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    Panic(oneshot::Sender<()>),
    /// Replies with the value and the number of the activation that handled it.
    Echo(u32, oneshot::Sender<(u32, u64)>),
}

struct Fragile {
    activation: u64,
}

impl Actor for Fragile {
    type Key = u32;
    type Message = Command;
    type Context = Counts;

    async fn activate(_key: &u32, counts: &Arc<Counts>) -> Self {
        let should_panic = counts
            .activation_panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        assert!(!should_panic, "activation asked to panic");
        Self {
            activation: counts.activations.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Command>) {
        for command in batch.drain(..) {
            match command {
                Command::Block { started, release } => {
                    let _ = started.send(());
                    let _ = release.await;
                }
                Command::Panic(reply) => {
                    let _dropped_unanswered = reply;
                    panic!("asked to panic");
                }
                Command::Echo(value, reply) => {
                    let _ = reply.send((value, self.activation));
                }
            }
        }
    }
}

fn registry(counts: Counts, max_batch: usize) -> Registry<Fragile> {
    Registry::new(
        Arc::new(counts),
        RegistryConfig {
            max_batch,
            ..RegistryConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_fails_its_ask_and_the_actor_is_reactivated() {
    let registry = registry(Counts::default(), 256);
    assert_eq!(
        registry.ask(1, |reply| Command::Echo(7, reply)).await,
        Ok((7, 1))
    );

    assert_eq!(
        registry.ask(1, Command::Panic).await,
        Err(AskError::ActorFailed)
    );
    assert_eq!(
        registry.ask(1, |reply| Command::Echo(8, reply)).await,
        Ok((8, 2))
    );

    let stats = registry.stats();
    assert_eq!(stats.restarts, 1);
    assert_eq!(stats.activations, 2);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_behind_a_panic_go_to_the_new_activation() {
    // One message per batch, so the messages behind the panic are not in its batch.
    let registry = registry(Counts::default(), 1);
    let (started, has_started) = oneshot::channel();
    let (release, released) = oneshot::channel();
    registry
        .send(
            1,
            Command::Block {
                started,
                release: released,
            },
        )
        .await
        .expect("send block");
    has_started
        .await
        .expect("actor started the blocking command");

    let (panic_reply, panic_answer) = oneshot::channel();
    registry
        .send(1, Command::Panic(panic_reply))
        .await
        .expect("send panic");
    let mut echoes = Vec::new();
    for value in 0..3 {
        let (reply, answer) = oneshot::channel();
        registry
            .send(1, Command::Echo(value, reply))
            .await
            .expect("send echo");
        echoes.push(answer);
    }
    release.send(()).expect("actor is waiting");

    assert!(
        panic_answer.await.is_err(),
        "the panicking request gets no reply"
    );
    for (value, answer) in (0..3).zip(echoes) {
        assert_eq!(
            answer.await,
            Ok((value, 2)),
            "handled by the second activation"
        );
    }
    let stats = registry.stats();
    assert_eq!(stats.restarts, 1);
    assert_eq!(stats.activations, 2);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_activation_is_retried_with_backoff() {
    let registry = registry(
        Counts {
            activation_panics: AtomicU64::new(2),
            ..Counts::default()
        },
        256,
    );
    assert_eq!(
        registry.ask(1, |reply| Command::Echo(3, reply)).await,
        Ok((3, 1))
    );
    let stats = registry.stats();
    assert_eq!(stats.restarts, 2);
    assert_eq!(stats.activations, 1);
    registry.shutdown().await;
}
