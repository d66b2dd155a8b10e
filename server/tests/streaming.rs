//! A streamed reply through a server that is killed mid-stream (SIGKILL) and started again on
//! the same database: every delta the server acknowledged is stored, in order; the draft is
//! finished `incomplete` once its timeout passes with no delta; a viewer that resumes from the
//! last event it saw gets the rest of the reply with no gap and no repeat.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Server, client, create, get, post, read_named_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_survives_sigkill_mid_stream() {
    let mut server = Server::sqlite(&["--draft-timeout-ms", "400"]);
    let client = client();
    let id = create(&client, &server, "alice").await;
    let draft = Uuid::now_v7();
    let start = json!({"messages": [{"id": draft, "role": "assistant", "content": "", "status": "in_progress"}]});
    let (status, _) = post(
        &client,
        &server,
        &format!("/v1/sessions/{id}/messages"),
        "alice",
        &start,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // A viewer follows the reply; it reads 20 events, then the connection is dropped.
    let viewer = client
        .get(server.url(&format!("/v1/sessions/{id}/events")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("events");
    // The writer streams 4-byte deltas, each once acknowledged, until the server dies.
    let acknowledged = Arc::new(Mutex::new(0usize));
    let sent = Arc::new(Mutex::new(String::new()));
    let writer = {
        let (client, url) = (
            client.clone(),
            server.url(&format!("/v1/sessions/{id}/messages/{draft}/deltas")),
        );
        let (acknowledged, sent) = (acknowledged.clone(), sent.clone());
        tokio::spawn(async move {
            for index in 0..100_000u32 {
                let token = format!("{:04}", index % 10_000);
                let offset = sent.lock().expect("sent").len();
                sent.lock().expect("sent").push_str(&token);
                let answer = client
                    .post(&url)
                    .header("x-user-id", "alice")
                    .json(&json!({"offset": offset, "content": token}))
                    .send()
                    .await;
                match answer {
                    Ok(response) if response.status() == StatusCode::OK => {
                        let body: Value = response.json().await.expect("json");
                        let length = body["length"].as_u64().expect("length") as usize;
                        assert_eq!(length, offset + 4, "each delta acknowledged at its end");
                        *acknowledged.lock().expect("acknowledged") = length;
                    }
                    // The server is gone: stop.
                    _ => return index,
                }
            }
            100_000
        })
    };
    let seen = read_named_events(viewer, 20).await;
    assert_eq!(seen[0].1, "message.created");
    let mut viewed = String::new();
    for (_, name, data) in &seen[1..] {
        assert_eq!(name, "message.delta");
        assert_eq!(
            data["offset"].as_u64(),
            Some(viewed.len() as u64),
            "no gap, no repeat"
        );
        viewed.push_str(data["content"].as_str().expect("content"));
    }
    let last_event = seen.last().expect("events").0.clone();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.restart();
    let deltas_sent = writer.await.expect("writer");
    let acknowledged = *acknowledged.lock().expect("acknowledged");
    let sent = sent.lock().expect("sent").clone();
    assert!(
        acknowledged > viewed.len(),
        "the writer got further than the viewer"
    );

    // Every acknowledged delta is there, in order; what was sent but not acknowledged may be.
    let path = format!("/v1/sessions/{id}");
    let (status, page) = get(&client, &server, &path, "alice").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let stored = page["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        stored.len() >= acknowledged,
        "{} stored < {acknowledged} acknowledged",
        stored.len()
    );
    assert!(
        sent.starts_with(&stored),
        "stored text is a prefix of what was sent"
    );
    // Found in progress by the new process, it is finished incomplete once its timeout passed.
    let began = Instant::now();
    let finished = loop {
        let (_, page) = get(&client, &server, &path, "alice").await;
        if page["messages"][0]["status"] != "in_progress" {
            break page;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "never finished: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(finished["messages"][0]["status"], "incomplete");
    assert_eq!(
        finished["messages"][0]["content"].as_str(),
        Some(stored.as_str()),
        "kept whole"
    );

    // The viewer comes back with the last id it saw: the rest, then the finish.
    let resumed = client
        .get(server.url(&format!("/v1/sessions/{id}/events")))
        .header("x-user-id", "alice")
        .header("last-event-id", &last_event)
        .send()
        .await
        .expect("events");
    let rest = read_named_events(resumed, 2).await;
    assert_eq!(rest[0].1, "message.delta", "{rest:?}");
    assert_eq!(rest[0].2["offset"].as_u64(), Some(viewed.len() as u64));
    viewed.push_str(rest[0].2["content"].as_str().expect("content"));
    assert_eq!(rest[1].1, "message.finished");
    assert_eq!(
        viewed, stored,
        "the viewer saw the stored reply exactly, once"
    );
    eprintln!(
        "SIGKILL mid-stream: {deltas_sent} deltas sent, {acknowledged} bytes acknowledged, {} stored, \
         finished incomplete {:?} after the restart",
        stored.len(),
        began.elapsed()
    );
}
