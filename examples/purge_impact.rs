//! What the purge of expired sessions costs the writers: the same append workload, timed with
//! the purge off and with it erasing a backlog of expired sessions, side by side in one run.
//!
//! Each round makes a fresh SQLite database (in a temporary directory) holding `EXPIRED`
//! sessions whose one-second time to live has run out (two messages each), then runs
//! `WRITERS` tasks appending one message at a time to sessions of their own for `SECONDS`,
//! and reports the appends' latency. Rounds alternate between the purge off and on
//! (`--purge-interval-ms 100`, batches of 100), `ROUNDS` of each.
//!
//! ```text
//! cargo run --release --example purge_impact
//! EXPIRED=50000 WRITERS=64 SECONDS=20 ROUNDS=3 cargo run --release --example purge_impact
//! ```

use std::time::{Duration, Instant};

use soloist::{CreateSession, Engine, EngineConfig, NewMessage, SessionId};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// What one round measured.
struct Round {
    appends: usize,
    latencies: Vec<Duration>,
    purged: u64,
}

impl Round {
    fn quantile(&self, q: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

/// Fills a fresh database with `expired` sessions of one second to live, waits until they
/// expired, then times `writers` appending for `seconds` with the purge on or off.
async fn round(
    url: &str,
    purge: bool,
    expired: usize,
    writers: usize,
    seconds: u64,
) -> Result<Round, Box<dyn std::error::Error>> {
    let quiet = EngineConfig {
        purge_interval: None,
        ..EngineConfig::new(url)
    };
    let engine = Engine::start(quiet.clone()).await?;
    let tasks = 16;
    let mut fillers = Vec::new();
    for task in 0..tasks {
        let engine = engine.clone();
        fillers.push(tokio::spawn(async move {
            for _ in (task..expired).step_by(tasks) {
                let created = engine
                    .create_session(CreateSession {
                        user_id: "expiring".into(),
                        title: Some("old conversation".into()),
                        ttl_seconds: Some(1),
                        ..CreateSession::default()
                    })
                    .await?;
                engine
                    .session("expiring", created.session.id)
                    .append(vec![NewMessage::user("hello"), NewMessage::assistant("hi")])
                    .await?;
            }
            Ok::<_, soloist::Error>(())
        }));
    }
    for filler in fillers {
        filler.await??;
    }
    engine.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let config = EngineConfig {
        purge_interval: purge.then(|| Duration::from_millis(100)),
        purge_batch: 100,
        ..quiet
    };
    let engine = Engine::start(config).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for _ in 0..writers {
        let session = engine.session("writer", SessionId::new());
        session.create(None, None).await?;
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                session
                    .append(vec![NewMessage::user("a new message")])
                    .await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, soloist::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    latencies.sort();
    let purged = engine.stats().purged_sessions;
    engine.shutdown().await;
    Ok(Round {
        appends: latencies.len(),
        latencies,
        purged,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let expired = env_number("EXPIRED", 20_000);
    let writers = env_number("WRITERS", 32);
    let seconds = env_number("SECONDS", 10) as u64;
    let rounds = env_number("ROUNDS", 2);
    let dir = std::env::temp_dir().join(format!("soloist-purge-impact-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "{expired} expired sessions, {writers} writers appending for {seconds} s, SQLite file"
    );
    println!("| round | purge | appends/s | p50 ms | p99 ms | p99.9 ms | max ms | purged |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for index in 0..rounds {
        for purge in [false, true] {
            let url = format!(
                "sqlite://{}",
                dir.join(format!("{index}-{purge}.db")).display()
            );
            let measured = round(&url, purge, expired, writers, seconds).await?;
            let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                index + 1,
                if purge { "on" } else { "off" },
                measured.appends as f64 / seconds as f64,
                ms(measured.quantile(0.5)),
                ms(measured.quantile(0.99)),
                ms(measured.quantile(0.999)),
                ms(measured.latencies.last().copied().unwrap_or_default()),
                measured.purged,
            );
        }
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
