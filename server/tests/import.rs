//! `POST /v1/sessions/import`: an export's NDJSON back in, on the real binary. An export
//! imported under a new id exports the same, line for line (but for the draft that was still
//! streaming, imported `incomplete`); a repeat answers 200 and changes nothing; a bad line is
//! refused with its number and stores nothing; the body and the messages are bounded.

mod common;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use soloist::uuid::Uuid;

use common::{Memory, Server, assert_error, client, create, get, post, send, send_tagged};

/// The session's export as text, read by `user`.
async fn export(client: &reqwest::Client, server: &Server, session: &str, user: &str) -> String {
    let response = client
        .get(server.url(&format!("/v1/sessions/{session}/export")))
        .header("x-user-id", user)
        .send()
        .await
        .expect("export");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("body")
}

/// `POST /v1/sessions/import` of `body` as `user`, as NDJSON: the status, the JSON answer and
/// its `ETag`.
async fn import(
    client: &reqwest::Client,
    server: &Server,
    user: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value, Option<i64>) {
    send_tagged(
        client
            .post(server.url("/v1/sessions/import"))
            .header("x-user-id", user)
            .header("content-type", "application/x-ndjson")
            .body(body),
    )
    .await
}

/// `text`'s lines as JSON values.
fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).expect("one JSON value per line"))
        .collect()
}

/// `export` with its session line naming `id` instead.
fn under_id(export: &str, id: &str) -> String {
    let mut lines = export.lines();
    let mut session: Value =
        serde_json::from_str(lines.next().expect("session line")).expect("json");
    session["session_id"] = json!(id);
    let mut body = session.to_string();
    for line in lines {
        body.push('\n');
        body.push_str(line);
    }
    body.push('\n');
    body
}

async fn append(client: &reqwest::Client, server: &Server, session: &str, messages: Value) {
    let (status, body) = post(
        client,
        server,
        &format!("/v1/sessions/{session}/messages"),
        "alice",
        &json!({ "messages": messages }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imported_under_a_new_id_exports_the_same() {
    // Pages of 100: the export reads several, and so does the one of the imported session.
    let server = Server::sqlite(&["--max-page-size", "100"]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let messages: Vec<Value> = (0..250)
        .map(|index| json!({"role": "user", "content": format!("m{index}"), "metadata": {"i": index}}))
        .collect();
    append(&client, &server, &session, json!(messages)).await;
    append(
        &client,
        &server,
        &session,
        json!([
            {"role": "system", "content": "be terse", "name": "setup"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"n\":1.50}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            {"role": "assistant", "refusal": "no"},
        ]),
    )
    .await;
    // A draft cut short, then one still streaming.
    let cut = Uuid::now_v7();
    append(
        &client,
        &server,
        &session,
        json!([{"id": cut, "role": "assistant", "content": "It", "status": "in_progress"}]),
    )
    .await;
    let (status, body) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages/{cut}/deltas"),
        "alice",
        &json!({"offset": 2, "content": " was"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages/{cut}/finish"),
        "alice",
        &json!({"status": "incomplete", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    append(
        &client,
        &server,
        &session,
        json!([{"role": "assistant", "content": "so far", "status": "in_progress"}]),
    )
    .await;

    let original = export(&client, &server, &session, "alice").await;
    let copy = Uuid::now_v7().to_string();
    let file = under_id(&original, &copy);
    let (status, created, etag) = import(&client, &server, "bob", file.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["session_id"], copy.as_str());
    assert_eq!(created["user_id"], "bob", "the importer owns the copy");
    assert_eq!(created["message_count"], 257);
    assert_eq!(etag, Some(1), "one write");
    let (status, again, etag) = import(&client, &server, "bob", file.clone()).await;
    assert_eq!(status, StatusCode::OK, "a repeat: {again}");
    assert_eq!(again, created, "answered the same");
    assert_eq!(etag, Some(1), "nothing changed");

    let (original, copied) = (
        lines(&original),
        lines(&export(&client, &server, &copy, "bob").await),
    );
    assert_eq!(copied.len(), original.len());
    assert_eq!(copied.len(), 1 + 257);
    for field in ["title", "metadata", "usage", "message_count"] {
        assert_eq!(
            copied[0][field], original[0][field],
            "the session's {field}"
        );
    }
    assert_eq!(
        copied[0]["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2})
    );
    for (number, (copy, original)) in copied.iter().zip(&original).enumerate().skip(1) {
        let mut expected = original.clone();
        if expected["status"] == "in_progress" {
            expected["status"] = json!("incomplete");
        }
        assert_eq!(copy, &expected, "line {}", number + 1);
    }
    assert_eq!(copied[257]["status"], "incomplete");
    assert_eq!(copied[257]["content"], "so far");
    assert_eq!(copied[256]["status"], "incomplete");
    assert_eq!(copied[256]["content"], "It was");
    assert_eq!(
        original[257]["status"], "in_progress",
        "the original streams on"
    );

    // The same file under its own id is alice's session: not bob's to import into.
    let (status, body, _) = import(
        &client,
        &server,
        "bob",
        under_id(&export(&client, &server, &session, "alice").await, &session),
    )
    .await;
    assert_error((status, body), StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_is_refused_with_its_number_and_stores_nothing() {
    let server = Server::sqlite(&[
        "--max-import-messages",
        "5",
        "--max-import-body-bytes",
        "4096",
    ]);
    let client = client();
    let id = Uuid::now_v7().to_string();
    let session_line = json!({"session_id": id, "title": "t", "message_count": 3}).to_string();
    let message = |seq: usize| {
        json!({"seq": seq, "id": Uuid::now_v7(), "role": "user", "content": format!("m{seq}")})
            .to_string()
    };
    let file = |middle: &str| format!("{session_line}\n{}\n{middle}\n{}\n", message(0), message(2));

    let cases = [
        (r#"{"seq": 1, "role": "user", "content": "no id"}"#.to_owned(), StatusCode::BAD_REQUEST, "invalid_input"),
        ("{not json".to_owned(), StatusCode::BAD_REQUEST, "invalid_input"),
        (
            json!({"seq": 1, "id": Uuid::now_v7(), "role": "user", "content": "x", "colour": "red"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            json!({"seq": 1, "id": Uuid::now_v7(), "role": "user", "content": [{"type": "refusal", "refusal": "no"}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
        (
            json!({"seq": 1, "id": Uuid::now_v7(), "role": "tool", "tool_call_id": "call_9", "content": "x"}).to_string(),
            StatusCode::CONFLICT,
            "unknown_tool_call",
        ),
        (
            json!({"error": {"code": "storage", "message": "the database is unavailable"}}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_input",
        ),
    ];
    for (middle, status, code) in cases {
        let (got, body, _) = import(&client, &server, "alice", file(&middle)).await;
        assert_error((got, body.clone()), status, code);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if code == "invalid_input" {
            assert!(message.starts_with("line 3:"), "{middle}: {message}");
        }
        let (status, _) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "nothing stored for {middle}");
    }

    // Cut short at a line's end: fewer messages than the session line says.
    let short = format!("{session_line}\n{}\n{}\n", message(0), message(1));
    let (status, body, _) = import(&client, &server, "alice", short).await;
    assert_error(
        (status, body.clone()),
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert!(body.to_string().contains("cut short"), "{body}");
    let (status, body, _) = import(&client, &server, "alice", "").await;
    assert_error((status, body), StatusCode::BAD_REQUEST, "invalid_input");

    // Bounds: messages, then bytes.
    let many: Vec<String> = (0..6).map(message).collect();
    let (status, body, _) = import(
        &client,
        &server,
        "alice",
        format!("{session_line}\n{}\n", many.join("\n")),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");
    let big = json!({"seq": 0, "id": Uuid::now_v7(), "role": "user", "content": "x".repeat(5000)});
    let (status, body, _) = import(
        &client,
        &server,
        "alice",
        format!("{session_line}\n{big}\n"),
    )
    .await;
    assert_error((status, body), StatusCode::PAYLOAD_TOO_LARGE, "too_large");

    // The route's edges: NDJSON only, a caller required.
    let good = file(&message(1));
    let (status, body) = send(
        client
            .post(server.url("/v1/sessions/import"))
            .header("x-user-id", "alice")
            .header("content-type", "application/json")
            .body(good.clone()),
    )
    .await;
    assert_error(
        (status, body),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let (status, body) = send(
        client
            .post(server.url("/v1/sessions/import"))
            .header("content-type", "application/x-ndjson")
            .body(good.clone()),
    )
    .await;
    assert_error((status, body), StatusCode::UNAUTHORIZED, "unauthenticated");

    // Mended, the file goes in whole, in the order given.
    let (status, body, _) = import(&client, &server, "alice", good).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(status, StatusCode::OK);
    let contents: Vec<&str> = page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|message| message["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(contents, ["m0", "m1", "m2"]);
}

/// Two servers on one PostgreSQL database: imports sent to either reach their session's owner
/// (large ones too, through the peers' protocol), and a repeat through the other answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_reaches_its_sessions_owner() {
    let Some(db) = common::postgres_db().await else {
        return;
    };
    let servers = [Server::start(&db.url, &[]), Server::start(&db.url, &[])];
    let client = client();
    for server in &servers {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, health) = send(client.get(server.url("/healthz"))).await;
            if health["members"].as_array().map(Vec::len) == Some(2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "members never both seen: {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Sixteen sessions: both servers own some of them, but for a chance of 2^-15.
    for round in 0..16 {
        let id = Uuid::now_v7();
        let mut file = json!({"session_id": id, "title": "t", "message_count": 500}).to_string();
        for seq in 0..500 {
            let line = json!({"seq": seq, "id": Uuid::now_v7(), "role": "user", "content": format!("{seq:>1000}")});
            file.push('\n');
            file.push_str(&line.to_string());
        }
        let (via, other) = (&servers[round % 2], &servers[1 - round % 2]);
        let (status, body, _) = import(&client, via, "alice", file.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let (status, body, _) = import(&client, other, "alice", file).await;
        assert_eq!(status, StatusCode::OK, "a repeat through the other: {body}");
        let (status, page) = get(
            &client,
            other,
            &format!("/v1/sessions/{id}?fresh=true"),
            "alice",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["message_count"], 500);
    }
    let mut forwarded = 0.0;
    for server in &servers {
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        forwarded += metrics
            .lines()
            .filter(|line| line.starts_with("soloist_forwarded_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert!(
        forwarded >= 1.0,
        "no import went through the peers' protocol"
    );
}

/// The import of one session of `SOLOIST_IMPORT_MESSAGES` messages (default 100,000) of ~45
/// bytes of text, as an export writes them, on an SQLite file, or on PostgreSQL when
/// `SOLOIST_IMPORT_POSTGRES` is set: the rate in messages per second and the server's memory
/// before and after. A measurement, not a check: run it on the release build with
///
/// ```text
/// cargo build --release -p soloist-server
/// SOLOIST_SERVER_BIN=target/release/soloist-server \
///     cargo test -p soloist-server --test import -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand (see its doc)"]
async fn import_rate_and_memory() {
    let count: usize = std::env::var("SOLOIST_IMPORT_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100_000);
    let limits = [
        "--max-import-messages".to_owned(),
        count.to_string(),
        "--max-import-body-bytes".to_owned(),
        (1usize << 30).to_string(),
        "--command-timeout-ms".to_owned(),
        "600000".to_owned(),
    ];
    let limits: Vec<&str> = limits.iter().map(String::as_str).collect();
    let database = match std::env::var_os("SOLOIST_IMPORT_POSTGRES") {
        Some(_) => common::postgres_db().await,
        None => None,
    };
    let server = match &database {
        Some(db) => Server::start(&db.url, &limits),
        None => Server::sqlite(&limits),
    };
    let backend = if database.is_some() {
        "PostgreSQL"
    } else {
        "SQLite file"
    };
    let id = Uuid::now_v7();
    let mut file = json!({"session_id": id, "title": "big", "message_count": count}).to_string();
    file.push('\n');
    let created_at = "2024-05-01T12:00:00.123456Z";
    for seq in 0..count {
        let role = if seq % 2 == 0 { "user" } else { "assistant" };
        let line = json!({
            "seq": seq,
            "id": Uuid::now_v7(),
            "role": role,
            "content": format!("message number {seq:>8} of the big session"),
            "status": "completed",
            "created_at": created_at,
        });
        file.push_str(&line.to_string());
        file.push('\n');
    }
    let bytes = file.len();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("client");
    let before: Memory = server.memory();
    let started = Instant::now();
    let (status, body, _) = import(&client, &server, "alice", file).await;
    let took = started.elapsed();
    let after: Memory = server.memory();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["message_count"], count);
    let rate = count as f64 / took.as_secs_f64();
    eprintln!(
        "import of {count} messages ({:.1} MB of NDJSON) on {backend}: {:.2} s, \
         {rate:.0} messages/s; server before: {before}; after: {after}",
        bytes as f64 / 1e6,
        took.as_secs_f64()
    );
    let started = Instant::now();
    let exported = export(&client, &server, &id.to_string(), "alice").await;
    let exporting = started.elapsed();
    let started = Instant::now();
    let (status, body, _) = import(&client, &server, "alice", exported).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    eprintln!(
        "exported in {:.2} s, imported again (a repeat: every message read back and compared) \
         in {:.2} s; server: {}",
        exporting.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        server.memory()
    );
}
