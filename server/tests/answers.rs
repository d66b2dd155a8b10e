//! Large answers against the real binary: a page is bounded by bytes as well as by count
//! (it ends early, with its cursor), and the large answers in flight share a memory budget,
//! so clients that ask for large pages and stop reading them hold a bounded amount between
//! them; the memory comes back when the stalled-reader timeout closes them.

mod common;

use std::time::Duration;

use common::{Server, assert_error, client, create, get, post, stalled_get};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Messages in the session, each with 60 KB of content: 9 MB in all.
const MESSAGES: usize = 150;
const CONTENT: usize = 60_000;
/// The page's byte bound the server runs with: 139 of the messages fit. Larger than what
/// the connection buffers (the server's socket grows its send buffer to 4 MiB on loopback),
/// so that a client that does not read leaves most of its answer in the server.
const PAGE_BYTES: usize = 8 << 20;

/// The status of the answer `stream` has started to receive.
async fn status_of(stream: &mut TcpStream) -> u16 {
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .expect("an answer within 10 s")
        .expect("a head");
    String::from_utf8_lossy(&head[9..12])
        .parse()
        .expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_bounded_by_bytes_and_share_a_budget() {
    // The budget's floor is eight of the largest pages: 64 MiB here.
    let server = Server::sqlite(&[
        "--max-page-bytes",
        &PAGE_BYTES.to_string(),
        "--answer-memory-bytes",
        "0",
        "--stalled-reader-timeout-ms",
        "3000",
    ]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let content = "m".repeat(CONTENT);
    for _ in 0..MESSAGES / 10 {
        let messages: Vec<Value> = (0..10)
            .map(|_| json!({"role": "user", "content": content}))
            .collect();
        let path = format!("/v1/sessions/{session}/messages");
        let (status, body) = post(
            &client,
            &server,
            &path,
            "alice",
            &json!({"messages": messages}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // A page ends before the byte bound, with its cursor; following it reaches every message.
    let mut after = -1i64;
    let mut pages = 0;
    let mut seen = 0;
    loop {
        let (status, page) = get(
            &client,
            &server,
            &format!("/v1/sessions/{session}?after_seq={after}&limit=1000"),
            "alice",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let messages = page["messages"].as_array().expect("messages");
        assert!(!messages.is_empty());
        assert!(
            messages.len() * CONTENT <= PAGE_BYTES,
            "{} messages",
            messages.len()
        );
        seen += messages.len();
        pages += 1;
        match page["next_after_seq"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, MESSAGES);
    assert_eq!(pages, MESSAGES.div_ceil(PAGE_BYTES / CONTENT));

    // Sixteen clients ask for a page each and stop reading: the budget holds about eight.
    let before = server.memory();
    let path = format!("/v1/sessions/{session}?limit=1000");
    let mut stalled = Vec::new();
    for _ in 0..16 {
        stalled.push(stalled_get(server.address(), &path).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = server.memory();
    let grown_mib = during.rss_kib.saturating_sub(before.rss_kib) as f64 / 1024.0;
    let mut answered = 0;
    let mut busy = 0;
    let mut answered_streams = Vec::new();
    for mut stream in stalled {
        match status_of(&mut stream).await {
            200 => {
                answered += 1;
                answered_streams.push(stream);
            }
            503 => busy += 1,
            other => panic!("status {other}"),
        }
    }
    eprintln!(
        "16 stalled readers of 8 MiB pages: {answered} answered, {busy} busy; \
         RSS +{grown_mib:.1} MiB"
    );
    assert!((4..=9).contains(&answered), "{answered} answered");
    assert_eq!(answered + busy, 16);
    assert!(grown_mib < 128.0, "+{grown_mib:.1} MiB");
    // Meanwhile a large answer finds no room, and says so at once.
    assert_error(
        get(&client, &server, &path, "alice").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
    );
    // Readers that take nothing for the stalled-reader timeout are closed, and what they
    // held is given back, whether or not they ever read again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, page) = get(&client, &server, &path, "alice").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    for stream in &mut answered_streams {
        assert!(
            common::closed_within(stream, Duration::from_secs(10))
                .await
                .is_some(),
            "a stalled reader's connection stayed open"
        );
    }
}
