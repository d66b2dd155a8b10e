//! Forwarding between server processes: the transport behind [`soloist::cluster`].
//!
//! The engine places each session on one member (rendezvous hashing over the live members in
//! the database) and hands a command that must run at another member to [`Peers`], which sends
//! it over one HTTP/2 connection per peer (prior knowledge, no TLS, multiplexed, kept open) to
//! the peer's internal route, `POST /internal/v1/commands`, on the peer's ordinary listener.
//! Forwards to one peer are coalesced like writes in group commit: while a request to the peer
//! is in flight, the commands for it queue, and the next request carries all of them (at most
//! [`MAX_BATCH`] commands or [`MAX_BATCH_BYTES`]). The body is
//! `{"commands": [{"command": <Command>, "hops": n, "budget_ms": n|null}, ...]}`: each command
//! as its JSON [`Command`], how many times it has travelled (at most
//! [`MAX_HOPS`](soloist::cluster::MAX_HOPS)), and how long its caller still waits (the peer
//! answers a timeout rather than work past it). The peer runs them concurrently and answers
//! `{"answers": [<Answer>, ...]}` in the same order, each a reply or a typed error. The header
//! `x-soloist-cluster-secret` carries the cluster secret
//! ([`soloist::Engine::cluster_secret`]), compared in constant time: without it, or with
//! another, the route answers the same 404 as an unknown path, before reading the body.
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

/// Commands one request to a peer carries at most.
pub const MAX_BATCH: usize = 256;

/// Bytes of commands one request to a peer carries at most (a larger single command goes
/// alone).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Requests in flight to one peer at once; the commands for it queue meanwhile.
const IN_FLIGHT_PER_PEER: usize = 2;

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

/// One forwarded command as it travels.
#[derive(serde::Serialize, serde::Deserialize)]
struct Forwarded {
    command: Command,
    hops: u8,
    budget_ms: Option<u64>,
}

/// What a request to a peer carries.
#[derive(serde::Serialize, serde::Deserialize)]
struct Batch {
    commands: Vec<Forwarded>,
}

/// What a peer answers: one answer per command, in order.
#[derive(serde::Serialize, serde::Deserialize)]
struct Answers {
    answers: Vec<Answer>,
}

/// `POST /internal/v1/commands`: runs the commands a peer forwarded, concurrently, and
/// answers their [`Answer`]s in order.
async fn forwarded(State(state): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    if parts.method != Method::POST || !authenticated(&state.engine, &parts.headers) {
        return not_found();
    }
    // A peer re-encodes what its client sent (escapes may differ) and wraps it: room for both,
    // and for a batch of smaller ones.
    let limits = state.bodies.limits();
    let limit = 2 * limits.append_bytes.max(limits.session_bytes) + MAX_BATCH_BYTES + 64 * 1024;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", error.to_string())
                .into_response();
        }
    };
    let batch = match serde_json::from_slice::<Batch>(&bytes) {
        Ok(batch) if batch.commands.len() <= MAX_BATCH => batch,
        Ok(_) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", "batch too large")
                .into_response();
        }
        Err(error) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", error.to_string())
                .into_response();
        }
    };
    let engine = &state.engine;
    let runs = batch.commands.into_iter().map(|forwarded| async move {
        let run = engine.execute_forwarded(forwarded.command, forwarded.hops);
        let result = match forwarded.budget_ms.map(Duration::from_millis) {
            Some(budget) => tokio::time::timeout(budget, run)
                .await
                .unwrap_or(Err(Error::Timeout(budget))),
            None => run.await,
        };
        Answer::from(result)
    });
    let answers = Answers {
        answers: futures::future::join_all(runs).await,
    };
    match serde_json::to_vec(&answers) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(error) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "owner_unreachable",
            error.to_string(),
        )
        .into_response(),
    }
}

/// The connections to the other members: per peer, one HTTP/2 connection (opened on first use
/// and again after it closes) and the queue of the commands waiting for it.
pub struct Peers {
    secret: Arc<str>,
    peers: Mutex<HashMap<Uuid, Peer>>,
}

/// One peer: its connection and the queue its pump sends from.
struct Peer {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// The connection to one peer, if open; locked while it is being opened.
struct Connection {
    address: String,
    secret: Arc<str>,
    slot: tokio::sync::Mutex<Option<Sender>>,
}

/// The sending half of a connection to a peer.
type Sender = SendRequest<Full<Bytes>>;

/// What a forward is answered with.
type Outcome = Result<Result<Reply, Error>, Undelivered>;

/// A command waiting for its peer, as the JSON it travels as.
struct Queued {
    json: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Outcome>,
}

/// Commands waiting for one peer at most; a forward past it waits for room.
const QUEUE: usize = 4096;

impl Peers {
    /// Peers authenticated with `secret`.
    pub fn new(secret: String) -> Peers {
        Peers {
            secret: secret.into(),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Routes `engine`'s commands through peers authenticated with its cluster secret; does
    /// nothing when the engine is not a member.
    pub fn install(engine: &Engine) {
        if let Some(secret) = engine.cluster_secret() {
            engine.route_through(Arc::new(Peers::new(secret.to_owned())));
        }
    }

    /// The queue of `peer`, with its pump started on first use.
    fn queue(&self, peer: &Member) -> tokio::sync::mpsc::Sender<Queued> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = peers.entry(peer.id).or_insert_with(|| {
            let (queue, waiting) = tokio::sync::mpsc::channel(QUEUE);
            let connection = Arc::new(Connection {
                address: peer.address.clone(),
                secret: self.secret.clone(),
                slot: tokio::sync::Mutex::new(None),
            });
            tokio::spawn(pump(connection, waiting));
            Peer { queue }
        });
        entry.queue.clone()
    }

    /// [`Forward::forward`]: queues the command for its peer and waits for its answer.
    async fn forward_command(
        &self,
        peer: &Member,
        command: &Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> Outcome {
        let forwarded = Forwarded {
            command: command.clone(),
            hops,
            budget_ms: budget.map(|budget| u64::try_from(budget.as_millis()).unwrap_or(u64::MAX)),
        };
        let json =
            serde_json::to_vec(&forwarded).map_err(|error| Undelivered(error.to_string()))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue(peer)
            .send(Queued { json, reply })
            .await
            .map_err(|_| Undelivered("the peer's queue is closed".into()))?;
        answer.await.unwrap_or_else(|_| {
            Ok(Err(Error::OwnerUnreachable(
                "the forward was dropped".into(),
            )))
        })
    }
}

impl Forward for Peers {
    fn forward<'a>(
        &'a self,
        peer: &'a Member,
        command: &'a Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.forward_command(peer, command, hops, budget))
    }
}

/// Sends what queues for one peer: each request carries every command that queued while the
/// previous ones were in flight (at most [`IN_FLIGHT_PER_PEER`] at once), within the batch
/// limits. Ends when the queue closes.
async fn pump(connection: Arc<Connection>, mut waiting: tokio::sync::mpsc::Receiver<Queued>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_PER_PEER));
    let mut carried: Option<Queued> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.json.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match waiting.try_recv() {
                Ok(next) if bytes + next.json.len() <= MAX_BATCH_BYTES => {
                    bytes += next.json.len();
                    batch.push(next);
                }
                Ok(next) => {
                    carried = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        let connection = connection.clone();
        tokio::spawn(async move {
            let _permit = permit;
            connection.send_batch(batch).await;
        });
    }
}

impl Connection {
    /// An open connection: the one in use, or a new one.
    async fn sender(&self) -> Result<Sender, Undelivered> {
        let mut slot = self.slot.lock().await;
        if let Some(sender) = slot.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(sender.clone());
        }
        let sender = connect(&self.address).await?;
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends one request; `Err` when it was surely not sent.
    async fn send(
        &self,
        body: Bytes,
    ) -> Result<Result<hyper::Response<hyper::body::Incoming>, hyper::Error>, Undelivered> {
        let uri: Uri = format!("{}{COMMANDS_PATH}", self.address.trim_end_matches('/'))
            .parse()
            .map_err(|error| Undelivered(format!("bad peer address {}: {error}", self.address)))?;
        let mut request = axum::http::Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(SECRET_HEADER, &*self.secret)
            .body(Full::new(body))
            .map_err(|error| Undelivered(error.to_string()))?;
        // A connection that closed since it was last used is replaced once.
        for _ in 0..2 {
            let mut sender = self.sender().await?;
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

    /// Sends `batch` as one request and hands each command its answer.
    async fn send_batch(&self, batch: Vec<Queued>) {
        let mut body = Vec::with_capacity(
            batch
                .iter()
                .map(|queued| queued.json.len() + 1)
                .sum::<usize>()
                + 16,
        );
        body.extend_from_slice(b"{\"commands\":[");
        for (index, queued) in batch.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&queued.json);
        }
        body.extend_from_slice(b"]}");
        let outcome = self.exchange(Bytes::from(body), batch.len()).await;
        match outcome {
            Ok(Ok(answers)) => {
                for (queued, answer) in batch.into_iter().zip(answers) {
                    let _ = queued.reply.send(Ok(answer.into()));
                }
            }
            Ok(Err(error)) => {
                for queued in batch {
                    let _ = queued.reply.send(Ok(Err(error.clone())));
                }
            }
            Err(undelivered) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(undelivered.clone()));
                }
            }
        }
    }

    /// One request carrying `count` commands: their answers, one error for all when the peer
    /// stopped answering, or [`Undelivered`] when none of them reached it.
    async fn exchange(
        &self,
        body: Bytes,
        count: usize,
    ) -> Result<Result<Vec<Answer>, Error>, Undelivered> {
        let lost = |error: &dyn std::fmt::Display| Error::OwnerUnreachable(error.to_string());
        let response = match self.send(body).await? {
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
            StatusCode::OK => match serde_json::from_slice::<Answers>(&bytes) {
                Ok(answers) if answers.answers.len() == count => Ok(Ok(answers.answers)),
                Ok(answers) => Ok(Err(Error::OwnerUnreachable(format!(
                    "the owner answered {} of {count} commands",
                    answers.answers.len()
                )))),
                Err(error) => Ok(Err(lost(&error))),
            },
            // The peer refused it unread: another cluster's process, or another secret.
            StatusCode::NOT_FOUND => Err(Undelivered(format!(
                "{} refused the cluster secret",
                self.address
            ))),
            other => Ok(Err(Error::OwnerUnreachable(format!(
                "the owner answered {other}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )))),
        }
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
