//! Routing between server processes: the peers' protocol's authentication, a
//! session's owner killed with SIGKILL under round-robin load (takeover time bounded, nothing
//! lost or duplicated), and a member drained with SIGTERM under load (the clients of the other
//! members see no error at all).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use soloist::cluster::{Forward, Undelivered, score};
use soloist::{Member, SessionId};
use soloist_server::cluster::Peers;
use soloist_testkit::{assert_contiguous, stored_rows};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use common::{Server, client, postgres_db};

/// The documented bound on how long a session whose owner was killed refuses appends (typed,
/// retryable errors) before another member has taken it over, with the default settings.
const TAKEOVER_BOUND: Duration = Duration::from_secs(2);

/// What a connection in the peers' protocol gets: its answers, or the HTTP answer (status
/// line and JSON body) that refused it.
type Spoken = Result<Vec<Value>, (String, Value)>;

/// Speaks the peers' protocol to `server`, by its wire format: the preface, the secret in a
/// frame (none: the connection's write side closes instead), then each of `commands` in a
/// frame, reading its answer before sending the next.
async fn speak_peer(server: &Server, secret: Option<&[u8]>, commands: &[Value]) -> Spoken {
    let mut stream = TcpStream::connect(server.address()).await.expect("connect");
    stream
        .write_all(b"SOLOIST-PEER/1\r\n")
        .await
        .expect("preface");
    let Some(secret) = secret else {
        stream.shutdown().await.expect("shutdown");
        return Err(http_answer(stream, Vec::new()).await);
    };
    write_frame(&mut stream, secret).await;
    let mut welcome = vec![0u8; b"SOLOIST-PEER/1 OK\r\n".len()];
    let read = stream.read(&mut welcome).await.expect("an answer");
    welcome.truncate(read);
    if welcome != b"SOLOIST-PEER/1 OK\r\n"[..read] || read == 0 {
        return Err(http_answer(stream, welcome).await);
    }
    stream
        .read_exact(&mut welcome[read..])
        .await
        .expect("the welcome");
    let mut answers = Vec::new();
    for (id, command) in (1u64..).zip(commands) {
        let frame =
            json!({"command": {"id": id, "hops": 1, "budget_ms": 5000, "command": command}});
        write_frame(&mut stream, frame.to_string().as_bytes()).await;
        loop {
            let length = stream.read_u32().await.expect("a frame");
            let mut body = vec![0u8; usize::try_from(length).expect("length")];
            stream.read_exact(&mut body).await.expect("a frame's body");
            let frame: Value = serde_json::from_slice(&body).expect("a JSON frame");
            if frame == json!("pong") {
                continue;
            }
            assert_eq!(frame["answer"]["id"], id, "{frame}");
            answers.push(frame["answer"]["answer"].clone());
            break;
        }
    }
    Ok(answers)
}

async fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    let length = u32::try_from(body.len()).expect("a short frame");
    stream.write_u32(length).await.expect("a frame's length");
    stream.write_all(body).await.expect("a frame");
}

/// The rest of an HTTP/1 answer that began with `start`, up to the end of the connection:
/// its status line and its JSON body.
async fn http_answer(mut stream: TcpStream, mut start: Vec<u8>) -> (String, Value) {
    stream.read_to_end(&mut start).await.expect("an answer");
    let text = String::from_utf8(start).expect("text");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The cluster secret the server generated in its SQLite database.
async fn stored_secret(server: &Server) -> String {
    let url = format!("sqlite://{}", server.sqlite_dir().join("chat.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
    let (secret,): (String,) =
        sqlx::query_as("SELECT value FROM cluster_settings WHERE name = 'secret'")
            .fetch_one(&pool)
            .await
            .expect("a stored secret");
    pool.close().await;
    secret
}

/// The peers' protocol answers the same 404 as an unknown path to a connection without the
/// secret, with a wrong one, or with an empty one, and runs nothing; HTTP/1 never reaches it,
/// even with the right secret. With the secret it runs commands, and the owner checks the
/// identity each carries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_protocol_is_not_there_without_the_secret() {
    let server = Server::sqlite(&[]);
    let secret = stored_secret(&server).await;
    assert_eq!(secret.len(), 64, "32 random bytes as hex");
    let session = Uuid::now_v7();
    let command = json!({"create_session": {"user_id": "mallory", "session_id": session}});
    let unknown = common::send(client().get(server.url("/no/such/route"))).await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
    let refused = Err(("HTTP/1.1 404 Not Found".to_owned(), unknown.1.clone()));

    // The secret with its last digit changed.
    let last = if secret.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &secret[..63]);
    let attempts: [Option<&[u8]>; 4] = [None, Some(b""), Some(wrong.as_bytes()), Some(b"mallory")];
    for attempt in attempts {
        let spoken = speak_peer(&server, attempt, std::slice::from_ref(&command)).await;
        assert_eq!(spoken, refused, "{attempt:?}");
    }
    // The engine's own client is refused too: nothing was sent, so the command may go elsewhere.
    let peers = Peers::new(wrong.clone());
    let member = Member {
        id: Uuid::now_v7(),
        address: server.url(""),
        started_at: chrono::Utc::now(),
        heartbeat_at: chrono::Utc::now(),
    };
    let command_value: soloist::Command = serde_json::from_value(command.clone()).expect("command");
    let forwarded = peers.forward(&member, &command_value, 1, None).await;
    assert!(
        matches!(&forwarded, Err(Undelivered(reason)) if reason.contains("refused")),
        "{forwarded:?}"
    );
    for path in ["/internal/v1/commands", "/internal/v1/peers"] {
        let over_http1 = common::send(
            client()
                .post(server.url(path))
                .header("x-soloist-cluster-secret", &secret)
                .json(&command),
        )
        .await;
        assert_eq!(over_http1, unknown, "HTTP/1 never reaches the peers");
    }
    let path = format!("/v1/sessions/{session}");
    let (status, _) = common::get(&client(), &server, &path, "mallory").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing ran");

    // The owner checks the identity the command carries, like any other.
    let foreign = json!({"get_session": {"user_id": "eve", "session_id": session}});
    let answers = speak_peer(&server, Some(secret.as_bytes()), &[command, foreign])
        .await
        .expect("welcomed");
    assert_eq!(
        answers[0]["reply"]["session_created"]["created"], true,
        "{answers:?}"
    );
    assert_eq!(answers[1]["error"]["code"], "not_found", "{answers:?}");
    let (status, page) = common::get(&client(), &server, &path, "mallory").await;
    assert_eq!(status, StatusCode::OK, "{page}");
}

/// The servers' member ids, from `/healthz`, by server index.
async fn member_ids(client: &Client, servers: &[Server]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for server in servers {
        // Each sees all of them once the earlier ones have read the members again.
        let deadline = Instant::now() + Duration::from_secs(10);
        let health = loop {
            let (status, health) = common::send(client.get(server.url("/healthz"))).await;
            assert_eq!(status, StatusCode::OK, "{health}");
            if health["members"].as_array().map(Vec::len) == Some(servers.len()) {
                break health;
            }
            assert!(
                Instant::now() < deadline,
                "members never all seen: {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ids.push(
            health["member"]["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("a member id"),
        );
    }
    ids
}

/// The index of the server rendezvous hashing places `session` on.
fn owner_of(ids: &[Uuid], session: Uuid) -> usize {
    let session = SessionId::from(session);
    (0..ids.len())
        .max_by_key(|&index| (score(ids[index], session), ids[index]))
        .expect("members")
}

/// What the writers of a run share.
#[derive(Default)]
struct Run {
    stop: AtomicBool,
    /// Acknowledged appends: (session, seq, message id, when, relative to `started`).
    acks: Mutex<Vec<(Uuid, i64, Uuid, Duration)>>,
    /// Failed attempts by kind.
    errors: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
}

/// One writer: appends to `sessions` in turn through `targets` in turn, each message retried
/// with its id until acknowledged (every 20 ms, for at most 30 s).
async fn writer(
    client: Client,
    targets: Arc<Vec<String>>,
    sessions: Arc<Vec<(Uuid, String)>>,
    run: Arc<Run>,
    started: Instant,
    index: usize,
) {
    let mut turn = index;
    while !run.stop.load(Ordering::Relaxed) {
        let (session, user) = &sessions[turn % sessions.len()];
        let id = Uuid::new_v4();
        let body = json!({"messages": [{"id": id, "role": "user", "content": format!("w{index} t{turn}")}]});
        let first = Instant::now();
        loop {
            let target =
                &targets[run.requests.fetch_add(1, Ordering::Relaxed) as usize % targets.len()];
            let sent = client
                .post(format!("{target}/v1/sessions/{session}/messages"))
                .header("x-user-id", user)
                .json(&body)
                .send()
                .await;
            let failure = match sent {
                Ok(response) if response.status() == StatusCode::OK => {
                    let answer: Value = response.json().await.expect("json");
                    let seq = answer["sequences"][0].as_i64().expect("a sequence");
                    run.acks
                        .lock()
                        .expect("acks")
                        .push((*session, seq, id, started.elapsed()));
                    break;
                }
                Ok(response) => {
                    let status = response.status();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    assert!(
                        matches!(status.as_u16(), 409 | 429 | 503),
                        "not retryable: {status} {body}"
                    );
                    format!("{status} {}", body["error"]["code"].as_str().unwrap_or(""))
                }
                Err(error) if error.is_connect() => "connect".to_owned(),
                Err(_) => "cut off".to_owned(),
            };
            *run.errors
                .lock()
                .expect("errors")
                .entry(failure)
                .or_default() += 1;
            assert!(
                first.elapsed() < Duration::from_secs(30),
                "never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        turn += 1;
    }
}

/// Checks the stored rows against the acknowledgements: each acknowledged append stored once,
/// at its acknowledged sequence, in contiguous sequences.
async fn check_stored(url: &str, sessions: &[(Uuid, String)], run: &Run) -> usize {
    let acks = run.acks.lock().expect("acks").clone();
    let mut stored = 0;
    for (session, _) in sessions {
        let rows = stored_rows(url, SessionId::from(*session))
            .await
            .expect("rows");
        assert_contiguous(&rows);
        let at: HashMap<Uuid, i64> = rows.iter().map(|&(seq, id)| (id, seq)).collect();
        for &(acked_session, seq, id, _) in &acks {
            if acked_session == *session {
                assert_eq!(
                    at.get(&id),
                    Some(&seq),
                    "acknowledged append {id} not stored at {seq}"
                );
            }
        }
        stored += rows.len();
    }
    stored
}

/// Three servers, clients spread round robin over all three, the owner of the hot session
/// killed with SIGKILL mid-run and restarted: the session refuses appends for less than the
/// documented bound, and every acknowledged append is stored once at its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_sessions_owner_killed_is_replaced_within_the_bound() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(&db.url, &[])).collect();
    let client = client();
    let ids = member_ids(&client, &servers).await;
    let session = common::create(&client, &servers[0], "alice").await;
    let session: Uuid = session.parse().expect("a session id");
    let victim = owner_of(&ids, session);
    let sessions = Arc::new(vec![(session, "alice".to_owned())]);
    let targets = Arc::new(
        servers
            .iter()
            .map(|server| server.url(""))
            .collect::<Vec<_>>(),
    );
    let run = Arc::new(Run::default());
    let started = Instant::now();
    let writers: Vec<_> = (0..16)
        .map(|index| {
            tokio::spawn(writer(
                client.clone(),
                targets.clone(),
                sessions.clone(),
                run.clone(),
                started,
                index,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let address = servers[victim].address().to_owned();
    servers[victim].kill();
    let killed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    servers[victim] = Server::try_start(&address, &db.url, &[]).expect("restart on its port");
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("a writer failed");
    }
    let mut times: Vec<Duration> = run
        .acks
        .lock()
        .expect("acks")
        .iter()
        .map(|ack| ack.3)
        .collect();
    times.sort();
    let before = times
        .iter()
        .rev()
        .find(|&&at| at < killed)
        .copied()
        .expect("acks before");
    let after = times
        .iter()
        .find(|&&at| at > killed)
        .copied()
        .expect("acks after");
    let gap = after - before;
    let stored = check_stored(&db.url, &sessions, &run).await;
    eprintln!(
        "SIGKILL of the owner: {} acks, {stored} stored; no append acknowledged for {gap:?} \
         (last before the kill {:?} before it, first after {:?} after); errors {:?}",
        times.len(),
        killed - before,
        after - killed,
        run.errors.lock().expect("errors"),
    );
    assert_eq!(stored, times.len(), "every stored append was acknowledged");
    assert!(
        gap < TAKEOVER_BOUND,
        "the session refused appends for {gap:?}"
    );
}

/// Three servers under load from clients of two of them; the third, which owns some of the
/// sessions, is drained with SIGTERM: it hands its sessions over, and the clients see no error
/// at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_member_hands_over_without_an_error() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(&db.url, &[])).collect();
    let client = client();
    let ids = member_ids(&client, &servers).await;
    let mut sessions = Vec::new();
    for index in 0..12 {
        let user = format!("user-{index}");
        let id: Uuid = common::create(&client, &servers[index % 2], &user)
            .await
            .parse()
            .expect("a session id");
        sessions.push((id, user));
    }
    let drained = sessions
        .iter()
        .filter(|(id, _)| owner_of(&ids, *id) == 2)
        .count();
    assert!(drained > 0, "the drained member owns some sessions");
    let sessions = Arc::new(sessions);
    let targets = Arc::new(vec![servers[0].url(""), servers[1].url("")]);
    let run = Arc::new(Run::default());
    let started = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|index| {
            tokio::spawn(writer(
                client.clone(),
                targets.clone(),
                sessions.clone(),
                run.clone(),
                started,
                index,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = servers[2].terminate();
    assert!(status.success(), "{status:?}");
    let drained_in = started.elapsed() - Duration::from_secs(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    run.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("a writer failed");
    }
    let acks = run.acks.lock().expect("acks").len();
    let stored = check_stored(&db.url, &sessions, &run).await;
    eprintln!(
        "SIGTERM of a member owning {drained} of 12 sessions: exited after {drained_in:?}; \
         {acks} acks, {stored} stored, errors {:?}",
        run.errors.lock().expect("errors")
    );
    assert_eq!(stored, acks);
    assert!(
        run.errors.lock().expect("errors").is_empty(),
        "the clients of the other members saw errors"
    );
}
