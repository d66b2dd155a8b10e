//! What the actor runtime costs on top of the channels it is built from.
//!
//! Each group measures, side by side, one caller making sequential request/reply round trips:
//! - `raw_mpsc_oneshot`: the baseline, a tokio task looping on a bounded `mpsc` receiver and
//!   answering each request over its `oneshot`, with the same mailbox capacity as the registry;
//! - `registry_ask`: a trivial echo [`Actor`] reached through [`Registry::ask`] (key lookup in the
//!   map, bounded mailbox, batching, reply), with the default configuration (idle timeout on);
//! - `registry_ask_no_idle_timeout`: the same without an idle timeout, which shows what arming
//!   the idle timer on every receive costs.
//!
//! The caller runs as a task on the runtime, as a server's request handler would, and times its
//! own loop (`iter_custom`). Groups: one key on a multi-thread runtime (2 workers, one per core
//! here) and on a current-thread runtime; 16 keys called round robin (16 actors, or 16 raw tasks).
//! The target is `registry_ask` ≤ 2× `raw_mpsc_oneshot` in the same run.
//!
//! Run with `cargo bench -p soloist-actors --bench overhead`.

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use soloist_actors::{Actor, Registry, RegistryConfig};
use tokio::{
    runtime::Runtime,
    sync::{mpsc, oneshot},
};

/// A request: a value to send back, and where to send it.
type Request = (u64, oneshot::Sender<u64>);

/// Mailbox capacity of both the registry's actors and the raw baseline's channel.
const CAPACITY: usize = 256;

/// An actor that answers every request with its own value.
struct Echo;

impl Actor for Echo {
    type Key = u32;
    type Message = Request;
    type Context = ();

    async fn activate(_key: &u32, _context: &Arc<()>) -> Self {
        Echo
    }

    async fn handle(&mut self, batch: &mut Vec<Request>) {
        for (value, reply_to) in batch.drain(..) {
            let _ = reply_to.send(value);
        }
    }
}

/// The baseline: what a hand-written actor loop costs.
fn spawn_raw_echo() -> mpsc::Sender<Request> {
    let (sender, mut receiver) = mpsc::channel::<Request>(CAPACITY);
    tokio::spawn(async move {
        while let Some((value, reply_to)) = receiver.recv().await {
            let _ = reply_to.send(value);
        }
    });
    sender
}

/// One round trip over a raw channel.
async fn raw_round_trip(sender: &mpsc::Sender<Request>, value: u64) -> u64 {
    let (reply_to, reply) = oneshot::channel();
    sender
        .send((value, reply_to))
        .await
        .expect("raw echo task is running");
    reply.await.expect("raw echo task answers")
}

/// One round trip through the registry.
async fn registry_round_trip(registry: &Registry<Echo>, key: u32, value: u64) -> u64 {
    registry
        .ask(key, |reply_to| (value, reply_to))
        .await
        .expect("echo actor answers")
}

fn multi_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build multi-thread runtime")
}

fn current_thread_runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build current-thread runtime")
}

/// Runs `timed_loop` as a task on `runtime` (where a server's request handler would run) and
/// returns the duration it measured.
fn on_runtime(
    runtime: &Runtime,
    timed_loop: impl Future<Output = Duration> + Send + 'static,
) -> Duration {
    runtime.block_on(async move {
        tokio::spawn(timed_loop)
            .await
            .expect("benchmark task completes")
    })
}

/// The contenders on `keys` keys (called round robin), on one runtime.
fn compare(group: &mut BenchmarkGroup<'_, WallTime>, runtime: &Runtime, keys: u32) {
    let raw: Arc<Vec<mpsc::Sender<Request>>> =
        Arc::new(runtime.block_on(async { (0..keys).map(|_| spawn_raw_echo()).collect() }));
    group.bench_function("raw_mpsc_oneshot", |b| {
        b.iter_custom(|iters| {
            let raw = Arc::clone(&raw);
            on_runtime(runtime, async move {
                let start = Instant::now();
                for i in 0..iters {
                    let sender = &raw[(i % raw.len() as u64) as usize];
                    black_box(raw_round_trip(sender, i).await);
                }
                start.elapsed()
            })
        });
    });
    // Dropping the senders ends the raw tasks.
    drop(raw);

    for (name, idle_timeout) in [
        ("registry_ask", RegistryConfig::default().idle_timeout),
        ("registry_ask_no_idle_timeout", None),
    ] {
        let config = RegistryConfig {
            mailbox_capacity: CAPACITY,
            idle_timeout,
            ..RegistryConfig::default()
        };
        let registry = Registry::<Echo>::new(Arc::new(()), config);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let registry = registry.clone();
                on_runtime(runtime, async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        let key = (i % u64::from(keys)) as u32;
                        black_box(registry_round_trip(&registry, key, i).await);
                    }
                    start.elapsed()
                })
            });
        });
        runtime.block_on(registry.shutdown());
    }
}

fn round_trip(c: &mut Criterion) {
    let multi_thread = multi_thread_runtime();
    let current_thread = current_thread_runtime();
    for (name, runtime, keys) in [
        ("round_trip/multi_thread", &multi_thread, 1),
        ("round_trip/current_thread", &current_thread, 1),
        ("round_trip_16_keys/multi_thread", &multi_thread, 16),
    ] {
        let mut group = c.benchmark_group(name);
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        compare(&mut group, runtime, keys);
        group.finish();
    }
}

// `main` by hand rather than `criterion_group!`/`criterion_main!`, whose generated public function
// cannot carry the doc comment the workspace lints ask for.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    round_trip(&mut criterion);
    criterion.final_summary();
}
