//! Span export over OTLP (feature `otlp`, on by default): the spans of the server and of the
//! engine, sent in batches over OTLP/HTTP with protobuf bodies to a collector, and the W3C trace
//! context (`traceparent`) of incoming requests taken as the parent of their `request` spans.
//!
//! Off unless [`Traces::start`] is called (`--otlp-endpoint`): until then the request path reads
//! no header and adds no layer; it checks one flag per request.
//!
//! The exporter's HTTP client is hyper's connection pool, driven by the server's tokio runtime:
//! the SDK's batch processor runs on a thread of its own and hands each export to the runtime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError, Request};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

/// Whether spans are exported: set once by [`Traces::start`], read per request.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long one export may take, connecting included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the shutdown waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest collector answer read; OTLP answers are a few bytes (or an error message).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The name of the W3C trace context header.
const TRACEPARENT: &str = "traceparent";

/// The export pipeline; [`Traces::shutdown`] sends the spans still queued.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

/// Why the export pipeline could not be built (e.g. an endpoint that is no URL).
#[derive(Debug)]
pub struct TracesError(String);

impl std::fmt::Display for TracesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OTLP export: {}", self.0)
    }
}

impl std::error::Error for TracesError {}

impl Traces {
    /// Builds the pipeline exporting to `endpoint` (a collector's OTLP/HTTP base URL, e.g.
    /// `http://127.0.0.1:4318`, to which `/v1/traces` is added unless it ends with it) as
    /// service `service_name`, its exports run on `runtime`. Returns the layer to add to the
    /// tracing subscriber and the pipeline to shut down at exit; from then on incoming
    /// `traceparent` headers are honoured and answers carry `traceresponse`.
    ///
    /// The batch processor's queue and batch sizes, the sampler and extra resource attributes
    /// follow the SDK's environment variables (`OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`,
    /// `OTEL_RESOURCE_ATTRIBUTES`), and `OTEL_EXPORTER_OTLP_HEADERS` adds headers to exports.
    pub fn start<S>(
        endpoint: &str,
        service_name: &str,
        runtime: tokio::runtime::Handle,
    ) -> Result<(OpenTelemetryLayer<S, SdkTracer>, Traces), TracesError>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        let endpoint = traces_url(endpoint);
        let uri: axum::http::Uri = endpoint
            .parse()
            .map_err(|error| TracesError(format!("endpoint {endpoint:?}: {error}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(TracesError(format!(
                "endpoint {endpoint:?}: only http:// is supported (no TLS in this build); \
                 send to a local collector"
            )));
        }
        let exporter = SpanExporter::builder()
            .with_http()
            .with_http_client(Transport::new(runtime))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|error| TracesError(error.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(service_name.to_owned())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(env!("CARGO_PKG_NAME")))
            // Not the source file, line and thread of every span (the names and targets say
            // enough), nor the time each spent entered and not (two clock reads per poll).
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false);
        ENABLED.store(true, Ordering::Release);
        Ok((layer, Traces { provider }))
    }

    /// Exports the spans still queued (waiting at most 5 s) and stops the pipeline. Spans
    /// closed afterwards are dropped.
    pub async fn shutdown(self) {
        // Blocking, and the export it waits for runs on the runtime: off its worker threads.
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "OTLP export: the last spans were not sent"),
            Err(error) => tracing::warn!(%error, "OTLP export: shutdown failed"),
        }
    }
}

/// Whether spans are exported (so the request path honours `traceparent`).
pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `endpoint` with the OTLP/HTTP traces path.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Makes the trace context in `headers` (`traceparent`, `tracestate`), if valid, the parent
/// of `span`, which must not have been entered yet. A request without one starts a new trace.
pub(crate) fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key(TRACEPARENT) {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_remote() {
        // Fails only when the span is filtered out, and then there is nothing to export.
        let _ = span.set_parent(parent);
    }
}

/// Adds `traceresponse` (W3C Trace Context level 2: `00-<trace id>-<span id>-<flags>`) to an
/// answer: the trace and the `request` span it was answered in, to look the request up in the
/// tracing backend. Runs inside the request's span.
pub(crate) async fn trace_response(mut response: Response) -> Response {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    if span.is_valid() {
        let value = format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        );
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert("traceresponse", value);
        }
    }
    response
}

/// The exporter's HTTP client: hyper's pool (HTTP/1, plain TCP), each request run on the
/// server's runtime, since the batch processor's thread has none. Failed exports are logged at
/// `warn`, at most once a minute.
#[derive(Debug)]
struct Transport {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    /// When a failure was last logged, and the failures since.
    failures: Mutex<(Option<Instant>, u64)>,
}

/// How often a failing export is logged at most.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Transport {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            runtime,
            failures: Mutex::new((None, 0)),
        }
    }

    /// Counts a failed export, and logs it unless one was logged within the interval.
    fn failed(&self, error: &dyn std::fmt::Display) {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, count) = &mut *failures;
        *count += 1;
        if last.is_none_or(|last| last.elapsed() >= FAILURE_LOG_INTERVAL) {
            // Outside any span (this thread has none), so it is logged, not exported.
            tracing::warn!(
                %error,
                failures = *count,
                "OTLP export failed; spans are lost until the collector answers"
            );
            *last = Some(Instant::now());
            *count = 0;
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<axum::http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await?;
            Ok(axum::http::Response::from_parts(parts, body.to_bytes()))
        };
        let answer = self
            .runtime
            .spawn(async move {
                tokio::time::timeout(EXPORT_TIMEOUT, exchange)
                    .await
                    .map_err(HttpError::from)?
            })
            .await
            .map_err(HttpError::from)
            .and_then(|answer| answer);
        match &answer {
            Ok(response) if !response.status().is_success() => {
                self.failed(&format_args!(
                    "the collector answered {}",
                    response.status()
                ));
            }
            Ok(_) => {}
            Err(error) => self.failed(&with_causes(&**error)),
        }
        answer
    }
}

/// `error` and its causes, `: ` between them (hyper's errors say little without theirs).
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://gateway/otlp"),
            "http://gateway/otlp/v1/traces"
        );
    }
}
