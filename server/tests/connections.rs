//! The server's connections against the real binary: idle and slow connections cannot lock
//! clients out or exhaust descriptors, slow headers and idle keep-alive connections time out,
//! the cap refuses with a typed 503 only when every connection is busy, and SIGTERM drains within
//! its deadline however slow the clients.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Server, client, closed_within, create, get, post, read_response, read_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use uuid::Uuid;

/// A body of exactly [`BODY_LENGTH`] bytes that creates a session.
const BODY_LENGTH: usize = 100;

fn create_body() -> String {
    format!("{:<BODY_LENGTH$}", r#"{"title":"slow"}"#)
}

/// Sends the head of a `POST /v1/sessions` whose body is not sent yet, and waits for the
/// server's `100 Continue`: from then on the request is in flight (its handler is reading the
/// body).
async fn start_slow_post(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nhost: test\r\nx-user-id: slow\r\n\
         content-type: application/json\r\ncontent-length: {BODY_LENGTH}\r\n\
         expect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let interim = read_until(&mut stream, b"\r\n\r\n").await;
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {interim:?}"
    );
    // The first byte of the body: the rest never comes, or comes late.
    stream.write_all(b"{").await.expect("first byte");
    stream
}

/// Whether the server has closed the connection, without waiting.
async fn is_closed(stream: &mut TcpStream) -> bool {
    closed_within(stream, Duration::from_millis(1))
        .await
        .is_some()
}

/// The soft limit on this test process's open files.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))?
                .trim_start_matches("Max open files")
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_header_connections_do_not_lock_clients_out() {
    // 1,024 descriptors: the default cap is 896. Headers may take a minute, so that only the
    // cap's eviction, not the timeout, keeps room for the clients below.
    let mut server = Server::sqlite_with_open_files(1024, &["--header-read-timeout-ms", "60000"]);
    let address = server.address().to_owned();
    // 1,000 of each where this process may open that many files (next to the 1,100 of the
    // test below, which may run at the same time).
    let per_kind = (open_file_limit().saturating_sub(1400) / 2).min(1000);
    if per_kind < 1000 {
        eprintln!(
            "only {per_kind} connections of each kind: this process's open-file limit is low"
        );
    }

    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..per_kind {
        silent.push(TcpStream::connect(&address).await.expect("connect"));
    }
    let mut slow = Vec::new();
    for _ in 0..per_kind {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        // A write to a connection the server has already closed may fail; that is fine.
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: t").await;
        slow.push(stream);
    }
    eprintln!(
        "opened {} silent and {} slow-header connections in {:?}",
        silent.len(),
        slow.len(),
        start.elapsed()
    );
    // The slow ones send a byte of their unfinished header every 200 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut trickled = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for stream in &mut slow {
                    if stream.write_all(b"x").await.is_ok() {
                        trickled += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (slow, trickled)
        })
    };

    let mut rounds = Vec::new();
    for round in 0..50 {
        let started = Instant::now();
        // A new client each round: a new connection, which must find room.
        let client = client();
        let user = format!("user-{round}");
        let id = create(&client, &server, &user).await;
        let (status, body) = post(
            &client,
            &server,
            &format!("/v1/sessions/{id}/messages"),
            &user,
            &json!({"messages": [{"id": Uuid::now_v7(), "role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = get(&client, &server, &format!("/v1/sessions/{id}"), &user).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(1), "{body}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "round {round} took {took:?}");
        rounds.push(took);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut slow, trickled) = trickle.await.expect("trickle");
    rounds.sort();
    eprintln!(
        "50 rounds of create + append + get, each on a new connection: median {:?}, max {:?}",
        rounds[rounds.len() / 2],
        rounds[rounds.len() - 1]
    );

    let mut silent_closed = 0;
    for stream in &mut silent {
        silent_closed += usize::from(is_closed(stream).await);
    }
    let mut slow_closed = 0;
    for stream in &mut slow {
        slow_closed += usize::from(is_closed(stream).await);
    }
    eprintln!(
        "closed by the server: {silent_closed} of {} silent, {slow_closed} of {} slow-header \
         connections ({trickled} header bytes trickled)",
        silent.len(),
        slow.len(),
    );
    // The server holds at most its cap (896) at once, so it evicted the rest, oldest first.
    assert!(
        silent_closed + slow_closed + 896 >= silent.len() + slow.len(),
        "too few idle connections were evicted"
    );
    assert!(server.is_running(), "the server died");
    let (status, _) = common::send(client().get(server.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_running_out_of_descriptors_evicts_and_keeps_serving() {
    // A cap far above what 1,024 descriptors allow: `accept` fails with "too many open files"
    // and the server must free descriptors by itself.
    let mut server = Server::sqlite_with_open_files(
        1024,
        &[
            "--max-connections",
            "100000",
            "--header-read-timeout-ms",
            "60000",
        ],
    );
    let address = server.address().to_owned();
    // Next to the 2,000 of the test above, which may run at the same time.
    let count = open_file_limit().saturating_sub(2200).min(1100);
    if count < 1100 {
        eprintln!("only {count} connections: this process's open-file limit is low");
    }
    let start = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..count {
        idle.push(TcpStream::connect(&address).await.expect("connect"));
    }
    eprintln!("opened {count} idle connections in {:?}", start.elapsed());
    let mut rounds = Vec::new();
    for round in 0..20 {
        let started = Instant::now();
        let client = client();
        let user = format!("user-{round}");
        create(&client, &server, &user).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "round {round} took {took:?}");
        rounds.push(took);
    }
    rounds.sort();
    let mut closed = 0;
    for stream in &mut idle {
        closed += usize::from(is_closed(stream).await);
    }
    eprintln!(
        "20 creates, each on a new connection: median {:?}, max {:?}; {closed} of {count} idle \
         connections closed by the server",
        rounds[rounds.len() / 2],
        rounds[rounds.len() - 1]
    );
    assert!(server.is_running(), "the server died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_keep_alive_connections_are_closed() {
    let server = Server::sqlite(&[
        "--header-read-timeout-ms",
        "500",
        "--keep-alive-timeout-ms",
        "1500",
    ]);
    let address = server.address().to_owned();
    let limit = Duration::from_secs(5);
    // Answered once, then half of a next head: the header timeout runs from its first bytes,
    // not the longer keep-alive timeout.
    let mut stalled = TcpStream::connect(&address).await.expect("connect");
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("request");
    let (status, _, _) = read_response(&mut stalled).await;
    assert_eq!(status, 200);
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t")
        .await
        .expect("half a next head");
    let stalled = closed_within(&mut stalled, limit)
        .await
        .expect("a stalled next head is closed");
    assert!(
        stalled >= Duration::from_millis(300) && stalled < Duration::from_millis(1200),
        "a stalled next head closed after {stalled:?}: header timeout 500 ms, keep-alive 1.5 s"
    );

    let mut silent = TcpStream::connect(&address).await.expect("connect");
    let mut partial = TcpStream::connect(&address).await.expect("connect");
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t")
        .await
        .expect("half a header");
    let mut keep_alive = TcpStream::connect(&address).await.expect("connect");
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("request");
    let (status, head, _) = read_response(&mut keep_alive).await;
    assert_eq!(status, 200);
    assert!(!head.contains("connection: close"), "{head}");

    let (silent, partial, keep_alive) = tokio::join!(
        closed_within(&mut silent, limit),
        closed_within(&mut partial, limit),
        closed_within(&mut keep_alive, limit),
    );
    eprintln!(
        "closed after: stalled next head {stalled:?}, silent {silent:?}, half a header \
         {partial:?}, idle keep-alive {keep_alive:?}"
    );
    for (what, closed) in [("silent", silent), ("half a header", partial)] {
        let closed = closed.unwrap_or_else(|| panic!("{what} connection still open after 5 s"));
        // The server starts counting slightly before this test does.
        assert!(
            closed >= Duration::from_millis(300) && closed < Duration::from_millis(1200),
            "{what} connection closed after {closed:?}, header timeout 500 ms"
        );
    }
    let keep_alive = keep_alive.expect("idle keep-alive connection still open after 5 s");
    assert!(
        keep_alive >= Duration::from_millis(1200) && keep_alive < Duration::from_millis(3500),
        "idle keep-alive connection closed after {keep_alive:?}, keep-alive timeout 1.5 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_evicts_idle_connections_and_refuses_when_all_are_busy() {
    let server = Server::sqlite(&["--max-connections", "4"]);
    let address = server.address().to_owned();

    // One idle connection and three with a request in flight fill the cap.
    let mut idle = TcpStream::connect(&address).await.expect("connect");
    let mut busy = Vec::new();
    for _ in 0..3 {
        busy.push(start_slow_post(&address).await);
    }
    // A fifth connection is served: the idle one makes room.
    let mut fifth = TcpStream::connect(&address).await.expect("connect");
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("request");
    let (status, _, _) = read_response(&mut fifth).await;
    assert_eq!(status, 200);
    assert!(
        closed_within(&mut idle, Duration::from_secs(2))
            .await
            .is_some(),
        "the idle connection was not evicted"
    );
    // Another busy connection evicts the fifth, idle since its answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    busy.push(start_slow_post(&address).await);
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2))
            .await
            .is_some(),
        "the idle keep-alive connection was not evicted"
    );

    // Every connection is busy: the next is refused with a typed 503.
    let mut refused = TcpStream::connect(&address).await.expect("connect");
    refused
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("request");
    let (status, head, body) = read_response(&mut refused).await;
    assert_eq!(status, 503, "{head}{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(
        closed_within(&mut refused, Duration::from_secs(2))
            .await
            .is_some(),
        "the refused connection stayed open"
    );

    // The busy requests were not disturbed: one finishes and gets its answer.
    let rest = &create_body()[1..];
    busy[0].write_all(rest.as_bytes()).await.expect("rest");
    let (status, _, body) = read_response(&mut busy[0]).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_slow_clients_exits_within_the_shutdown_timeout() {
    let mut server = Server::sqlite(&["--shutdown-timeout-ms", "2000"]);
    let address = server.address().to_owned();
    let client = client();
    let id = create(&client, &server, "alice").await;
    // An event stream, a request whose body never ends, and one that ends during the drain.
    let events = client
        .get(server.url(&format!("/v1/sessions/{id}/events")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), StatusCode::OK);
    let _stuck = start_slow_post(&address).await;
    let mut finishing = start_slow_post(&address).await;

    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Draining: the listener is closed.
    assert!(
        TcpStream::connect(&address).await.is_err(),
        "a new connection was accepted while draining"
    );
    let rest = &create_body()[1..];
    finishing.write_all(rest.as_bytes()).await.expect("rest");
    let (status, head, body) = read_response(&mut finishing).await;
    assert_eq!(status, 201, "{body}");
    assert!(head.contains("connection: close"), "{head}");
    // The event stream ended when the drain began.
    let streamed = tokio::time::timeout(Duration::from_secs(5), events.text())
        .await
        .expect("the event stream ends");
    assert!(streamed.is_ok(), "{streamed:?}");

    let (status, took) = tokio::time::timeout(Duration::from_secs(10), exit)
        .await
        .expect("the server exits")
        .expect("join");
    eprintln!("SIGTERM to exit with a stuck request: {took:?}");
    assert!(status.success(), "exit status {status:?}");
    // Held open by the stuck request until the 2 s deadline, and no longer.
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "exited after {took:?}"
    );
}
