//! Request bodies against the real binary: a body over its route's limit is refused (413)
//! before it is read when its length is declared, and as soon as it passes the limit when
//! chunked, so that 50 MB bodies leave the server's memory where it was, even under a 1 GiB
//! address-space limit; the largest accepted appends, sixteen at once, fit the body budget;
//! slow bodies time out (408); JSON fields are stored exactly as sent; every error is a JSON
//! error that changes nothing.
//!
//! The memory figures (`VmHWM`, the peak resident set, before and after) are printed; run with
//! `--nocapture` to read them, and with `SOLOIST_SERVER_BIN=target/release/soloist-server` to
//! measure the release build.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{
    Memory, Server, assert_error, client, create, get, post, read_response, read_until, send,
};
use futures::future::join_all;
use reqwest::{Body, Client, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

/// The default limit of an append body.
const APPEND_LIMIT: usize = 8 * MIB;

/// The probes' size: 50 MB of `0,0,0,...`, which a `serde_json::Value` would hold in about
/// 1.7 GiB.
const PROBE_BYTES: usize = 50_000_000;

/// `prefix` + `0,0,...,0` + `suffix`, exactly `total` bytes of valid JSON.
fn zeros(prefix: &str, suffix: &str, total: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(total);
    body.extend_from_slice(prefix.as_bytes());
    body.push(b'0');
    let pairs = (total - body.len() - suffix.len()) / 2;
    body.extend_from_slice(",0".repeat(pairs).as_bytes());
    // One byte short when the lengths' parities differ: JSON allows a space.
    if body.len() + suffix.len() < total {
        body.push(b' ');
    }
    body.extend_from_slice(suffix.as_bytes());
    assert_eq!(body.len(), total);
    body
}

/// `{"metadata":{"a":[0,0,...]}}`, 50,000,000 bytes, for `POST /v1/sessions`.
fn create_probe() -> &'static [u8] {
    static PROBE: OnceLock<Vec<u8>> = OnceLock::new();
    PROBE.get_or_init(|| zeros(r#"{"metadata":{"a":["#, "]}}", PROBE_BYTES))
}

/// An append of one assistant message whose `tool_calls` is `[0,0,...]`, of `bytes` bytes.
fn append_probe(bytes: usize) -> Vec<u8> {
    zeros(
        r#"{"messages":[{"role":"assistant","content":"x","tool_calls":["#,
        "]}]}",
        bytes,
    )
}

/// [`append_probe`] of 50,000,000 bytes.
fn append_probe_50mb() -> &'static [u8] {
    static PROBE: OnceLock<Vec<u8>> = OnceLock::new();
    PROBE.get_or_init(|| append_probe(PROBE_BYTES))
}

/// A body sent chunked (no `content-length`), 64 KiB per chunk.
fn chunked(body: &'static [u8]) -> Body {
    Body::wrap_stream(futures::stream::iter(
        body.chunks(64 * 1024).map(Ok::<_, std::io::Error>),
    ))
}

/// `POST path` as `user` with a JSON `body` (sized or chunked): the status, the error code if
/// any, and how long the answer took.
async fn post_body(
    client: &Client,
    server: &Server,
    path: &str,
    user: &str,
    body: Body,
) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let (status, body) = send(
        client
            .post(server.url(path))
            .header("x-user-id", user)
            .header("content-type", "application/json")
            .body(body),
    )
    .await;
    (status, body, started.elapsed())
}

/// A create, an append and a read, as a client that knows nothing of the probes would make.
async fn normal_round(client: &Client, server: &Server, user: &str) {
    let id = create(client, server, user).await;
    let (status, body) = post(
        client,
        server,
        &format!("/v1/sessions/{id}/messages"),
        user,
        &json!({"messages": [{"role": "user", "content": "still here?"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get(client, server, &format!("/v1/sessions/{id}"), user).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["messages"][0]["content"], "still here?", "{body}");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints one line of figures that can be quoted: where, before, after, growth of the peak.
fn report(what: &str, before: Memory, after: Memory) {
    eprintln!(
        "FIGURES {what}: before {before}; after {after}; peak growth {:.1} MiB",
        mib(after.peak_kib.saturating_sub(before.peak_kib))
    );
}

/// Counts answers: 413 `too_large` expected, 503 `busy` tolerated (and counted).
fn count_refusals(answers: &[(StatusCode, Value, Duration)]) -> (usize, usize) {
    let mut too_large = 0;
    let mut busy = 0;
    for (status, body, _) in answers {
        match (status.as_u16(), body["error"]["code"].as_str()) {
            (413, Some("too_large")) => too_large += 1,
            (503, Some("busy")) => busy += 1,
            _ => panic!("expected 413 too_large (or 503 busy), got {status} {body}"),
        }
    }
    (too_large, busy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabyte_probes_are_refused_under_a_one_gib_address_space() {
    let server = Server::sqlite_with_address_space(1024 * 1024, &[])
        .unwrap_or_else(|error| panic!("no start under ulimit -v 1048576: {error}"));
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");
    let before = server.memory();

    // Declared length: refused before the body is read.
    let (status, body, took) = post_body(
        &client,
        &server,
        "/v1/sessions",
        "alice",
        Body::from(create_probe()),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(
        took < Duration::from_secs(2),
        "sized create probe took {took:?}"
    );
    eprintln!("50 MB create probe, content-length: 413 in {took:?}");
    let (status, body, took) = post_body(
        &client,
        &server,
        &messages,
        "alice",
        Body::from(append_probe_50mb()),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    assert!(
        took < Duration::from_secs(2),
        "sized append probe took {took:?}"
    );
    eprintln!("50 MB append probe, content-length: 413 in {took:?}");

    // Chunked: refused once the limit is passed.
    let (status, body, took) = post_body(
        &client,
        &server,
        "/v1/sessions",
        "alice",
        chunked(create_probe()),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    eprintln!("50 MB create probe, chunked: 413 in {took:?}");
    let (status, body, took) = post_body(
        &client,
        &server,
        &messages,
        "alice",
        chunked(append_probe_50mb()),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    eprintln!("50 MB append probe, chunked: 413 in {took:?}");
    let single = server.memory();

    // Sixteen chunked append probes at once: each may hold up to the 8 MiB limit.
    let started = Instant::now();
    let answers = join_all((0..16).map(|_| {
        post_body(
            &client,
            &server,
            &messages,
            "alice",
            chunked(append_probe_50mb()),
        )
    }))
    .await;
    let (too_large, busy) = count_refusals(&answers);
    eprintln!(
        "16 concurrent chunked 50 MB append probes: {too_large} x 413, {busy} x 503 busy in {:?}",
        started.elapsed()
    );
    assert!(too_large >= 1);

    normal_round(&client, &server, "bob").await;
    let (status, body) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message_count"], 0, "{body}");
    let after = server.memory();
    report("1 GiB address space, 4 single 50 MB probes", before, single);
    report(
        "1 GiB address space, then 16 concurrent chunked 50 MB probes",
        before,
        after,
    );
    let mut server = server;
    assert!(server.is_running());
}

/// An append of `count` user messages of `content` bytes each.
fn append_body(count: usize, content: usize) -> Vec<u8> {
    let message = format!(r#"{{"role":"user","content":"{}"}}"#, "x".repeat(content));
    let mut body = br#"{"messages":["#.to_vec();
    for index in 0..count {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message.as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_largest_accepted_appends_at_once() {
    let server = Server::sqlite(&[]);
    let client = client();
    // 131 messages of 64,000 bytes: 8,388,076 bytes, the most of such messages that fit the
    // 8 MiB limit (the engine takes up to 256 messages of up to 64 KiB each).
    let body: &'static [u8] = Box::leak(append_body(131, 64_000).into_boxed_slice());
    assert!(body.len() <= APPEND_LIMIT && body.len() + 64_032 > APPEND_LIMIT);
    let mut ids = Vec::new();
    for index in 0..16 {
        ids.push(create(&client, &server, &format!("user-{index}")).await);
    }
    let before = server.memory();
    let started = Instant::now();
    let answers = join_all(ids.iter().enumerate().map(|(index, id)| {
        let client = &client;
        let server = &server;
        async move {
            post_body(
                client,
                server,
                &format!("/v1/sessions/{id}/messages"),
                &format!("user-{index}"),
                Body::from(body),
            )
            .await
        }
    }))
    .await;
    let took = started.elapsed();
    let mut accepted = 0;
    let mut busy = 0;
    for (status, answer, _) in &answers {
        match status.as_u16() {
            200 => {
                assert_eq!(answer["sequences"].as_array().map(Vec::len), Some(131));
                accepted += 1;
            }
            503 if answer["error"]["code"] == "busy" => busy += 1,
            _ => panic!("expected 200 (or 503 busy), got {status} {answer}"),
        }
    }
    let after = server.memory();
    eprintln!(
        "16 concurrent appends of {} bytes (131 x 64,000-byte messages): {accepted} x 200, \
         {busy} x 503 busy, in {took:?}",
        body.len()
    );
    report("16 concurrent largest accepted appends", before, after);
    assert!(accepted >= 1);
    let (status, page) = get(
        &client,
        &server,
        &format!("/v1/sessions/{}?limit=0", ids[0]),
        "user-0",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    normal_round(&client, &server, "after").await;
    let growth = after.peak_kib.saturating_sub(before.peak_kib);
    assert!(
        growth < 600 * 1024,
        "peak RSS grew by {:.1} MiB",
        mib(growth)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_largest_refused_appends_at_once() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");
    let one_over: &'static [u8] = Box::leak(append_probe(APPEND_LIMIT + 1).into_boxed_slice());
    let sixty: &'static [u8] = Box::leak(append_probe(60_000_000).into_boxed_slice());
    let before = server.memory();

    let started = Instant::now();
    let answers = join_all(
        (0..16).map(|_| post_body(&client, &server, &messages, "alice", Body::from(one_over))),
    )
    .await;
    let (too_large, busy) = count_refusals(&answers);
    assert_eq!((too_large, busy), (16, 0));
    let slowest = answers.iter().map(|answer| answer.2).max();
    eprintln!(
        "16 concurrent appends of 8 MiB + 1 byte, content-length: 16 x 413 in {:?} \
         (slowest {slowest:?})",
        started.elapsed()
    );
    assert!(slowest < Some(Duration::from_secs(3)), "{slowest:?}");
    let sized = server.memory();

    let started = Instant::now();
    let answers =
        join_all((0..16).map(|_| post_body(&client, &server, &messages, "alice", chunked(sixty))))
            .await;
    let (too_large, busy) = count_refusals(&answers);
    eprintln!(
        "16 concurrent chunked 60 MB appends: {too_large} x 413, {busy} x 503 busy, in {:?}",
        started.elapsed()
    );
    let after = server.memory();
    report(
        "16 concurrent refused 8 MiB + 1, content-length",
        before,
        sized,
    );
    report(
        "16 concurrent refused 8 MiB + 1, then 16 chunked 60 MB",
        before,
        after,
    );
    let (status, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["message_count"], 0, "{page}");
    normal_round(&client, &server, "after").await;
    let growth = after.peak_kib.saturating_sub(before.peak_kib);
    assert!(
        growth < 200 * 1024,
        "peak RSS grew by {:.1} MiB",
        mib(growth)
    );
}

/// The head of a `POST` as `alice` with a JSON body; `framing` is its `content-length` or
/// `transfer-encoding` line(s).
fn post_head(path: &str, framing: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nx-user-id: alice\r\n\
         content-type: application/json\r\n{framing}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_time_out() {
    let server = Server::sqlite(&["--body-timeout-ms", "500", "--min-body-rate", "100000"]);
    let client = client();
    let id = create(&client, &server, "alice").await;

    // 10 bytes of a declared 200, then nothing.
    let mut stream = TcpStream::connect(server.address()).await.expect("connect");
    let head = post_head("/v1/sessions", "content-length: 200\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    stream.write_all(br#"{"title":""#).await.expect("10 bytes");
    let (status, _, body) = read_response(&mut stream).await;
    let took = started.elapsed();
    eprintln!("stalled sized body: {status} after {took:?}");
    assert_eq!(status, 408, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(body["error"]["code"], "body_timeout", "{body}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // Chunked, one byte every 100 ms.
    let stream = TcpStream::connect(server.address()).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let path = format!("/v1/sessions/{id}/messages");
    let head = post_head(&path, "transfer-encoding: chunked\r\n");
    writer.write_all(head.as_bytes()).await.expect("head");
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for byte in br#"{"messages":[{"role":"user","content":"trickle"}]}"# {
            let chunk = [b'1', b'\r', b'\n', *byte, b'\r', b'\n'];
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let head = read_until_half(&mut reader).await;
    let took = started.elapsed();
    trickle.abort();
    eprintln!(
        "trickled chunked body: {} after {took:?}",
        first_line(&head)
    );
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains(r#""code":"body_timeout""#), "{head}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );

    let (status, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["message_count"], 0, "{page}");
}

/// The first 300 characters of `text`, for assertion messages.
fn head(text: &str) -> String {
    text.chars().take(300).collect()
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Reads a whole response from a read half: until the end of the JSON body that follows the
/// head (error bodies are one JSON object), or the connection's end.
async fn read_until_half(reader: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&read);
        if let Some((_, body)) = text.split_once("\r\n\r\n")
            && body.ends_with('}')
            && serde_json::from_str::<Value>(body).is_ok()
        {
            return text.into_owned();
        }
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return text.into_owned(),
            Ok(Ok(count)) => read.extend_from_slice(&buffer[..count]),
            Err(_) => panic!("nothing read for 10 s; so far {text:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_length_over_the_limit_is_refused_without_the_body() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let path = format!("/v1/sessions/{id}/messages");

    // Only the head of a 60 MiB append: the answer comes without a byte of the body.
    let mut stream = TcpStream::connect(server.address()).await.expect("connect");
    let started = Instant::now();
    let head = post_head(&path, "content-length: 62914560\r\n");
    stream.write_all(head.as_bytes()).await.expect("head");
    let (status, _, body) = read_response(&mut stream).await;
    let took = started.elapsed();
    eprintln!("head of a 60 MiB append: {status} in {took:?}");
    assert_eq!(status, 413, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // With `expect: 100-continue` the server never asks for the body: the first answer is the
    // 413, not a `100 Continue`.
    let mut stream = TcpStream::connect(server.address()).await.expect("connect");
    let head = post_head(
        &path,
        "content-length: 62914560\r\nexpect: 100-continue\r\n",
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let first = read_until(&mut stream, b"\r\n").await;
    assert!(first.starts_with("HTTP/1.1 413"), "{first:?}");

    let (status, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["message_count"], 0, "{page}");
}

/// `POST path` as `alice` with `body` sent as is; the answer's status and text.
async fn post_raw(
    client: &Client,
    server: &Server,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let response = client
        .post(server.url(path))
        .header("x-user-id", "alice")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.text().await.expect("body"))
}

/// `GET path` as `alice`; the answer's status and text.
async fn get_raw(client: &Client, server: &Server, path: &str) -> (StatusCode, String) {
    let response = client
        .get(server.url(path))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("request");
    let status = response.status();
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_fields_are_stored_exactly_as_sent() {
    let mut server = Server::sqlite(&[]);
    let client = client();
    // A number beyond u64, a duplicate key, a trailing zero: a `Value` would change each.
    let metadata = r#"{"big":18446744073709551616,"dup":1,"dup":2,"f":1.50}"#;
    let (status, text) = post_raw(
        &client,
        &server,
        "/v1/sessions",
        &format!(r#"{{"metadata":{metadata}}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert!(
        text.contains(&format!(r#""metadata":{metadata}"#)),
        "{text}"
    );
    let id = serde_json::from_str::<Value>(&text).expect("JSON")["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();

    let tool_calls = r#"[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}},{"id":"c2","type":"custom","n":12345678901234567890}]"#;
    let (status, text) = post_raw(
        &client,
        &server,
        &format!("/v1/sessions/{id}/messages"),
        &format!(r#"{{"messages":[{{"role":"assistant","tool_calls":{tool_calls}}}]}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");

    // From the live session, then from storage after a restart.
    for source in ["memory", "storage"] {
        if source == "storage" {
            server.restart();
        }
        let (status, text) = get_raw(&client, &server, &format!("/v1/sessions/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(
            text.contains(&format!(r#""metadata":{metadata}"#)),
            "{source}: {text}"
        );
        assert!(
            text.contains(&format!(r#""tool_calls":{tool_calls}"#)),
            "{source}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_changes_nothing() {
    let server = Server::sqlite(&[]);
    let client = client();
    let metadata = r#"{"k":1}"#;
    let (status, text) = post_raw(
        &client,
        &server,
        "/v1/sessions",
        &format!(r#"{{"metadata":{metadata}}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let id = serde_json::from_str::<Value>(&text).expect("JSON")["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    let session = format!("/v1/sessions/{id}");
    let messages = format!("{session}/messages");
    let user_message = json!({"messages": [{"role": "user", "content": "x"}]});
    let unchanged = async || {
        let (status, page) = get(&client, &server, &session, "alice").await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["message_count"], 0, "{page}");
        assert_eq!(page["metadata"], json!({"k": 1}), "{page}");
    };

    assert_error(
        send(
            client
                .put(server.url("/v1/sessions"))
                .header("x-user-id", "alice")
                .json(&json!({})),
        )
        .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_error(
        send(
            client
                .put(server.url(&messages))
                .header("x-user-id", "alice")
                .json(&user_message),
        )
        .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_error(
        get(&client, &server, "/v1/nothing/here", "alice").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        post(
            &client,
            &server,
            &messages,
            "alice",
            &json!({"messages": [{"role": "user", "content": "x", "tool_call_ids": "y"}]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        send(
            client
                .post(server.url(&messages))
                .header("x-user-id", "alice")
                .header("x-user-id", "mallory")
                .json(&user_message),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        send(
            client
                .post(server.url(&messages))
                .header("x-user-id", "ali ce")
                .json(&user_message),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        send(
            client
                .post(server.url(&messages))
                .header("x-user-id", "alice")
                .header("content-type", "text/plain")
                .body(user_message.to_string()),
        )
        .await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    assert_error(
        send(
            client
                .post(server.url(&messages))
                .header("x-user-id", "alice")
                .header("content-type", "application/json")
                .body(r#"{"messages":[{"role":"user","content":"x"}"#),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    unchanged().await;

    // Nested 10,000 deep, in a session's metadata and in a message's tool calls.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for (path, body) in [
        (
            session.as_str(),
            format!(r#"{{"metadata":{{"a":{deep}}}}}"#),
        ),
        (
            messages.as_str(),
            format!(r#"{{"messages":[{{"role":"assistant","tool_calls":{deep}}}]}}"#),
        ),
    ] {
        let method = if path == session {
            reqwest::Method::PATCH
        } else {
            reqwest::Method::POST
        };
        assert_error(
            send(
                client
                    .request(method, server.url(path))
                    .header("x-user-id", "alice")
                    .header("content-type", "application/json")
                    .body(body),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_input",
        );
    }
    let (status, text) = post_raw(
        &client,
        &server,
        "/v1/sessions",
        &format!(r#"{{"metadata":{{"a":{deep}}}}}"#),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", head(&text));
    // The limit: 100 levels in all (the object and 99 arrays in it) is taken, 101 refused.
    let nested = |depth: usize| {
        format!(
            r#"{{"metadata":{{"a":{}{}}}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    };
    let (status, text) = post_raw(&client, &server, "/v1/sessions", &nested(100)).await;
    assert_eq!(status, StatusCode::CREATED, "{}", head(&text));
    let (status, text) = post_raw(&client, &server, "/v1/sessions", &nested(101)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", head(&text));
    assert!(text.contains("nested deeper than 100"), "{text}");
    unchanged().await;
    normal_round(&client, &server, "bob").await;
}
