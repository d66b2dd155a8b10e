//! Drives the real `soloist-server` binary over HTTP: every endpoint, every error code, SSE
//! while appends run, idempotent resends, graceful shutdown, and two server processes on one
//! PostgreSQL database.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use common::{
    Server, admin_pool, assert_error, client, create, get, post, postgres_db, read_named_events,
    send,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint() {
    let server = Server::sqlite(&[]);
    let client = client();
    let (status, body) = send(client.get(server.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Create with an idempotency key, then again: 201 twice, the same session (the first
    // answer); the server chose the id.
    let keyed_create = || {
        send(
            client
                .post(server.url("/v1/sessions"))
                .header("x-user-id", "alice")
                .header("idempotency-key", "trip-1")
                .json(&json!({"title": "Trip", "metadata": {"k": 1}})),
        )
    };
    let created = keyed_create().await;
    assert_eq!(created.0, StatusCode::CREATED, "{}", created.1);
    let id: Uuid = created.1["session_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("session_id");
    assert_eq!(created.1["title"], "Trip");
    assert_eq!(created.1["metadata"], json!({"k": 1}));
    assert!(created.1["created_at"].is_string());
    let again = keyed_create().await;
    assert_eq!(again, created, "a retried create answers the first answer");

    // Append (with a tool call), resend the same ids: same sequences.
    let messages = json!({"messages": [
        {"id": Uuid::now_v7(), "role": "user", "content": "hi"},
        {"id": Uuid::now_v7(), "role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"id": Uuid::now_v7(), "role": "tool", "tool_call_id": "c1", "content": "42"},
    ]});
    let path = format!("/v1/sessions/{id}/messages");
    let appended = post(&client, &server, &path, "alice", &messages).await;
    assert_eq!(appended, (StatusCode::OK, json!({"sequences": [0, 1, 2]})));
    let resent = post(&client, &server, &path, "alice", &messages).await;
    assert_eq!(
        resent,
        (StatusCode::OK, json!({"sequences": [0, 1, 2]})),
        "idempotent resend"
    );

    // Read with paging.
    let page = get(
        &client,
        &server,
        &format!("/v1/sessions/{id}?after_seq=0&limit=1"),
        "alice",
    )
    .await;
    assert_eq!(page.0, StatusCode::OK);
    assert_eq!(page.1["user_id"], "alice");
    assert_eq!(page.1["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(page.1["messages"][0]["seq"], 1);
    assert_eq!(
        page.1["messages"][0]["tool_calls"][0]["id"], "c1",
        "tool calls round-trip"
    );
    assert_eq!(page.1["next_after_seq"], 1);
    let all = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    let seqs: Vec<i64> = all.1["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    assert!(all.1.get("next_after_seq").is_none());

    // Patch, usage deltas.
    let patched = send(
        client
            .patch(server.url(&format!("/v1/sessions/{id}")))
            .header("x-user-id", "alice")
            .json(&json!({"title": "Renamed", "metadata": {"k": 2}})),
    )
    .await;
    assert_eq!(patched.0, StatusCode::OK);
    assert_eq!(patched.1["title"], "Renamed");
    let usage_path = format!("/v1/sessions/{id}/usage");
    post(
        &client,
        &server,
        &usage_path,
        "alice",
        &json!({"prompt_tokens": 10, "completion_tokens": 3}),
    )
    .await;
    let usage = post(
        &client,
        &server,
        &usage_path,
        "alice",
        &json!({"prompt_tokens": 5, "completion_tokens": 1}),
    )
    .await;
    assert_eq!(
        usage,
        (
            StatusCode::OK,
            json!({"prompt_tokens": 15, "completion_tokens": 4})
        )
    );

    // List, newest first, with a cursor.
    let second = create(&client, &server, "alice").await;
    let first_page = get(&client, &server, "/v1/sessions?limit=1", "alice").await;
    assert_eq!(first_page.0, StatusCode::OK);
    assert_eq!(first_page.1["sessions"][0]["session_id"], second);
    let cursor = first_page.1["next_before"]
        .as_str()
        .expect("cursor")
        .to_owned();
    let next_page = send(
        client
            .get(server.url("/v1/sessions"))
            .query(&[("limit", "1"), ("before", cursor.as_str())])
            .header("x-user-id", "alice"),
    )
    .await;
    assert_eq!(next_page.1["sessions"][0]["session_id"], id.to_string());
    assert_eq!(next_page.1["sessions"][0]["usage"]["prompt_tokens"], 15);

    // Metrics.
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.expect("text");
    assert!(text.contains("soloist_rows_total 3"), "{text}");
    assert!(
        text.contains("soloist_flush_sessions_bucket{le=\"+Inf\"}"),
        "{text}"
    );

    // Delete: 204, then 404.
    let deleted = client
        .delete(server.url(&format!("/v1/sessions/{id}")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_error(
        get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code() {
    let server = Server::sqlite(&["--mailbox-capacity", "1", "--send-timeout-ms", "1"]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");

    // 401: no identity.
    assert_error(
        send(client.get(server.url(&format!("/v1/sessions/{id}")))).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    // 400: malformed JSON, unknown role, bad id in the path, bad cursor, invalid message.
    assert_error(
        send(
            client
                .post(server.url(&messages))
                .header("x-user-id", "alice")
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        post(
            &client,
            &server,
            &messages,
            "alice",
            &json!({"messages": [{"role": "wizard", "content": "x"}]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        get(&client, &server, "/v1/sessions/not-a-uuid", "alice").await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        get(&client, &server, "/v1/sessions?before=garbage", "alice").await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        post(
            &client,
            &server,
            &messages,
            "alice",
            &json!({"messages": [{"role": "tool", "content": "no tool_call_id"}]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    assert_error(
        post(
            &client,
            &server,
            &messages,
            "alice",
            &json!({"messages": []}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    // 404: someone else's session looks missing; unknown session; unknown route.
    assert_error(
        get(&client, &server, &format!("/v1/sessions/{id}"), "mallory").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        post(
            &client,
            &server,
            &format!("/v1/sessions/{}/messages", Uuid::now_v7()),
            "alice",
            &json!({"messages": [{"role": "user", "content": "x"}]}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        get(&client, &server, "/v2/nothing", "alice").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // 400: a client cannot choose a session id, so cannot try another user's; with the same
    // idempotency key as another user, it gets a session of its own.
    assert_error(
        post(
            &client,
            &server,
            "/v1/sessions",
            "mallory",
            &json!({"id": id}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_input",
    );
    let keyed = |user: &str| {
        send(
            client
                .post(server.url("/v1/sessions"))
                .header("x-user-id", user)
                .header("idempotency-key", "same-key")
                .json(&json!({})),
        )
    };
    let (alices, mallorys) = (keyed("alice").await, keyed("mallory").await);
    assert_eq!(
        (alices.0, mallorys.0),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_ne!(alices.1["session_id"], mallorys.1["session_id"]);
    // 413: content over the 64 KiB limit.
    assert_error(
        post(
            &client,
            &server,
            &messages,
            "alice",
            &json!({"messages": [{"role": "user", "content": "x".repeat(70_000)}]}),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    // Nothing of the above changed the session.
    let page = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(page.1["message_count"], 0, "{}", page.1);

    // 429: a one-slot mailbox with a 1 ms send timeout, flooded with concurrent appends. Every
    // request gets exactly one answer: 200 or 429, never a 500, and the 200s are all stored.
    let mut tasks = Vec::new();
    for task in 0..64 {
        let client = client.clone();
        let url = server.url(&messages);
        tasks.push(tokio::spawn(async move {
            send(
                client.post(url).header("x-user-id", "alice").json(
                    &json!({"messages": [{"role": "user", "content": format!("flood {task}")}]}),
                ),
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut overloaded = 0;
    for task in tasks {
        let (status, body) = task.await.expect("task");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "overloaded");
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        overloaded > 0,
        "the flood never overloaded a one-slot mailbox"
    );
    let page = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(
        page.1["message_count"], ok,
        "every 200 is stored, no 429 is"
    );
}

/// Reads SSE events (`id`, data JSON) from a response until `count` messages arrived.
async fn read_events(response: reqwest::Response, count: usize) -> Vec<(i64, Value)> {
    read_named_events(response, count)
        .await
        .into_iter()
        .map(|(id, _, data)| (id.parse::<i64>().expect("a message's id"), data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_every_message_in_order_while_appends_run() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");
    post(
        &client,
        &server,
        &messages,
        "alice",
        &json!({"messages": [{"role": "user", "content": "before"}]}),
    )
    .await;
    let response = client
        .get(server.url(&format!("/v1/sessions/{id}/events?after_seq=-1")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    assert_eq!(response.status(), StatusCode::OK);
    let mut writers = Vec::new();
    for writer in 0..8 {
        let client = client.clone();
        let url = server.url(&messages);
        writers.push(tokio::spawn(async move {
            for turn in 0..10 {
                let (status, body) = send(client.post(url.clone()).header("x-user-id", "alice").json(&json!({"messages": [{"role": "user", "content": format!("{writer}/{turn}")}]}))).await;
                assert_eq!(status, StatusCode::OK, "{body}");
            }
        }));
    }
    let events = read_events(response, 81).await;
    for (index, (event_id, message)) in events.iter().enumerate() {
        assert_eq!(*event_id, index as i64, "gap-free, in order");
        assert_eq!(message["seq"], index as i64);
    }
    let contents: HashSet<_> = events
        .iter()
        .map(|(_, m)| m["content"].to_string())
        .collect();
    assert_eq!(contents.len(), 81, "each message once");
    for writer in writers {
        writer.await.expect("writer");
    }
    // A reconnecting client resumes after Last-Event-ID.
    let resumed = client
        .get(server.url(&format!("/v1/sessions/{id}/events")))
        .header("x-user-id", "alice")
        .header("last-event-id", "79")
        .send()
        .await
        .expect("events");
    let tail = read_events(resumed, 1).await;
    assert_eq!(tail[0].0, 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let mut server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let url = server.url(&format!("/v1/sessions/{id}/messages"));
    // Keep appends going, and an event stream open, while the signal arrives.
    let events = client
        .get(server.url(&format!("/v1/sessions/{id}/events")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = client.clone();
        let url = url.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for turn in 0..1000 {
                let message_id = Uuid::now_v7();
                let sent = client
                    .post(url.clone())
                    .header("x-user-id", "alice")
                    .json(&json!({"messages": [{"id": message_id, "role": "user", "content": format!("{writer}/{turn}")}]}))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == StatusCode::OK => acked.push(message_id),
                    Ok(response) => panic!("unexpected status {}", response.status()),
                    Err(_) => break, // connection refused or closed: the server stopped
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server)
    });
    let (status, server) = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("the server exits within 30 s")
        .expect("join");
    assert!(status.success(), "exit status {status:?}");
    drop(events);
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.expect("writer"));
    }
    assert!(!acked.is_empty());
    // Every acknowledged append is in the database; at most one unanswered request per writer
    // (cut off with its connection) may have been stored without its answer arriving.
    let path = server.sqlite_dir().join("chat.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the database");
    let stored: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT seq, message_id FROM messages ORDER BY seq")
            .fetch_all(&pool)
            .await
            .expect("rows");
    let stored_ids: HashSet<Uuid> = stored.iter().map(|row| row.1).collect();
    for id in &acked {
        assert!(stored_ids.contains(id), "acknowledged append {id} lost");
    }
    assert!(
        stored.len() <= acked.len() + 4,
        "{} stored, {} acked",
        stored.len(),
        acked.len()
    );
    for (index, row) in stored.iter().enumerate() {
        assert_eq!(row.0, index as i64, "contiguous");
    }
    pool.close().await;
    drop(server);
}

/// 403 for someone else's session when the server is told to reveal them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_when_foreign_sessions_are_revealed() {
    let server = Server::sqlite(&["--reveal-foreign-sessions"]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    assert_error(
        get(&client, &server, &format!("/v1/sessions/{id}"), "mallory").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
}

/// 503 when the database fails under the server, and service again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_is_503_and_recovers() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let (schema, url) = (db.schema().expect("a schema"), db.url.clone());
    let pool = admin_pool().await;
    let server = Server::start(&url, &[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");
    let body = json!({"messages": [{"role": "user", "content": "x"}]});
    let ok = post(&client, &server, &messages, "alice", &body).await;
    assert_eq!(ok.0, StatusCode::OK);
    // The tables disappear under the server (an operator's mistake, a failover to an empty
    // replica...): every write fails in the database.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {schema}.messages RENAME TO gone"
    )))
    .execute(&pool)
    .await
    .expect("rename");
    let failed = post(&client, &server, &messages, "alice", &body).await;
    assert_error(failed, StatusCode::SERVICE_UNAVAILABLE, "storage");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {schema}.gone RENAME TO messages"
    )))
    .execute(&pool)
    .await
    .expect("rename back");
    let recovered = post(&client, &server, &messages, "alice", &body).await;
    assert_eq!(
        recovered,
        (StatusCode::OK, json!({"sequences": [1]})),
        "nothing half-written"
    );
}

/// Two server processes on one PostgreSQL database, written through both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_database() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let (schema, url) = (db.schema().expect("a schema"), db.url.clone());
    let pool = admin_pool().await;
    let servers = [Server::start(&url, &[]), Server::start(&url, &[])];
    let client = client();
    let id = create(&client, &servers[0], "alice").await;
    let mut tasks = Vec::new();
    for task in 0..16 {
        let client = client.clone();
        let url = servers[task % 2].url(&format!("/v1/sessions/{id}/messages"));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for turn in 0..10 {
                let message_id = Uuid::now_v7();
                // Both servers take the one session from each other on nearly every write;
                // past its retry bound an engine answers 409 (retryable), and the client
                // re-sends the same message id, as a client of a busy session would.
                let mut attempts = 0;
                let body = loop {
                    let (status, body) = send(client.post(url.clone()).header("x-user-id", "alice").json(&json!({"messages": [{"id": message_id, "role": "user", "content": format!("{task}/{turn}")}]}))).await;
                    attempts += 1;
                    match status {
                        StatusCode::OK => break body,
                        StatusCode::CONFLICT if attempts < 20 => continue,
                        _ => panic!("{status}: {body}"),
                    }
                };
                acked.push((body["sequences"][0].as_i64().expect("seq"), message_id));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("task"));
    }
    acked.sort();
    let rows: Vec<(i64, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT seq, message_id FROM {schema}.messages ORDER BY seq"
    )))
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(
        rows, acked,
        "every acknowledged append once, at its sequence, contiguous"
    );
    assert_eq!(rows.last().map(|row| row.0), Some(159));
    // A fresh read through either server sees everything.
    for server in &servers {
        let page = get(
            &client,
            server,
            &format!("/v1/sessions/{id}?fresh=true&limit=1000"),
            "alice",
        )
        .await;
        assert_eq!(page.1["message_count"], 160, "{}", page.1);
    }
    // Each server registered itself under the address it listens on, with only
    // `--database-url` and `--listen` given.
    let mut registered: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT address FROM {schema}.members"
    )))
    .fetch_all(&pool)
    .await
    .expect("members");
    registered.sort();
    let mut expected: Vec<String> = servers.iter().map(|server| server.url("")).collect();
    expected.sort();
    assert_eq!(registered, expected);
}

/// Content as typed parts and per-message metadata travel through HTTP as sent: the JSON
/// text of each comes back byte for byte in the page, and a
/// part the role may not send is a 400 that stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_parts_and_metadata_come_back_as_sent() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let parts = r#"[{"type":"text","text":"look"},{"image_url":{"url":"https://example.com/a.png"},"type":"image_url"}]"#;
    let metadata = r#"{"trace":"t-1","n":1.0000000000000000000001}"#;
    let body =
        format!(r#"{{"messages":[{{"role":"user","content":{parts},"metadata":{metadata}}}]}}"#);
    let path = format!("/v1/sessions/{id}/messages");
    let appended = client
        .post(server.url(&path))
        .header("x-user-id", "alice")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("append");
    assert_eq!(appended.status(), StatusCode::OK);
    let page = client
        .get(server.url(&format!("/v1/sessions/{id}")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("read")
        .text()
        .await
        .expect("body");
    assert!(page.contains(&format!(r#""content":{parts}"#)), "{page}");
    assert!(
        page.contains(&format!(r#""metadata":{metadata}"#)),
        "{page}"
    );

    let refused = post(
        &client,
        &server,
        &path,
        "alice",
        &json!({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    )
    .await;
    assert_eq!(refused.0, StatusCode::BAD_REQUEST, "{}", refused.1);
    assert_eq!(refused.1["error"]["code"], "invalid_input");
    let (_, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(1), "{page}");
}

/// A streamed reply over HTTP: a draft appended `in_progress`, deltas (one, then several,
/// then a resend), the errors of a gap, a conflict, an unknown message, a second turn and a
/// delta after the end, the draft read while it streams, and its finish, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_reply() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let messages = format!("/v1/sessions/{id}/messages");
    let draft = Uuid::now_v7();
    let started = post(
        &client,
        &server,
        &messages,
        "alice",
        &json!({"messages": [{"id": draft, "role": "assistant", "content": "", "status": "in_progress"}]}),
    )
    .await;
    assert_eq!(started, (StatusCode::OK, json!({"sequences": [0]})));
    let deltas = format!("/v1/sessions/{id}/messages/{draft}/deltas");
    let one = post(
        &client,
        &server,
        &deltas,
        "alice",
        &json!({"offset": 0, "content": "Hel"}),
    )
    .await;
    assert_eq!(one, (StatusCode::OK, json!({"length": 3})));
    let several =
        json!({"deltas": [{"offset": 3, "content": "lo"}, {"offset": 5, "content": ", world"}]});
    let two = post(&client, &server, &deltas, "alice", &several).await;
    assert_eq!(two, (StatusCode::OK, json!({"length": 12})));
    let resent = post(&client, &server, &deltas, "alice", &several).await;
    assert_eq!(
        resent,
        (StatusCode::OK, json!({"length": 12})),
        "a resend changes nothing"
    );
    let errors = [
        (json!({"offset": 20, "content": "!"}), 409, "offset_gap"),
        (json!({"offset": 0, "content": "J"}), 409, "offset_conflict"),
        (json!({"offset": 0}), 400, "invalid_input"),
    ];
    for (body, status, code) in errors {
        let (got, answer) = post(&client, &server, &deltas, "alice", &body).await;
        assert_eq!(
            (got.as_u16(), answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let unknown = format!("/v1/sessions/{id}/messages/{}/deltas", Uuid::now_v7());
    let (status, answer) = post(
        &client,
        &server,
        &unknown,
        "alice",
        &json!({"offset": 0, "content": "x"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("message_not_found"))
    );
    let second = post(
        &client,
        &server,
        &messages,
        "alice",
        &json!({"messages": [{"role": "assistant", "status": "in_progress"}]}),
    )
    .await;
    assert_eq!(
        (second.0, second.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("turn_in_progress"))
    );

    let (_, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(page["messages"][0]["status"], "in_progress");
    assert_eq!(page["messages"][0]["content"], "Hello, world");

    let finish = format!("/v1/sessions/{id}/messages/{draft}/finish");
    let body =
        json!({"status": "completed", "usage": {"prompt_tokens": 4, "completion_tokens": 3}});
    let (status, finished) = post(&client, &server, &finish, "alice", &body).await;
    assert_eq!(status, StatusCode::OK, "{finished}");
    assert_eq!(
        (finished["status"].as_str(), finished["content"].as_str()),
        (Some("completed"), Some("Hello, world"))
    );
    let again = post(&client, &server, &finish, "alice", &body).await;
    assert_eq!(
        again,
        (StatusCode::OK, finished.clone()),
        "the same finish answers the same"
    );
    let other = post(
        &client,
        &server,
        &finish,
        "alice",
        &json!({"status": "aborted"}),
    )
    .await;
    assert_eq!(
        (other.0, other.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("finish_conflict"))
    );
    let late = post(
        &client,
        &server,
        &deltas,
        "alice",
        &json!({"offset": 12, "content": "!"}),
    )
    .await;
    assert_eq!(
        (late.0, late.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("message_finished"))
    );
    let (_, page) = get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await;
    assert_eq!(
        page["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3}),
        "usage added once"
    );
    assert_eq!(page["messages"][0]["status"], "completed");
}

/// The event stream follows a streamed reply: `message.created` with the draft so far,
/// `message.delta` per durable delta, `message.finished`; a client that reconnects with the
/// id of a delta gets the rest of the draft from that byte, and a malformed id is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_a_streamed_reply_and_resume_mid_draft() {
    let server = Server::sqlite(&[]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let draft = Uuid::now_v7();
    let start = json!({"messages": [{"id": draft, "role": "assistant", "content": "He", "status": "in_progress"}]});
    post(
        &client,
        &server,
        &format!("/v1/sessions/{id}/messages"),
        "alice",
        &start,
    )
    .await;
    let events_url = server.url(&format!("/v1/sessions/{id}/events"));
    let deltas = format!("/v1/sessions/{id}/messages/{draft}/deltas");
    let live = client
        .get(&events_url)
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    post(
        &client,
        &server,
        &deltas,
        "alice",
        &json!({"offset": 2, "content": "llo"}),
    )
    .await;
    let seen = read_named_events(live, 2).await;
    assert_eq!(
        (seen[0].0.as_str(), seen[0].1.as_str()),
        ("0:2", "message.created")
    );
    assert_eq!(seen[0].2["content"], "He");
    assert_eq!(seen[0].2["status"], "in_progress");
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_str(), &seen[1].2),
        (
            "0:5",
            "message.delta",
            &json!({"seq": 0, "offset": 2, "content": "llo"})
        )
    );
    // While the client is away: more text, and the end.
    post(
        &client,
        &server,
        &deltas,
        "alice",
        &json!({"offset": 5, "content": " there"}),
    )
    .await;
    let finish = format!("/v1/sessions/{id}/messages/{draft}/finish");
    post(
        &client,
        &server,
        &finish,
        "alice",
        &json!({"status": "completed"}),
    )
    .await;
    let resumed = client
        .get(&events_url)
        .header("x-user-id", "alice")
        .header("last-event-id", "0:5")
        .send()
        .await
        .expect("events");
    let rest = read_named_events(resumed, 2).await;
    assert_eq!(
        (rest[0].0.as_str(), rest[0].1.as_str(), &rest[0].2),
        (
            "0:11",
            "message.delta",
            &json!({"seq": 0, "offset": 5, "content": " there"})
        )
    );
    assert_eq!(
        (rest[1].0.as_str(), rest[1].1.as_str()),
        ("0", "message.finished")
    );
    assert_eq!(rest[1].2["content"], "Hello there");
    let bad = client
        .get(&events_url)
        .header("x-user-id", "alice")
        .header("last-event-id", "0:x")
        .send()
        .await
        .expect("events");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}
