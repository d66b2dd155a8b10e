//! `soloist-server`: a chat server over HTTP that links the soloist engine.
//!
//! The caller's identity is the `x-user-id` header, which a trusted authentication proxy in
//! front of this server sets; a request without it gets 401. Every other check (ownership,
//! input validation, limits) is the engine's, and its typed errors become JSON error bodies
//! `{"error": {"code", "message"}}` with the matching status. Nothing a client sends can cause
//! a 500.
//!
//! # Layout
//! - [`app`]: the router, built from an [`Engine`]; tests drive it directly or over TCP.
//! - `api`: request and response bodies of the JSON API.
//! - `error`: [`ApiError`], the mapping from engine errors and bad requests to HTTP.
//! - `import`: `POST /v1/sessions/import`, an export's NDJSON back in.
//! - [`metrics`]: the Prometheus exporter the engine's and the server's metrics go to, and
//!   the server's own (requests by route and status, errors by code).
//! - `malformed`: the JSON error for requests hyper answers itself (malformed or too large
//!   heads).
//! - `openapi`: the OpenAPI 3.1 description ([`openapi()`]), served at `GET /openapi.json`;
//!   each handler's `#[utoipa::path]` attribute both routes it and describes it.
//! - [`serve()`]: the accept loop, with the connection cap, timeouts and bounded drain.
//! - [`cluster`]: forwarding commands to the process that owns their session: the peers'
//!   protocol on the ordinary listener, both its sides.
//! - `otlp` (feature `otlp`): the spans exported over OTLP, the parent taken from
//!   `traceparent`.

mod answers;
mod api;
mod body;
pub mod cluster;
mod error;
mod import;
mod limit;
mod malformed;
pub mod metrics;
mod openapi;
#[cfg(feature = "otlp")]
pub mod otlp;
mod serve;

use std::convert::Infallible;
use std::time::Duration;

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use soloist::uuid::Uuid;
use soloist::{
    AddUsage, AppendDeltas, AppendMessages, Appended, CreateSession, DeleteSession, DeltasAppended,
    Engine, FinishMessage, GetSession, ListSessions, Message, Position, SessionId, SessionPage,
    StreamEvent, UpdateSession, Usage,
};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnFailure, TraceLayer};

pub use answers::{HoldAnswers, LARGE_ANSWER_BYTES};
pub use body::{BodyBudget, BodyLimits, JsonBody};
pub use error::{ApiError, ErrorCode};
pub use limit::UserLimits;
pub use metrics::{install as install_metrics, spawn_upkeep as spawn_metrics_upkeep};
pub use metrics_exporter_prometheus::PrometheusHandle;
pub use openapi::openapi_json;
pub use serve::{ServeConfig, ServeReport, default_max_connections, open_file_limit, serve};

use api::{
    AppendBody, CreateBody, DeleteQuery, DeltasBody, ErasedBody, EventsQuery, FinishBody,
    ListQuery, PageQuery, SessionListBody, SessionPageBody, SessionSummary, UpdateBody,
    UsageDeltaBody,
};
use openapi::{
    AppendErrors, CreateErrors, DeleteErrors, DeltaEvent, DeltasErrors, EraseAllErrors,
    EventsErrors, FinishErrors, Health, HealthErrors, HealthMember, HealthStatus, LastEventId,
    ListErrors, PlainErrors, ReadErrors, UpdateErrors, UsageErrors,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine all requests go through.
    pub engine: Engine,
    /// Per-user rate limits, if set: checked when a handler learns the caller.
    pub user_limits: Option<Arc<UserLimits>>,
    /// Cancelled at shutdown so that long-lived event streams end and the server can drain.
    pub shutdown: CancellationToken,
    /// Request body limits and the memory budget all bodies in flight share.
    pub bodies: Arc<BodyBudget>,
    /// The memory budget all large answers in flight share.
    pub answers: HoldAnswers,
    /// The exporter `GET /metrics` renders ([`install_metrics`]); none, a 404.
    pub metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// The state for `engine`, with body limits fitted to the engine's input limits.
    pub fn new(engine: Engine, shutdown: CancellationToken) -> Self {
        let limits = BodyLimits::for_engine(&engine.config().limits);
        Self::with_body_limits(engine, shutdown, limits)
    }

    /// The state for `engine` with the given body limits.
    pub fn with_body_limits(
        engine: Engine,
        shutdown: CancellationToken,
        limits: BodyLimits,
    ) -> Self {
        Self {
            engine,
            shutdown,
            answers: HoldAnswers::new(limits.answer_memory_bytes),
            bodies: BodyBudget::new(limits),
            user_limits: None,
            metrics: None,
        }
    }

    /// The same state, rendering `handle` at `GET /metrics`.
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The same state, limiting each user's requests with `limits`.
    pub fn with_user_limits(mut self, limits: Arc<UserLimits>) -> Self {
        self.user_limits = Some(limits);
        self
    }
}

/// The router of the JSON API.
pub fn app(state: AppState) -> Router {
    // Each JSON route holds its body to its own limit (`JsonBody`); this is the outer bound for
    // anything else that might read a body.
    let body_limit = {
        let limits = state.bodies.limits();
        limits.append_bytes.max(limits.session_bytes)
    };
    let (routes, _) = routes().split_for_parts();
    let routes = routes
        .fallback(|| async { ApiError::unknown_route() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(state.answers.clone())
        .layer(metrics::RecordRequests)
        .with_state(state);
    with_edge(routes)
}

/// Every route, each registered from its handler's `#[utoipa::path]` attribute, which also
/// describes it: a route cannot be served without being in the description, nor described
/// under another path or method than it is served at. Handlers of one path go in one
/// `routes!`.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_document))
        .routes(routes!(create_session, list_sessions))
        .routes(routes!(import::import_session))
        .routes(routes!(get_session, update_session, delete_session))
        .routes(routes!(append_messages))
        .routes(routes!(add_usage))
        .routes(routes!(append_deltas))
        .routes(routes!(finish_message))
        .routes(routes!(events))
        .routes(routes!(export_session))
        .routes(routes!(erase_my_sessions))
}

/// The API's OpenAPI 3.1 description, as [`app`] serves it at `GET /openapi.json`
/// ([`openapi_json`] is the served text).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// Where an export stands between two chunks of its body.
enum Export {
    /// The first page is read: send the session's line, then its messages.
    Session(SessionPage),
    /// Send this page's messages.
    Page(SessionPage),
    /// Read the page after this sequence.
    After(i64),
    /// Sent everything (or an error line).
    Done,
}

/// Export a session as NDJSON.
///
/// A line with the session (`SessionSummary`, as `GET` shows it without messages), then a
/// line per message (`Message`) in sequence order, drafts with their content so far. The
/// server reads it a page at a time, so any size streams in bounded memory. A failure midway
/// ends the body with an error line (`ErrorBody`), so a cut export never passes for a whole
/// one.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/export",
    tag = "sessions",
    params(UserId, SessionPath),
    responses(
        (
            status = 200,
            description = "One JSON value per line: the session (`SessionSummary`), then each \
                message (`Message`) in order; an `ErrorBody` line ends a body cut short.",
            content_type = "application/x-ndjson",
            body = String,
        ),
        ReadErrors,
    ),
)]
async fn export_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
) -> Result<Response, ApiError> {
    let engine = state.engine;
    let limit = Some(engine.config().limits.max_page_size);
    let read = move |after_seq: Option<i64>| {
        let (engine, user_id) = (engine.clone(), user_id.clone());
        async move {
            engine
                .get_session(GetSession {
                    user_id,
                    session_id,
                    after_seq,
                    limit,
                    fresh: false,
                })
                .await
        }
    };
    // The first page before the answer: a missing or foreign session is a plain 404.
    let first = read(None).await?;
    let lines = |page: &SessionPage| {
        let mut out = Vec::new();
        for message in &page.messages {
            json_line(&mut out, &**message);
        }
        let next = page.next_after_seq.map_or(Export::Done, Export::After);
        (axum::body::Bytes::from(out), next)
    };
    let body = futures::stream::unfold(Export::Session(first), move |step| {
        let read = read.clone();
        async move {
            let (chunk, next) = match step {
                Export::Done => return None,
                Export::Session(page) => {
                    let mut out = Vec::new();
                    json_line(&mut out, &SessionSummary::from(page.session.clone()));
                    (axum::body::Bytes::from(out), Export::Page(page))
                }
                Export::Page(page) => lines(&page),
                Export::After(after) => match read(Some(after)).await {
                    Ok(page) => lines(&page),
                    Err(error) => {
                        let mut out = Vec::new();
                        json_line(&mut out, &ApiError::from(error).body());
                        (axum::body::Bytes::from(out), Export::Done)
                    }
                },
            };
            Some((Ok::<_, Infallible>(chunk), next))
        }
    })
    // Ended stays ended: the compression layer's encoder polls the body again after its end,
    // and `unfold` panics when polled past it (which cut a gzip export before its end).
    .fuse();
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Appends `value` as one JSON line to `out`.
fn json_line(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    if serde_json::to_writer(&mut *out, value).is_ok() {
        out.push(b'\n');
    }
}

/// The layers every request passes, outermost first: its request id (the client's
/// `x-request-id`, or a new one) set, a span per request carrying it (so every log line of the
/// request names it), the id sent back, a panicking handler answered `500 internal` in JSON
/// (and logged) instead of a dropped connection, and the answer compressed when the client
/// accepts gzip and it is worth it (never the event streams).
///
/// When spans are exported (`otlp::Traces::start` was called before), the request span's
/// parent is the client's `traceparent`, and answers carry `traceresponse`.
pub fn with_edge(router: Router) -> Router {
    let router = router
        .layer(CompressionLayer::new())
        .layer(CatchPanicLayer::custom(panicked));
    #[cfg(feature = "otlp")]
    let router = if otlp::enabled() {
        router.layer(axum::middleware::map_response(otlp::trace_response))
    } else {
        router
    };
    router
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .layer(SetRequestIdLayer::x_request_id(RequestIds::default()))
}

/// Request ids for requests that come without one: this process's random prefix and a count,
/// unique per process and cheap (a UUID per request would read the random source each time).
#[derive(Clone, Debug)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        let prefix = Uuid::new_v4().simple().to_string();
        Self {
            prefix: prefix[..12].into(),
            next: Arc::default(),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let count = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("{}-{count:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// The span of one request: method, path and request id; when spans are exported, a server
/// span whose parent is the client's `traceparent`, if any.
fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default();
    #[cfg(feature = "otlp")]
    if otlp::enabled() {
        let span = tracing::info_span!(
            "request",
            otel.kind = "server",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %id
        );
        otlp::adopt_parent(&span, request.headers());
        return span;
    }
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id
    )
}

/// The answer to a request whose handler panicked: the JSON error, 500; the panic is logged
/// and the process and the other requests go on.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %detail, "a request's handler panicked");
    ApiError::new(
        ErrorCode::Internal,
        "the server failed on this request; it was not applied unless a retry says otherwise",
    )
    .into_response()
}

/// The caller's identity, from the `x-user-id` header set by the trusted proxy in front: 1 to
/// 1,024 bytes of visible ASCII (`!` to `~`: no spaces, no control characters). Missing or empty
/// is a 401; several `x-user-id` headers, or other characters, a 400 (a proxy that appends
/// instead of replacing the header must not let a client choose which one counts).
pub struct UserId(pub String);

/// The longest user id (the engine's text limit).
const MAX_USER_ID_BYTES: usize = 1024;

impl FromRequestParts<AppState> for UserId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = Self::from_headers(parts)?;
        if let Some(limits) = &state.user_limits {
            limits.check(&user.0)?;
        }
        Ok(user)
    }
}

impl UserId {
    /// The caller from the request's `x-user-id`, checked.
    fn from_headers(parts: &Parts) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all("x-user-id").iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            if parts.headers.contains_key("x-user-id") {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "several x-user-id headers; send exactly one",
                ));
            }
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "missing x-user-id header",
            ));
        };
        let bytes = value.as_bytes();
        if bytes.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "empty x-user-id header",
            ));
        }
        if bytes.len() > MAX_USER_ID_BYTES || !bytes.iter().all(|byte| byte.is_ascii_graphic()) {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "x-user-id must be 1 to 1024 characters of visible ASCII (no spaces)",
            ));
        }
        Ok(UserId(String::from_utf8_lossy(bytes).into_owned()))
    }
}

/// The `{id}` path segment as a session id; anything else is a 400.
pub struct SessionPath(pub SessionId);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<SessionId>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(SessionPath(id)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

/// A message of a session, from the path `/v1/sessions/{id}/messages/{message_id}/...`; a
/// malformed id is a 400.
pub struct MessagePath(pub SessionId, pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for MessagePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<(SessionId, Uuid)>::from_request_parts(parts, state).await {
            Ok(Path((session, message))) => Ok(MessagePath(session, message)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, rejection.body_text())
}

/// The value of a header that may appear at most once; several are a 400.
fn single_header<'a>(parts: &'a Parts, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = parts.headers.get_all(name).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("several {name} headers; send one"),
        ));
    }
    first
        .map(|value| {
            value.to_str().map_err(|_| {
                ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("the {name} header must be visible ASCII"),
                )
            })
        })
        .transpose()
}

/// The `Idempotency-Key` header of a create, update, usage or delete: a retry with the same
/// key (within 24 hours by default) applies nothing and gets the first answer; the same key
/// with another request is a 409 `idempotency_key_reused`. 1 to 255 visible ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(IdempotencyKey(
            single_header(parts, "idempotency-key")?.map(str::to_owned),
        ))
    }
}

/// The `If-Match` header: the session's `ETag` (its version, quoted) the write is conditional
/// on; `*` matches any existing session. A session at another version answers 412.
pub struct IfMatch(pub Option<i64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = single_header(parts, "if-match")? else {
            return Ok(IfMatch(None));
        };
        let value = value.trim();
        if value == "*" {
            return Ok(IfMatch(None));
        }
        value
            .strip_prefix('"')
            .and_then(|rest| rest.strip_suffix('"'))
            .and_then(|version| version.parse::<i64>().ok())
            .map(|version| IfMatch(Some(version)))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidInput,
                    "If-Match takes one ETag of this session, such as \"7\", or *",
                )
            })
    }
}

/// `Query` whose rejections are 400 API errors.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, rejection.body_text())
}

/// Health.
///
/// 200 while serving, with this process's place in the cluster (`member` is `null` when this
/// process is not a member; `members` are the live members as this process last read them,
/// itself included); 503 `shutting_down` while draining.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Serving.", body = Health), HealthErrors),
)]
async fn healthz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::ShuttingDown, "draining").into_response();
    }
    let engine = &state.engine;
    let member = engine
        .config()
        .advertise_url
        .as_ref()
        .map(|address| HealthMember {
            id: engine.instance_id(),
            address: address.clone(),
        });
    let members = engine
        .member_view()
        .into_iter()
        .map(|member| HealthMember {
            id: member.id,
            address: member.address,
        })
        .collect();
    Json(Health {
        status: HealthStatus::Ok,
        member,
        members,
    })
    .into_response()
}

/// Metrics.
///
/// The engine's and the server's metrics in the Prometheus text format (404 when the server
/// runs without an exporter).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (
            status = 200,
            description = "Prometheus text format 0.0.4.",
            content_type = "text/plain; version=0.0.4",
            body = String,
        ),
        PlainErrors,
    ),
)]
async fn metrics(state: State<AppState>) -> Response {
    metrics::render(state).await
}

/// This description.
///
/// The OpenAPI 3.1 description of this API (the same text as `docs/openapi.json`).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI document.", body = Object),
        PlainErrors,
    ),
)]
async fn openapi_document() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

/// A session answer with its version as the `ETag`, for `If-Match` on the next write.
fn with_etag(status: StatusCode, version: i64, body: impl serde::Serialize) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(value) = axum::http::HeaderValue::from_str(&format!("\"{version}\"")) {
        response
            .headers_mut()
            .insert(axum::http::header::ETAG, value);
    }
    response
}

/// Create a session.
///
/// The server chooses the session's id (a body with `id` is `invalid_input`): a client that
/// could choose one could try another user's id and learn from the answer that it exists. A
/// create is made retryable with an `Idempotency-Key` instead: its id is then derived from the
/// user and the key, so each user's keys name sessions of their own, and a retry reaches the
/// same session and gets the first answer.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    params(UserId, IdempotencyKey),
    request_body = CreateBody,
    responses(
        (
            status = 201,
            description = "Created (a retry with the same `Idempotency-Key` gets this answer \
                again).",
            body = SessionSummary,
            headers(("ETag" = String, description = "The session's version, quoted (such as \
                `\"7\"`): send it back as `If-Match` to make a write conditional on it.")),
        ),
        (
            status = 200,
            description = "The session existed already.",
            body = SessionSummary,
            headers(("ETag" = String, description = "The session's version, quoted (such as \
                `\"7\"`): send it back as `If-Match` to make a write conditional on it.")),
        ),
        CreateErrors,
    ),
)]
async fn create_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    if body.id.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            "`id` is not accepted: the server chooses session ids; send an Idempotency-Key \
             header to make a create retryable",
        ));
    }
    let created = state
        .engine
        .create_session(CreateSession {
            user_id,
            session_id: None,
            title: body.title,
            metadata: body.metadata,
            ttl_seconds: body.ttl_seconds,
            idempotency_key,
        })
        .await?;
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let version = created.session.version;
    Ok(with_etag(
        status,
        version,
        SessionSummary::from(created.session),
    ))
}

/// Append messages.
///
/// Stored in the order sent at consecutive sequences, answered once durable. A message's `id`
/// makes it idempotent: one stored before under the same id is not stored again, and its
/// sequence is answered. A message with `status: in_progress` starts a draft (see `deltas` and
/// `finish`).
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/messages",
    tag = "messages",
    params(UserId, SessionPath, IfMatch),
    request_body = AppendBody,
    responses(
        (status = 200, description = "Stored.", body = Appended),
        AppendErrors,
    ),
)]
async fn append_messages(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    IfMatch(if_version): IfMatch,
    JsonBody(body): JsonBody<AppendBody>,
) -> Result<Json<Appended>, ApiError> {
    let appended = state
        .engine
        .append(AppendMessages {
            user_id,
            session_id,
            messages: body.messages,
            if_version,
            on_busy: body.on_busy,
        })
        .await?;
    Ok(Json(appended))
}

/// Read a session.
///
/// The session and a page of its messages, in sequence order, after `after_seq`.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(UserId, SessionPath, PageQuery),
    responses(
        (
            status = 200,
            description = "The session and a page of its messages.",
            body = SessionPageBody,
            headers(("ETag" = String, description = "The session's version, quoted (such as \
                `\"7\"`): send it back as `If-Match` to make a write conditional on it.")),
        ),
        ReadErrors,
    ),
)]
async fn get_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Response, ApiError> {
    let page = state
        .engine
        .get_session(GetSession {
            user_id,
            session_id,
            after_seq: query.after_seq,
            limit: query.limit,
            fresh: query.fresh.unwrap_or(false),
        })
        .await?;
    let version = page.session.version;
    Ok(with_etag(
        StatusCode::OK,
        version,
        SessionPageBody::from(page),
    ))
}

/// List sessions.
///
/// The caller's sessions, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(UserId, ListQuery),
    responses(
        (status = 200, description = "A page of sessions.", body = SessionListBody),
        ListErrors,
    ),
)]
async fn list_sessions(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    QueryParams(query): QueryParams<ListQuery>,
) -> Result<Json<SessionListBody>, ApiError> {
    let before = query.before.as_deref().map(api::parse_cursor).transpose()?;
    let list = state
        .engine
        .list_sessions(ListSessions {
            user_id,
            before,
            limit: query.limit,
        })
        .await?;
    Ok(Json(SessionListBody::from(list)))
}

/// Update a session.
///
/// The title and/or the metadata are replaced by the ones sent (metadata is replaced whole,
/// not merged); absent fields stay as they are.
#[utoipa::path(
    patch,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(UserId, SessionPath, IfMatch, IdempotencyKey),
    request_body = UpdateBody,
    responses(
        (
            status = 200,
            description = "Updated.",
            body = SessionSummary,
            headers(("ETag" = String, description = "The session's version, quoted (such as \
                `\"7\"`): send it back as `If-Match` to make a write conditional on it.")),
        ),
        UpdateErrors,
    ),
)]
async fn update_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    IfMatch(if_version): IfMatch,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Response, ApiError> {
    let session = state
        .engine
        .update_session(UpdateSession {
            user_id,
            session_id,
            title: body.title,
            metadata: body.metadata,
            ttl_seconds: body.ttl_seconds,
            if_version,
            idempotency_key,
        })
        .await?;
    let version = session.version;
    Ok(with_etag(
        StatusCode::OK,
        version,
        SessionSummary::from(session),
    ))
}

/// Add token usage.
///
/// Adds the tokens sent to the session's totals and answers the new totals.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/usage",
    tag = "sessions",
    params(UserId, SessionPath, IdempotencyKey),
    request_body = UsageDeltaBody,
    responses(
        (status = 200, description = "The session's totals.", body = Usage),
        UsageErrors,
    ),
)]
async fn add_usage(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    JsonBody(body): JsonBody<UsageDeltaBody>,
) -> Result<Json<Usage>, ApiError> {
    let usage = state
        .engine
        .add_usage(AddUsage {
            user_id,
            session_id,
            prompt_tokens: body.prompt_tokens,
            completion_tokens: body.completion_tokens,
            idempotency_key,
        })
        .await?;
    Ok(Json(usage))
}

/// Grow a draft.
///
/// Appends text to a draft (a message appended `in_progress`) at byte offsets of its content,
/// answered once durable. Text already there at its offset is a resend and changes nothing.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/messages/{message_id}/deltas",
    tag = "messages",
    params(UserId, MessagePath),
    request_body = DeltasBody,
    responses(
        (status = 200, description = "The draft's length now.", body = DeltasAppended),
        DeltasErrors,
    ),
)]
async fn append_deltas(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    MessagePath(session_id, message_id): MessagePath,
    JsonBody(body): JsonBody<DeltasBody>,
) -> Result<Json<DeltasAppended>, ApiError> {
    let appended = state
        .engine
        .append_deltas(AppendDeltas {
            user_id,
            session_id,
            message_id,
            deltas: body.into_deltas()?,
        })
        .await?;
    Ok(Json(appended))
}

/// Finish a draft.
///
/// Ends a draft `completed`, `incomplete` or `aborted`, with what only its end knows (tool
/// calls, a refusal, usage); answers the message as finished.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/messages/{message_id}/finish",
    tag = "messages",
    params(UserId, MessagePath),
    request_body = FinishBody,
    responses(
        (status = 200, description = "The finished message.", body = Message),
        FinishErrors,
    ),
)]
async fn finish_message(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    MessagePath(session_id, message_id): MessagePath,
    JsonBody(body): JsonBody<FinishBody>,
) -> Result<Json<Message>, ApiError> {
    let finished = state
        .engine
        .finish_message(FinishMessage {
            user_id,
            session_id,
            message_id,
            status: body.status,
            tool_calls: body.tool_calls,
            refusal: body.refusal,
            usage: body.usage,
        })
        .await?;
    Ok(Json(finished.message))
}

/// Delete a session.
///
/// The session and its messages are gone; its id is never reused. With `?erase=true` its
/// title, metadata, usage and idempotency records are erased too (a plain delete keeps them
/// with the session's tombstone); the owner may erase a session already deleted, and again
/// (204 each time).
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(UserId, SessionPath, IfMatch, IdempotencyKey, DeleteQuery),
    responses((status = 204, description = "Deleted."), DeleteErrors),
)]
async fn delete_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    IfMatch(if_version): IfMatch,
    IdempotencyKey(idempotency_key): IdempotencyKey,
    QueryParams(query): QueryParams<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    state
        .engine
        .delete_session(DeleteSession {
            user_id,
            session_id,
            if_version,
            idempotency_key,
            erase: query.erase,
            only_if_expired: false,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sessions one `DELETE /v1/users/me/sessions` erases at most (each is a write): the request's
/// time stays bounded however long the caller's history.
const ERASE_PER_REQUEST: usize = 1000;

/// Erase all my sessions.
///
/// Erases the sessions of the caller, live or deleted, up to 1,000 per call (`more`: call
/// again): messages, title, metadata, usage and idempotency records (each session's row stays
/// as a tombstone holding its id, owner and times, so that its id is never reused).
/// Idempotent: once nothing is left it answers `{"erased": 0, "more": false}`. Sessions
/// created while it runs may be left; on an error some sessions may have been erased: call
/// again.
#[utoipa::path(
    delete,
    path = "/v1/users/me/sessions",
    tag = "sessions",
    params(UserId),
    responses(
        (status = 200, description = "How many sessions this call erased.", body = ErasedBody),
        EraseAllErrors,
    ),
)]
async fn erase_my_sessions(
    State(state): State<AppState>,
    UserId(user_id): UserId,
) -> Result<Json<ErasedBody>, ApiError> {
    let done = state
        .engine
        .erase_user_sessions(&user_id, ERASE_PER_REQUEST)
        .await?;
    Ok(Json(ErasedBody {
        erased: done.erased,
        more: done.more,
    }))
}

/// Follow a session.
///
/// Server-Sent Events: the stored messages after `after_seq` (or after the `Last-Event-ID` a
/// reconnecting client sends), then each new message as it commits, and the drafts among them
/// as they grow and end. Events:
/// - `message`: a new message, whole (`Message`);
/// - `message.created`: a new draft, with its content so far (`Message`);
/// - `message.delta`: text a draft grew by, once durable (`DeltaEvent`);
/// - `message.finished`: a draft as it ended (`Message`);
/// - `error`: the stream ends (the session was deleted, the server is stopping; `ErrorBody`).
///
/// Each event's `id` is the stream's position after it (`7`, `7:120`, `8/7:120`), so a client
/// that reconnects with it as `Last-Event-ID` resumes exactly: the messages after it, and the
/// rest of an open draft from the byte it stopped at, with no gap and no repeat. A comment
/// line keeps the connection alive every 15 s.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/events",
    tag = "events",
    params(UserId, SessionPath, EventsQuery, LastEventId),
    responses(
        (
            status = 200,
            description = "An endless `text/event-stream`; see the operation's description \
                for its events.",
            content_type = "text/event-stream",
            body = String,
        ),
        EventsErrors,
    ),
)]
async fn events(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    SessionPath(session_id): SessionPath,
    QueryParams(query): QueryParams<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let resume = match headers
        .get("last-event-id")
        .map(|value| value.to_str().unwrap_or_default())
    {
        Some(id) => Some(id.trim().parse::<Position>().map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidInput,
                "Last-Event-ID is not an event id of this stream",
            )
        })?),
        None => None,
    };
    let position = resume.unwrap_or_else(|| Position::after(query.after_seq.unwrap_or(-1)));
    let stream = state
        .engine
        .session(user_id, session_id)
        .subscribe_from(position)
        .await?;
    let shutdown = state.shutdown.clone();
    let events = futures::stream::unfold(
        (stream, shutdown, false),
        |(mut stream, shutdown, ended)| async move {
            if ended {
                return None;
            }
            let next = tokio::select! {
                next = stream.next_event() => next,
                () = shutdown.cancelled() => return None,
            };
            let event = match next {
                Ok(event) => {
                    let id = stream.position().to_string();
                    let (name, data) = match &event {
                        StreamEvent::Message(message) => {
                            ("message", serde_json::to_string(&**message))
                        }
                        StreamEvent::Created(message) => {
                            ("message.created", serde_json::to_string(&**message))
                        }
                        StreamEvent::Delta {
                            seq,
                            offset,
                            content,
                        } => (
                            "message.delta",
                            serde_json::to_string(&DeltaEvent {
                                seq: *seq,
                                offset: *offset,
                                content,
                            }),
                        ),
                        StreamEvent::Finished(message) => {
                            ("message.finished", serde_json::to_string(&**message))
                        }
                    };
                    match data {
                        Ok(data) => Event::default().event(name).id(id).data(data),
                        Err(_) => Event::default().event("error").data("encoding"),
                    }
                }
                // The stream ended (session deleted, engine stopping): say why, then close.
                Err(error) => {
                    let event = Event::default()
                        .event("error")
                        .data(ApiError::from(error).body().to_string());
                    return Some((Ok(event), (stream, shutdown, true)));
                }
            };
            Some((Ok(event), (stream, shutdown, false)))
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
