//! The registry's activation / passivation race explored under shuttle's randomized schedulers.
//!
//! Compiled only in the `soloist-actors-shuttle` package, whose build script sets `cfg(shuttle)`,
//! so the crate's tasks, activation gate, yields and timers are shuttle's (see `rt`). `cargo test
//! --workspace` runs it; `cargo test -p soloist-actors-shuttle` runs it alone. Each test runs a
//! small scenario many times, each time under a different schedule chosen by shuttle's random
//! scheduler and then by its PCT scheduler (which biases towards bugs that need only a few
//! preemptions at the right places), and prints how many schedules it explored.
//! `SOLOIST_SHUTTLE_ITERATIONS` sets the number of schedules per scheduler per scenario;
//! the random scheduler's seed is fresh each run, so every run explores new schedules, and is
//! printed: `SOLOIST_SHUTTLE_SEED=<seed>` repeats that run's random schedules.
//!
//! # What one schedule does
//! Three senders send four messages each to two keys through a registry with one-slot mailboxes,
//! mixing fire-and-forget sends with asks, while the actors passivate: by the idle timeout (whose
//! virtual timer may fire at any point the actor's task is scheduled), by explicit `passivate`
//! calls from another task, or by LRU eviction under a cap of one live actor. Then the registry
//! shuts down, either after the senders finished or while they are still sending.
//!
//! The interleavings come from the scheduling points: every `.await` that waits, every spawn,
//! the activation gate, the test actor's yields inside `activate` and `stop`, and `rt::switch`
//! where the runtime decides to passivate but has not yet closed the mailbox, and where a
//! finished task has left the map but not yet released its successor. So a send can meet the
//! mailbox open, full, closing or closed, the slot present, draining or gone, with a successor
//! waiting or not, and shutdown can begin at any of those points.
//!
//! # What each schedule checks
//! - no two activations of one key overlap (a live count per key, kept by the actor, is never
//!   above one, and `handle` only runs while it is one);
//! - every accepted message is handled exactly once, and every ask is answered;
//! - per sender and key, messages are handled in the order they were sent;
//! - a message refused at shutdown is never handled, and nothing is handled once `shutdown`
//!   returned; every activation stopped and the map is empty;
//! - no schedule deadlocks (shuttle fails an execution in which every task is blocked) or runs
//!   away (shuttle's step limit).
//!
//! # What it does not explore
//! Operations of tokio's channels and cancellation tokens, of `DashMap` and of atomics are atomic
//! steps here: shuttle does not preempt inside them, so their own internal races (tested by
//! tokio with loom) and weak memory orderings are out of scope. Timers fire only when their task
//! is scheduled, never measured against real time; `send_timeout` and panics in the actor
//! (supervision) are not modelled, and schedules are sampled, not enumerated.

use std::{
    collections::HashSet,
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use shuttle::{
    Config, Runner,
    scheduler::{PctScheduler, RandomScheduler},
};
use tokio::sync::oneshot;

use crate::{Actor, AskError, Registry, RegistryConfig, SendError, rt};

const KEYS: usize = 2;
const SENDERS: u32 = 3;
const PER_SENDER: u32 = 4;
/// Schedules per scheduler per scenario, unless `SOLOIST_SHUTTLE_ITERATIONS` says otherwise.
const DEFAULT_ITERATIONS: usize = 1_000;
/// Preemptions per schedule that the PCT scheduler places.
const PCT_DEPTH: usize = 3;

/// What one schedule of a scenario saw; shared by the test actors and the test.
#[derive(Default)]
struct Observed {
    /// Activated-and-not-stopped actors per key: must only ever be 0 or 1.
    live: [AtomicI64; KEYS],
    /// What went wrong, for the assertion message.
    violations: Mutex<Vec<String>>,
    /// Per key, `(sender, sequence)` in the order handled.
    handled: Mutex<Vec<Vec<(u32, u32)>>>,
    /// Set once `Registry::shutdown` has returned.
    shut_down: AtomicBool,
}

impl Observed {
    fn violation(&self, what: String) {
        self.violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(what);
    }
}

/// One message: who sent it, its place in that sender's sequence, and a reply sender for asks.
struct Record {
    sender: u32,
    sequence: u32,
    reply: Option<oneshot::Sender<()>>,
}

/// An actor whose state lives in memory: it appends what it handles to `Observed::handled`.
struct Recorder {
    key: usize,
    observed: Arc<Observed>,
}

impl Actor for Recorder {
    type Key = usize;
    type Message = Record;
    type Context = Observed;

    async fn activate(key: &usize, observed: &Arc<Observed>) -> Self {
        let before = observed.live[*key].fetch_add(1, Ordering::SeqCst);
        if before != 0 {
            observed.violation(format!("key {key}: activated while {before} live"));
        }
        // Loading state takes time: let other tasks run in the middle of an activation.
        rt::yield_now().await;
        Self {
            key: *key,
            observed: Arc::clone(observed),
        }
    }

    async fn handle(&mut self, batch: &mut Vec<Record>) {
        let live = self.observed.live[self.key].load(Ordering::SeqCst);
        if live != 1 {
            self.observed
                .violation(format!("key {}: handled with {live} live", self.key));
        }
        if self.observed.shut_down.load(Ordering::SeqCst) {
            self.observed
                .violation(format!("key {}: handled after shutdown returned", self.key));
        }
        let mut handled = self
            .observed
            .handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for record in batch.drain(..) {
            handled[self.key].push((record.sender, record.sequence));
            if let Some(reply) = record.reply {
                let _ = reply.send(());
            }
        }
    }

    async fn stop(self) {
        // Saving state takes time too.
        rt::yield_now().await;
        let before = self.observed.live[self.key].fetch_sub(1, Ordering::SeqCst);
        if before != 1 {
            self.observed
                .violation(format!("key {}: stopped while {before} live", self.key));
        }
    }
}

/// The knobs that make one scenario differ from another.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    /// Passivate on idleness (a virtual timer that may fire whenever the actor is scheduled).
    idle_timeout: Option<Duration>,
    /// A cap on live actors, so activations evict others.
    max_live_actors: Option<usize>,
    /// A task that asks every key's actor to passivate, a few times.
    passivator: bool,
    /// Start shutdown while the senders are still sending, rather than after they finished.
    shutdown_early: bool,
}

/// Which key a sender's `sequence`-th message goes to: the senders interleave over the keys.
fn key_of(sender: u32, sequence: u32) -> usize {
    ((sender + sequence) as usize) % KEYS
}

/// Sends one sender's messages in order, every other one as an ask. Returns the sequences the
/// registry accepted; stops at the first refusal, which only shutdown may cause.
async fn send_all(registry: Registry<Recorder>, sender: u32, observed: Arc<Observed>) -> Vec<u32> {
    let mut accepted = Vec::new();
    for sequence in 0..PER_SENDER {
        let key = key_of(sender, sequence);
        let refused = if sequence % 2 == 1 {
            match registry
                .ask(key, |reply| Record {
                    sender,
                    sequence,
                    reply: Some(reply),
                })
                .await
            {
                Ok(()) => false,
                Err(AskError::ShuttingDown) => true,
                Err(error) => {
                    // Accepted, so it must have been handled: record it, and say what happened.
                    observed.violation(format!(
                        "sender {sender}, sequence {sequence}: ask accepted but {error}"
                    ));
                    false
                }
            }
        } else {
            let record = Record {
                sender,
                sequence,
                reply: None,
            };
            match registry.send(key, record).await {
                Ok(()) => false,
                Err(SendError::ShuttingDown(_)) => true,
                Err(SendError::Overloaded(_)) => {
                    observed.violation(format!(
                        "sender {sender}, sequence {sequence}: overloaded without a send timeout"
                    ));
                    true
                }
            }
        };
        if refused {
            if !registry.is_shutting_down() {
                observed.violation(format!(
                    "sender {sender}, sequence {sequence}: refused before shutdown"
                ));
            }
            break;
        }
        accepted.push(sequence);
    }
    accepted
}

/// One schedule of `scenario`: run it, check what the actors saw, and return the registry's
/// activation count.
fn run_once(scenario: Scenario) -> u64 {
    let observed = Arc::new(Observed {
        handled: Mutex::new(vec![Vec::new(); KEYS]),
        ..Observed::default()
    });
    let registry = Registry::<Recorder>::new(
        Arc::clone(&observed),
        RegistryConfig {
            // One slot, so senders also wait on full mailboxes that then close under them.
            mailbox_capacity: 1,
            max_batch: 2,
            idle_timeout: scenario.idle_timeout,
            send_timeout: None,
            max_live_actors: scenario.max_live_actors,
        },
    );

    let sent = shuttle::future::block_on({
        let registry = registry.clone();
        let observed = Arc::clone(&observed);
        async move {
            let senders: Vec<_> = (0..SENDERS)
                .map(|sender| {
                    shuttle::future::spawn(send_all(
                        registry.clone(),
                        sender,
                        Arc::clone(&observed),
                    ))
                })
                .collect();
            let passivator = scenario.passivator.then(|| {
                let registry = registry.clone();
                shuttle::future::spawn(async move {
                    for _ in 0..3 {
                        for key in 0..KEYS {
                            registry.passivate(&key);
                        }
                        rt::yield_now().await;
                    }
                })
            });
            let early_shutdown = scenario.shutdown_early.then(|| {
                let registry = registry.clone();
                let observed = Arc::clone(&observed);
                shuttle::future::spawn(async move {
                    registry.shutdown().await;
                    observed.shut_down.store(true, Ordering::SeqCst);
                })
            });
            let mut sent = Vec::new();
            for sender in senders {
                sent.push(sender.await.expect("sender task"));
            }
            if let Some(passivator) = passivator {
                passivator.await.expect("passivator task");
            }
            match early_shutdown {
                Some(shutdown) => shutdown.await.expect("shutdown task"),
                None => {
                    registry.shutdown().await;
                    observed.shut_down.store(true, Ordering::SeqCst);
                }
            }
            // Refused, and never handled.
            let late = registry
                .send(
                    0,
                    Record {
                        sender: SENDERS,
                        sequence: 0,
                        reply: None,
                    },
                )
                .await;
            assert!(
                matches!(late, Err(SendError::ShuttingDown(_))),
                "a send after shutdown was accepted"
            );
            sent
        }
    });

    let violations = observed
        .violations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(violations.is_empty(), "{scenario:?}: {violations:?}");
    for (key, live) in observed.live.iter().enumerate() {
        assert_eq!(
            live.load(Ordering::SeqCst),
            0,
            "{scenario:?}: key {key}: an activation never stopped"
        );
    }
    assert_eq!(
        registry.live_count(),
        0,
        "{scenario:?}: slots left in the map"
    );
    let handled = observed
        .handled
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (key, records) in handled.iter().enumerate() {
        let unique: HashSet<_> = records.iter().copied().collect();
        assert_eq!(
            unique.len(),
            records.len(),
            "{scenario:?}: key {key}: a message was handled twice: {records:?}"
        );
        for sender in 0..SENDERS {
            let sequences: Vec<u32> = records
                .iter()
                .filter(|(from, _)| *from == sender)
                .map(|(_, sequence)| *sequence)
                .collect();
            let expected: Vec<u32> = sent[sender as usize]
                .iter()
                .copied()
                .filter(|sequence| key_of(sender, *sequence) == key)
                .collect();
            assert_eq!(
                sequences, expected,
                "{scenario:?}: key {key}, sender {sender}: lost, reordered or refused-but-handled"
            );
        }
    }
    registry.stats().activations
}

/// Writes a line to stderr directly, past the test harness's capture, so the number of schedules
/// shows in every `cargo test` log and not only with `--nocapture`.
fn report(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn iterations() -> usize {
    std::env::var("SOLOIST_SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

/// Runs `scenario` under the random scheduler, then the PCT scheduler, and prints how many
/// schedules each explored (or after how many one failed).
fn explore(name: &str, scenario: Scenario) {
    let iterations = iterations();
    let seed = std::env::var("SOLOIST_SHUTTLE_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher as _, RandomState};
            RandomState::new().hash_one(Instant::now())
        });
    let random = Runner::new(
        RandomScheduler::new_from_seed(seed, iterations),
        Config::new(),
    );
    let label = format!("random scheduler (SOLOIST_SHUTTLE_SEED={seed})");
    run_counted(name, &label, scenario, |test| random.run(test));
    let pct = Runner::new(PctScheduler::new(PCT_DEPTH, iterations), Config::new());
    let label = format!("PCT scheduler (depth {PCT_DEPTH})");
    run_counted(name, &label, scenario, |test| pct.run(test));
}

/// Runs the schedules of `scenario` through `runner`, counting them, and reports the count.
fn run_counted(
    name: &str,
    scheduler: &str,
    scenario: Scenario,
    runner: impl FnOnce(Box<dyn Fn() + Send + Sync>) -> usize,
) {
    /// Reports how many schedules ran before a failure unwinds the test.
    struct OnFailure<'a>(&'a str, &'a str, &'a AtomicUsize);

    impl Drop for OnFailure<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                report(format_args!(
                    "shuttle {}: {} FAILED at schedule {}",
                    self.0,
                    self.1,
                    self.2.load(Ordering::Relaxed)
                ));
            }
        }
    }

    let schedules = Arc::new(AtomicUsize::new(0));
    let activations = Arc::new(AtomicU64::new(0));
    let on_failure = OnFailure(name, scheduler, &schedules);
    let started = Instant::now();
    let explored = runner(Box::new({
        let schedules = Arc::clone(&schedules);
        let activations = Arc::clone(&activations);
        move || {
            schedules.fetch_add(1, Ordering::Relaxed);
            activations.fetch_add(run_once(scenario), Ordering::Relaxed);
        }
    }));
    drop(on_failure);
    report(format_args!(
        "shuttle {name}: {scheduler} explored {explored} schedules in {:.1?} \
         ({:.1} activations per schedule)",
        started.elapsed(),
        activations.load(Ordering::Relaxed) as f64 / explored.max(1) as f64,
    ));
}

#[test]
fn idle_passivation_races_sends() {
    explore(
        "idle passivation",
        Scenario {
            idle_timeout: Some(Duration::from_millis(1)),
            max_live_actors: None,
            passivator: false,
            shutdown_early: false,
        },
    );
}

#[test]
fn explicit_passivation_races_sends() {
    explore(
        "explicit passivation",
        Scenario {
            idle_timeout: None,
            max_live_actors: None,
            passivator: true,
            shutdown_early: false,
        },
    );
}

#[test]
fn eviction_races_sends() {
    explore(
        "eviction",
        Scenario {
            idle_timeout: None,
            max_live_actors: Some(1),
            passivator: false,
            shutdown_early: false,
        },
    );
}

#[test]
fn shutdown_races_sends_and_passivation() {
    explore(
        "shutdown during sends",
        Scenario {
            idle_timeout: Some(Duration::from_millis(1)),
            max_live_actors: None,
            passivator: true,
            shutdown_early: true,
        },
    );
}
