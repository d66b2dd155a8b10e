//! `GET /metrics`: the engine's metrics (emitted through the facade) and the server's (requests
//! by route and status, errors by code), rendered by the Prometheus exporter.

mod common;

use reqwest::StatusCode;
use serde_json::json;
use soloist::stats::{Kind, METRICS};

use common::{Server, client, create, post};

/// The value of the sample `series` (its name and labels exactly as rendered), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

async fn scrape(client: &reqwest::Client, server: &Server) -> String {
    let response = client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.expect("metrics text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_commands_flushes_and_errors_are_measured() {
    let server = Server::sqlite(&[]);
    let client = client();
    let session = create(&client, &server, "alice").await;
    let appends = 5;
    for turn in 0..appends {
        let messages = json!({"messages": [
            {"role": "user", "content": format!("q{turn}")},
            {"role": "assistant", "content": format!("a{turn}")},
        ]});
        let path = format!("/v1/sessions/{session}/messages");
        let (status, body) = post(&client, &server, &path, "alice", &messages).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Two errors: another user's read (404 not_found from the engine) and a bad body (400,
    // refused before the engine).
    let foreign = client
        .get(server.url(&format!("/v1/sessions/{session}")))
        .header("x-user-id", "mallory")
        .send()
        .await
        .expect("get");
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    let (status, _) = post(
        &client,
        &server,
        &format!("/v1/sessions/{session}/messages"),
        "alice",
        &json!({"messages": "not a list"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let text = scrape(&client, &server).await;
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in {text}"));

    // Every metric the engine declares is there, with its type.
    for (name, kind, _, _) in METRICS {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind} in {text}"
        );
    }
    // Requests by method, route and status, as histograms with the latency buckets.
    let appended = r#"{method="POST",route="/v1/sessions/{id}/messages",status="200"}"#;
    assert_eq!(
        value(&format!("soloist_http_request_seconds_count{appended}")),
        f64::from(appends)
    );
    assert_eq!(
        value(
            r#"soloist_http_request_seconds_count{method="GET",route="/v1/sessions/{id}",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            r#"soloist_http_request_seconds_bucket{method="POST",route="/v1/sessions/{id}/messages",status="200",le="+Inf"}"#
        ),
        f64::from(appends)
    );
    assert!(value(&format!("soloist_http_request_seconds_sum{appended}")) > 0.0);
    // Errors by code, from the engine and from the edge.
    assert_eq!(value(r#"soloist_http_errors_total{code="not_found"}"#), 1.0);
    assert_eq!(
        value(r#"soloist_http_errors_total{code="invalid_input"}"#),
        1.0
    );
    assert_eq!(
        value(r#"soloist_command_errors_total{command="get_session",code="not_found"}"#),
        1.0
    );
    // Commands, append to commit, mailbox waits.
    assert_eq!(
        value(r#"soloist_commands_total{command="append"}"#),
        f64::from(appends)
    );
    assert_eq!(
        value(r#"soloist_command_seconds_count{command="append"}"#),
        f64::from(appends)
    );
    assert!(value(r#"soloist_command_seconds_sum{command="append"}"#) > 0.0);
    // create, the appends and the foreign read each waited in a mailbox.
    assert_eq!(
        value("soloist_mailbox_wait_seconds_count"),
        f64::from(appends + 2)
    );
    // Flushes: one row per message, every flush timed and sized.
    let rows = f64::from(2 * appends);
    assert_eq!(value("soloist_rows_total"), rows);
    assert_eq!(value("soloist_flush_rows_sum"), rows);
    let flushes = value("soloist_flushes_total");
    assert_eq!(value("soloist_flush_seconds_count"), flushes);
    assert_eq!(value("soloist_flush_sessions_count"), flushes);
    assert_eq!(
        value(r#"soloist_flush_sessions_bucket{le="+Inf"}"#),
        flushes
    );
    // The runtime's, published when read.
    assert_eq!(value("soloist_live_sessions"), 1.0);
    assert_eq!(value("soloist_activations_total"), 1.0);
}
