//! Requests that hyper answers itself, before the router sees them (a head it cannot parse, or
//! one too large), against the real binary: they get the JSON error with `connection: close`,
//! the connection closes, and the server goes on serving. The app's own answers, body-less ones
//! included, are written as they were.

mod common;

use std::time::{Duration, Instant};

use common::{Server, client, create, read_response, read_until};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` on a new connection and reads the answer: status, lower-cased head, body.
async fn exchange(address: &str, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(request).await.expect("request");
    let answer = read_response(&mut stream).await;
    assert_closed(&mut stream).await;
    answer
}

/// Asserts that the server closes the connection (end of stream, not a reset) with nothing
/// after the answer.
async fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s")
        .expect("closed without a reset");
    assert!(rest.is_empty(), "more after the answer: {rest:?}");
}

/// Asserts that `answer` is the JSON error `status` `code` of a closing connection.
#[track_caller]
fn assert_json_error(answer: &(u16, String, String), status: u16, code: &str) {
    let (actual, head, body) = answer;
    assert_eq!(*actual, status, "{head}{body}");
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    let body: Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// Asserts that an answer is `/healthz`'s own: 200 with its JSON status.
#[track_caller]
fn assert_healthy(status: u16, body: &str) {
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(health["status"], "ok", "{body}");
}

/// Asserts that a new connection is served.
async fn assert_serves(address: &str) {
    let (status, _, body) = exchange(
        address,
        b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_healthy(status, &body);
}

#[tokio::test]
async fn malformed_and_too_large_heads_get_the_json_error() {
    let server = Server::sqlite(&[]);
    let address = server.address().to_owned();
    let start = Instant::now();

    let garbage = exchange(&address, b"GARBAGE\r\n\r\n").await;
    assert_json_error(&garbage, 400, "invalid_request");
    assert!(
        garbage.2.contains("malformed HTTP request"),
        "{}",
        garbage.2
    );
    assert_serves(&address).await;

    let no_colon = exchange(
        &address,
        b"GET /healthz HTTP/1.1\r\nhost: test\r\nno colon here\r\n\r\n",
    )
    .await;
    assert_json_error(&no_colon, 400, "invalid_request");
    assert_serves(&address).await;

    // Past the 64 KiB limit on a head; the server reads what it could not parse and throws it
    // away, so the client reads the answer rather than a reset.
    let big_header = format!(
        "GET /healthz HTTP/1.1\r\nhost: test\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    assert_json_error(
        &exchange(&address, big_header.as_bytes()).await,
        431,
        "headers_too_large",
    );
    assert_serves(&address).await;

    let many_headers: String = (0..101).map(|i| format!("x-h{i}: 1\r\n")).collect();
    let many_headers = format!("GET /healthz HTTP/1.1\r\nhost: test\r\n{many_headers}\r\n");
    assert_json_error(
        &exchange(&address, many_headers.as_bytes()).await,
        431,
        "headers_too_large",
    );
    assert_serves(&address).await;

    // hyper answers a URI past 65,534 bytes with 414, unless the head is over the size limit
    // first.
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nhost: test\r\n\r\n",
        "a".repeat(100_000)
    );
    let answer = exchange(&address, long_uri.as_bytes()).await;
    match answer.0 {
        414 => assert_json_error(&answer, 414, "uri_too_long"),
        _ => assert_json_error(&answer, 431, "headers_too_large"),
    }
    assert_serves(&address).await;

    // A bad head after a request served on the same connection: the first answer as it was,
    // then the JSON error.
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\nGARBAGE\r\n\r\n")
        .await
        .expect("requests");
    let (status, head, body) = read_response(&mut stream).await;
    assert_healthy(status, &body);
    assert!(!head.contains("connection: close"), "{head}");
    assert_json_error(&read_response(&mut stream).await, 400, "invalid_request");
    assert_closed(&mut stream).await;
    assert_serves(&address).await;

    // The same from an HTTP/1.0 client: the answer speaks its version.
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGARBAGE\r\n\r\n")
        .await
        .expect("requests");
    let (status, head, _) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{head}");
    let answer = read_response(&mut stream).await;
    assert!(
        answer.1.starts_with("http/1.0 400 bad request\r\n"),
        "{}",
        answer.1
    );
    assert_json_error(&answer, 400, "invalid_request");
    assert_closed(&mut stream).await;
    assert_serves(&address).await;

    eprintln!("malformed heads answered in {:?}", start.elapsed());
}

#[tokio::test]
async fn the_apps_own_answers_are_untouched() {
    let server = Server::sqlite(&[]);
    let address = server.address().to_owned();
    let session = create(&client(), &server, "alice").await;
    let mut stream = TcpStream::connect(&address).await.expect("connect");

    // A 400 of the app, with its JSON body, and the same without its body (HEAD): the
    // connection stays open.
    stream
        .write_all(
            b"GET /v1/sessions/not-a-uuid HTTP/1.1\r\nhost: test\r\nx-user-id: alice\r\n\r\n",
        )
        .await
        .expect("request");
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 400, "{head}{body}");
    assert!(!head.contains("connection:"), "{head}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["code"], "invalid_input", "{body}");

    stream
        .write_all(
            b"HEAD /v1/sessions/not-a-uuid HTTP/1.1\r\nhost: test\r\nx-user-id: alice\r\n\r\n",
        )
        .await
        .expect("request");
    let head = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert!(
        head.contains("content-type: application/json\r\n"),
        "{head}"
    );
    assert!(!head.contains("connection:"), "{head}");

    // A 204 without a body.
    let delete =
        format!("DELETE /v1/sessions/{session} HTTP/1.1\r\nhost: test\r\nx-user-id: alice\r\n\r\n");
    stream.write_all(delete.as_bytes()).await.expect("request");
    let head = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert!(!head.contains("content-type"), "{head}");
    assert!(!head.contains("connection:"), "{head}");

    // The connection is still in step: a last request, then the server closes it.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .expect("request");
    let (status, _, body) = read_response(&mut stream).await;
    assert_healthy(status, &body);
    assert_closed(&mut stream).await;
}
