//! Exact retries against the real `soloist-server` binary: `Idempotency-Key` on create, PATCH,
//! usage and DELETE, message ids on appends, and `If-Match`.
//!
//! The headline tests inject command timeouts: the test holds the database's write lock (SQLite:
//! `BEGIN IMMEDIATE` on the server's own file; PostgreSQL: a `FOR UPDATE` row lock on the
//! session) for longer than the server's `--command-timeout-ms`, so that keyed commands sent
//! meanwhile are answered 503 `timeout` although they are still queued and are applied once the
//! lock is released. Every client then retries with its own key until answered, and the stored
//! result must count each command exactly once.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Connection, PgConnection, SqliteConnection};
use uuid::Uuid;

use common::{
    Server, admin_pool, assert_error, client, create, get, postgres_db, send, send_tagged,
};

/// Concurrent keyed commands per wave.
const N: usize = 50;
/// The server's command timeout in the timeout tests.
const COMMAND_TIMEOUT_MS: &str = "300";
/// How long the test holds the lock (below the server's 5 s busy and lock timeouts).
const HOLD: Duration = Duration::from_millis(1200);
/// Attempts of one command before the test gives up.
const MAX_ATTEMPTS: usize = 40;
/// Pause between two attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Status, JSON body and the `ETag` version of an answer.
type Answer = (StatusCode, Value, Option<i64>);

fn is_timeout(answer: &Answer) -> bool {
    answer.0 == StatusCode::SERVICE_UNAVAILABLE && answer.1["error"]["code"] == "timeout"
}

/// A lock the test holds on the server's database so that its writes wait.
enum Blocker {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Blocker {
    /// Takes SQLite's write lock on the server's database file.
    async fn sqlite(server: &Server) -> Blocker {
        let options = SqliteConnectOptions::new()
            .filename(server.sqlite_dir().join("chat.db"))
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let mut connection = SqliteConnection::connect_with(&options)
            .await
            .expect("open the server's SQLite file");
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut connection)
            .await
            .expect("take the write lock");
        Blocker::Sqlite(connection)
    }

    /// Locks the session's row (`url` connects to the server's schema).
    async fn postgres(url: &str, session: &str) -> Blocker {
        let mut connection = PgConnection::connect(url).await.expect("connect");
        sqlx::raw_sql("BEGIN")
            .execute(&mut connection)
            .await
            .expect("begin");
        let id: Uuid = session.parse().expect("session id");
        let locked: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM sessions WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut connection)
                .await
                .expect("row lock");
        assert!(locked.is_some(), "the session's row exists");
        Blocker::Postgres(connection)
    }

    async fn release(self) {
        match self {
            Blocker::Sqlite(mut connection) => {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut connection)
                    .await
                    .expect("release");
                connection.close().await.expect("close");
            }
            Blocker::Postgres(mut connection) => {
                sqlx::raw_sql("ROLLBACK")
                    .execute(&mut connection)
                    .await
                    .expect("release");
                connection.close().await.expect("close");
            }
        }
    }
}

/// Sends `make(i)` for every `i < n` at once; the answers in order.
async fn all_at_once(n: usize, make: impl Fn(usize) -> RequestBuilder) -> Vec<Answer> {
    futures::future::join_all((0..n).map(|i| send_tagged(make(i)))).await
}

/// Resends `make()` while `retry` says so (at most [`MAX_ATTEMPTS`] times): the answer and
/// the number of attempts.
async fn until_answered(
    make: impl Fn() -> RequestBuilder,
    retry: impl Fn(&Answer) -> bool,
) -> (Answer, usize) {
    for attempt in 1..=MAX_ATTEMPTS {
        let answer = send_tagged(make()).await;
        if !retry(&answer) {
            return (answer, attempt);
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    panic!("still retryable after {MAX_ATTEMPTS} attempts");
}

/// Reads `probe` until two reads 200 ms apart agree: what the server queued behind the lock
/// has been applied. At most 5 s.
async fn settled<F: Future<Output = Value>>(probe: impl Fn() -> F) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = probe().await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let next = probe().await;
        if next == last {
            return next;
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {last} then {next}"
        );
        last = next;
    }
}

/// What a wave of keyed commands sent while the database was locked came to.
struct Wave {
    /// The first answer of each command.
    first: Vec<Answer>,
    /// The answer each command got once retried (the first one if it was not a timeout).
    last: Vec<Answer>,
    /// The most attempts one command took.
    max_attempts: usize,
    /// How long the first answers took, all of them.
    first_took: Duration,
}

impl Wave {
    fn timed_out(&self) -> usize {
        self.first
            .iter()
            .filter(|answer| is_timeout(answer))
            .count()
    }

    /// Indexes of the commands first answered 503 `timeout`.
    fn timed_out_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.first.len()).filter(|&i| is_timeout(&self.first[i]))
    }
}

/// Sends `make(i)` for every `i < N` at once while `blocker` holds the lock, releases it after
/// [`HOLD`], reads `probe` once everything queued is applied (before any retry), then retries
/// every command that timed out until it is answered. Returns the wave and what `probe` read
/// before the retries.
async fn locked_wave<F: Future<Output = Value>>(
    blocker: Blocker,
    make: impl Fn(usize) -> RequestBuilder,
    probe: impl Fn() -> F,
) -> (Wave, Value) {
    let started = Instant::now();
    let first = all_at_once(N, &make).await;
    let first_took = started.elapsed();
    tokio::time::sleep(HOLD.saturating_sub(started.elapsed())).await;
    blocker.release().await;
    for answer in &first {
        assert!(
            answer.0.is_success() || is_timeout(answer),
            "a first answer is either the result or a timeout: {} {}",
            answer.0,
            answer.1
        );
    }
    let before_retries = settled(probe).await;
    let retried = futures::future::join_all((0..N).map(|i| {
        let make = &make;
        let first = &first[i];
        async move {
            if is_timeout(first) {
                until_answered(|| make(i), is_timeout).await
            } else {
                (first.clone(), 1)
            }
        }
    }))
    .await;
    let max_attempts = retried.iter().map(|(_, attempts)| *attempts).max();
    let last: Vec<Answer> = retried.into_iter().map(|(answer, _)| answer).collect();
    let wave = Wave {
        first,
        last,
        max_attempts: max_attempts.unwrap_or(0),
        first_took,
    };
    assert!(
        wave.timed_out() * 10 >= N * 9,
        "most commands sent while the lock was held time out: {} of {N} (first answers took {:?})",
        wave.timed_out(),
        wave.first_took
    );
    (wave, before_retries)
}

/// Resends every command of `wave` once more: each must be answered successfully and replay
/// the answer it got, whether that came from the first attempt or from a retry.
async fn assert_replayed(wave: &Wave, make: impl Fn(usize) -> RequestBuilder) {
    let replays = all_at_once(N, make).await;
    for (i, (replay, answer)) in replays.iter().zip(&wave.last).enumerate() {
        assert!(
            answer.0.is_success(),
            "command {i}: {} {}",
            answer.0,
            answer.1
        );
        assert_eq!(replay, answer, "command {i}: a replay is the first answer");
    }
}

/// `N` keyed usage deltas of (1, 2) on `session` while `blocker` holds the lock, retried until
/// answered: the totals are exactly (N, 2N) and each answer is the running total its delta
/// made (so the answers are exactly 1..=N).
async fn usage_after_timeouts(
    backend: &str,
    client: &Client,
    server: &Server,
    user: &str,
    session: &str,
    blocker: Blocker,
) {
    let path = format!("/v1/sessions/{session}/usage");
    let delta = json!({"prompt_tokens": 1, "completion_tokens": 2});
    let run = Uuid::new_v4().simple().to_string();
    let keys: Vec<String> = (0..N).map(|i| format!("usage-{run}-{i}")).collect();
    let make = |i: usize| {
        client
            .post(server.url(&path))
            .header("x-user-id", user)
            .header("idempotency-key", &keys[i])
            .json(&delta)
    };
    let totals = || async move {
        let (status, body) = get(client, server, &format!("/v1/sessions/{session}"), user).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["usage"].clone()
    };
    let (wave, before) = locked_wave(blocker, &make, &totals).await;
    assert_replayed(&wave, &make).await;
    let before = before["prompt_tokens"].as_i64().expect("prompt_tokens");
    let acked_first = i64::try_from(N - wave.timed_out()).expect("count");
    let applied_anyway = before - acked_first;

    let mut running: Vec<i64> = Vec::new();
    for (i, answer) in wave.last.iter().enumerate() {
        assert_eq!(answer.0, StatusCode::OK, "delta {i}: {}", answer.1);
        let prompt = answer.1["prompt_tokens"].as_i64().expect("prompt_tokens");
        assert_eq!(
            answer.1["completion_tokens"].as_i64(),
            Some(2 * prompt),
            "delta {i}: {}",
            answer.1
        );
        running.push(prompt);
    }
    // Each delta's answer is the running total right after it: applied once each, the
    // answers are 1..=N whatever the order.
    running.sort_unstable();
    let expected: Vec<i64> = (1..=i64::try_from(N).expect("N")).collect();
    assert_eq!(running, expected, "every delta applied exactly once");
    // A delta whose answer is within the total read before the retries was applied before
    // any retry: exactly the timed-out ones the total counts.
    let applied_before_retry = wave
        .timed_out_indexes()
        .filter(|&i| wave.last[i].1["prompt_tokens"].as_i64() <= Some(before))
        .count();
    assert_eq!(
        i64::try_from(applied_before_retry).expect("count"),
        applied_anyway,
        "the timed-out deltas found applied on their first retry are the ones the total counted"
    );
    let stored = totals().await;
    let n = i64::try_from(N).expect("N");
    assert_eq!(
        stored,
        json!({"prompt_tokens": n, "completion_tokens": 2 * n}),
        "stored exactly once each"
    );
    println!(
        "{backend} usage: {timed_out} of {N} keyed deltas answered 503 timeout (first answers \
         took {first_took:?}); {applied_anyway} of them were applied anyway (before any retry); \
         after retries (at most {attempts} attempts) stored exactly {stored}",
        timed_out = wave.timed_out(),
        first_took = wave.first_took,
        attempts = wave.max_attempts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_retried_after_timeouts_is_counted_once_sqlite() {
    let server = Server::sqlite(&["--command-timeout-ms", COMMAND_TIMEOUT_MS]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let blocker = Blocker::sqlite(&server).await;
    usage_after_timeouts("sqlite", &client, &server, "alice", &session, blocker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_retried_after_timeouts_is_counted_once_postgres() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let url = db.url.clone();
    let server = Server::start(&url, &["--command-timeout-ms", COMMAND_TIMEOUT_MS]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let blocker = Blocker::postgres(&url, &session).await;
    usage_after_timeouts("postgres", &client, &server, "alice", &session, blocker).await;
    drop(server);
}

/// `N` keyed PATCHes, each setting its own title, while the write lock is held, retried until
/// answered: each retry answers 200 with its own PATCH's first answer (its own title, although
/// later PATCHes changed it), the retries apply nothing again (version and title stay what the
/// first attempts left), and the version moved once per PATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_retried_after_timeouts_applies_once() {
    let server = Server::sqlite(&["--command-timeout-ms", COMMAND_TIMEOUT_MS]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let path = format!("/v1/sessions/{session}");
    let (client, server, path) = (&client, &server, &path);
    let read = || async move {
        let (status, body, version) =
            send_tagged(client.get(server.url(path)).header("x-user-id", "alice")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        json!({"version": version.expect("ETag"), "title": body["title"]})
    };
    let start = read().await["version"].as_i64().expect("version");
    let run = Uuid::new_v4().simple().to_string();
    let keys: Vec<String> = (0..N).map(|i| format!("patch-{run}-{i}")).collect();
    let make = |i: usize| {
        client
            .patch(server.url(path))
            .header("x-user-id", "alice")
            .header("idempotency-key", &keys[i])
            .json(&json!({"title": format!("t{i}")}))
    };
    let blocker = Blocker::sqlite(server).await;
    let (wave, before) = locked_wave(blocker, make, &read).await;
    for (i, answer) in wave.last.iter().enumerate() {
        assert_eq!(answer.0, StatusCode::OK, "PATCH {i}: {}", answer.1);
        assert_eq!(
            answer.1["title"],
            format!("t{i}"),
            "PATCH {i}: its own first answer"
        );
    }
    let stored = read().await;
    // Every PATCH was applied before its retry (the engine applies what it queued, whether or
    // not the caller still waits): a retry that applied anything would move the version.
    assert_eq!(stored, before, "the retries applied nothing again");
    let end = stored["version"].as_i64().expect("version");
    let writes = usize::try_from(end - start).expect("versions only grow");
    assert_eq!(
        writes, N,
        "one version per PATCH: {start} -> {end} for {N} PATCHes"
    );
    let title = stored["title"].as_str().expect("title");
    let titles: HashSet<String> = (0..N).map(|i| format!("t{i}")).collect();
    assert!(
        titles.contains(title),
        "the stored title {title:?} is one of the PATCHes'"
    );
    let retried: BTreeSet<u16> = wave
        .timed_out_indexes()
        .map(|i| wave.last[i].0.as_u16())
        .collect();
    println!(
        "sqlite PATCH: {timed_out} of {N} keyed PATCHes answered 503 timeout; all {timed_out} were \
         applied anyway (before any retry: the retries moved nothing); version {start} -> {end} \
         ({writes} writes for {N} PATCHes), stored title {title}; retries answered {retried:?} \
         (at most {attempts} attempts)",
        timed_out = wave.timed_out(),
        attempts = wave.max_attempts,
    );
}

/// `N` keyed creates without an id while the write lock is held, retried until answered:
/// exactly `N` sessions exist, one per key (its title), each key's retries answer 201 with its
/// session, and the retries created nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_retried_after_timeouts_makes_one_session_per_key() {
    let server = Server::sqlite(&["--command-timeout-ms", COMMAND_TIMEOUT_MS]);
    let client = client();
    let user = format!("creator-{}", Uuid::new_v4().simple());
    let (client, server, user) = (&client, &server, user.as_str());
    let keys: Vec<String> = (0..N).map(|i| format!("create-{i}")).collect();
    let make = |i: usize| {
        client
            .post(server.url("/v1/sessions"))
            .header("x-user-id", user)
            .header("idempotency-key", &keys[i])
            .json(&json!({"title": format!("c{i}")}))
    };
    // The user's sessions as sorted (title, id) pairs.
    let list = || async move {
        let (status, body) = get(client, server, "/v1/sessions?limit=1000", user).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut sessions: Vec<(String, String)> = body["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|session| {
                let title = session["title"].as_str().expect("title").to_owned();
                let id = session["session_id"].as_str().expect("id").to_owned();
                (title, id)
            })
            .collect();
        sessions.sort();
        json!(sessions)
    };
    let blocker = Blocker::sqlite(server).await;
    let (wave, before) = locked_wave(blocker, make, &list).await;
    for (i, answer) in wave.last.iter().enumerate() {
        assert_eq!(answer.0, StatusCode::CREATED, "create {i}: {}", answer.1);
        assert_eq!(
            answer.1["title"],
            format!("c{i}"),
            "create {i}: its own session"
        );
    }
    let created_before: HashSet<String> = before
        .as_array()
        .expect("sessions")
        .iter()
        .map(|pair| pair[0].as_str().expect("title").to_owned())
        .collect();
    let applied_anyway = wave
        .timed_out_indexes()
        .filter(|i| created_before.contains(&format!("c{i}")))
        .count();
    let stored = list().await;
    assert_eq!(stored, before, "the retries created nothing more");
    let titles: Vec<String> = stored
        .as_array()
        .expect("sessions")
        .iter()
        .map(|pair| pair[0].as_str().expect("title").to_owned())
        .collect();
    let mut expected: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    expected.sort();
    assert_eq!(titles, expected, "exactly one session per key");
    for (i, answer) in wave.first.iter().enumerate() {
        if answer.0 == StatusCode::CREATED {
            let id = answer.1["session_id"].as_str().expect("session_id");
            assert!(
                stored.to_string().contains(id),
                "create {i}: its session is stored"
            );
        }
    }
    let retried: BTreeSet<u16> = wave
        .timed_out_indexes()
        .map(|i| wave.last[i].0.as_u16())
        .collect();
    println!(
        "sqlite create: {timed_out} of {N} keyed creates answered 503 timeout; {applied_anyway} \
         of them were applied anyway (before any retry); after retries (at most {attempts} \
         attempts) the user has exactly {count} sessions, one per key; retries answered \
         {retried:?}",
        timed_out = wave.timed_out(),
        attempts = wave.max_attempts,
        count = titles.len(),
    );
}

/// The usage totals of `session`.
async fn usage_of(client: &Client, server: &Server, user: &str, session: &str) -> Value {
    let (status, body) = get(client, server, &format!("/v1/sessions/{session}"), user).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["usage"].clone()
}

/// A keyed usage delta.
fn usage(
    client: &Client,
    server: &Server,
    user: &str,
    session: &str,
    key: &str,
    prompt: u32,
    completion: u32,
) -> RequestBuilder {
    client
        .post(server.url(&format!("/v1/sessions/{session}/usage")))
        .header("x-user-id", user)
        .header("idempotency-key", key)
        .json(&json!({"prompt_tokens": prompt, "completion_tokens": completion}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_and_malformed_keys() {
    let server = Server::sqlite(&[]);
    let client = client();
    let alice = create(&client, &server, "alice").await;
    let first = send(usage(&client, &server, "alice", &alice, "k1", 1, 2)).await;
    assert_eq!(
        first,
        (
            StatusCode::OK,
            json!({"prompt_tokens": 1, "completion_tokens": 2})
        )
    );
    // The same key with another body: refused, nothing applied.
    assert_error(
        send(usage(&client, &server, "alice", &alice, "k1", 5, 5)).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    );
    // The same key and body: the first answer, nothing applied.
    assert_eq!(
        send(usage(&client, &server, "alice", &alice, "k1", 1, 2)).await,
        first
    );
    let totals = json!({"prompt_tokens": 1, "completion_tokens": 2});
    assert_eq!(usage_of(&client, &server, "alice", &alice).await, totals);

    // The same key on the same session from a PATCH or a DELETE: another request, refused.
    let session_path = server.url(&format!("/v1/sessions/{alice}"));
    assert_error(
        send(
            client
                .patch(&session_path)
                .header("x-user-id", "alice")
                .header("idempotency-key", "k1")
                .json(&json!({"title": "other"})),
        )
        .await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    );
    assert_error(
        send(
            client
                .delete(&session_path)
                .header("x-user-id", "alice")
                .header("idempotency-key", "k1"),
        )
        .await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    );
    let page = get(&client, &server, &format!("/v1/sessions/{alice}"), "alice").await;
    assert_eq!(page.0, StatusCode::OK, "not deleted: {}", page.1);
    assert_eq!(page.1["title"], "t", "not renamed");

    // Another user's session with the same key (and another body): independent, applied.
    let bob = create(&client, &server, "bob").await;
    assert_eq!(
        send(usage(&client, &server, "bob", &bob, "k1", 5, 5)).await,
        (
            StatusCode::OK,
            json!({"prompt_tokens": 5, "completion_tokens": 5})
        )
    );
    // Another user sending alice's key to alice's session gets no replay of her answer.
    assert_error(
        send(usage(&client, &server, "bob", &alice, "k1", 1, 2)).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Keys are scoped to a session: the same key on another session of alice's applies.
    let alice2 = create(&client, &server, "alice").await;
    assert_eq!(
        send(usage(&client, &server, "alice", &alice2, "k1", 1, 2)).await,
        first
    );
    assert_eq!(
        usage_of(&client, &server, "alice", &alice2).await,
        totals,
        "applied on the other session"
    );

    // A keyed create with the same key and another body: refused.
    let created = send(
        client
            .post(server.url("/v1/sessions"))
            .header("x-user-id", "alice")
            .header("idempotency-key", "c1")
            .json(&json!({"title": "one"})),
    )
    .await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    assert_error(
        send(
            client
                .post(server.url("/v1/sessions"))
                .header("x-user-id", "alice")
                .header("idempotency-key", "c1")
                .json(&json!({"title": "two"})),
        )
        .await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    );

    // Malformed keys: refused before anything is applied.
    let two_headers = client
        .post(server.url(&format!("/v1/sessions/{alice}/usage")))
        .header("x-user-id", "alice")
        .header("idempotency-key", "k2")
        .header("idempotency-key", "k3")
        .json(&json!({"prompt_tokens": 1, "completion_tokens": 1}));
    assert_error(
        send(two_headers).await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    for bad in ["has space", "", &"k".repeat(256)] {
        assert_error(
            send(usage(&client, &server, "alice", &alice, bad, 1, 1)).await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
    }
    assert_eq!(
        usage_of(&client, &server, "alice", &alice).await,
        totals,
        "nothing applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_survive_a_restart() {
    let mut first = Server::sqlite(&[]);
    let url = format!("sqlite://{}", first.sqlite_dir().join("chat.db").display());
    let client = client();
    let create_keyed = |server: &Server| {
        client
            .post(server.url("/v1/sessions"))
            .header("x-user-id", "alice")
            .header("idempotency-key", "create-1")
            .json(&json!({"title": "kept"}))
    };
    let created = send(create_keyed(&first)).await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    let session = created.1["session_id"].as_str().expect("id").to_owned();
    let applied = send(usage(&client, &first, "alice", &session, "u-1", 3, 4)).await;
    assert_eq!(applied.0, StatusCode::OK, "{}", applied.1);
    let doomed = create(&client, &first, "alice").await;
    let delete_keyed = |server: &Server| {
        client
            .delete(server.url(&format!("/v1/sessions/{doomed}")))
            .header("x-user-id", "alice")
            .header("idempotency-key", "delete-1")
    };
    let deleted = send(delete_keyed(&first)).await;
    assert_eq!(deleted.0, StatusCode::NO_CONTENT, "{}", deleted.1);

    assert!(first.terminate().success(), "a clean exit on SIGTERM");
    let second = Server::try_start("127.0.0.1:0", &url, &[]).expect("restart on the same file");
    assert_eq!(
        send(create_keyed(&second)).await,
        created,
        "the create replay after the restart: the first answer, 201 and all"
    );
    assert_eq!(
        send(usage(&client, &second, "alice", &session, "u-1", 3, 4)).await,
        applied,
        "the usage replay after the restart"
    );
    assert_eq!(
        usage_of(&client, &second, "alice", &session).await,
        json!({"prompt_tokens": 3, "completion_tokens": 4}),
        "applied once"
    );
    assert_eq!(
        send(delete_keyed(&second)).await,
        (StatusCode::NO_CONTENT, Value::Null),
        "the delete replay after the restart is 204, not 404"
    );
    let (status, body) = get(&client, &second, &format!("/v1/sessions/{doomed}"), "alice").await;
    assert_error((status, body), StatusCode::NOT_FOUND, "not_found");
    // Without the key the delete of a deleted session is a 404.
    assert_error(
        send(
            client
                .delete(second.url(&format!("/v1/sessions/{doomed}")))
                .header("x-user-id", "alice"),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    drop(second);
}

/// 409 `conflict` (the two processes took the session from each other past the engine's
/// bound) and 503 are retryable.
fn is_retryable(answer: &Answer) -> bool {
    (answer.0 == StatusCode::CONFLICT && answer.1["error"]["code"] == "conflict")
        || answer.0 == StatusCode::SERVICE_UNAVAILABLE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_keys_through_two_servers_apply_once() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let (schema, url) = (db.schema().expect("a schema"), db.url.clone());
    let pool = admin_pool().await;
    let servers = [Server::start(&url, &[]), Server::start(&url, &[])];
    let client = client();
    let session = create(&client, &servers[0], "alice").await;
    const KEYS: usize = 20;
    let run = Uuid::new_v4().simple().to_string();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("both-{run}-{i}")).collect();
    let answers = futures::future::join_all((0..KEYS).flat_map(|i| {
        let key = &keys[i];
        let (client, session) = (&client, &session);
        servers.iter().map(move |server| async move {
            until_answered(
                || usage(client, server, "alice", session, key, 1, 2),
                is_retryable,
            )
            .await
        })
    }))
    .await;
    let attempts: usize = answers.iter().map(|(_, attempts)| attempts - 1).sum();
    let mut running = Vec::new();
    for (i, pair) in answers.chunks(2).enumerate() {
        let ((a, _), (b, _)) = (&pair[0], &pair[1]);
        assert_eq!(a.0, StatusCode::OK, "key {i}: {}", a.1);
        assert_eq!(a, b, "key {i}: one applied, the other its replay");
        running.push(a.1["prompt_tokens"].as_i64().expect("prompt_tokens"));
    }
    running.sort_unstable();
    let expected: Vec<i64> = (1..=i64::try_from(KEYS).expect("KEYS")).collect();
    assert_eq!(running, expected, "each key applied exactly once");
    let n = i64::try_from(KEYS).expect("KEYS");
    for server in &servers {
        let (status, body) = get(
            &client,
            server,
            &format!("/v1/sessions/{session}?fresh=true"),
            "alice",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": n, "completion_tokens": 2 * n})
        );
    }
    let id: Uuid = session.parse().expect("uuid");
    let (records,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.idempotency_keys WHERE session_id = $1"
    )))
    .bind(id)
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(records, n, "one record per key");
    // How often a server lost a write to the other one and restaged (the replay path).
    let mut conflict_retries = 0.0;
    for server in &servers {
        let (_, metrics) = send(client.get(server.url("/metrics"))).await;
        let metrics = metrics.as_str().expect("metrics text").to_owned();
        conflict_retries += metrics
            .lines()
            .filter(|line| line.starts_with("soloist_conflict_retries_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    println!(
        "postgres, two servers: {KEYS} keys each sent to both at once: totals {n}/{} stored, \
         {records} records, {attempts} resends after 409 conflict or 503, {conflict_retries} \
         conflict retries inside the servers",
        2 * n
    );
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_guards_writes() {
    let server = Server::sqlite(&[]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let path = server.url(&format!("/v1/sessions/{session}"));
    let messages = server.url(&format!("/v1/sessions/{session}/messages"));
    let read = || send_tagged(client.get(&path).header("x-user-id", "alice"));
    let (status, _, etag) = read().await;
    assert_eq!(status, StatusCode::OK);
    let etag = etag.expect("ETag on GET");

    // Two PATCHes conditional on the same version: one wins, the other is refused.
    let patch = |title: &str| {
        send_tagged(
            client
                .patch(&path)
                .header("x-user-id", "alice")
                .header("if-match", format!("\"{etag}\""))
                .json(&json!({"title": title})),
        )
    };
    let (a, b) = tokio::join!(patch("a"), patch("b"));
    let (winner, loser) = if a.0 == StatusCode::OK {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(winner.0, StatusCode::OK, "{}", winner.1);
    assert_error(
        (loser.0, loser.1),
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let current = winner.2.expect("ETag on PATCH");
    assert!(current > etag);
    let (_, body, version) = read().await;
    assert_eq!(
        body["title"], winner.1["title"],
        "the winner's title stands"
    );
    assert_eq!(version, Some(current));

    // A DELETE on the old version: refused, the session stays.
    assert_error(
        send(
            client
                .delete(&path)
                .header("x-user-id", "alice")
                .header("if-match", format!("\"{etag}\"")),
        )
        .await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    assert_eq!(read().await.0, StatusCode::OK, "still there");

    // An append on the old version: refused, nothing stored.
    let message = json!({"messages": [{"id": Uuid::now_v7(), "role": "user", "content": "hi"}]});
    let append = |if_match: String, body: &Value| {
        send(
            client
                .post(&messages)
                .header("x-user-id", "alice")
                .header("if-match", if_match)
                .json(body),
        )
    };
    assert_error(
        append(format!("\"{etag}\""), &message).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let (_, body, _) = read().await;
    assert_eq!(body["message_count"], 0, "nothing stored: {body}");
    // On the current version it is stored; resent on a stale version it answers the original
    // sequence (nothing new to write, so nothing to refuse).
    assert_eq!(
        append(format!("\"{current}\""), &message).await,
        (StatusCode::OK, json!({"sequences": [0]}))
    );
    assert_eq!(
        append(format!("\"{etag}\""), &message).await,
        (StatusCode::OK, json!({"sequences": [0]})),
        "a resend with a stale If-Match"
    );
    // `*` matches any version.
    let star = json!({"messages": [{"id": Uuid::now_v7(), "role": "user", "content": "star"}]});
    assert_eq!(
        append("*".to_owned(), &star).await,
        (StatusCode::OK, json!({"sequences": [1]}))
    );
    // Malformed If-Match: 400.
    for bad in ["7", "\"x\"", "W/\"1\"", "\"1\", \"2\""] {
        assert_error(
            append(bad.to_owned(), &star).await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
        assert_error(
            send(
                client
                    .patch(&path)
                    .header("x-user-id", "alice")
                    .header("if-match", bad)
                    .json(&json!({"title": "bad"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
    }
    let (_, body, _) = read().await;
    assert_eq!(body["message_count"], 2, "{body}");
    assert_eq!(body["title"], winner.1["title"], "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_ids_are_idempotency_keys() {
    let server = Server::sqlite(&[]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let path = format!("/v1/sessions/{session}/messages");
    let first_id = Uuid::now_v7();
    let message = |id: Uuid, content: &str| json!({"id": id, "role": "user", "content": content});
    let (client, server, session) = (&client, &server, session.as_str());
    let append = |messages: Vec<Value>| {
        send(
            client
                .post(server.url(&path))
                .header("x-user-id", "alice")
                .json(&json!({"messages": messages})),
        )
    };
    let stored = || async move {
        let (status, body) = get(
            client,
            server,
            &format!("/v1/sessions/{session}?limit=1"),
            "alice",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["message_count"].clone(),
            body["messages"][0]["content"].clone(),
        )
    };

    assert_eq!(
        append(vec![message(first_id, "original")]).await,
        (StatusCode::OK, json!({"sequences": [0]}))
    );
    // The same id with other content: the whole append refused, nothing stored.
    assert_error(
        append(vec![message(first_id, "changed")]).await,
        StatusCode::CONFLICT,
        "message_id_reused",
    );
    assert_error(
        append(vec![
            message(Uuid::now_v7(), "new"),
            message(first_id, "changed"),
        ])
        .await,
        StatusCode::CONFLICT,
        "message_id_reused",
    );
    assert_eq!(stored().await, (json!(1), json!("original")));
    // The same id twice in one request.
    let twice = Uuid::now_v7();
    assert_error(
        append(vec![message(twice, "x"), message(twice, "x")]).await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_eq!(stored().await, (json!(1), json!("original")));

    // Past the engine's cached tail (1,000 messages): 1,250 more in appends of 250.
    for batch in 0..5 {
        let messages: Vec<Value> = (0..250)
            .map(|i| message(Uuid::now_v7(), &format!("m{batch}-{i}")))
            .collect();
        let (status, body) = append(messages).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["sequences"][0], 1 + batch * 250, "{body}");
    }
    assert_eq!(stored().await, (json!(1251), json!("original")));
    // The very first message, resent: its original sequence.
    assert_eq!(
        append(vec![message(first_id, "original")]).await,
        (StatusCode::OK, json!({"sequences": [0]}))
    );
    // With a new one: the old one's sequence and the next one.
    assert_eq!(
        append(vec![
            message(first_id, "original"),
            message(Uuid::now_v7(), "next")
        ])
        .await,
        (StatusCode::OK, json!({"sequences": [0, 1251]}))
    );
    // Other content for that old id: refused whole.
    assert_error(
        append(vec![
            message(Uuid::now_v7(), "new"),
            message(first_id, "changed"),
        ])
        .await,
        StatusCode::CONFLICT,
        "message_id_reused",
    );
    assert_eq!(stored().await, (json!(1252), json!("original")));
}
