//! `GET /v1/sessions/{id}/export`: NDJSON, the session's line then every message in order,
//! across pages, drafts with their content so far; only for the session's owner.

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};

use common::{Server, client, create, post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_is_the_session_then_every_message_in_order() {
    // Pages of 100, so that 1,000 messages take ten reads.
    let server = Server::sqlite(&["--max-page-size", "100"]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    for batch in 0..4 {
        let messages: Vec<Value> = (0..250)
            .map(|index| json!({"role": "user", "content": format!("m{}", batch * 250 + index)}))
            .collect();
        let (status, body) = post(
            &client,
            &server,
            &format!("/v1/sessions/{session}/messages"),
            "alice",
            &json!({ "messages": messages }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages"),
        "alice",
        &json!({"messages": [{"role": "assistant", "content": "so far", "status": "in_progress"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let export = client
        .get(server.url(&format!("/v1/sessions/{session}/export")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("export");
    assert_eq!(export.status(), StatusCode::OK);
    assert_eq!(
        export
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok()),
        Some("application/x-ndjson")
    );
    let text = export.text().await.expect("body");
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON value per line"))
        .collect();
    assert_eq!(lines.len(), 1 + 1001, "the session, then every message");
    assert_eq!(lines[0]["session_id"], session.as_str());
    assert_eq!(lines[0]["message_count"], 1001);
    assert!(
        lines[0].get("messages").is_none(),
        "the session line has no messages"
    );
    for (seq, line) in lines[1..1001].iter().enumerate() {
        assert_eq!(line["seq"], seq, "in order, none missing or twice");
        assert_eq!(line["content"], format!("m{seq}"));
    }
    assert_eq!(lines[1001]["status"], "in_progress");
    assert_eq!(lines[1001]["content"], "so far");

    let foreign = client
        .get(server.url(&format!("/v1/sessions/{session}/export")))
        .header("x-user-id", "bob")
        .send()
        .await
        .expect("export");
    assert_eq!(
        foreign.status(),
        StatusCode::NOT_FOUND,
        "like a missing session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_export_ends_whole() {
    // The gzip encoder polls the body once more after its end; the export's stream must answer
    // "ended" again, not panic (which cut the connection before the answer's end).
    let server = Server::sqlite(&["--max-page-size", "10"]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let messages: Vec<Value> = (0..25)
        .map(|index| json!({"role": "user", "content": format!("m{index}")}))
        .collect();
    let (status, body) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages"),
        "alice",
        &json!({ "messages": messages }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let export = |gzip: bool| {
        let mut request = client
            .get(server.url(&format!("/v1/sessions/{session}/export")))
            .header("x-user-id", "alice");
        if gzip {
            request = request.header("accept-encoding", "gzip");
        }
        request.send()
    };
    let plain = export(false)
        .await
        .expect("export")
        .bytes()
        .await
        .expect("body");
    let compressed = export(true).await.expect("export");
    assert_eq!(compressed.status(), StatusCode::OK);
    assert_eq!(
        compressed
            .headers()
            .get("content-encoding")
            .and_then(|value| value.to_str().ok()),
        Some("gzip")
    );
    let bytes = compressed.bytes().await.expect("the whole compressed body");
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .expect("a whole gzip stream");
    assert_eq!(text, plain, "the same export, compressed");
    assert_eq!(String::from_utf8_lossy(&text).lines().count(), 1 + 25);
}
