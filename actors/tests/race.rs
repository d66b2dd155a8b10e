//! The hard race: messages sent while their actor is passivating are handled exactly once, in
//! per-sender order, and two activations for one key never overlap.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use soloist_actors::{Actor, Registry, RegistryConfig};
use tokio::sync::oneshot;

const KEYS: usize = 3;
const SENDERS: u32 = 8;
/// Messages each sender sends at least...
const PER_SENDER: u32 = 2_500;
/// ...and it keeps going (up to a bound) until the actors have cycled this many times, so the
/// race is exercised the same amount on fast and slow machines.
const MIN_ACTIVATIONS: u64 = 2_000;

/// Shared across activations: what a correct runtime must never let happen, and what was handled.
#[derive(Default)]
struct Observed {
    /// Activated-and-not-stopped actors per key: must only ever be 0 or 1.
    live: [AtomicI64; KEYS],
    /// Times an activation, batch or stop saw another live actor for its key.
    violations: AtomicU64,
    /// Per key, `(sender, sequence)` in the order handled.
    handled: Mutex<Vec<Vec<(u32, u32)>>>,
}

struct Record {
    sender: u32,
    sequence: u32,
    reply: Option<oneshot::Sender<()>>,
}

struct Recorder {
    key: usize,
    observed: Arc<Observed>,
}

impl Actor for Recorder {
    type Key = usize;
    type Message = Record;
    type Context = Observed;

    async fn activate(key: &usize, observed: &Arc<Observed>) -> Self {
        if observed.live[*key].fetch_add(1, Ordering::SeqCst) != 0 {
            observed.violations.fetch_add(1, Ordering::SeqCst);
        }
        // Widen the window in which a second activation could sneak in.
        tokio::task::yield_now().await;
        Self {
            key: *key,
            observed: Arc::clone(observed),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Record>) {
        if self.observed.live[self.key].load(Ordering::SeqCst) != 1 {
            self.observed.violations.fetch_add(1, Ordering::SeqCst);
        }
        let mut handled = self.observed.handled.lock().expect("handled lock");
        for record in batch.drain(..) {
            handled[self.key].push((record.sender, record.sequence));
            if let Some(reply) = record.reply {
                let _ = reply.send(());
            }
        }
    }

    async fn stop(self) {
        tokio::task::yield_now().await;
        if self.observed.live[self.key].fetch_sub(1, Ordering::SeqCst) != 1 {
            self.observed.violations.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_racing_passivation_are_handled_exactly_once_in_order() {
    let observed = Arc::new(Observed {
        handled: Mutex::new(vec![Vec::new(); KEYS]),
        ..Observed::default()
    });
    let registry = Registry::<Recorder>::new(
        Arc::clone(&observed),
        RegistryConfig {
            mailbox_capacity: 8,
            max_batch: 16,
            idle_timeout: Some(Duration::from_millis(1)),
            ..RegistryConfig::default()
        },
    );

    let done = Arc::new(AtomicBool::new(false));
    let passivator = tokio::spawn({
        let registry = registry.clone();
        let done = Arc::clone(&done);
        async move {
            while !done.load(Ordering::Relaxed) {
                for key in 0..KEYS {
                    registry.passivate(&key);
                }
                tokio::task::yield_now().await;
            }
        }
    });

    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut sequence = 0;
                loop {
                    let enough = sequence >= PER_SENDER
                        && (sequence >= 40 * PER_SENDER
                            || sequence % 64 == 0
                                && registry.stats().activations >= MIN_ACTIVATIONS);
                    let last = enough;
                    let key = ((sequence + sender) as usize) % KEYS;
                    // Mix pipelined sends (several queued across a passivation) with asks.
                    if sequence % 4 == 3 || last {
                        registry
                            .ask(key, |reply| Record {
                                sender,
                                sequence,
                                reply: Some(reply),
                            })
                            .await
                            .expect("ask accepted and answered");
                    } else {
                        registry
                            .send(
                                key,
                                Record {
                                    sender,
                                    sequence,
                                    reply: None,
                                },
                            )
                            .await
                            .expect("send accepted");
                    }
                    sequence += 1;
                    if last {
                        return sequence;
                    }
                }
            })
        })
        .collect();
    let mut sent = Vec::new();
    for sender in senders {
        sent.push(sender.await.expect("sender task"));
    }
    let total_sent: u32 = sent.iter().sum();
    done.store(true, Ordering::Relaxed);
    passivator.await.expect("passivator task");
    registry.shutdown().await;

    let stats = registry.stats();
    println!("race test: {stats:?}");
    assert_eq!(observed.violations.load(Ordering::SeqCst), 0);
    for live in &observed.live {
        assert_eq!(live.load(Ordering::SeqCst), 0, "every activation stopped");
    }
    assert_eq!(registry.live_count(), 0);
    assert!(
        stats.activations >= MIN_ACTIVATIONS,
        "only {} activations",
        stats.activations
    );
    assert_eq!(stats.restarts, 0);
    assert_eq!(stats.messages, u64::from(total_sent));

    let handled = observed.handled.lock().expect("handled lock");
    let mut total = 0;
    for (key, records) in handled.iter().enumerate() {
        let unique: HashSet<_> = records.iter().copied().collect();
        assert_eq!(
            unique.len(),
            records.len(),
            "key {key}: a message was handled twice"
        );
        total += records.len();
        for sender in 0..SENDERS {
            let sequences: Vec<u32> = records
                .iter()
                .filter(|(from, _)| *from == sender)
                .map(|(_, sequence)| *sequence)
                .collect();
            let expected: Vec<u32> = (0..sent[sender as usize])
                .filter(|sequence| ((sequence + sender) as usize) % KEYS == key)
                .collect();
            assert_eq!(
                sequences, expected,
                "key {key}, sender {sender}: lost or reordered"
            );
        }
    }
    assert_eq!(total, total_sent as usize);
}
