//! The cost of one forward: a command that reaches a process other than its session's owner
//! travels to the owner over the peers' connection and its answer back.
//!
//! Two engines on one SQLite file, both members, each serving its peers' route on a listener
//! of its own (in this process). The command is a fresh read (`GetSession { fresh: true }`:
//! it runs at the owner, which checks the stored version, and answers with the session and no
//! message), so that what is timed is the same work with and without the hop:
//! - `forward/local`: sent to the owner's engine;
//! - `forward/forwarded`: sent to the other engine, which forwards it to the owner.
//!
//! The difference is the cost of one forward: serialising the command, one round trip
//! on loopback, running it at the owner, and the answer's way back.
//!
//! Run with `cargo bench -p soloist-server --bench forward`.

use std::time::{Duration, Instant};

use criterion::Criterion;
use soloist::cluster::Placement;
use soloist::{CreateSession, Engine, EngineConfig, GetSession, SessionId};
use soloist_server::cluster::{Inbound, Peers};
use soloist_server::{AppState, ServeConfig, serve};
use soloist_testkit::TempDir;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// An engine on `url` serving its peers' route, registered under the listener's address.
async fn member(url: &str, stop: &CancellationToken) -> Engine {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let engine = Engine::start(EngineConfig {
        advertise_url: Some(format!("http://{address}")),
        ..EngineConfig::new(url)
    })
    .await
    .expect("engine");
    Peers::install(&engine);
    let peers = Inbound::new(
        engine.clone(),
        AppState::new(engine.clone(), stop.clone()).bodies.limits(),
    );
    let public = axum::Router::new();
    let stop = stop.clone();
    tokio::spawn(async move {
        serve(
            listener,
            public,
            peers,
            ServeConfig::default(),
            stop.cancelled_owned(),
        )
        .await;
    });
    engine
}

fn forward(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = TempDir::new("soloist-forward-bench").expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let stop = CancellationToken::new();
    let (a, b, session) = runtime.block_on(async {
        let a = member(&url, &stop).await;
        let b = member(&url, &stop).await;
        a.refresh_members().await.expect("members");
        // A session that both place on `b`.
        let session = loop {
            let session = SessionId::new();
            if matches!(a.placement(session), Placement::Peer(_))
                && b.placement(session) == Placement::Here
            {
                break session;
            }
        };
        b.create_session(CreateSession {
            user_id: "alice".into(),
            session_id: Some(session),
            ..CreateSession::default()
        })
        .await
        .expect("create");
        (a, b, session)
    });
    let mut group = c.benchmark_group("forward");
    for (name, engine) in [("local", &b), ("forwarded", &a)] {
        group.bench_function(name, |bench| {
            bench.iter_custom(|iterations| time(&runtime, engine, session, iterations));
        });
    }
    group.finish();
    let forwarded = a.stats().forwarded;
    assert!(forwarded > 0, "the forwarded runs went through the peer");
    runtime.block_on(async {
        stop.cancel();
        a.shutdown().await;
        b.shutdown().await;
    });
    drop(dir);
}

/// Times `iterations` fresh reads of `session` through `engine`, one after another.
fn time(runtime: &Runtime, engine: &Engine, session: SessionId, iterations: u64) -> Duration {
    let engine = engine.clone();
    runtime.block_on(async move {
        let started = Instant::now();
        for _ in 0..iterations {
            engine
                .get_session(GetSession {
                    user_id: "alice".into(),
                    session_id: session,
                    after_seq: None,
                    limit: Some(0),
                    fresh: true,
                })
                .await
                .expect("read");
        }
        started.elapsed()
    })
}

// `main` by hand rather than `criterion_group!`/`criterion_main!`, whose generated public function
// cannot carry the doc comment the workspace lints ask for.
fn main() {
    let mut criterion = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    forward(&mut criterion);
    criterion.final_summary();
}
