//! Metrics: the Prometheus exporter the engine's and the server's metrics go to, and the
//! server's own (requests by route and status, errors by code).
//!
//! Nothing here formats a metric: the engine emits through the `metrics` facade
//! ([`soloist::stats`]), and `metrics-exporter-prometheus` keeps and renders them.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, State};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use soloist::stats::{
    COUNT_BUCKETS, COUNT_HISTOGRAMS, LATENCY_BUCKETS_SECONDS, LATENCY_HISTOGRAMS,
};
use tokio_util::sync::CancellationToken;
use tower_layer::Layer;
use tower_service::Service;

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

/// Times each request and counts it by method, route and status
/// ([`HTTP_REQUEST_SECONDS`]). A plain tower layer, not a `from_fn` middleware: it calls the
/// route at once and wraps its future, where `from_fn` clones the route for every request. The
/// labels are static strings (the route's pattern found among [`ROUTES`], the method and the
/// status from small tables), so recording allocates nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordRequests;

impl<S> Layer<S> for RecordRequests {
    type Service = Recorded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Recorded { inner }
    }
}

/// The service of [`RecordRequests`].
#[derive(Clone, Debug)]
pub struct Recorded<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Recorded<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .and_then(|matched| ROUTES.iter().find(|route| **route == matched.as_str()))
            .copied()
            .unwrap_or("unmatched");
        Timed {
            method: method_label(request.method()),
            route,
            started: Instant::now(),
            inner: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    /// A route's answer, timed when it is ready.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        method: &'static str,
        route: &'static str,
        started: Instant,
    }
}

impl<F, E> Future for Timed<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &answer {
            histogram!(
                HTTP_REQUEST_SECONDS,
                "method" => *this.method,
                "route" => *this.route,
                "status" => status_label(response.status()),
            )
            .record(this.started.elapsed());
        }
        Poll::Ready(answer)
    }
}

/// Every route's pattern, as the router matches it (a test checks the list against the API
/// description).
pub const ROUTES: &[&str] = &[
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/v1/sessions",
    "/v1/sessions/import",
    "/v1/sessions/{id}",
    "/v1/sessions/{id}/messages",
    "/v1/sessions/{id}/usage",
    "/v1/sessions/{id}/messages/{message_id}/deltas",
    "/v1/sessions/{id}/messages/{message_id}/finish",
    "/v1/sessions/{id}/events",
    "/v1/sessions/{id}/export",
    "/v1/users/me/sessions",
];

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_label(status: StatusCode) -> &'static str {
    const LABELS: [(u16, &str); 22] = [
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (406, "406"),
        (408, "408"),
        (409, "409"),
        (411, "411"),
        (412, "412"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (431, "431"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    let code = status.as_u16();
    LABELS.iter().find(|(known, _)| *known == code).map_or(
        match code {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        |(_, label)| label,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routes_labelled_are_the_routes_described() {
        let described: Vec<String> = crate::openapi().paths.paths.keys().cloned().collect();
        let mut labelled: Vec<String> = ROUTES.iter().map(|route| (*route).to_owned()).collect();
        labelled.sort();
        let mut described = described;
        described.sort();
        assert_eq!(labelled, described);
    }

    #[test]
    fn labels_are_the_wire_names() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(status_label(StatusCode::CREATED), "201");
        assert_eq!(status_label(StatusCode::IM_A_TEAPOT), "4xx");
        assert_eq!(status_label(StatusCode::SERVICE_UNAVAILABLE), "503");
    }
}
