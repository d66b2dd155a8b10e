//! Crash safety of the embedded default: many OS processes append to one SQLite file and are
//! killed (SIGKILL) at random moments, some while still opening the database. Afterwards the
//! file passes `PRAGMA integrity_check`, every append a process acknowledged is stored at its
//! acknowledged sequence, and every session is a contiguous prefix with no duplicate ids.
//!
//! The child processes are this test binary itself, re-run with `SOLOIST_CRASH_CHILD` set, so
//! the test needs no extra binary.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use soloist::uuid::Uuid;
use soloist::{Engine, NewMessage, SessionId};
use soloist_testkit::{TestDb, assert_contiguous, stored_rows};
use sqlx::Connection;

const CHILD_ENV: &str = "SOLOIST_CRASH_CHILD";

/// The child: appends to the given sessions until it is killed, printing each acknowledgement
/// (`ack <session> <seq> <message id>`) once the append returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // an ordinary test run: nothing to do
    };
    let mut parts = spec.split(' ');
    let url = parts.next().expect("url").to_owned();
    let sessions: Vec<SessionId> = parts.map(|id| id.parse().expect("session id")).collect();
    let engine = Engine::connect(&url).await.expect("open the database");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "ready");
    let _ = stdout.flush();
    for turn in 0usize.. {
        let session = sessions[turn % sessions.len()];
        let id = Uuid::now_v7();
        match engine
            .session("crash", session)
            .append(vec![NewMessage::user(format!("turn {turn}")).with_id(id)])
            .await
        {
            Ok(sequences) => {
                let _ = writeln!(stdout, "ack {session} {} {id}", sequences[0]);
                let _ = stdout.flush();
            }
            Err(error) => {
                let _ = writeln!(stdout, "error {error}");
                let _ = stdout.flush();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processes_lose_no_acknowledged_append() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let db = TestDb::sqlite_file().expect("database");
    let sessions: Vec<SessionId> = (0..4).map(|_| SessionId::new()).collect();
    {
        let engine = db.engine().await.expect("engine");
        for &id in &sessions {
            engine
                .session("crash", id)
                .create(None, None)
                .await
                .expect("create");
        }
        engine.shutdown().await;
    }
    let spec = std::iter::once(db.url.clone())
        .chain(sessions.iter().map(SessionId::to_string))
        .collect::<Vec<_>>()
        .join(" ");
    let me = std::env::current_exe().expect("test binary");
    let mut acked: Vec<(SessionId, i64, Uuid)> = Vec::new();
    let mut killed_while_opening = 0;
    let started = Instant::now();
    let children = 100;
    // How long a child takes from spawn to an open database, from the children that got
    // there: the "kill while opening" moments are drawn below it, so that they land in the
    // process start or in `Engine::connect` (migrations, WAL set-up), not after it.
    let mut ready_after: Vec<Duration> = Vec::new();
    let mut running: Vec<Running> = Vec::new();
    let mut spawned = 0;
    while spawned < children || !running.is_empty() {
        // Two children at a time write the same sessions.
        while running.len() < 2 && spawned < children {
            let open_kill = spawned % 10 == 0;
            let lifetime = if open_kill {
                let ready = median(&ready_after).unwrap_or(Duration::from_millis(20));
                ready.mul_f64(fastrand::f64() * 0.9)
            } else {
                Duration::from_millis(fastrand::u64(50..250))
            };
            running.push(Running::spawn(&me, &spec, lifetime));
            spawned += 1;
        }
        let next = (0..running.len())
            .min_by_key(|&index| running[index].kill_at)
            .expect("a running child");
        let child = running.swap_remove(next);
        std::thread::sleep(child.kill_at.saturating_duration_since(Instant::now()));
        let (lines, ready) = child.kill();
        match ready {
            Some(ready) => ready_after.push(ready),
            None => killed_while_opening += 1,
        }
        for line in lines {
            let Some(start) = line.find("ack ") else {
                continue;
            };
            let mut words = line[start..].split(' ');
            if words.next() == Some("ack") {
                let session: SessionId = words.next().expect("session").parse().expect("uuid");
                let seq: i64 = words.next().expect("seq").parse().expect("seq");
                let id: Uuid = words.next().expect("id").parse().expect("uuid");
                acked.push((session, seq, id));
            }
        }
    }
    assert!(
        killed_while_opening >= children / 20,
        "only {killed_while_opening} children were killed before their database was open"
    );

    let mut connection = sqlx::SqliteConnection::connect(&db.url)
        .await
        .expect("open");
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut connection)
        .await
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    let mut total = 0;
    for &session in &sessions {
        let rows = stored_rows(&db.url, session).await.expect("rows");
        assert_contiguous(&rows);
        total += rows.len();
        let stored: HashMap<Uuid, i64> = rows.iter().map(|&(seq, id)| (id, seq)).collect();
        for (_, seq, id) in acked.iter().filter(|(s, _, _)| *s == session) {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "an acknowledged append was lost or moved"
            );
        }
    }
    let distinct: HashSet<Uuid> = acked.iter().map(|(_, _, id)| *id).collect();
    assert_eq!(distinct.len(), acked.len());
    assert!(!acked.is_empty(), "no child ever acknowledged an append");
    eprintln!(
        "crash test: {children} children killed, two at a time ({killed_while_opening} before their \
         database was open; median open {:?}), {} acknowledged appends, {total} stored, {:.1} s",
        median(&ready_after),
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A child process appending until its kill time, with a thread collecting its output.
struct Running {
    child: std::process::Child,
    kill_at: Instant,
    spawned: Instant,
    output: std::thread::JoinHandle<Vec<(Instant, String)>>,
}

impl Running {
    fn spawn(me: &std::path::Path, spec: &str, lifetime: Duration) -> Self {
        let spawned = Instant::now();
        let mut child = Command::new(me)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a child");
        let stdout = child.stdout.take().expect("stdout");
        let output = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => lines.push((Instant::now(), line)),
                    Err(_) => break,
                }
            }
            lines
        });
        Self {
            child,
            kill_at: spawned + lifetime,
            spawned,
            output,
        }
    }

    /// Kills the child (SIGKILL) and returns its lines and how long it took to open the
    /// database, if it got there.
    fn kill(mut self) -> (Vec<String>, Option<Duration>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let lines = self.output.join().expect("reader");
        // The test harness may print its own text before a child's first line.
        let ready = lines
            .iter()
            .find(|(_, line)| line.ends_with("ready"))
            .map(|(at, _)| at.duration_since(self.spawned));
        (lines.into_iter().map(|(_, line)| line).collect(), ready)
    }
}

fn median(durations: &[Duration]) -> Option<Duration> {
    let mut sorted = durations.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied()
}
