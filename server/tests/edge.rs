//! The layers every request passes: its request id, set or kept and sent back (errors too);
//! answers compressed when the client accepts gzip, never the event streams; a panicking
//! handler answered 500 in JSON while the server goes on.

mod common;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use reqwest::StatusCode;
use serde_json::Value;

use common::{Server, client, create};

fn request_id(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_set_kept_and_sent_back() {
    let server = Server::sqlite(&[]);
    let client = client();
    let answered = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    let made = request_id(&answered).expect("an id is made when the client sends none");
    assert!(made.len() >= 14, "a process prefix and a count: {made}");
    let again = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_ne!(request_id(&again), Some(made), "one id per request");

    let kept = client
        .get(server.url("/no/such/route"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .expect("unknown route");
    assert_eq!(kept.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        request_id(&kept).as_deref(),
        Some("trace-me-42"),
        "the client's id comes back, on an error too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_compressed_but_not_event_streams() {
    let server = Server::sqlite(&[]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let read = client
        .get(server.url(&format!("/v1/sessions/{session}")))
        .header("x-user-id", "alice")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(
        read.headers()
            .get("content-encoding")
            .and_then(|value| value.to_str().ok()),
        Some("gzip")
    );
    let plain = client
        .get(server.url(&format!("/v1/sessions/{session}")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("read");
    assert!(
        plain.headers().get("content-encoding").is_none(),
        "not without accept-encoding"
    );
    let events = client
        .get(server.url(&format!("/v1/sessions/{session}/events")))
        .header("x-user-id", "alice")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), StatusCode::OK);
    assert!(
        events.headers().get("content-encoding").is_none(),
        "an event stream is sent as it comes, uncompressed"
    );
}

/// A handler with a bug.
async fn boom() -> &'static str {
    panic!("boom")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
    let router = soloist_server::with_edge(
        Router::new()
            .route("/boom", get(boom))
            .route("/fine", get(|| async { "fine" })),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = client();
    for _ in 0..3 {
        let answer = client
            .get(format!("http://{address}/boom"))
            .header("x-request-id", "the-panic")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(request_id(&answer).as_deref(), Some("the-panic"));
        let body: Value = answer.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "internal", "{body}");
    }
    let fine = client
        .get(format!("http://{address}/fine"))
        .send()
        .await
        .expect("fine");
    assert_eq!(fine.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_is_held_to_the_rate_limit_with_a_computed_retry_after() {
    let server = Server::sqlite(&["--rate-limit-per-second", "1", "--rate-limit-burst", "3"]);
    let client = client();
    let read = |user: &'static str| {
        client
            .get(server.url("/v1/sessions"))
            .header("x-user-id", user)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(read("alice").await.expect("read").status(), StatusCode::OK);
    }
    let refused = read("alice").await.expect("read");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("Retry-After in seconds");
    assert_eq!(
        retry_after, 1,
        "one request a second: the next in under 1 s"
    );
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(
        read("bob").await.expect("read").status(),
        StatusCode::OK,
        "another user has a bucket of their own"
    );
    assert_eq!(
        client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        StatusCode::OK,
        "health checks are not users"
    );
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        read("alice").await.expect("read").status(),
        StatusCode::OK,
        "after Retry-After, the request goes through"
    );
}
