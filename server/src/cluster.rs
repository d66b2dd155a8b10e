//! Forwarding between server processes: the transport behind [`soloist::cluster`].
//!
//! The engine places each session on one member (rendezvous hashing over the live members in
//! the database) and hands a command that must run at another member to [`Peers`], which sends
//! it over one TCP connection per peer, opened on first use and kept open, to the peer's
//! ordinary listener (no second port). Every frame carries one command or one answer, so many
//! commands are in flight on a connection at once and each answer comes back as soon as its
//! command has run, in whatever order they finish; what queued up while the previous write
//! was in flight goes out in the next one (one system call for many commands, as group commit
//! does for rows).
//!
//! The protocol, in order:
//! 1. The member that connects sends [`PREFACE`], then one frame holding the cluster secret
//!    ([`soloist::Engine::cluster_secret`]). The listener recognises the preface (which no
//!    HTTP request starts with) and compares the secret in constant time. A wrong or missing
//!    secret gets the same HTTP 404 as an unknown path, and the connection closes: nothing
//!    else is read. The right one gets [`WELCOME`].
//! 2. Then frames both ways: a 4-byte big-endian length and a JSON body.
//!    - To the owner: `{"command": {"id", "hops", "budget_ms", "command"}}` (the JSON
//!      [`Command`], exactly as the client's request became, so that idempotency fingerprints
//!      match wherever it runs; `hops`: how many times it has travelled, at most
//!      [`MAX_HOPS`](soloist::cluster::MAX_HOPS); `budget_ms`: how long the original caller
//!      still waits, which the owner does not work past), or `"ping"`.
//!    - Back: `{"answer": {"id", "answer"}}` (the [`Answer`]: a reply or a typed error),
//!      `"pong"`, `"closing"` (the owner is draining: it runs nothing more on this
//!      connection), `{"unrun": {"id"}}` (a command read after `closing`: it did not run, and
//!      the sender sends it again on a new connection).
//! 3. The connecting member pings every [`PING_INTERVAL`] and gives a connection up when
//!    nothing has come back for two intervals: a peer that goes silent (cut off without the
//!    connection breaking) fails the commands in flight to it within about 2 s. The owner
//!    closes a connection that has sent nothing for [`PEER_SILENCE`].
//!
//! The user's identity travels inside the command and the owner checks it again like any
//! other.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use soloist::cluster::{Answer, Forward, Undelivered};
use soloist::uuid::Uuid;
use soloist::{Command, Engine, Error, Member, Reply};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ApiError;
use crate::body::BodyLimits;

/// How a peer's connection starts. Not an HTTP request line (`/` cannot be part of a method),
/// so no HTTP client's connection is ever taken for a peer's.
pub const PREFACE: &[u8] = b"SOLOIST-PEER/1\r\n";

/// What the owner answers to the right secret.
pub const WELCOME: &[u8] = b"SOLOIST-PEER/1 OK\r\n";

/// How long connecting to a peer (and the secret's exchange) may take. A peer that was killed
/// refuses at once; one cut off by a partition does not answer, and its commands are placed
/// elsewhere after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often a member pings the peers it holds a connection to; one that has sent nothing
/// back for two intervals is given up, failing the commands in flight to it.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// How long the owner keeps a connection on which nothing arrives (not even a ping).
pub const PEER_SILENCE: Duration = Duration::from_secs(5);

/// Commands one connection may have running at the owner; past that the owner stops reading
/// it until some finish.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The longest secret frame read.
const MAX_SECRET_BYTES: usize = 1024;

/// The largest answer read from a peer: a page of the largest messages.
const MAX_ANSWER_BYTES: usize = 128 * 1024 * 1024;

/// Frames queued for a connection's writer.
const QUEUE: usize = 1024;

const PING: &[u8] = b"\"ping\"";
const PONG: &[u8] = b"\"pong\"";
const CLOSING: &[u8] = b"\"closing\"";

/// A frame to the owner.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToOwner<C> {
    Command {
        id: u64,
        hops: u8,
        budget_ms: Option<u64>,
        command: C,
    },
    Ping,
}

/// A frame from the owner. Short-lived (one per forwarded command), so not boxed.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
enum FromOwner {
    Answer { id: u64, answer: Answer },
    Unrun { id: u64 },
    Pong,
    Closing,
}

/// Frames: a 4-byte big-endian length, then the body, of at most `max` bytes.
fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max)
        .new_codec()
}

/// Writes `first` and every frame already queued behind it, then flushes: one write for what
/// queued up while the previous one was in flight.
async fn write_batch<W: AsyncWrite + Unpin>(
    sink: &mut FramedWrite<W, LengthDelimitedCodec>,
    queue: &mut mpsc::Receiver<Bytes>,
    first: Bytes,
) -> io::Result<()> {
    sink.feed(first).await?;
    // Let the tasks that are ready to queue more (other requests read in the same wake-up,
    // the other answers of one committed batch) do so before writing.
    tokio::task::yield_now().await;
    while let Ok(next) = queue.try_recv() {
        sink.feed(next).await?;
    }
    SinkExt::<Bytes>::flush(sink).await
}

/// The bytes an unknown path gets: an HTTP 404 with the JSON error, closing the connection.
fn not_found() -> Vec<u8> {
    let body = ApiError::unknown_route().body().to_string();
    format!(
        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The owner's side: runs the commands peers forward here.
#[derive(Clone)]
pub struct Inbound {
    engine: Engine,
    secret: String,
    max_frame: usize,
}

impl Inbound {
    /// Serves `engine`'s peers, with commands as large as `limits` let clients send; `None`
    /// when the engine is not a member (it has no cluster secret).
    pub fn new(engine: Engine, limits: &BodyLimits) -> Option<Inbound> {
        let secret = engine.cluster_secret()?.to_owned();
        // A peer re-encodes what its client sent (escapes may differ) and wraps it: room for
        // both.
        let largest = limits
            .append_bytes
            .max(limits.session_bytes)
            .max(limits.import_bytes);
        let max_frame = 2 * largest + 64 * 1024;
        Some(Inbound {
            engine,
            secret,
            max_frame,
        })
    }

    /// Takes a connection whose [`PREFACE`] was read through the secret's exchange: `true`,
    /// with [`WELCOME`] sent, if the peer sent the cluster secret; otherwise it is answered as
    /// a missing page and closed. Bounded by the caller.
    pub async fn welcome(&self, stream: &mut TcpStream) -> bool {
        let secret = {
            let mut frames = FramedRead::new(&mut *stream, codec(MAX_SECRET_BYTES));
            frames.next().await.and_then(Result::ok)
        };
        let welcome = secret.is_some_and(|sent| bool::from(self.secret.as_bytes().ct_eq(&sent)));
        if !welcome {
            let _ = stream.write_all(&not_found()).await;
            let _ = stream.shutdown().await;
            return false;
        }
        stream.write_all(WELCOME).await.is_ok()
    }

    /// Serves a welcomed peer's connection until the peer closes it, falls silent for
    /// [`PEER_SILENCE`], or, once `drain` is cancelled, has been told `closing` and its
    /// commands have run.
    pub async fn serve(&self, stream: TcpStream, drain: CancellationToken) {
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let frames = FramedRead::new(read, codec(self.max_frame));
        let sink = FramedWrite::new(write, codec(self.max_frame));
        if let Err(error) = self.run_commands(frames, sink, drain).await {
            debug!(%error, "peer connection failed");
        }
    }

    /// Reads frames, runs their commands and writes their answers, until the connection ends.
    /// One task per connection: the answers of one committed batch wake it once, and go out
    /// in one write.
    async fn run_commands<R, W>(
        &self,
        mut frames: FramedRead<R, LengthDelimitedCodec>,
        mut sink: FramedWrite<W, LengthDelimitedCodec>,
        drain: CancellationToken,
    ) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut running = FuturesUnordered::new();
        let mut closing = false;
        let mut reading = true;
        while reading || !running.is_empty() {
            let frame = tokio::select! {
                biased;
                Some(answer) = running.next(), if !running.is_empty() => {
                    sink.feed(answer).await?;
                    while let Some(Some(answer)) = running.next().now_or_never() {
                        sink.feed(answer).await?;
                    }
                    SinkExt::<Bytes>::flush(&mut sink).await?;
                    continue;
                }
                () = drain.cancelled(), if !closing => {
                    closing = true;
                    sink.send(Bytes::from_static(CLOSING)).await?;
                    continue;
                }
                next = tokio::time::timeout(PEER_SILENCE, frames.next()),
                    if reading && running.len() < MAX_IN_FLIGHT => next,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame?,
                Ok(None) => {
                    reading = false;
                    continue;
                }
                Err(_) => {
                    debug!("closing a silent peer connection");
                    break;
                }
            };
            match serde_json::from_slice::<ToOwner<Command>>(&frame) {
                Ok(ToOwner::Ping) => sink.send(Bytes::from_static(PONG)).await?,
                Ok(ToOwner::Command { id, .. }) if closing => {
                    sink.send(encode(&FromOwner::Unrun { id })).await?;
                }
                Ok(ToOwner::Command {
                    id,
                    hops,
                    budget_ms,
                    command,
                }) => running.push(self.run(id, command, hops, budget_ms)),
                Err(error) => {
                    debug!(%error, "closing a peer connection that sent an unreadable frame");
                    break;
                }
            }
        }
        SinkExt::<Bytes>::close(&mut sink).await
    }

    /// Runs a forwarded command within the caller's budget; its answer's frame.
    async fn run(&self, id: u64, command: Command, hops: u8, budget_ms: Option<u64>) -> Bytes {
        let run = self.engine.execute_forwarded(command, hops);
        let result = match budget_ms.map(Duration::from_millis) {
            Some(budget) => tokio::time::timeout(budget, run)
                .await
                .unwrap_or(Err(Error::Timeout(budget))),
            None => run.await,
        };
        let answer = Answer::from(result);
        encode(&FromOwner::Answer { id, answer })
    }
}

/// A frame's JSON; answers and frames of this module always encode.
fn encode<T: Serialize>(frame: &T) -> Bytes {
    serde_json::to_vec(frame).map_or_else(
        |error| {
            // Unreachable with this module's types; an unreadable frame closes the connection.
            debug!(%error, "a frame did not encode");
            Bytes::new()
        },
        Bytes::from,
    )
}

/// The connections to the other members, one each, opened on first use and again after it
/// closes.
pub struct Peers {
    secret: String,
    links: Mutex<HashMap<Uuid, Slot>>,
    /// Command ids, unique over this process's connections.
    next_id: AtomicU64,
}

/// The connection to one peer, if open; locked while it is being opened.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;

/// What became of a command sent on a connection (one per command, so not boxed).
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Answered(Answer),
    /// It did not run: the peer was closing the connection, or it closed before the command
    /// was written.
    Unrun,
    /// The connection failed with the command in flight: it may have run.
    Lost(String),
}

/// One open connection to a peer.
struct Link {
    /// Frames to write.
    queue: mpsc::Sender<Bytes>,
    state: Mutex<LinkState>,
    /// Cancelled when the peer said `closing`: the writer sends what is queued, then closes.
    closing: CancellationToken,
    /// Cancelled when the connection is given up.
    failed: CancellationToken,
}

struct LinkState {
    /// Whether new commands may be sent.
    open: bool,
    /// The commands waiting for their answers.
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
}

impl Link {
    fn is_open(&self) -> bool {
        self.state().open
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a command's `frame` and waits for its outcome.
    async fn call(&self, id: u64, frame: Bytes) -> Outcome {
        let (tell, told) = oneshot::channel();
        {
            let mut state = self.state();
            if !state.open {
                return Outcome::Unrun;
            }
            state.waiting.insert(id, tell);
        }
        // Forgets the command if the caller stops waiting (its budget ran out).
        let _waiting = Waiting { link: self, id };
        if self.queue.send(frame).await.is_err() {
            return Outcome::Unrun;
        }
        told.await
            .unwrap_or_else(|_| Outcome::Lost("the connection closed".into()))
    }

    /// Hands `outcome` to the command `id`, if it is still waited for.
    fn settle(&self, id: u64, outcome: Outcome) {
        if let Some(tell) = self.state().waiting.remove(&id) {
            let _ = tell.send(outcome);
        }
    }

    /// Gives the connection up: every command in flight on it is lost.
    fn fail(&self, reason: &str) {
        let waiting = {
            let mut state = self.state();
            state.open = false;
            std::mem::take(&mut state.waiting)
        };
        for (_, tell) in waiting {
            let _ = tell.send(Outcome::Lost(reason.to_owned()));
        }
        self.failed.cancel();
    }
}

/// A command waited for on a [`Link`]; forgotten when dropped.
struct Waiting<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.link.state().waiting.remove(&self.id);
    }
}

impl Peers {
    /// Peers authenticated with `secret`.
    pub fn new(secret: String) -> Peers {
        Peers {
            secret,
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
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
    async fn link(&self, peer: &Member) -> Result<Arc<Link>, Undelivered> {
        let slot = {
            let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            links.entry(peer.id).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(link) = slot.as_ref().filter(|link| link.is_open()) {
            return Ok(Arc::clone(link));
        }
        let link = connect(&peer.address, &self.secret).await?;
        *slot = Some(Arc::clone(&link));
        Ok(link)
    }

    /// [`Forward::forward`], with the failures after sending as errors.
    async fn forward_command(
        &self,
        peer: &Member,
        command: &Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> Result<Result<Reply, Error>, Undelivered> {
        let budget_ms = budget.map(|budget| u64::try_from(budget.as_millis()).unwrap_or(u64::MAX));
        // A connection the peer is closing is replaced once.
        for _ in 0..2 {
            let link = self.link(peer).await?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let frame = serde_json::to_vec(&ToOwner::Command {
                id,
                hops,
                budget_ms,
                command,
            })
            .map_err(|error| Undelivered(error.to_string()))?;
            match link.call(id, Bytes::from(frame)).await {
                Outcome::Answered(answer) => return Ok(answer.into()),
                Outcome::Unrun => continue,
                Outcome::Lost(reason) => {
                    return Ok(Err(Error::OwnerUnreachable(format!(
                        "{}: {reason}",
                        peer.address
                    ))));
                }
            }
        }
        Err(Undelivered(format!(
            "{} closed its connections before the command was sent",
            peer.address
        )))
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in links.values() {
            if let Ok(slot) = slot.try_lock()
                && let Some(link) = slot.as_ref()
            {
                link.fail("this process stopped forwarding");
            }
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

/// Opens a connection to the peer at `address` (`http://host:port`) and starts its reader and
/// writer.
async fn connect(address: &str, secret: &str) -> Result<Arc<Link>, Undelivered> {
    let authority = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    let open = async {
        let failed = |error: io::Error| Undelivered(format!("connecting to {address}: {error}"));
        let stream = TcpStream::connect(authority).await.map_err(failed)?;
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        let mut sink = FramedWrite::new(write, codec(MAX_ANSWER_BYTES));
        sink.get_mut().write_all(PREFACE).await.map_err(failed)?;
        sink.send(Bytes::copy_from_slice(secret.as_bytes()))
            .await
            .map_err(failed)?;
        let mut welcome = [0u8; WELCOME.len()];
        if read.read_exact(&mut welcome).await.is_err() || welcome != WELCOME {
            // Another cluster's process, or another secret.
            return Err(Undelivered(format!("{address} refused the cluster secret")));
        }
        Ok((FramedRead::new(read, codec(MAX_ANSWER_BYTES)), sink))
    };
    let (frames, sink) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .unwrap_or_else(|_| {
            Err(Undelivered(format!(
                "connecting to {address} took over {CONNECT_TIMEOUT:?}"
            )))
        })?;
    let (queue, queued) = mpsc::channel(QUEUE);
    let link = Arc::new(Link {
        queue,
        state: Mutex::new(LinkState {
            open: true,
            waiting: HashMap::new(),
        }),
        closing: CancellationToken::new(),
        failed: CancellationToken::new(),
    });
    tokio::spawn(read_answers(Arc::clone(&link), frames));
    tokio::spawn(write_commands(Arc::clone(&link), sink, queued));
    Ok(link)
}

/// Reads a connection's answers until it ends, fails, or nothing has come back for two ping
/// intervals; then gives it up.
async fn read_answers<R: AsyncRead + Unpin>(
    link: Arc<Link>,
    mut frames: FramedRead<R, LengthDelimitedCodec>,
) {
    let reason = loop {
        let next = tokio::select! {
            () = link.failed.cancelled() => return,
            next = tokio::time::timeout(2 * PING_INTERVAL, frames.next()) => next,
        };
        let frame = match next {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(error))) => break error.to_string(),
            Ok(None) => break "the peer closed the connection".to_owned(),
            Err(_) => break format!("no answer to pings for {:?}", 2 * PING_INTERVAL),
        };
        match serde_json::from_slice::<FromOwner>(&frame) {
            Ok(FromOwner::Answer { id, answer }) => link.settle(id, Outcome::Answered(answer)),
            Ok(FromOwner::Unrun { id }) => link.settle(id, Outcome::Unrun),
            Ok(FromOwner::Pong) => {}
            Ok(FromOwner::Closing) => {
                link.state().open = false;
                link.closing.cancel();
            }
            Err(error) => break format!("an unreadable answer: {error}"),
        }
    };
    debug!(%reason, "peer connection closed");
    link.fail(&reason);
}

/// Writes a connection's commands, and a ping every [`PING_INTERVAL`]; once the peer said
/// `closing`, writes what is queued and closes its side.
async fn write_commands<W: AsyncWrite + Unpin>(
    link: Arc<Link>,
    mut sink: FramedWrite<W, LengthDelimitedCodec>,
    mut queue: mpsc::Receiver<Bytes>,
) {
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            () = link.failed.cancelled() => return,
            () = link.closing.cancelled() => break,
            Some(frame) = queue.recv() => frame,
            _ = ping.tick() => Bytes::from_static(PING),
        };
        let written = tokio::select! {
            () = link.failed.cancelled() => return,
            written = write_batch(&mut sink, &mut queue, first) => written,
        };
        if let Err(error) = written {
            link.fail(&error.to_string());
            return;
        }
    }
    // The peer is closing: what is queued reaches it (and comes back unrun); whoever queues
    // after this finds the queue closed.
    queue.close();
    let mut rest = Vec::new();
    while let Ok(frame) = queue.try_recv() {
        rest.push(frame);
    }
    let mut rest = futures::stream::iter(rest.into_iter().map(Ok));
    let closed = async {
        sink.send_all(&mut rest).await?;
        SinkExt::<Bytes>::close(&mut sink).await
    };
    tokio::select! {
        () = link.failed.cancelled() => {}
        closed = closed => if let Err(error) = closed {
            link.fail(&error.to_string());
        }
    }
}
