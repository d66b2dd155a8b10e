//! Event streams against the real binary, attacked as one client would: viewers that stop
//! reading pin a bounded amount of memory however long the drafts they follow grow (and get
//! the whole reply, in order, once they read again), and event ids the stream never gave are
//! refused at once instead of followed in silence or in a loop.

mod common;

use std::time::{Duration, Instant};

use common::{Server, assert_error, client, create, get, post, stalled_get};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use uuid::Uuid;

/// Sessions, each with one viewer that stops reading.
const SESSIONS: usize = 4;
/// Messages before the draft, of [`LARGE`] bytes each: 6 MB, more than the connection buffers
/// (the server's socket grows its send buffer to 4 MiB on loopback), so the viewer is stuck
/// in the backlog when the draft starts.
const BACKLOG: usize = 100;
/// Bytes of each earlier message, and of the draft's start.
const LARGE: usize = 60_000;
/// One-byte deltas each draft grows by: more than the 1,024 events a session holds for its
/// subscribers, so a stalled viewer lags and catches up from the session.
const DELTAS: usize = 1_500;

/// Reads the viewer's stream until an event carries the draft as it ended (`end`: the end of
/// its content, closing the JSON string), and returns its events `(name, data)` in order (the
/// body is chunked: one chunk per event).
async fn read_to_end(stream: &mut TcpStream, end: &[u8]) -> Vec<(String, Value)> {
    let mut raw = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    while !contains(&raw, end) {
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buffer))
            .await
            .expect("the stream goes on within 30 s")
            .expect("read");
        assert!(read > 0, "the stream ended before the draft's end");
        raw.extend_from_slice(&buffer[..read]);
    }
    // Up to the end of that event's chunk.
    while !raw.ends_with(b"\n\n\r\n") {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0, "the stream ended inside the draft's end");
        raw.extend_from_slice(&buffer[..read]);
    }
    let head_end = find(&raw, b"\r\n\r\n").expect("a head") + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body = String::from_utf8(dechunk(&raw[head_end..])).expect("UTF-8 events");
    body.split("\n\n")
        .filter_map(|event| {
            let field = |name: &str| {
                event
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|value| value.trim().to_owned())
            };
            Some((
                field("event:")?,
                serde_json::from_str(&field("data:")?).expect("JSON data"),
            ))
        })
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// The data of a chunked body.
fn dechunk(mut chunked: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = find(chunked, b"\r\n") {
        let size = std::str::from_utf8(&chunked[..line_end]).expect("chunk size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        let start = line_end + 2;
        if size == 0 || chunked.len() < start + size {
            break;
        }
        body.extend_from_slice(&chunked[start..start + size]);
        chunked = &chunked[(start + size + 2).min(chunked.len())..];
    }
    body
}

/// Four sessions, each with a viewer that stopped reading (stuck in a 6 MB backlog, its
/// socket full), each with a 60 KB draft that grows by 1,500 one-byte deltas. Each commit
/// used to publish a copy of the whole draft, and a stalled viewer kept up to 1,024 of them
/// (about 60 MB a session); what a session holds for its subscribers is now the deltas,
/// bounded in bytes and in number. Once they read again, the viewers get the backlog and the
/// reply whole and in order (as it ended: they fell behind past what is held for them, and
/// went on from their own positions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_that_stop_reading_pin_a_bounded_amount() {
    // The backlog in one page: the viewer listens for what commits while it is stuck in it.
    // Stalled readers are kept for as long as the test takes (by default they are closed
    // after 30 s; this test is about what they hold meanwhile).
    let server = Server::sqlite(&[
        "--max-page-bytes",
        "16777216",
        "--stalled-reader-timeout-ms",
        "600000",
    ]);
    let client = client();
    let large = "x".repeat(LARGE);
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let session = create(&client, &server, "alice").await;
        for _ in 0..BACKLOG / 10 {
            let earlier: Vec<Value> = (0..10)
                .map(|_| json!({"role": "user", "content": large}))
                .collect();
            let path = format!("/v1/sessions/{session}/messages");
            let body = json!({"messages": earlier});
            let (status, body) = post(&client, &server, &path, "alice", &body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        sessions.push(session);
    }
    let mut viewers = Vec::new();
    for session in &sessions {
        viewers
            .push(stalled_get(server.address(), &format!("/v1/sessions/{session}/events")).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.memory();

    let started = Instant::now();
    let writers: Vec<_> = sessions
        .iter()
        .map(|session| {
            let (client, large) = (client.clone(), large.clone());
            let messages = server.url(&format!("/v1/sessions/{session}/messages"));
            let draft = Uuid::now_v7();
            let deltas = server.url(&format!("/v1/sessions/{session}/messages/{draft}/deltas"));
            let finish = server.url(&format!("/v1/sessions/{session}/messages/{draft}/finish"));
            tokio::spawn(async move {
                let start = json!({"messages": [{"id": draft, "role": "assistant", "content": large, "status": "in_progress"}]});
                let answer = client
                    .post(&messages)
                    .header("x-user-id", "alice")
                    .json(&start)
                    .send()
                    .await
                    .expect("start");
                assert_eq!(answer.status(), StatusCode::OK);
                for index in 0..DELTAS {
                    let delta = json!({"offset": LARGE + index, "content": "y"});
                    let answer = client
                        .post(&deltas)
                        .header("x-user-id", "alice")
                        .json(&delta)
                        .send()
                        .await
                        .expect("delta");
                    assert_eq!(answer.status(), StatusCode::OK);
                }
                let answer = client
                    .post(&finish)
                    .header("x-user-id", "alice")
                    .json(&json!({"status": "completed"}))
                    .send()
                    .await
                    .expect("finish");
                assert_eq!(answer.status(), StatusCode::OK);
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let after = server.memory();
    let grown_mib = after.rss_kib.saturating_sub(before.rss_kib) as f64 / 1024.0;
    eprintln!(
        "{SESSIONS} stalled viewers, {DELTAS} deltas each on a {LARGE}-byte draft in {:.1} s: \
         RSS {:.1} -> {:.1} MiB (+{grown_mib:.1} MiB, {:.2} MiB a viewer)",
        started.elapsed().as_secs_f64(),
        before.rss_kib as f64 / 1024.0,
        after.rss_kib as f64 / 1024.0,
        grown_mib / SESSIONS as f64,
    );
    assert!(
        grown_mib < 64.0,
        "stalled viewers pinned {grown_mib:.1} MiB (before: about 60 MiB each)"
    );

    // Reading again, each viewer gets the backlog, the draft from its start, every byte it
    // grew by once and in order, and the finish.
    let expected = format!("{large}{}", "y".repeat(DELTAS));
    let end = format!("{}\"", "y".repeat(DELTAS));
    for mut viewer in viewers {
        // Reading again, with room to read at loopback speed (a 4 KiB window crawls).
        socket2::SockRef::from(&viewer)
            .set_recv_buffer_size(1 << 20)
            .expect("SO_RCVBUF");
        let events = read_to_end(&mut viewer, end.as_bytes()).await;
        let mut backlog = 0;
        // The draft as followed (if the viewer got to it before it ended), and as it ended.
        let mut draft = None::<String>;
        let mut ended = None;
        for (name, data) in &events {
            let content = data["content"].as_str().expect("content");
            match name.as_str() {
                "message" if data["seq"] == BACKLOG => ended = Some(content.to_owned()),
                "message" => backlog += 1,
                "message.created" => draft = Some(content.to_owned()),
                "message.delta" => {
                    let text = draft.as_mut().expect("a delta after the draft's start");
                    assert_eq!(data["offset"].as_u64(), Some(text.len() as u64), "no gap");
                    text.push_str(content);
                }
                "message.finished" => ended = Some(content.to_owned()),
                other => panic!("unexpected event {other}: {data}"),
            }
        }
        assert_eq!(backlog, BACKLOG, "the backlog, each message once");
        assert_eq!(ended.as_deref(), Some(expected.as_str()));
        if let Some(draft) = draft {
            assert_eq!(draft, expected, "every delta once, in order");
        }
    }
}

/// Event ids the stream never gave get 400 at once: positions past the session's newest
/// message (whatever their size: `9223372036854775807/0:0` used to overflow and resubscribe
/// in a loop, on two cores), offsets past a draft's content or inside one of its characters.
/// A position the stream gave resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_the_stream_never_gave_are_refused() {
    let server = Server::sqlite(&[]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{session}/messages");
    let (status, _) = post(
        &client,
        &server,
        &messages,
        "alice",
        &json!({"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A draft at 2 whose second character takes two bytes (1..3).
    let draft = Uuid::now_v7();
    let start = json!({"messages": [{"id": draft, "role": "assistant", "content": "héllo", "status": "in_progress"}]});
    let (status, _) = post(&client, &server, &messages, "alice", &start).await;
    assert_eq!(status, StatusCode::OK);

    let events = server.url(&format!("/v1/sessions/{session}/events"));
    let follow = |last_event_id: &str| {
        client
            .get(&events)
            .header("x-user-id", "alice")
            .header("last-event-id", last_event_id)
    };
    for impossible in [
        "9223372036854775807/0:0",
        "9223372036854775807",
        "999999:999999",
        "3",
        "2:99",
        "2:2",
        "3/2:0",
    ] {
        assert_error(
            common::send(follow(impossible)).await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
    }
    assert_error(
        get(
            &client,
            &server,
            &format!("/v1/sessions/{session}/events?after_seq=1000"),
            "alice",
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );

    // From inside the draft, at a character's boundary: the rest of it, then what comes.
    let resumed = follow("2:1").send().await.expect("events");
    assert_eq!(resumed.status(), StatusCode::OK);
    let (status, _) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages/{draft}/deltas"),
        "alice",
        &json!({"offset": 6, "content": "!"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = common::read_named_events(resumed, 2).await;
    assert_eq!(seen[0].1, "message.delta");
    assert_eq!(seen[0].2["offset"], 1);
    assert_eq!(seen[0].2["content"], "éllo");
    assert_eq!(seen[1].2["offset"], 6);
    assert_eq!(seen[1].2["content"], "!");
    assert_eq!(seen[1].0, "2:7");
}
