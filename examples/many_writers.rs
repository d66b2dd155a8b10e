//! The main job until the chat server lands: opens the embedded SQLite default
//! (`sqlite://soloist.db`, or `DATABASE_URL`), creates a session, appends to it from many tasks
//! at once, and shows that every message got its own contiguous sequence and how few commits
//! that took.
//!
//! ```text
//! cargo run --release --example many_writers            # 64 tasks x 50 appends
//! WRITERS=8 APPENDS=200 cargo run --release --example many_writers
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --release --example many_writers
//! ```

use std::time::Instant;

use soloist::SessionId;
use soloist::{Engine, NewMessage};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://soloist.db".into());
    let writers = env_number("WRITERS", 64);
    let appends = env_number("APPENDS", 50);

    let engine = Engine::connect(&url).await?;
    let session = engine.session("demo-user", SessionId::new());
    session
        .create(
            Some("many writers".into()),
            Some(serde_json::json!({"demo": true}).into()),
        )
        .await?;
    println!("session {} on {url}", session.id());

    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let session = session.clone();
        tasks.push(tokio::spawn(async move {
            for turn in 0..appends {
                session
                    .append(vec![NewMessage::user(format!(
                        "writer {writer}, turn {turn}"
                    ))])
                    .await?;
            }
            Ok::<_, soloist::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();

    // Read everything back, page by page, and check the sequences.
    let mut expected = 0;
    let mut after = None;
    loop {
        let page = session.get(after, Some(1000)).await?;
        for message in &page.messages {
            assert_eq!(message.seq, expected, "sequences are contiguous");
            expected += 1;
        }
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let total = writers * appends;
    let stats = engine.stats();
    println!(
        "{total} appends from {writers} tasks in {:.2?}: {:.0} appends/s",
        elapsed,
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "stored sequences 0..{expected} with no gap or duplicate; {} write transactions \
         (group commit: {:.1} appends per commit)",
        stats.flushes,
        total as f64 / stats.flushes.max(1) as f64
    );
    engine.shutdown().await;
    Ok(())
}
