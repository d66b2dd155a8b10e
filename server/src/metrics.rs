//! Metrics: the Prometheus exporter the engine's and the server's metrics go to, and the
//! server's own (requests by route and status, errors by code).
//!
//! Nothing here formats a metric: the engine emits through the `metrics` facade
//! ([`soloist::stats`]), and `metrics-exporter-prometheus` keeps and renders them.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use soloist::stats::{
    COUNT_BUCKETS, COUNT_HISTOGRAMS, LATENCY_BUCKETS_SECONDS, LATENCY_HISTOGRAMS,
};
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// `soloist_http_request_seconds{method, route, status}`: from a request's arrival to its
/// answer's head (an event stream's or an export's body goes on after it).
pub const HTTP_REQUEST_SECONDS: &str = "soloist_http_request_seconds";
/// `soloist_http_errors_total{code}`: error answers, by their JSON `code`.
pub const HTTP_ERRORS: &str = "soloist_http_errors_total";

/// How often the exporter's histograms are compacted (the exporter's upkeep).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the Prometheus exporter as this process's metrics recorder, with the buckets of
/// every histogram, and describes every metric. Call it before starting the engine: the engine
/// takes its metric handles when it starts. Fails if a recorder is already installed.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let mut builder = PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full(HTTP_REQUEST_SECONDS.into()),
        &LATENCY_BUCKETS_SECONDS,
    )?;
    for name in LATENCY_HISTOGRAMS {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.into()), &LATENCY_BUCKETS_SECONDS)?;
    }
    for name in COUNT_HISTOGRAMS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), &COUNT_BUCKETS)?;
    }
    let handle = builder.install_recorder()?;
    soloist::stats::describe();
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        Unit::Seconds,
        "From a request's arrival to its answer's head, by method, route and status."
    );
    describe_counter!(HTTP_ERRORS, Unit::Count, "Error answers, by code.");
    Ok(handle)
}

/// Runs the exporter's upkeep until `stop`.
pub fn spawn_upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                () = stop.cancelled() => break,
            }
        }
    });
}

/// Times a request and counts it by method, route (the route's pattern, `unmatched` for none)
/// and status.
pub async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    histogram!(HTTP_REQUEST_SECONDS, "method" => method, "route" => route, "status" => status)
        .record(started.elapsed());
    response
}

/// Counts an error answer by its code.
pub fn record_error(code: &'static str) {
    counter!(HTTP_ERRORS, "code" => code).increment(1);
}

/// `GET /metrics`: every metric in the Prometheus text format (404 when this server was built
/// without an exporter, as a program embedding the router may be).
pub async fn render(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return crate::ApiError::new(crate::ErrorCode::NotFound, "this server exports no metrics")
            .into_response();
    };
    state.engine.stats().publish();
    (
        [("content-type", "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
