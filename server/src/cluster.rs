//! Forwarding between server processes: the transport behind [`soloist::cluster`].
//!
//! The engine places each session on one member (rendezvous hashing over the live members in
//! the database) and hands a command that must run at another member to [`Peers`], which sends
//! it over one HTTP/2 connection per peer (prior knowledge, no TLS, multiplexed, kept open) to
//! the peer's internal route, `POST /internal/v1/commands`, on the peer's ordinary listener.
//! The command travels as its JSON [`Command`]; the answer comes back as the JSON
//! [`Answer`] (a reply or a typed error). Headers:
//! - `x-soloist-cluster-secret`: the cluster secret ([`soloist::Engine::cluster_secret`]),
//!   compared in constant time. Without it, or with another, the route answers the same 404 as
//!   an unknown path, before reading the body.
//! - `x-soloist-hops`: how many times the command has travelled (at most
//!   [`MAX_HOPS`](soloist::cluster::MAX_HOPS)).
//! - `x-soloist-budget-ms`: how long the original caller still waits; the peer answers a
//!   timeout rather than work past it.
//!
//! The user's identity travels inside the command and the owner checks it again like any
//! other. Only HTTP/2 connections reach this route (see [`crate::serve()`]), and only peers
//! open those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use soloist::cluster::{Answer, Forward, Undelivered};
use soloist::uuid::Uuid;
use soloist::{Command, Engine, Error, Member, Reply};
use subtle::ConstantTimeEq;
use tracing::debug;

use crate::{ApiError, AppState};

/// The internal route peers send commands to.
pub const COMMANDS_PATH: &str = "/internal/v1/commands";

/// The header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-soloist-cluster-secret";

/// The header carrying the times the command has travelled.
pub const HOPS_HEADER: &str = "x-soloist-hops";

/// The header carrying how long the original caller still waits, in milliseconds.
pub const BUDGET_HEADER: &str = "x-soloist-budget-ms";

/// How long connecting to a peer may take. A peer that was killed refuses at once; one cut off
/// by a partition does not answer, and its commands are placed elsewhere after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often a connection with commands in flight pings its peer, and how long the peer has
/// to answer before the connection is given up.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// The largest answer read from a peer: a page of the largest messages.
const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;

/// The router of peers' connections: the internal route, and the same 404 as an unknown path
/// for everything else.
pub fn peer_app(state: AppState) -> Router {
    Router::new()
        .route(COMMANDS_PATH, any(forwarded))
        .fallback(|| async { not_found() })
        .with_state(state)
}

/// What an unknown path gets: the internal route answers it too, to anyone without the secret.
fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route").into_response()
}

/// Whether `headers` carry this cluster's secret (compared in constant time).
fn authenticated(engine: &Engine, headers: &HeaderMap) -> bool {
    let (Some(secret), Some(sent)) = (engine.cluster_secret(), headers.get(SECRET_HEADER)) else {
        return false;
    };
    bool::from(secret.as_bytes().ct_eq(sent.as_bytes()))
}

/// `POST /internal/v1/commands`: runs a command a peer forwarded, and answers its [`Answer`].
async fn forwarded(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if parts.method != Method::POST || !authenticated(&state.engine, &parts.headers) {
        return not_found();
    }
    let number = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok())
    };
    let hops = number(HOPS_HEADER).map_or(1, |hops| u8::try_from(hops).unwrap_or(u8::MAX));
    let budget = number(BUDGET_HEADER).map(Duration::from_millis);
    // A peer re-encodes what its client sent (escapes may differ) and wraps it: room for both.
    let limits = state.bodies.limits();
    let limit = 2 * limits.append_bytes.max(limits.session_bytes) + 64 * 1024;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", error.to_string())
                .into_response();
        }
    };
    let command = match serde_json::from_slice::<Command>(&bytes) {
        Ok(command) => command,
        Err(error) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", error.to_string())
                .into_response();
        }
    };
    let run = state.engine.execute_forwarded(command, hops);
    let result = match budget {
        Some(budget) => tokio::time::timeout(budget, run)
            .await
            .unwrap_or(Err(Error::Timeout(budget))),
        None => run.await,
    };
    let answer = Answer::from(result);
    match serde_json::to_vec(&answer) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "owner_unreachable",
            error.to_string(),
        )
        .into_response(),
    }
}

/// The connections to the other members, one HTTP/2 connection each, opened on first use and
/// again after it closes.
pub struct Peers {
    secret: String,
    connections: Mutex<HashMap<Uuid, Slot>>,
}

/// The sending half of a connection to a peer.
type Sender = SendRequest<Full<Bytes>>;

/// The connection to one peer, if open; locked while it is being opened.
type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

impl Peers {
    /// Peers authenticated with `secret`.
    pub fn new(secret: String) -> Peers {
        Peers {
            secret,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Routes `engine`'s commands through peers authenticated with its cluster secret; does
    /// nothing when the engine is not a member.
    pub fn install(engine: &Engine) {
        if let Some(secret) = engine.cluster_secret() {
            engine.route_through(Arc::new(Peers::new(secret.to_owned())));
        }
    }

    /// An open connection to `peer`: the one in use, or a new one.
    async fn connection(&self, peer: &Member) -> Result<Sender, Undelivered> {
        let slot = {
            let mut connections = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            connections.entry(peer.id).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(sender.clone());
        }
        let sender = connect(&peer.address).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends one request on a connection to `peer`; `Err` when it was surely not sent.
    async fn send(
        &self,
        peer: &Member,
        body: Bytes,
        hops: u8,
        budget: Option<Duration>,
    ) -> Result<Result<hyper::Response<hyper::body::Incoming>, hyper::Error>, Undelivered> {
        let uri: Uri = format!("{}{COMMANDS_PATH}", peer.address.trim_end_matches('/'))
            .parse()
            .map_err(|error| Undelivered(format!("bad peer address {}: {error}", peer.address)))?;
        let mut request = axum::http::Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(SECRET_HEADER, &self.secret)
            .header(HOPS_HEADER, u16::from(hops));
        if let Some(budget) = budget {
            request = request.header(BUDGET_HEADER, budget.as_millis().to_string());
        }
        let mut request = request
            .body(Full::new(body))
            .map_err(|error| Undelivered(error.to_string()))?;
        // A connection that closed since it was last used is replaced once.
        for _ in 0..2 {
            let mut sender = self.connection(peer).await?;
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(Ok(response)),
                Err(mut error) => match error.take_message() {
                    // Refused before it was sent (the connection was closing): try a new one.
                    Some(unsent) => request = unsent,
                    None => return Ok(Err(error.into_error())),
                },
            }
        }
        Err(Undelivered(
            "the connection closed before the command was sent".into(),
        ))
    }

    /// [`Forward::forward`], with the failures after sending as errors.
    async fn forward_command(
        &self,
        peer: &Member,
        command: &Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> Result<Result<Reply, Error>, Undelivered> {
        let body = serde_json::to_vec(command)
            .map(Bytes::from)
            .map_err(|error| Undelivered(error.to_string()))?;
        let lost = |error: &dyn std::fmt::Display| Error::OwnerUnreachable(error.to_string());
        let response = match self.send(peer, body, hops, budget).await? {
            Ok(response) => response,
            Err(error) => return Ok(Err(lost(&error))),
        };
        let status = response.status();
        let bytes = match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(error) => return Ok(Err(lost(&error))),
        };
        match status {
            StatusCode::OK => match serde_json::from_slice::<Answer>(&bytes) {
                Ok(answer) => Ok(answer.into()),
                Err(error) => Ok(Err(lost(&error))),
            },
            // The peer refused it unread: another cluster's process, or another secret.
            StatusCode::NOT_FOUND => Err(Undelivered(format!(
                "{} refused the cluster secret",
                peer.address
            ))),
            other => Ok(Err(Error::OwnerUnreachable(format!(
                "the owner answered {other}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )))),
        }
    }
}

impl Forward for Peers {
    fn forward<'a>(
        &'a self,
        peer: &'a Member,
        command: &'a Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> BoxFuture<'a, Result<Result<Reply, Error>, Undelivered>> {
        Box::pin(self.forward_command(peer, command, hops, budget))
    }
}

/// Opens an HTTP/2 connection to the peer at `address` (`http://host:port`).
async fn connect(address: &str) -> Result<Sender, Undelivered> {
    let authority = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    let open = async {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|error| Undelivered(format!("connecting to {address}: {error}")))?;
        let _ = stream.set_nodelay(true);
        let mut http = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        // A peer that stops answering (cut off without the connection breaking) is found by
        // its missed ping within about 2 s, which fails the commands in flight to it.
        http.timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_INTERVAL);
        let (sender, connection) = http
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| Undelivered(format!("HTTP/2 handshake with {address}: {error}")))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "peer connection closed");
            }
        });
        Ok(sender)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .unwrap_or_else(|_| {
            Err(Undelivered(format!(
                "connecting to {address} took over {CONNECT_TIMEOUT:?}"
            )))
        })
}
