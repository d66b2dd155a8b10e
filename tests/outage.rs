//! Outage (tracker issue): "PostgreSQL stopped for 10 s under load, then restarted."
//!
//! Pass: callers get typed errors within the configured timeout, memory stays bounded, the
//! engine recovers without a process restart, nothing acknowledged is lost.
//!
//! The engine is configured with `command_timeout` 3 s and `database_timeout` (the pools'
//! acquire timeout) 2 s; every call must answer within 3 s + 1 s of slack, with a result or a
//! retryable typed error (`Timeout`, `Storage`, `Overloaded`...), counted by variant. A command
//! that timed out may still be applied later: writers retry the same message id, and the final
//! check (plus the history checker of `testkit/src/history.rs`, which treats `Timeout` as
//! "outcome unknown") shows the retry got the stored sequence and nothing is stored twice.
//!
//! The shared PostgreSQL server must never be stopped (other tests run against it), so this
//! test runs a private server of its own: `initdb` into a temporary directory, started on a free
//! port, stopped with `pg_ctl stop -m immediate` (a crash: in-flight commits are cut) and started
//! again on the same port and data directory. Without the PostgreSQL binaries the test is skipped
//! with a message, except under `CI=true`, where it fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use soloist::command::{GetSession, ListSessions};
use soloist::uuid::Uuid;
use soloist::{Engine, EngineConfig, Error, NewMessage, SessionId};
use soloist_testkit::history::{FinalRows, History};
use soloist_testkit::{assert_contiguous, ci, stored_rows};
use sqlx::Connection;

/// A PostgreSQL server private to one test, stopped (and its directory removed) when dropped,
/// also when the test panics.
struct PrivatePostgres {
    /// `initdb`, `pg_ctl` and friends.
    bin: PathBuf,
    /// The data directory.
    data: PathBuf,
    /// Holds the data directory, the unix socket and the server log; removed on drop.
    root: PathBuf,
    /// The TCP port the server listens on, kept across restarts.
    port: u16,
    /// Whether the server programs must run as the `postgres` OS user (they refuse root).
    as_postgres: bool,
}

impl PrivatePostgres {
    /// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`
    /// (`SOLOIST_PG_BIN` overrides).
    fn binaries() -> Option<PathBuf> {
        if let Ok(bin) = std::env::var("SOLOIST_PG_BIN") {
            return Some(PathBuf::from(bin));
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version: u32 = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file())
                    .then_some((version, bin))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin)
    }

    /// A fresh cluster, started; `None` (after saying why) when the binaries are missing
    /// outside CI.
    fn start_new() -> Option<PrivatePostgres> {
        let Some(bin) = Self::binaries() else {
            if ci() {
                panic!(
                    "the PostgreSQL server binaries (initdb, pg_ctl) are missing and CI=true: \
                     install them or set SOLOIST_PG_BIN"
                );
            }
            eprintln!("SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin");
            return None;
        };
        let root = std::env::temp_dir().join(format!("soloist-outage-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&root).expect("create the server's directory");
        let as_postgres = is_root();
        if as_postgres {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&root),
            );
        }
        let server = PrivatePostgres {
            bin,
            data: root.join("data"),
            root,
            port: free_port(),
            as_postgres,
        };
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&server.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_checked(&mut initdb);
        server.start();
        Some(server)
    }

    /// A server program, run as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    fn pg_ctl(&self) -> Command {
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.root.join("server.log"));
        command
    }

    /// Starts the server and waits until it accepts connections (crash recovery included).
    fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50 \
             -c shared_buffers=32MB -c fsync=on",
            self.port,
            self.root.display()
        );
        run_checked(
            self.pg_ctl()
                .args(["-w", "-t", "60", "-o", &options, "start"]),
        );
    }

    /// Stops the server the way a crash would: no checkpoint, connections cut, in-flight
    /// commits lost unless already durable.
    fn stop_immediately(&self) {
        run_checked(self.pg_ctl().args(["-w", "-m", "immediate", "stop"]));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The end of the server log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Stopping a stopped server fails harmlessly.
        let _ = self
            .pg_ctl()
            .args(["-w", "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// A TCP port free now (the OS picks it; it is released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("pick a free port")
        .port()
}

#[track_caller]
fn run_checked(command: &mut Command) {
    let output = command.output().expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One call to the engine, timed.
#[derive(Clone, Debug)]
struct Call {
    kind: &'static str,
    /// Since the load started.
    started: Duration,
    latency: Duration,
    /// `ok` or the error's [`Error::code`].
    outcome: &'static str,
    retryable: bool,
    message: Option<String>,
}

impl Call {
    fn of<T>(kind: &'static str, t0: Instant, started: Instant, result: &Result<T, Error>) -> Call {
        Call {
            kind,
            started: started - t0,
            latency: started.elapsed(),
            outcome: match result {
                Ok(_) => "ok",
                Err(error) => error.code(),
            },
            retryable: result.as_ref().err().is_some_and(Error::is_retryable),
            message: result.as_ref().err().map(ToString::to_string),
        }
    }

    fn ended(&self) -> Duration {
        self.started + self.latency
    }
}

/// One memory sample.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    live_sessions: u64,
    mailbox_depth: u64,
}

/// One message a writer sent, retried under its id until acknowledged.
#[derive(Clone, Debug)]
struct Write {
    session: SessionId,
    id: Uuid,
    /// The error code of each failed attempt, in order.
    failures: Vec<&'static str>,
    /// The acknowledged sequence, and when the acknowledging attempt started and ended (since
    /// the load started); `None` if the writer gave up.
    acked: Option<(i64, Duration, Duration)>,
}

const SESSIONS: usize = 20;
const WRITERS: usize = 16;
const READERS: usize = 4;
const HEALTHY: Duration = Duration::from_secs(3);
/// How long the server stays down; `SOLOIST_OUTAGE_SECS` overrides (e.g. 40, to see the bound
/// hold through a long outage).
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("SOLOIST_OUTAGE_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(10),
    )
}
/// The engine's bound on a command, from the call to its answer (`EngineConfig::command_timeout`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// The pools' acquire timeout (`EngineConfig::database_timeout`): shorter than
/// [`COMMAND_TIMEOUT`], so a flush that cannot reach the server fails with a storage error of its
/// own before its callers time out. It is also what bounds `list_sessions`, which is served by
/// the database without going through a session actor (and so without `command_timeout`).
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than [`COMMAND_TIMEOUT`] a call may take: timer and scheduling delays on a
/// loaded 2-core machine, with the server's crash recovery running alongside.
const SLACK: Duration = Duration::from_secs(1);
/// New messages stop this long after the restart; the writers then only finish what they hold.
const AFTER_RESTART: Duration = Duration::from_secs(5);
/// How long after the restart the writers may take to get everything acknowledged.
const RECOVERY_CAP: Duration = Duration::from_secs(60);
/// RSS may grow by this much during the outage (generous: the point is "not without bound").
const MAX_RSS_GROWTH_KIB: u64 = 64 * 1024;

/// 16 writers append to 20 sessions (retrying the same message id after any error, with
/// backoff) and 4 readers read, for 3 s healthy, 10 s with the server stopped, then until every
/// append is acknowledged after the restart. Every append and session read goes through a
/// [`History`] client, checked against the stored rows at the end.
///
/// Pass: every call, during the outage or not, answers within [`COMMAND_TIMEOUT`] +
/// [`SLACK`] with either a result or a retryable typed error (counted by variant), and appends
/// made during the outage do get errors; RSS and the queued commands stay bounded during the
/// outage; the same engine serves appends and reads again after the restart; every
/// acknowledged append is stored exactly once at its acknowledged sequence (also when an
/// attempt that timed out was applied later and the retry returned the stored sequence: seen
/// by chance during the outage, and made certain once after it with writes held back),
/// sequences are contiguous, nothing is stored that was never sent, each session's
/// `message_count` matches its rows, and the history checker finds no violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_for_ten_seconds_under_load() {
    let Some(server) = PrivatePostgres::start_new() else {
        return;
    };
    let server = Arc::new(server);
    let url = server.url();
    let config = EngineConfig {
        writer_connections: 4,
        read_pool_size: 4,
        mailbox_capacity: 64,
        send_timeout: Some(Duration::from_secs(2)),
        command_timeout: Some(COMMAND_TIMEOUT),
        database_timeout: DATABASE_TIMEOUT,
        ..EngineConfig::new(&url)
    };
    let mailbox_capacity = config.mailbox_capacity;
    let bound = COMMAND_TIMEOUT + SLACK;
    let engine = Engine::start(config).await.expect("engine");
    let user = "outage-user";
    let sessions: Vec<SessionId> = (0..SESSIONS).map(|_| SessionId::new()).collect();
    for &id in &sessions {
        engine
            .session(user, id)
            .create(None, None)
            .await
            .expect("create");
    }

    let history = History::new();
    let t0 = Instant::now();
    let stop_new = Arc::new(AtomicBool::new(false));
    let give_up = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let engine = engine.clone();
        let sessions = sessions.clone();
        let (stop_new, give_up) = (stop_new.clone(), give_up.clone());
        let client = history.client(format!("writer {writer}"));
        writers.push(tokio::spawn(async move {
            let mut writes: Vec<Write> = Vec::new();
            let mut calls = Vec::new();
            let mut turn = writer;
            while !stop_new.load(Ordering::Relaxed) {
                let session = sessions[turn % SESSIONS];
                turn += 1;
                let handle = engine.session(user, session);
                let mut write = Write {
                    session,
                    id: Uuid::now_v7(),
                    failures: Vec::new(),
                    acked: None,
                };
                let mut backoff = Duration::from_millis(20);
                while !give_up.load(Ordering::Relaxed) {
                    let message = NewMessage::user(format!("w{writer} t{turn}")).with_id(write.id);
                    let started = Instant::now();
                    let result = client.append(&handle, vec![message]).await;
                    let call = Call::of("append", t0, started, &result);
                    match result {
                        Ok(sequences) => {
                            assert_eq!(sequences.len(), 1);
                            write.acked = Some((sequences[0], call.started, call.ended()));
                            calls.push(call);
                            break;
                        }
                        // Any error, `Timeout` included: retry the same id (a non-retryable
                        // one is reported).
                        Err(_) => {
                            write.failures.push(call.outcome);
                            calls.push(call);
                            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                let acked = write.acked.is_some();
                writes.push(write);
                if !acked {
                    break;
                }
            }
            (writes, calls)
        }));
    }

    let mut readers = Vec::new();
    for reader in 0..READERS {
        let engine = engine.clone();
        let sessions = sessions.clone();
        let done = done.clone();
        let client = history.client(format!("reader {reader}"));
        readers.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            let mut turn = reader;
            while !done.load(Ordering::Relaxed) {
                let session = sessions[turn % SESSIONS];
                turn += 1;
                let started = Instant::now();
                // A read served from memory, a fresh read (checks the database), a listing
                // (straight from the database).
                let call = match turn % 3 {
                    0 | 1 => {
                        let command = GetSession {
                            user_id: user.to_owned(),
                            session_id: session,
                            after_seq: None,
                            limit: Some(10),
                            fresh: turn % 3 == 1,
                        };
                        let result = client.get_session(&engine, command).await;
                        let kind = if turn % 3 == 1 { "fresh_get" } else { "get" };
                        Call::of(kind, t0, started, &result)
                    }
                    _ => {
                        let result = engine
                            .list_sessions(ListSessions {
                                user_id: user.to_owned(),
                                before: None,
                                limit: Some(5),
                            })
                            .await;
                        Call::of("list", t0, started, &result)
                    }
                };
                let failed = call.outcome != "ok";
                calls.push(call);
                let pause = if failed { 100 } else { 10 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            calls
        }));
    }

    let sampler = {
        let engine = engine.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let stats = engine.stats();
                samples.push(Sample {
                    at: t0.elapsed(),
                    rss_kib: rss_kib(),
                    live_sessions: stats.live_sessions,
                    mailbox_depth: stats.mailbox_depth,
                });
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            samples
        })
    };

    // Healthy, then the crash, the outage, and the restart on the same port and data.
    tokio::time::sleep(HEALTHY).await;
    let stop_began = t0.elapsed();
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.stop_immediately())
            .await
            .expect("stop the server");
    }
    let stopped = t0.elapsed();
    tokio::time::sleep(outage()).await;
    let restart_began = t0.elapsed();
    {
        let server = server.clone();
        tokio::task::spawn_blocking(move || server.start())
            .await
            .expect("restart the server");
    }
    let restarted = t0.elapsed();
    tokio::time::sleep(AFTER_RESTART).await;
    stop_new.store(true, Ordering::Relaxed);

    let mut writes: Vec<Write> = Vec::new();
    let mut calls = Vec::new();
    let deadline = t0 + restarted + RECOVERY_CAP;
    for writer in writers {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(joined) = tokio::time::timeout(left, writer).await else {
            give_up.store(true, Ordering::Relaxed);
            panic!(
                "a writer did not finish within {RECOVERY_CAP:?} after the restart (appends kept \
                 failing); stats: {:?}\nserver log:\n{}",
                engine.stats(),
                server.log_tail()
            );
        };
        let (writer_writes, writer_calls) = joined.expect("writer task");
        writes.extend(writer_writes);
        calls.extend(writer_calls);
    }
    let writers_done = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        calls.extend(reader.await.expect("reader task"));
    }
    let samples = sampler.await.expect("sampler task");

    // The same engine serves an append and a read after the restart.
    let client = history.client("after the outage");
    let handle = engine.session(user, sessions[0]);
    let final_id = Uuid::now_v7();
    let final_seq = client
        .append(
            &handle,
            vec![NewMessage::user("after the outage").with_id(final_id)],
        )
        .await
        .expect("append after recovery")[0];
    let page = client
        .get(&handle, Some(final_seq - 1), None)
        .await
        .expect("read after recovery");
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].id, final_id);

    // A command that times out and is applied later, for certain (the outage produces such
    // commands only by chance): writes are held back past the timeout, then released; the
    // write lands, and the retry under the same id returns its stored sequence.
    let late_id = Uuid::now_v7();
    let late = || vec![NewMessage::user("timed out, applied later").with_id(late_id)];
    let paused = engine.pause_writes().await;
    let started = Instant::now();
    let timed_out = client.append(&handle, late()).await;
    let timed_out_after = started.elapsed();
    assert!(
        matches!(timed_out, Err(Error::Timeout(limit)) if limit == COMMAND_TIMEOUT),
        "an append whose write is held back times out: {timed_out:?}"
    );
    assert!(
        timed_out_after <= bound,
        "timed out after {timed_out_after:?}"
    );
    drop(paused);
    let applied_at = loop {
        let rows = stored_rows(&url, sessions[0]).await.expect("rows");
        if let Some(&(seq, _)) = rows.iter().find(|&&(_, id)| id == late_id) {
            break seq;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the timed-out append is written once writes resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let late_seq = client
        .append(&handle, late())
        .await
        .expect("retry of the timed-out append")[0];
    assert_eq!(
        late_seq, applied_at,
        "the retry returns the timed-out append's stored sequence"
    );

    // ---- figures ----
    let outage_start = stop_began;
    let outage_end = restarted;
    let during: Vec<&Call> = calls
        .iter()
        .filter(|call| call.started < outage_end && call.ended() > outage_start)
        .collect();
    let max_latency_during = during.iter().map(|call| call.latency).max();
    let max_latency_all = calls.iter().map(|call| call.latency).max();
    let slowest = calls.iter().max_by_key(|call| call.latency);
    let mut outcomes: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for call in &during {
        *outcomes.entry((call.kind, call.outcome)).or_default() += 1;
    }
    // Per kind of call overlapping the outage: how many, the slowest, and how many outlived
    // the bound.
    let mut by_kind: BTreeMap<&str, (usize, Duration, usize)> = BTreeMap::new();
    for call in &during {
        let entry = by_kind.entry(call.kind).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(call.latency);
        if call.latency > bound {
            entry.2 += 1;
        }
    }
    let errors_by_variant = |calls: &mut dyn Iterator<Item = &Call>| {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for call in calls.filter(|call| call.outcome != "ok") {
            *counts.entry(call.outcome).or_default() += 1;
        }
        counts
    };
    let errors_during = errors_by_variant(&mut during.iter().copied());
    let errors_all = errors_by_variant(&mut calls.iter());
    let mut error_messages: BTreeMap<String, usize> = BTreeMap::new();
    for message in calls.iter().filter_map(|call| call.message.as_ref()) {
        let key: String = message.chars().take(90).collect();
        *error_messages.entry(key).or_default() += 1;
    }
    let not_retryable: Vec<&Call> = calls
        .iter()
        .filter(|call| call.outcome != "ok" && !call.retryable)
        .collect();
    let over_bound: Vec<&Call> = calls.iter().filter(|call| call.latency > bound).collect();
    let append_errors_during = during
        .iter()
        .filter(|call| call.kind == "append" && call.outcome != "ok")
        .count();
    // Recovery: the first acknowledged append that ended after the restart.
    let first_ok_after = calls
        .iter()
        .filter(|call| call.kind == "append" && call.outcome == "ok" && call.ended() > restarted)
        .map(|call| call.ended())
        .min();
    let last_error_append = calls
        .iter()
        .filter(|call| call.kind == "append" && call.outcome != "ok")
        .map(|call| call.ended())
        .max();
    let calls_started_in_outage = calls
        .iter()
        .filter(|call| call.started >= outage_start && call.started < outage_end)
        .count();

    // Writes applied by an attempt that failed: the acknowledging retry started after another
    // write of the same session had been acknowledged at a higher sequence, so the write was
    // already stored and the retry only returned its sequence. Keyed by `timeout` when some
    // failed attempt timed out, else by the last error.
    let mut acks_by_session: HashMap<SessionId, Vec<(Duration, i64)>> = HashMap::new();
    for write in &writes {
        if let Some((seq, _, ended)) = write.acked {
            acks_by_session
                .entry(write.session)
                .or_default()
                .push((ended, seq));
        }
    }
    let mut applied_before_ack: BTreeMap<&str, usize> = BTreeMap::new();
    let mut retried_after_timeout = 0;
    for write in &writes {
        let (Some((seq, retry_started, _)), Some(&last)) = (write.acked, write.failures.last())
        else {
            continue;
        };
        let timed_out = write.failures.contains(&"timeout");
        retried_after_timeout += usize::from(timed_out);
        let stored_earlier = acks_by_session[&write.session]
            .iter()
            .any(|&(ended, other)| ended < retry_started && other > seq);
        if stored_earlier {
            let key = if timed_out { "timeout" } else { last };
            *applied_before_ack.entry(key).or_default() += 1;
        }
    }

    let before = samples
        .iter()
        .rfind(|sample| sample.at <= stop_began)
        .copied();
    let in_outage: Vec<Sample> = samples
        .iter()
        .filter(|sample| sample.at > stop_began && sample.at <= restarted)
        .copied()
        .collect();
    let after = samples.last().copied();
    let max_rss_outage = in_outage.iter().map(|sample| sample.rss_kib).max();
    let max_depth = samples.iter().map(|sample| sample.mailbox_depth).max();
    let max_live = samples.iter().map(|sample| sample.live_sessions).max();

    // ---- storage check ----
    let mut acked_total = 0;
    let mut stored_total = 0;
    let mut per_session: HashMap<SessionId, (HashSet<Uuid>, HashMap<Uuid, i64>)> = HashMap::new();
    for write in &writes {
        let entry = per_session.entry(write.session).or_default();
        entry.0.insert(write.id);
        let (seq, _, _) = write
            .acked
            .unwrap_or_else(|| panic!("append {} was never acknowledged", write.id));
        entry.1.insert(write.id, seq);
        acked_total += 1;
    }
    let entry = per_session.entry(sessions[0]).or_default();
    for (id, seq) in [(final_id, final_seq), (late_id, late_seq)] {
        entry.0.insert(id);
        entry.1.insert(id, seq);
    }
    let mut db = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to the private server");
    let mut final_rows = FinalRows::new();
    for &session in &sessions {
        let (sent, acked) = per_session.remove(&session).unwrap_or_default();
        let rows = stored_rows(&url, session).await.expect("rows");
        assert_contiguous(&rows);
        for (_, id) in &rows {
            assert!(sent.contains(id), "stored message {id} was never sent");
        }
        let stored: HashMap<Uuid, i64> = rows.iter().map(|&(seq, id)| (id, seq)).collect();
        for (id, seq) in &acked {
            assert_eq!(
                stored.get(id),
                Some(seq),
                "acknowledged {id} stored once at its acknowledged sequence"
            );
        }
        assert_eq!(
            rows.len(),
            acked.len(),
            "nothing stored but the acknowledged"
        );
        let (message_count,): (i64,) =
            sqlx::query_as("SELECT message_count FROM sessions WHERE id = $1")
                .bind(session)
                .fetch_one(&mut db)
                .await
                .expect("read message_count");
        assert_eq!(message_count, rows.len() as i64, "message_count matches");
        let page = engine
            .get_session(GetSession {
                user_id: user.to_owned(),
                session_id: session,
                after_seq: None,
                limit: Some(0),
                fresh: true,
            })
            .await
            .expect("fresh read");
        assert_eq!(page.session.message_count, rows.len() as i64);
        stored_total += rows.len();
        final_rows.insert(session, rows);
    }
    let _ = db.close().await;
    let report = history.check(&final_rows);
    let stats = engine.stats();

    let secs = |duration: Duration| format!("{:.2}s", duration.as_secs_f64());
    let opt_secs = |duration: Option<Duration>| duration.map_or("-".to_owned(), secs);
    let mib = |kib: u64| format!("{:.1}MiB", kib as f64 / 1024.0);
    println!(
        "outage timeline: stop began {}, server down {}, restart began {}, server up {}, writers \
         done {}",
        secs(stop_began),
        secs(stopped),
        secs(restart_began),
        secs(restarted),
        secs(writers_done)
    );
    println!("outage call outcomes (kind, outcome) -> count: {outcomes:?}");
    for (kind, (count, slowest, over)) in &by_kind {
        println!(
            "  {kind:>9}: {count:>4} calls overlapping the outage, slowest {}, {over} over \
             command_timeout + slack ({})",
            secs(*slowest),
            secs(bound)
        );
    }
    println!("errors by variant (whole run): {errors_all:?}");
    for (message, count) in &error_messages {
        println!("  {count:>6} x {message}");
    }
    println!("slowest call: {slowest:?}");
    println!(
        "memory samples (t, RSS, live sessions, queued commands): {}",
        samples
            .iter()
            .step_by(4)
            .map(|s| format!(
                "{}={}/{}/{}",
                secs(s.at),
                mib(s.rss_kib),
                s.live_sessions,
                s.mailbox_depth
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("final stats: {stats:?}");
    report.print("outage (private PostgreSQL)");
    println!(
        "OUTAGE SUMMARY: {} calls overlapping the outage ({calls_started_in_outage} started in \
         it), max latency during outage {} vs command_timeout {} (+ slack {}), max overall {}, \
         errors by variant during outage {errors_during:?} (whole run {errors_all:?}), {} not \
         retryable, RSS before {} / max in outage {} ({} samples) / after {}, max queued \
         commands {}, max live sessions {}, first ack {} after the server was up, last failed \
         append ended {} after it, appends acked {acked_total} (+2 after the outage) / stored \
         {stored_total}, {retried_after_timeout} acked after a timeout, applied before the \
         acknowledging retry {applied_before_ack:?}; held-back append timed out after {}, \
         applied at seq {applied_at}, retry returned {late_seq}",
        during.len(),
        opt_secs(max_latency_during),
        secs(COMMAND_TIMEOUT),
        secs(SLACK),
        opt_secs(max_latency_all),
        not_retryable.len(),
        before.map_or("-".to_owned(), |s| mib(s.rss_kib)),
        max_rss_outage.map_or("-".to_owned(), mib),
        in_outage.len(),
        after.map_or("-".to_owned(), |s| mib(s.rss_kib)),
        max_depth.unwrap_or(0),
        max_live.unwrap_or(0),
        opt_secs(first_ok_after.map(|at| at.saturating_sub(restarted))),
        opt_secs(last_error_append.map(|at| at.saturating_sub(restarted))),
        secs(timed_out_after),
    );

    // ---- pass criteria ----
    assert!(
        not_retryable.is_empty(),
        "every error is a retryable typed error: {:?}",
        &not_retryable[..not_retryable.len().min(5)]
    );
    assert!(
        over_bound.is_empty(),
        "{} calls took longer than command_timeout + slack ({bound:?}), the slowest \
         {max_latency_all:?}: {:?}",
        over_bound.len(),
        &over_bound[..over_bound.len().min(5)]
    );
    assert!(
        append_errors_during > 0,
        "appends made while the server was down get typed errors: {outcomes:?}"
    );
    if let (Some(before), Some(max_rss)) = (before, max_rss_outage) {
        assert!(
            max_rss.saturating_sub(before.rss_kib) < MAX_RSS_GROWTH_KIB,
            "RSS grew from {} to {} during the outage",
            mib(before.rss_kib),
            mib(max_rss)
        );
    }
    assert!(
        max_depth.unwrap_or(0) <= (SESSIONS * mailbox_capacity) as u64,
        "queued commands stay within the mailboxes' capacity"
    );
    assert!(
        first_ok_after.is_some(),
        "appends are acknowledged again after the restart"
    );
    assert_eq!(acked_total + 2, stored_total);
    report.assert_clean();

    engine.shutdown().await;
    drop(server);
}
