//! Span export over OTLP (`--otlp-endpoint`), end to end: the server binary exports to a
//! collector stub in this process (`POST /v1/traces`, the protobuf decoded with the
//! `opentelemetry-proto` types), and a request's `traceparent` becomes the parent of its
//! `request` span, whose trace the engine's `command` span joins.

#![cfg(feature = "otlp")]

mod common;

use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;

use common::{Server, client};

/// A collector: records every export it is sent, answers 200 with an empty (protobuf) answer.
struct Collector {
    base: String,
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

impl Collector {
    async fn start() -> Collector {
        let exports = Arc::new(Mutex::new(Vec::new()));
        let recorded = exports.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let recorded = recorded.clone();
                async move {
                    assert_eq!(
                        headers
                            .get("content-type")
                            .and_then(|value| value.to_str().ok()),
                        Some("application/x-protobuf")
                    );
                    let export = ExportTraceServiceRequest::decode(body).expect("an OTLP export");
                    recorded
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(export);
                    (
                        StatusCode::OK,
                        [("content-type", "application/x-protobuf")],
                        Vec::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector {
            base: format!("http://{address}"),
            exports,
        }
    }

    /// Every span received, with its service's name.
    fn spans(&self) -> Vec<Span> {
        let exports = self.exports.lock().unwrap_or_else(PoisonError::into_inner);
        let mut spans = Vec::new();
        for export in exports.iter() {
            for resource in &export.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|resource| text(&resource.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push(Span {
                            service: service.clone(),
                            name: span.name.clone(),
                            kind: span.kind,
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            attributes: span.attributes.clone(),
                        });
                    }
                }
            }
        }
        spans
    }
}

/// What the tests look at in an exported span; ids in lower-case hex, as in `traceparent`.
#[derive(Debug)]
struct Span {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<KeyValue>,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<String> {
        text(&self.attributes, key)
    }
}

/// The value of attribute `key`, as text.
fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes
        .iter()
        .find(|attribute| attribute.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::IntValue(number) => number.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn random_hex(bytes: usize) -> String {
    hex(&(0..bytes).map(|_| fastrand::u8(..)).collect::<Vec<_>>())
}

/// The `traceresponse` header of an answer, split: trace id, span id, flags.
fn trace_response(response: &reqwest::Response) -> Option<(String, String, String)> {
    let value = response.headers().get("traceresponse")?.to_str().ok()?;
    let parts: Vec<&str> = value.split('-').collect();
    match parts.as_slice() {
        ["00", trace, span, flags] => {
            Some(((*trace).to_owned(), (*span).to_owned(), (*flags).to_owned()))
        }
        _ => panic!("traceresponse {value:?} is not 00-<trace>-<span>-<flags>"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_in_the_trace_of_the_callers_traceparent() {
    let collector = Collector::start().await;
    let mut server = Server::sqlite(&[
        "--otlp-endpoint",
        &collector.base,
        "--otlp-service-name",
        "soloist-otlp-test",
    ]);
    let client = client();

    // A caller inside a trace: its span is the parent of the request's.
    let (trace, caller) = (random_hex(16), random_hex(8));
    let created = client
        .post(server.url("/v1/sessions"))
        .header("x-user-id", "alice")
        .header("traceparent", format!("00-{trace}-{caller}-01"))
        .json(&json!({"title": "traced"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), StatusCode::CREATED);
    let (answered_trace, request_span, flags) =
        trace_response(&created).expect("traceresponse when spans are exported");
    assert_eq!(answered_trace, trace, "the answer names the caller's trace");
    assert_ne!(request_span, caller, "the request has a span of its own");
    assert_eq!(flags, "01", "sampled, as the caller asked");
    let body: serde_json::Value = created.json().await.expect("body");
    let session = body["session_id"].as_str().expect("session_id").to_owned();

    // A caller with no trace: the request starts one.
    let read = client
        .get(server.url(&format!("/v1/sessions/{session}")))
        .header("x-user-id", "alice")
        .send()
        .await
        .expect("read");
    assert_eq!(read.status(), StatusCode::OK);
    let (own_trace, own_span, _) = trace_response(&read).expect("traceresponse");
    assert_ne!(own_trace, trace);

    // A caller whose trace is not sampled: nothing of it is exported.
    let unsampled = random_hex(16);
    let skipped = client
        .get(server.url(&format!("/v1/sessions/{session}")))
        .header("x-user-id", "alice")
        .header(
            "traceparent",
            format!("00-{unsampled}-{}-00", random_hex(8)),
        )
        .send()
        .await
        .expect("read");
    assert_eq!(skipped.status(), StatusCode::OK);
    let (skipped_trace, _, skipped_flags) = trace_response(&skipped).expect("traceresponse");
    assert_eq!(
        (skipped_trace.as_str(), skipped_flags.as_str()),
        (unsampled.as_str(), "00")
    );

    // A malformed traceparent is ignored: a new trace.
    let malformed = client
        .get(server.url("/healthz"))
        .header("traceparent", "00-not-a-trace-01")
        .send()
        .await
        .expect("healthz");
    let (malformed_trace, malformed_span, _) = trace_response(&malformed).expect("traceresponse");

    // The batch still queued is sent at shutdown.
    assert!(server.terminate().success(), "clean exit");
    let spans = collector.spans();
    assert!(!spans.is_empty(), "nothing exported");
    assert!(
        spans.iter().all(|span| span.service == "soloist-otlp-test"),
        "service.name: {spans:#?}"
    );

    let request = spans
        .iter()
        .find(|span| span.name == "request" && span.span_id == request_span)
        .unwrap_or_else(|| panic!("no request span {request_span} in {spans:#?}"));
    assert_eq!(request.trace_id, trace, "the caller's trace");
    assert_eq!(
        request.parent_span_id, caller,
        "the caller's span is the parent"
    );
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(request.attribute("method").as_deref(), Some("POST"));
    assert_eq!(request.attribute("path").as_deref(), Some("/v1/sessions"));
    assert!(request.attribute("request_id").is_some(), "{request:?}");

    let command = spans
        .iter()
        .find(|span| span.name == "command" && span.trace_id == trace)
        .unwrap_or_else(|| panic!("no engine span in trace {trace}: {spans:#?}"));
    assert_eq!(
        command.parent_span_id, request_span,
        "under the request span"
    );
    assert_eq!(
        command.attribute("command").as_deref(),
        Some("create_session")
    );
    assert_eq!(
        command.attribute("session_id").as_deref(),
        Some(session.as_str())
    );

    let own = spans
        .iter()
        .find(|span| span.name == "request" && span.span_id == own_span)
        .unwrap_or_else(|| panic!("no request span {own_span} in {spans:#?}"));
    assert_eq!(own.trace_id, own_trace);
    assert_eq!(own.parent_span_id, "", "a root span");
    assert!(
        spans.iter().any(|span| span.name == "command"
            && span.trace_id == own_trace
            && span.parent_span_id == own_span
            && span.attribute("command").as_deref() == Some("get_session")),
        "the read's engine span in its trace: {spans:#?}"
    );

    let fresh = spans
        .iter()
        .find(|span| span.span_id == malformed_span)
        .unwrap_or_else(|| panic!("no request span {malformed_span} in {spans:#?}"));
    assert_eq!(fresh.trace_id, malformed_trace);
    assert_eq!(fresh.parent_span_id, "", "a root span");

    assert!(
        spans.iter().all(|span| span.trace_id != unsampled),
        "an unsampled trace was exported: {spans:#?}"
    );
    assert!(
        spans
            .iter()
            .any(|span| span.name == "flush" && span.attribute("rows").is_some()),
        "the writer's flush spans: {spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_traceparent_is_not_read() {
    let server = Server::sqlite(&[]);
    let answer = client()
        .get(server.url("/healthz"))
        .header(
            "traceparent",
            format!("00-{}-{}-01", random_hex(16), random_hex(8)),
        )
        .send()
        .await
        .expect("healthz");
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(answer.headers().get("traceresponse").is_none());
}

#[test]
fn an_endpoint_other_than_http_is_refused_at_start() {
    let refused = Server::try_start(
        "127.0.0.1:0",
        "sqlite::memory:",
        &["--otlp-endpoint", "https://127.0.0.1:4318"],
    );
    let error = refused.err().expect("https is refused");
    assert!(error.contains("did not start"), "{error}");
}
