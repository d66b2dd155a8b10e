//! The fault test of the scale-out deployment: three `soloist-server` processes on one
//! PostgreSQL database, 32 writers spread over the same 50 sessions through all three, one
//! process killed with SIGKILL mid-run and restarted on its port. Clients retry with the same
//! message ids until acknowledged. Afterwards the stored rows, read straight from PostgreSQL,
//! must hold every acknowledged append exactly once at its acknowledged sequence, with
//! contiguous sequences and nothing that was never sent.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Server, admin_pool, client, create, postgres_db};

const SERVERS: usize = 3;
const SESSIONS: usize = 50;
const USERS: usize = 5;
const WRITERS: usize = 32;
/// Each writer's appends at least; they keep going past it until the restarted process has
/// acknowledged appends, so that the run always covers before, during and after the outage.
const APPENDS_PER_WRITER: usize = 100;
/// Appends the restarted process must acknowledge before the writers may stop.
const ACKS_AFTER_RESTART: u64 = 100;
/// The process that is killed.
const VICTIM: usize = 1;
/// Requests the victim should have in flight when it is killed (waited for up to 2 s).
const IN_FLIGHT_AT_KILL: u64 = 4;
/// How long the victim stays dead.
const OUTAGE: Duration = Duration::from_millis(1500);
/// How long one append may take to be acknowledged, retries included, before the test fails.
const APPEND_DEADLINE: Duration = Duration::from_secs(120);

/// A session and the user who owns it.
#[derive(Clone)]
struct Session {
    id: Uuid,
    user: String,
}

/// One append a writer sent, and the sequence it was acknowledged at.
struct Sent {
    session: Uuid,
    message_id: Uuid,
    content: String,
    sequence: i64,
    /// Whether an attempt lost its connection after sending the request (the process died):
    /// the append may have committed without its acknowledgement arriving.
    interrupted: bool,
}

/// A stored message: session, seq, message id, role, content, created_at (µs).
type StoredRow = (Uuid, i64, Uuid, String, Option<Vec<u8>>, i64);

/// Counters shared by the writers and the controller.
#[derive(Default)]
struct Tally {
    /// Requests sent to each server.
    requests: [AtomicU64; SERVERS],
    /// Requests sent to each server and not answered yet.
    in_flight: [AtomicU64; SERVERS],
    /// Appends each server acknowledged.
    acks: [AtomicU64; SERVERS],
    /// Appends acknowledged in all.
    acked: AtomicU64,
    /// Requests that were resent after a failure.
    retries: AtomicU64,
    /// Failures by kind (`503 storage`, `connect`, ...).
    errors: Mutex<BTreeMap<String, u64>>,
    /// Set once the victim is back and has acknowledged enough appends.
    may_stop: AtomicBool,
}

impl Tally {
    fn error(&self, kind: String) {
        *self.errors.lock().expect("tally").entry(kind).or_default() += 1;
    }
}

/// What a failed attempt was, for the tally; an answer no retry can fix panics.
fn classify_status(status: StatusCode, body: &str) -> String {
    let code = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    match status {
        StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            format!("{} {code}", status.as_u16())
        }
        other => panic!("an append got {other}, which no retry can fix: {body}"),
    }
}

fn classify_transport(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connect"
    } else if error.is_timeout() {
        "timeout"
    } else if error.is_body() || error.is_decode() {
        "body cut off"
    } else if error.is_request() {
        "request cut off"
    } else {
        "transport"
    };
    kind.to_owned()
}

/// Appends one message through `bases`, starting at `first` and moving to the next server
/// after each failure, until it is acknowledged; returns the acknowledged sequence and
/// whether an attempt was cut off after sending it.
async fn append_until_acked(
    client: &Client,
    bases: &[String],
    first: usize,
    session: &Session,
    body: &Value,
    tally: &Tally,
) -> (i64, bool) {
    let started = Instant::now();
    let mut attempt = 0usize;
    let mut interrupted = false;
    loop {
        let server = (first + attempt) % SERVERS;
        tally.requests[server].fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/v1/sessions/{}/messages", bases[server], session.id);
        tally.in_flight[server].fetch_add(1, Ordering::Relaxed);
        let sent = client
            .post(url)
            .header("x-user-id", &session.user)
            .json(body)
            .send()
            .await;
        let answer = match sent {
            Ok(response) => {
                let status = response.status();
                response.text().await.map(|text| (status, text))
            }
            Err(error) => Err(error),
        };
        tally.in_flight[server].fetch_sub(1, Ordering::Relaxed);
        let failure = match answer {
            Ok((StatusCode::OK, text)) => {
                let answer: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|error| panic!("a 200 with body {text:?}: {error}"));
                let sequences = answer["sequences"].as_array().expect("sequences");
                assert_eq!(sequences.len(), 1, "{answer}");
                tally.acks[server].fetch_add(1, Ordering::Relaxed);
                tally.acked.fetch_add(1, Ordering::Relaxed);
                return (sequences[0].as_i64().expect("a sequence"), interrupted);
            }
            Ok((status, text)) => classify_status(status, &text),
            Err(error) => classify_transport(&error),
        };
        interrupted |= failure.ends_with("cut off") || failure == "timeout";
        tally.error(failure);
        assert!(
            started.elapsed() < APPEND_DEADLINE,
            "an append still unacknowledged after {APPEND_DEADLINE:?} and {attempt} retries: {body}"
        );
        attempt += 1;
        tally.retries.fetch_add(1, Ordering::Relaxed);
        let backoff = Duration::from_millis(10 << attempt.min(5));
        tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
    }
}

/// One writer: appends to sessions picked at random through the servers in turn.
async fn writer(
    writer: usize,
    client: Client,
    bases: Arc<Vec<String>>,
    sessions: Arc<Vec<Session>>,
    tally: Arc<Tally>,
) -> Vec<Sent> {
    let mut random = fastrand::Rng::with_seed(writer as u64);
    let mut sent = Vec::new();
    let mut turn = 0;
    while turn < APPENDS_PER_WRITER || !tally.may_stop.load(Ordering::Relaxed) {
        let session = &sessions[random.usize(..SESSIONS)];
        let message_id = Uuid::new_v4();
        let content = format!("writer {writer} turn {turn}");
        let body = json!({"messages": [{"id": message_id, "role": "user", "content": content}]});
        let (sequence, interrupted) =
            append_until_acked(&client, &bases, writer + turn, session, &body, &tally).await;
        sent.push(Sent {
            session: session.id,
            message_id,
            content,
            sequence,
            interrupted,
        });
        turn += 1;
    }
    sent
}

/// Every message of a session through the HTTP API of one server, as (seq, id, content).
async fn read_messages(
    client: &Client,
    base: &str,
    session: &Session,
    fresh: bool,
) -> (i64, Vec<(i64, Uuid, String)>) {
    let mut messages = Vec::new();
    let mut after = -1;
    loop {
        let url = format!(
            "{base}/v1/sessions/{}?after_seq={after}&limit=1000&fresh={fresh}",
            session.id
        );
        let (status, page) = common::send(client.get(url).header("x-user-id", &session.user)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for message in page["messages"].as_array().expect("messages") {
            messages.push((
                message["seq"].as_i64().expect("seq"),
                message["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .expect("id"),
                message["content"].as_str().expect("content").to_owned(),
            ));
        }
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => return (page["message_count"].as_i64().expect("count"), messages),
        }
    }
}

/// Starts a successor of a killed server on its port, retrying while the port is not free yet.
async fn restart(address: String, url: String) -> Server {
    for _ in 0..40 {
        let (address, url) = (address.clone(), url.clone());
        let started = tokio::task::spawn_blocking(move || Server::try_start(&address, &url, &[]))
            .await
            .expect("join");
        match started {
            Ok(server) => return server,
            Err(error) => {
                eprintln!("restart: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    panic!("could not restart the server on {address}");
}

fn micros_now() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_micros()).expect("micros fit")
}

/// Waits until `done`; panics after 5 minutes, or if a writer stopped early (it panicked: its
/// own message says why).
async fn wait_until<T>(
    writers: &[tokio::task::JoinHandle<T>],
    what: &str,
    done: impl Fn() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        assert!(
            !writers.iter().any(|writer| writer.is_finished()),
            "a writer stopped while waiting for {what}; see its panic above"
        );
        assert!(Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_one_killed_mid_run_lose_and_duplicate_nothing() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let (schema, url) = (db.schema().expect("a schema"), db.url.clone());
    let pool = admin_pool().await;
    eprintln!("schema {schema}");
    // Started one after another: each runs the migrations first.
    let mut servers: Vec<Server> = (0..SERVERS).map(|_| Server::start(&url, &[])).collect();
    let bases: Arc<Vec<String>> = Arc::new(servers.iter().map(|server| server.url("")).collect());
    let client = client();

    let mut sessions = Vec::new();
    for index in 0..SESSIONS {
        let user = format!("user-{}", index % USERS);
        let id = create(&client, &servers[index % SERVERS], &user).await;
        sessions.push(Session {
            id: id.parse().expect("a session id"),
            user,
        });
    }
    let sessions = Arc::new(sessions);

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|index| {
            tokio::spawn(writer(
                index,
                client.clone(),
                bases.clone(),
                sessions.clone(),
                tally.clone(),
            ))
        })
        .collect();

    // A third of the way in, SIGKILL one process; the writers carry on through the other two.
    let planned = (WRITERS * APPENDS_PER_WRITER) as u64;
    wait_until(&writers, "a third of the appends", || {
        tally.acked.load(Ordering::Relaxed) >= planned / 3
    })
    .await;
    // Preferably while it has appends in flight, so that some die with it half-answered.
    let busy_until = Instant::now() + Duration::from_secs(2);
    while tally.in_flight[VICTIM].load(Ordering::Relaxed) < IN_FLIGHT_AT_KILL
        && Instant::now() < busy_until
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let in_flight_at_kill = tally.in_flight[VICTIM].load(Ordering::Relaxed);
    let address = servers[VICTIM].address().to_owned();
    // Rows stamped before this instant cannot come from a retry of an append the kill cut off.
    let kill_micros = micros_now();
    servers[VICTIM].kill();
    let killed_at = started.elapsed();
    let acked_at_kill = tally.acked.load(Ordering::Relaxed);
    tokio::time::sleep(OUTAGE).await;
    let acked_before_restart = tally.acked.load(Ordering::Relaxed);
    servers[VICTIM] = restart(address, url.clone()).await;
    let restarted_at = started.elapsed();
    let victim_acks_at_restart = tally.acks[VICTIM].load(Ordering::Relaxed);
    wait_until(
        &writers,
        "appends acknowledged by the restarted process",
        || {
            tally.acks[VICTIM].load(Ordering::Relaxed)
                >= victim_acks_at_restart + ACKS_AFTER_RESTART
        },
    )
    .await;
    tally.may_stop.store(true, Ordering::Relaxed);

    let mut sent = Vec::new();
    for writer in writers {
        let writer = tokio::time::timeout(Duration::from_secs(600), writer)
            .await
            .expect("the writers finish within 10 minutes")
            .expect("a writer failed");
        sent.extend(writer);
    }
    let run_time = started.elapsed();

    eprintln!(
        "cluster: {} appends acked in {run_time:.1?}, {} retries; SIGKILL at {killed_at:.1?} \
         after {acked_at_kill} acks with {in_flight_at_kill} requests in flight to it, {} acked during the outage, restarted at {restarted_at:.1?}",
        sent.len(),
        tally.retries.load(Ordering::Relaxed),
        acked_before_restart - acked_at_kill,
    );
    eprintln!(
        "cluster: errors by kind {:?}",
        tally.errors.lock().expect("tally")
    );
    for server in 0..SERVERS {
        eprintln!(
            "cluster: server {server}: {} requests, {} acks",
            tally.requests[server].load(Ordering::Relaxed),
            tally.acks[server].load(Ordering::Relaxed)
        );
    }

    // How much the engines resolved among themselves (the victim's count since its restart).
    for (server, base) in bases.iter().enumerate() {
        let metrics = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let counters: Vec<String> = metrics
            .lines()
            .filter_map(|line| line.strip_prefix("soloist_"))
            .filter(|line| {
                [
                    "rows_total",
                    "flushes_total",
                    "conflicts_total",
                    "fenced_total",
                    "takeovers_total",
                    "conflict_retries_total",
                    "transient_retries_total",
                    "storage_errors_total",
                    "command_errors_total",
                    "settled_outcomes_total",
                ]
                .iter()
                .any(|name| {
                    line.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with([' ', '{']))
                })
            })
            .map(str::to_owned)
            .collect();
        eprintln!("cluster: server {server} engine: {}", counters.join(", "));
    }

    // Resending acknowledged appends, through another server than the one that took them first,
    // returns their original sequences and stores nothing new.
    for (index, append) in sent.iter().enumerate().step_by(7) {
        let session = sessions
            .iter()
            .find(|session| session.id == append.session)
            .expect("session");
        let body = json!({"messages": [{"id": append.message_id, "role": "user", "content": append.content}]});
        let (sequence, _) =
            append_until_acked(&client, &bases, index, session, &body, &tally).await;
        assert_eq!(
            sequence, append.sequence,
            "a resent message id {} got another sequence",
            append.message_id
        );
    }

    // The stored rows, straight from PostgreSQL.
    let rows: Vec<StoredRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT session_id, seq, message_id, role, content, created_at FROM {schema}.messages \
             ORDER BY session_id, seq"
    )))
    .fetch_all(&pool)
    .await
    .expect("messages");
    let counts: HashMap<Uuid, i64> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, message_count FROM {schema}.sessions"
    )))
    .fetch_all(&pool)
    .await
    .expect("sessions")
    .into_iter()
    .collect();

    let mut stored_by_id: HashMap<Uuid, Vec<(Uuid, i64)>> = HashMap::new();
    let mut seqs_by_session: BTreeMap<Uuid, Vec<i64>> = BTreeMap::new();
    let sent_by_id: HashMap<Uuid, &Sent> =
        sent.iter().map(|sent| (sent.message_id, sent)).collect();
    assert_eq!(sent_by_id.len(), sent.len(), "message ids are unique");
    let mut committed_but_unacknowledged = 0;
    for (session, seq, message_id, role, content, created_at) in &rows {
        stored_by_id
            .entry(*message_id)
            .or_default()
            .push((*session, *seq));
        seqs_by_session.entry(*session).or_default().push(*seq);
        // Nothing stored that was never sent, and what is stored is what was sent.
        let sent = sent_by_id
            .get(message_id)
            .unwrap_or_else(|| panic!("stored message {message_id} was never sent"));
        assert_eq!(
            *session, sent.session,
            "message {message_id} in another session"
        );
        assert_eq!(role, "user");
        assert_eq!(
            content.as_deref(),
            Some(sent.content.as_bytes()),
            "message {message_id} content"
        );
        if sent.interrupted && *created_at < kill_micros {
            committed_but_unacknowledged += 1;
        }
    }
    // The exactly-once path after a crash: the killed process committed these, their
    // acknowledgement died with it, and the retry through a survivor found them stored.
    eprintln!(
        "cluster: {} appends cut off by the kill, at least {committed_but_unacknowledged} of \
         them committed by the killed process and acknowledged by a survivor's retry",
        sent.iter().filter(|sent| sent.interrupted).count()
    );
    // Every acknowledged append stored exactly once, at its acknowledged sequence.
    for sent in &sent {
        let stored = stored_by_id.get(&sent.message_id).map(Vec::as_slice);
        assert_eq!(
            stored,
            Some(&[(sent.session, sent.sequence)][..]),
            "acknowledged append {} at {}",
            sent.message_id,
            sent.sequence
        );
    }
    assert_eq!(rows.len(), sent.len());
    // Per session, sequences 0..n-1 and a message count of n.
    for session in sessions.iter() {
        let seqs = seqs_by_session.remove(&session.id).unwrap_or_default();
        let expected: Vec<i64> = (0..seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "session {} contiguous from 0", session.id);
        assert_eq!(
            counts.get(&session.id),
            Some(&(seqs.len() as i64)),
            "message_count of session {}",
            session.id
        );
    }
    assert!(seqs_by_session.is_empty(), "rows of unknown sessions");

    // A fresh read through any process, the restarted one included, is the stored history.
    for session in sessions.iter().take(5) {
        let stored: Vec<(i64, Uuid, String)> = rows
            .iter()
            .filter(|row| row.0 == session.id)
            .map(|row| {
                let content = String::from_utf8(row.4.clone().expect("content")).expect("UTF-8");
                (row.1, row.2, content)
            })
            .collect();
        for base in bases.iter() {
            let (count, messages) = read_messages(&client, base, session, true).await;
            assert_eq!(count, stored.len() as i64, "message_count through {base}");
            assert_eq!(messages, stored, "session {} through {base}", session.id);
            // Without `fresh`, a process follows the others' writes by LISTEN/NOTIFY: not a
            // guarantee of this test, only a remark when it lags.
            let (_, cached) = read_messages(&client, base, session, false).await;
            if cached != stored {
                eprintln!(
                    "cluster: a cached read of session {} through {base} has {} of {} messages",
                    session.id,
                    cached.len(),
                    stored.len()
                );
            }
        }
    }

    drop(servers);
}
