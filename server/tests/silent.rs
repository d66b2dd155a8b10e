//! Requests and connections that send nothing, against the real binary: they cannot lock
//! other users out. Bodies hold the shared body budget only for the bytes that arrived (a
//! declared length claims nothing) and time out after the grace; connections that sent the
//! peers' preface wait in a small pool of their own, outside the clients' cap, and close
//! after a second; a partial preface costs no CPU while it waits.

mod common;

use std::time::{Duration, Instant};

use common::{Server, client, closed_within, create, post, read_response};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends the head of a POST declaring `length` body bytes, and no byte of the body.
async fn silent_post(address: &str, path: &str, content_type: &str, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: soloist\r\nx-user-id: mallory\r\n\
         content-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
}

/// Two imports declaring 64 MiB and sixteen appends declaring 8 MiB, none sending a byte of
/// their bodies: 256 MiB declared against a 128 MiB budget. They used to hold their declared
/// share until 10 s + length / 64 KiB/s, and every other user's create and append waited 5 s
/// for room, then got 503. Now the others are served at once, and the silent ones get 408
/// once the grace has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_bodies_claim_nothing_and_time_out() {
    let grace = Duration::from_secs(3);
    let server = Server::sqlite(&["--body-timeout-ms", "3000"]);
    let client = client();
    let mallorys = create(&client, &server, "mallory").await;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            silent_post(
                server.address(),
                "/v1/sessions/import",
                "application/x-ndjson",
                64 << 20,
            )
            .await,
        );
    }
    for _ in 0..16 {
        silent.push(
            silent_post(
                server.address(),
                &format!("/v1/sessions/{mallorys}/messages"),
                "application/json",
                8 << 20,
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another user, meanwhile: every create and append answered, none waiting.
    let mut slowest = Duration::ZERO;
    for round in 0..10 {
        let sent = Instant::now();
        let session = create(&client, &server, "alice").await;
        let (status, body) = post(
            &client,
            &server,
            &format!("/v1/sessions/{session}/messages"),
            "alice",
            &json!({"messages": [{"role": "user", "content": format!("round {round}")}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        slowest = slowest.max(sent.elapsed());
    }
    eprintln!("alice's slowest create + append while 256 MiB were declared: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "alice waited {slowest:?} behind bodies that sent nothing"
    );
    assert!(
        started.elapsed() < grace,
        "the check above must run within the grace"
    );

    // The silent ones: 408 once the grace has passed, not at their declared length's pace.
    for mut stream in silent {
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("body_timeout"), "{body}");
    }
    let ended = started.elapsed();
    eprintln!("the silent bodies were answered 408 after {ended:?} (grace {grace:?})");
    assert!(ended < grace + Duration::from_secs(2), "{ended:?}");
}

/// CPU time the process has used (user + system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// 200 connections that sent the peers' preface and then nothing, on a server capped at 20
/// connections: they used to count as busy clients for 10 s and could not be evicted, so
/// every request got 503 `too_many_connections`. Now they wait outside the cap, in a pool
/// of 32 (a new one evicts the oldest), and close within a second; clients are served
/// throughout. 500 connections that sent part of the preface (each used to be polled every
/// 5 ms) cost no CPU while they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_handshakes_lock_nobody_out() {
    let server = Server::sqlite(&["--max-connections", "20"]);
    let client = client();
    let mut handshakes = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(server.address()).await.expect("connect");
        stream
            .write_all(b"SOLOIST-PEER/1\r\n")
            .await
            .expect("preface");
        handshakes.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let mut stream = TcpStream::connect(server.address()).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: soloist\r\n\r\n")
            .await
            .expect("request");
        let (status, _, body) = read_response(&mut stream).await;
        assert_eq!(status, 200, "{body}");
    }
    let session = create(&client, &server, "alice").await;
    assert!(!session.is_empty());
    for mut stream in handshakes {
        assert!(
            closed_within(&mut stream, Duration::from_secs(3))
                .await
                .is_some(),
            "a half-open handshake stayed open"
        );
    }

    // Part of the preface: an idle client connection like any other, waiting without a poll.
    let server = Server::sqlite(&["--header-read-timeout-ms", "60000"]);
    let mut partial = Vec::new();
    for _ in 0..500 {
        let mut stream = TcpStream::connect(server.address()).await.expect("connect");
        stream
            .write_all(b"SOLOIST")
            .await
            .expect("part of the preface");
        partial.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time(server.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(server.pid()) - before;
    eprintln!("500 partial prefaces for 2 s cost the server {used:?} of CPU");
    assert!(used < Duration::from_millis(150), "{used:?} of CPU in 2 s");
    drop(partial);
}
