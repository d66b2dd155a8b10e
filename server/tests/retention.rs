//! Retention and erasure over HTTP: `ttl_seconds` on create and PATCH with the server's
//! `--session-ttl` default, the purge (`--purge-interval-ms`), `DELETE ...?erase=true` and
//! `DELETE /v1/users/me/sessions`.

mod common;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use common::{Server, assert_error, client, create, get, post, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_are_purged_and_are_erased_on_request() {
    let server = Server::sqlite(&["--session-ttl", "3600", "--purge-interval-ms", "100"]);
    let client = client();
    // The server's default, shown with the expiry.
    let defaulted = create(&client, &server, "alice").await;
    let (status, body) = get(
        &client,
        &server,
        &format!("/v1/sessions/{defaulted}"),
        "alice",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ttl_seconds"], 3600);
    assert!(body["expires_at"].is_string(), "{body}");
    // A session of one second, which the purge erases once it has run out.
    let (status, short) = post(
        &client,
        &server,
        "/v1/sessions",
        "alice",
        &json!({"title": "short", "ttl_seconds": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{short}");
    let short = short["session_id"].as_str().expect("id").to_owned();
    // PATCH: 0 is no expiry.
    let patch = client
        .patch(server.url(&format!("/v1/sessions/{defaulted}")))
        .header("x-user-id", "alice")
        .json(&json!({"ttl_seconds": 0}));
    let (status, body) = send(patch).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["ttl_seconds"].clone(), body["expires_at"].clone()),
        (json!(null), json!(null))
    );
    let (status, body) = post(
        &client,
        &server,
        "/v1/sessions",
        "alice",
        &json!({"ttl_seconds": -5}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Gone once expired, then erased by the purge.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_error(
        get(&client, &server, &format!("/v1/sessions/{short}"), "alice").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        let metrics = metrics.text().await.expect("text");
        if metrics.contains("soloist_purged_sessions_total 1\n") {
            break;
        }
        assert!(Instant::now() < deadline, "not purged: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Erase one session, then everything of alice's; bob's stays.
    let (status, _) = post(
        &client,
        &server,
        &format!("/v1/sessions/{defaulted}/messages"),
        "alice",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let erase = |id: &str| {
        client
            .delete(server.url(&format!("/v1/sessions/{id}?erase=true")))
            .header("x-user-id", "alice")
    };
    assert_eq!(send(erase(&defaulted)).await.0, StatusCode::NO_CONTENT);
    assert_eq!(
        send(erase(&defaulted)).await.0,
        StatusCode::NO_CONTENT,
        "erasing again is done"
    );
    assert_error(
        get(
            &client,
            &server,
            &format!("/v1/sessions/{defaulted}"),
            "alice",
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let bad_query = client
        .delete(server.url(&format!("/v1/sessions/{defaulted}?erase=maybe")))
        .header("x-user-id", "alice");
    assert_eq!(send(bad_query).await.0, StatusCode::BAD_REQUEST);

    let kept = create(&client, &server, "alice").await;
    let another = create(&client, &server, "alice").await;
    let bobs = create(&client, &server, "bob").await;
    let erase_all = |user: &str| {
        client
            .delete(server.url("/v1/users/me/sessions"))
            .header("x-user-id", user)
    };
    let (status, body) = send(erase_all("alice")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"erased": 2, "more": false}),
        "the two left; the erased and purged ones are done"
    );
    assert_eq!(
        send(erase_all("alice")).await.1,
        json!({"erased": 0, "more": false})
    );
    for id in [&kept, &another] {
        assert_error(
            get(&client, &server, &format!("/v1/sessions/{id}"), "alice").await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    assert_eq!(
        get(&client, &server, &format!("/v1/sessions/{bobs}"), "bob")
            .await
            .0,
        StatusCode::OK
    );
    let anonymous = client.delete(server.url("/v1/users/me/sessions"));
    assert_eq!(send(anonymous).await.0, StatusCode::UNAUTHORIZED);
}

/// What one user may keep: `--max-sessions-per-user` new sessions, then `403 quota_exceeded`
/// for a create (a keyed create's retry is still answered), until one is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_s_sessions_are_bounded() {
    let server = Server::sqlite(&["--max-sessions-per-user", "2"]);
    let client = client();
    let keyed = || {
        client
            .post(server.url("/v1/sessions"))
            .header("x-user-id", "alice")
            .header("idempotency-key", "chat-1")
            .json(&json!({"title": "first"}))
    };
    let (status, first) = send(keyed()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let second = create(&client, &server, "alice").await;
    assert_error(
        post(&client, &server, "/v1/sessions", "alice", &json!({})).await,
        StatusCode::FORBIDDEN,
        "quota_exceeded",
    );
    let (status, again) = send(keyed()).await;
    assert_eq!(status, StatusCode::CREATED, "a retry is answered: {again}");
    assert_eq!(again["session_id"], first["session_id"]);
    // Another user has their own.
    create(&client, &server, "bob").await;
    let (status, _) = send(
        client
            .delete(server.url(&format!("/v1/sessions/{second}")))
            .header("x-user-id", "alice"),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    create(&client, &server, "alice").await;
}
