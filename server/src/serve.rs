//! The accept loop: HTTP/1 connections served by hyper, with the limits that keep clients from
//! taking the server down.
//!
//! - A connection that opens with the peers' preface ([`crate::cluster::PREFACE`]) is
//!   another server process forwarding commands: once the preface has arrived it leaves the
//!   clients' cap for a small pool of handshakes of its own, short and evictable, and, once it
//!   sent the cluster secret, is served the peers' protocol only, under the same drain (see
//!   `handshake`). Every other connection is HTTP/1 and never reaches the peers' protocol.
//! - A new connection must send its first request's headers within the header-read timeout,
//!   and so must a kept-alive connection once the next request's first bytes arrived; a
//!   kept-alive connection waiting for its next request closes after the keep-alive timeout,
//!   which is longer by default, so that it outlives a balancer's idle timeout towards this
//!   server (otherwise the balancer may send a request on a connection being closed).
//! - At most `max_connections` are open. A new connection beyond that evicts the connection
//!   that has been idle longest (no request in flight: still reading headers, or idle between
//!   requests), so that clients that hold connections without using them cannot lock others
//!   out. Only when every connection has a request in flight is the new one refused, with a
//!   503 `too_many_connections`.
//! - At shutdown, idle connections close at once and in-flight requests get until the drain
//!   deadline; whatever is still open then is cut.
//! - A connection closed with a request body left unread (refused with a 413 or a 408 before
//!   its end) lingers: its answer is sent and its write side shut, then what the client still
//!   sends is read and discarded for a short while. Closing at once would reset the connection,
//!   and a reset can destroy the answer before the client reads it: a client still sending its
//!   body would see a broken pipe instead of the 413.
//! - A request head longer than 64 KiB ([`MAX_HEAD_BYTES`]), or one hyper cannot parse, never
//!   reaches the router: hyper answers it itself, with a bare 431, 414 or 400 head, and closes
//!   the connection. The socket writes the JSON error answer in its place (see
//!   [`crate::malformed`]) and lingers like after a refused body, since the rest of the head
//!   may still be coming.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::{debug, info, warn};

mod handshake;

use crate::cluster::Inbound;
use crate::error::{ApiError, ErrorCode};
use crate::malformed::{MAX_HEAD_BYTES, automatic_answer};
use handshake::{Handshakes, Sniffed, sniff};

/// Descriptors kept back from the connection cap for everything else the process opens: the
/// listener, database connections (an SQLite connection holds several files), logs.
const DESCRIPTOR_RESERVE: u64 = 128;

/// Refusals being written at once; past that a refused connection is closed without an answer,
/// so that answering a flood cannot itself exhaust descriptors.
const MAX_REFUSALS: usize = 64;

/// How long `accept` rests after an error such as running out of descriptors, instead of
/// spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// "Too many open files": the same number on every Unix.
const EMFILE: i32 = 24;

/// Descriptors the cap is lowered by below what was open when `accept` ran out of them.
const EMFILE_HEADROOM: usize = 16;

/// The longest a refusal waits for its client to read the answer and hang up.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The longest a connection closed with a request body unread discards what its client still
/// sends, so that the client reads the answer instead of a reset.
const BODY_LINGER: Duration = Duration::from_secs(2);

/// ... and the longest it waits for more of it: a client that has stopped sending is not
/// waited for.
const BODY_LINGER_QUIET: Duration = Duration::from_millis(500);

/// Limits of [`serve`].
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The longest a connection may take to send a request's headers, counted from when the
    /// server starts waiting for them: from accept, and from the end of the previous response
    /// on a keep-alive connection (so it is also how long an idle keep-alive connection stays
    /// open).
    pub header_read_timeout: Duration,
    /// How long a connection that has been answered may wait for its next request (no byte of
    /// it yet) before it is closed.
    pub keep_alive_timeout: Duration,
    /// How long an answer may wait for a client that takes none of it (every write refused,
    /// the buffers full) before its connection is closed.
    pub stalled_reader_timeout: Duration,
    /// Connections open at once; see [`default_max_connections`]. Lowered while serving if
    /// `accept` runs out of descriptors below it.
    pub max_connections: usize,
    /// At shutdown, how long in-flight requests may take before their connections are cut.
    pub shutdown_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            stalled_reader_timeout: Duration::from_secs(30),
            max_connections: default_max_connections(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The connection cap that fits the process's open-file limit (the soft `RLIMIT_NOFILE`): the
/// limit less a reserve of 128 descriptors for everything else, and at least half the limit.
/// Where the limit cannot be read, as if it were 1,024.
pub fn default_max_connections() -> usize {
    let limit = open_file_limit().unwrap_or(1024);
    let cap = limit
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(limit / 2)
        .max(1);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The soft limit on open files, from `/proc` (so without `unsafe`); `None` where that is not
/// available, and a large number when unlimited.
pub fn open_file_limit() -> Option<u64> {
    soft_open_file_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The soft limit in the text of `/proc/<pid>/limits`.
fn soft_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    match line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
    {
        "unlimited" => Some(1 << 20),
        soft => soft.parse().ok(),
    }
}

/// What happened to the connections of one [`serve`] run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Connections accepted and served.
    pub accepted: u64,
    /// Idle connections closed to make room for new ones.
    pub evicted: u64,
    /// Connections answered 503 `too_many_connections` (or closed unanswered) because every
    /// open connection had a request in flight.
    pub refused: u64,
    /// Connections still open at the shutdown deadline, and cut.
    pub cut: usize,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains: stops accepting,
/// lets every connection finish its in-flight request (idle ones close at once) for at most
/// `shutdown_timeout`, and cuts the rest. Returns when no connection task is left.
///
/// `peers` serves the connections that open with the peers' preface (see [`crate::cluster`]);
/// without it they are served as HTTP/1, which refuses them.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    peers: Option<Inbound>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> ServeReport {
    let mut http = http1::Builder::new();
    // Both waits for a request head are timed by `idle_watch`: hyper's own header timer also
    // runs while a kept-alive connection waits, and would close it after the shorter one.
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD_BYTES);
    let timeouts = Timeouts {
        header: config.header_read_timeout,
        keep_alive: config.keep_alive_timeout,
        stalled_reader: config.stalled_reader_timeout,
    };
    let registry = Arc::new(Registry::new());
    let handshakes = Arc::new(Handshakes::new());
    let drain = CancellationToken::new();
    let mut connections = JoinSet::new();
    let mut refusals = JoinSet::new();
    let mut report = ServeReport::default();
    let mut next_id = 0u64;
    let mut evict_warning = RateLimit::new(Duration::from_secs(10));
    let mut refuse_warning = RateLimit::new(Duration::from_secs(10));
    let mut accept_warning = RateLimit::new(Duration::from_secs(1));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut max_connections = config.max_connections;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            Some(_) = refusals.join_next(), if !refusals.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Most likely out of descriptors: accepting again at once would fail again, so
                // free one if an idle connection can spare it, and rest.
                let open = registry.len();
                if error.raw_os_error() == Some(EMFILE) && open > 1 && open <= max_connections {
                    // The cap does not fit the descriptors left: lower it, with some room for
                    // evicted connections still closing, so that from now on a new connection
                    // evicts an idle one before accept runs out again.
                    max_connections = open.saturating_sub(EMFILE_HEADROOM).max(open / 2);
                }
                let mut evicted = 0u64;
                while registry.len() > max_connections.saturating_sub(1) || evicted == 0 {
                    if !registry.evict_idlest() {
                        break;
                    }
                    evicted += 1;
                }
                report.evicted += evicted;
                if accept_warning.ready() {
                    warn!(%error, evicted, max_connections, "accept failed; backing off");
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        if registry.len() >= max_connections {
            if registry.evict_idlest() {
                report.evicted += 1;
                if evict_warning.ready() {
                    warn!(
                        max_connections,
                        "connection cap reached: evicting the longest-idle connections"
                    );
                }
            } else {
                report.refused += 1;
                if refuse_warning.ready() {
                    warn!(
                        max_connections,
                        "connection cap reached with a request in flight on every connection: \
                         refusing new connections"
                    );
                }
                if refusals.len() < MAX_REFUSALS {
                    refusals.spawn(refuse(stream));
                }
                continue;
            }
        }
        report.accepted += 1;
        next_id += 1;
        let tracked = registry.insert(next_id);
        let guard = Registered {
            registry: Arc::clone(&registry),
            id: next_id,
        };
        connections.spawn(connection(
            stream,
            http.clone(),
            (router.clone(), peers.clone(), handshakes.clone()),
            tracked,
            guard,
            drain.clone(),
            timeouts,
        ));
    }

    drop(listener);
    refusals.abort_all();
    let open = connections.len();
    info!(
        open,
        timeout_ms = config.shutdown_timeout.as_millis(),
        "draining connections"
    );
    drain.cancel();
    let deadline = tokio::time::sleep(config.shutdown_timeout);
    let mut deadline = std::pin::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            next = connections.join_next() => if next.is_none() { break },
            () = &mut deadline => {
                report.cut = connections.len();
                connections.shutdown().await;
                break;
            }
        }
    }
    while refusals.join_next().await.is_some() {}
    if report.cut > 0 {
        warn!(
            cut = report.cut,
            "shutdown deadline passed: cut connections with requests still in flight"
        );
    } else {
        info!("every connection drained");
    }
    report
}

/// Errors of `accept` that concern only the connection being accepted.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The waits for a request head.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    header: Duration,
    keep_alive: Duration,
    stalled_reader: Duration,
}

/// Returns when the connection has waited too long for a request head: a new connection for
/// its first head, a kept-alive one since the first bytes of its next head arrived (header
/// timeout), or since its last answer ended with no byte of a next request (keep-alive
/// timeout). A request in flight is bounded elsewhere (its body's rate, the command timeout).
async fn idle_watch(tracked: &Tracked, timeouts: Timeouts) {
    loop {
        let wait = if tracked.in_flight.load(Ordering::Acquire) > 0 {
            // An answer the client takes none of: closed after the stalled-reader timeout.
            let blocked = tracked.write_blocked_since.load(Ordering::Acquire);
            if blocked == 0 {
                timeouts.header.min(timeouts.stalled_reader)
            } else {
                let limit = u64::try_from(timeouts.stalled_reader.as_millis()).unwrap_or(u64::MAX);
                let due = (blocked - 1).saturating_add(limit);
                let now = millis_since(tracked.epoch);
                if now >= due {
                    debug!("closing a connection whose client took none of its answer");
                    return;
                }
                Duration::from_millis(due - now)
            }
        } else {
            let head = tracked.head_since.load(Ordering::Acquire);
            let (since, limit) = if !tracked.served.load(Ordering::Acquire) {
                (tracked.idle_since.load(Ordering::Acquire), timeouts.header)
            } else if head != 0 {
                (head - 1, timeouts.header)
            } else {
                (
                    tracked.idle_since.load(Ordering::Acquire),
                    timeouts.keep_alive,
                )
            };
            let due = since.saturating_add(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
            let now = millis_since(tracked.epoch);
            if now >= due {
                return;
            }
            Duration::from_millis(due - now)
        };
        // Looked at again within the stalled-reader timeout, whatever it waits for: a request
        // may start meanwhile, and its answer stall.
        tokio::time::sleep(wait.min(timeouts.stalled_reader)).await;
    }
}

/// Serves one connection until it ends, is evicted, times out waiting for a request, or is
/// cut at shutdown.
async fn connection(
    mut stream: TcpStream,
    http: http1::Builder,
    (router, peers, handshakes): (Router, Option<Inbound>, Arc<Handshakes>),
    tracked: Arc<Tracked>,
    registered: Registered,
    drain: CancellationToken,
    timeouts: Timeouts,
) {
    let evict = tracked.evict.clone();
    let watched = Arc::clone(&tracked);
    let mut replay = Vec::new();
    if let Some(peers) = peers {
        let sniffed = tokio::select! {
            biased;
            () = evict.cancelled() => return,
            () = idle_watch(&watched, timeouts) => return,
            () = drain.cancelled() => return,
            sniffed = sniff(&mut stream) => sniffed,
        };
        match sniffed {
            Ok(Sniffed::Peer) => {
                // Out of the clients' cap: a handshake is held to its own.
                let id = registered.id;
                drop(registered);
                return handshakes.serve(id, stream, peers, drain).await;
            }
            Ok(Sniffed::Other(read)) => replay = read,
            Err(_) => return,
        }
    }
    let io = TokioIo::new(Lingering {
        stream,
        replay,
        tracked: Arc::clone(&tracked),
        shut: false,
        linger: None,
        answer: None,
        head_unread: false,
    });
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        // A new request: whatever the previous one left unread has been read since.
        tracked.unread_body.store(false, Ordering::Relaxed);
        let in_flight = InFlight::start(Arc::clone(&tracked));
        let tracked = Arc::clone(&tracked);
        let request = request.map(|inner| Watched {
            inner,
            ended: false,
            tracked,
        });
        let mut router = router.clone();
        async move {
            let response = router.call(request).await?;
            // The request stays in flight until its response body is sent, so that an event
            // stream is never taken for an idle connection.
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _in_flight = &in_flight;
                    frame
                }))
            }))
        }
    });
    let connection = http.serve_connection(io, service);
    drive(
        connection,
        |c| c.graceful_shutdown(),
        &watched,
        &drain,
        timeouts,
    )
    .await;
}

/// Drives a served connection until it ends, is evicted, waits too long for a request
/// ([`idle_watch`]), or, once the drain begins, until it has shut down gracefully (or is cut).
async fn drive<C, E>(
    connection: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    tracked: &Tracked,
    drain: &CancellationToken,
    timeouts: Timeouts,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        biased;
        () = tracked.evict.cancelled() => return,
        () = idle_watch(tracked, timeouts) => {
            debug!("closing a connection that waited too long for a request");
            return;
        }
        result = connection.as_mut() => result,
        () = drain.cancelled() => {
            graceful_shutdown(connection.as_mut());
            tokio::select! {
                result = connection.as_mut() => result,
                () = tracked.evict.cancelled() => return,
            }
        }
    };
    if let Err(error) = result {
        debug!(%error, "connection ended with an error");
    }
}

/// A request body that marks its connection when it is dropped before its end (its handler
/// refused it part-read), so that the connection lingers when it closes.
struct Watched {
    inner: Incoming,
    /// Whether the end of the body has been read.
    ended: bool,
    tracked: Arc<Tracked>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() {
            this.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.tracked.unread_body.store(true, Ordering::Relaxed);
        }
    }
}

/// A connection's socket. Its shutdown, hyper's last act on a connection it closes, shuts the
/// write side (the client sees the end of the answer) and then, if a request body was left
/// unread, discards what the client still sends until it stops (end of stream, or nothing for
/// [`BODY_LINGER_QUIET`]), for at most [`BODY_LINGER`].
///
/// Its writes replace hyper's own answer to a request head it could not parse with the JSON
/// error (see [`crate::malformed`]); that answer is always the last thing hyper writes.
struct Lingering {
    stream: TcpStream,
    /// Bytes read before HTTP took the connection (while telling it from a peer's), given
    /// to HTTP first.
    replay: Vec<u8>,
    tracked: Arc<Tracked>,
    /// Whether the write side has been shut.
    shut: bool,
    /// The deadlines of the linger, once it has started.
    linger: Option<Linger>,
    /// The JSON error answer written in place of hyper's, and how much of it has been sent.
    answer: Option<(Vec<u8>, usize)>,
    /// Whether hyper answered a request head itself, so that the rest of the head may still
    /// be unread when the connection closes.
    head_unread: bool,
}

/// What a write does with the bytes hyper gives it.
enum Intercept {
    /// Writes them: an answer of the app.
    Pass,
    /// Writes only the first ones: the end of an earlier answer, before hyper's own.
    Before(usize),
    /// Writes this JSON error answer instead of hyper's own.
    Replace(Vec<u8>),
}

impl Lingering {
    /// Notes whether a write went through, for the stalled-reader timeout ([`idle_watch`]).
    fn note_write(&self, written: &Poll<io::Result<usize>>) {
        let blocked = &self.tracked.write_blocked_since;
        match written {
            Poll::Pending => {
                if blocked.load(Ordering::Relaxed) == 0 {
                    let now = millis_since(self.tracked.epoch).saturating_add(1);
                    blocked.store(now, Ordering::Release);
                }
            }
            Poll::Ready(_) => blocked.store(0, Ordering::Release),
        }
    }

    /// Whether `last` (the last bytes hyper gives this write, after `before` others) ends with
    /// hyper's own answer. While a request is in flight the bytes are its answer's: hyper
    /// answers a head itself only between requests.
    fn intercept(&self, before: usize, last: &[u8]) -> Intercept {
        if self.tracked.in_flight.load(Ordering::Acquire) != 0 {
            return Intercept::Pass;
        }
        match automatic_answer(last) {
            None => Intercept::Pass,
            Some(found) if before == 0 && found.start == 0 => Intercept::Replace(found.json()),
            Some(found) => Intercept::Before(found.start),
        }
    }

    /// Starts writing `answer` in place of hyper's, which the caller reports written.
    fn replace(&mut self, answer: Vec<u8>, cx: &mut Context<'_>) -> io::Result<()> {
        debug!("answering a request head hyper refused with the JSON error");
        self.answer = Some((answer, 0));
        self.head_unread = true;
        match self.poll_answer(cx) {
            Poll::Ready(Err(error)) => Err(error),
            // The rest goes out on the flush or the shutdown that follows.
            _ => Ok(()),
        }
    }

    /// Writes what is left of the JSON error answer, if any; everything else waits for it.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((answer, sent)) = &mut self.answer {
            while *sent < answer.len() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &answer[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
            self.answer = None;
        }
        Poll::Ready(Ok(()))
    }
}

/// The deadlines of a linger: the whole of it, and the quiet one (moved on by each read).
struct Linger {
    whole: Pin<Box<Sleep>>,
    quiet: Pin<Box<Sleep>>,
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = if this.replay.is_empty() {
            Pin::new(&mut this.stream).poll_read(cx, buf)
        } else {
            let given = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..given]);
            this.replay.drain(..given);
            Poll::Ready(Ok(()))
        };
        let tracked = &this.tracked;
        // The first bytes of a request head, read between requests, start its header timeout.
        if buf.filled().len() > before
            && tracked.in_flight.load(Ordering::Acquire) == 0
            && tracked.head_since.load(Ordering::Acquire) == 0
        {
            let now = millis_since(tracked.epoch).saturating_add(1);
            tracked.head_since.store(now, Ordering::Release);
        }
        read
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        let written = match this.intercept(0, buf) {
            Intercept::Pass => Pin::new(&mut this.stream).poll_write(cx, buf),
            Intercept::Before(start) => Pin::new(&mut this.stream).poll_write(cx, &buf[..start]),
            Intercept::Replace(answer) => {
                this.replace(answer, cx)?;
                Poll::Ready(Ok(buf.len()))
            }
        };
        this.note_write(&written);
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        // hyper writes its own answer's head into one buffer, the last it holds.
        let Some(last) = bufs.iter().rposition(|buf| !buf.is_empty()) else {
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        };
        let before = bufs[..last].iter().map(|buf| buf.len()).sum();
        let written = match this.intercept(before, &bufs[last]) {
            Intercept::Pass => Pin::new(&mut this.stream).poll_write_vectored(cx, bufs),
            Intercept::Before(start) => {
                let mut earlier = bufs[..last].to_vec();
                earlier.push(io::IoSlice::new(&bufs[last][..start]));
                Pin::new(&mut this.stream).poll_write_vectored(cx, &earlier)
            }
            Intercept::Replace(answer) => {
                this.replace(answer, cx)?;
                Poll::Ready(Ok(bufs[last].len()))
            }
        };
        this.note_write(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_answer(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            ready!(this.poll_answer(cx))?;
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            this.shut = true;
        }
        if !this.head_unread && !this.tracked.unread_body.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        let Linger { whole, quiet } = this.linger.get_or_insert_with(|| Linger {
            whole: Box::pin(tokio::time::sleep(BODY_LINGER)),
            quiet: Box::pin(tokio::time::sleep(BODY_LINGER_QUIET)),
        });
        let mut sink = [0u8; 16 * 1024];
        loop {
            if whole.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut sink);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                // The client has sent everything, or is gone.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let more = tokio::time::Instant::now() + BODY_LINGER_QUIET;
                    quiet.as_mut().reset(more);
                }
                Poll::Pending => {
                    ready!(quiet.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// Answers a connection that cannot be served with a 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = ApiError::new(
        ErrorCode::TooManyConnections,
        "the server has too many connections with requests in flight; retry later",
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Closing with the request unread would reset the connection, and a reset can destroy
        // the answer before the client reads it: read until the client hangs up.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

/// The open connections, for the cap and eviction.
struct Registry {
    /// When the registry was made; activity instants are milliseconds since.
    epoch: Instant,
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

/// What the accept loop knows of one connection.
struct Tracked {
    /// Requests whose response has not been sent completely.
    in_flight: AtomicUsize,
    /// Whether the last request's body was dropped before its end (see [`Lingering`]).
    unread_body: AtomicBool,
    /// Milliseconds since [`Registry::epoch`] at which the connection last became idle: when
    /// it was accepted or when its last response ended. Bytes of a request still being read
    /// do not count, or a client trickling headers would look busy.
    idle_since: AtomicU64,
    /// Whether an answer has ended on this connection: from then on it waits for its next
    /// request under the keep-alive timeout.
    served: AtomicBool,
    /// 1 + the milliseconds since [`Registry::epoch`] at which the first bytes of the next
    /// request head arrived while no request was in flight; 0 while none have.
    head_since: AtomicU64,
    /// 1 + the milliseconds since [`Registry::epoch`] since which every write was refused
    /// (the client reads nothing, the buffers are full); 0 while writes go through.
    write_blocked_since: AtomicU64,
    /// Cancelled to close the connection at once.
    evict: CancellationToken,
    /// The registry's epoch.
    epoch: Instant,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            epoch: Instant::now(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn insert(&self, id: u64) -> Arc<Tracked> {
        let tracked = Arc::new(Tracked {
            in_flight: AtomicUsize::new(0),
            unread_body: AtomicBool::new(false),
            idle_since: AtomicU64::new(millis_since(self.epoch)),
            served: AtomicBool::new(false),
            head_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            evict: CancellationToken::new(),
            epoch: self.epoch,
        });
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&tracked));
        tracked
    }

    /// Closes the connection idle the longest, if any has no request in flight.
    fn evict_idlest(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let idlest = open
            .iter()
            .filter(|(_, tracked)| tracked.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, tracked)| tracked.idle_since.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        let Some(tracked) = idlest.and_then(|id| open.remove(&id)) else {
            return false;
        };
        drop(open);
        tracked.evict.cancel();
        true
    }
}

/// Removes its connection from the registry when the connection's task ends (or is aborted).
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// One request in flight on its connection, until dropped.
struct InFlight(Arc<Tracked>);

impl InFlight {
    fn start(tracked: Arc<Tracked>) -> InFlight {
        tracked.in_flight.fetch_add(1, Ordering::AcqRel);
        tracked.head_since.store(0, Ordering::Release);
        InFlight(tracked)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let tracked = &self.0;
        tracked
            .idle_since
            .store(millis_since(tracked.epoch), Ordering::Relaxed);
        tracked.served.store(true, Ordering::Release);
        tracked.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Lets a warning through at most once per period, so that a flood does not flood the log.
struct RateLimit {
    period: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    fn new(period: Duration) -> RateLimit {
        RateLimit { period, last: None }
    }

    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.period)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_soft_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(soft_open_file_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(soft_open_file_limit(unlimited), Some(1 << 20));
        assert_eq!(
            soft_open_file_limit("Max processes 10 10 processes\n"),
            None
        );
        assert!(default_max_connections() >= 1);
    }

    /// What a [`Lingering`] socket sends for the writes `write` makes on it, then shut.
    async fn sent<F>(in_flight: bool, write: F) -> String
    where
        F: AsyncFnOnce(&mut Lingering),
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(address).await.expect("connect");
        // Nothing to send: the linger after hyper's answer ends at once.
        client.shutdown().await.expect("client shutdown");
        let (stream, _) = listener.accept().await.expect("accept");
        let tracked = Registry::new().insert(1);
        let _in_flight = in_flight.then(|| InFlight::start(Arc::clone(&tracked)));
        let mut socket = Lingering {
            stream,
            replay: Vec::new(),
            tracked,
            shut: false,
            linger: None,
            answer: None,
            head_unread: false,
        };
        write(&mut socket).await;
        socket.shutdown().await.expect("shutdown");
        let mut sent = String::new();
        client.read_to_string(&mut sent).await.expect("read");
        sent
    }

    #[tokio::test]
    async fn writes_the_json_error_in_place_of_hypers_own_answer() {
        const EARLIER: &str = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        const HYPERS: &str = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
                              content-length: 0\r\ndate: Mon, 30 Nov 2026 13:06:53 GMT\r\n\r\n";
        let json = automatic_answer(HYPERS.as_bytes()).expect("found").json();
        let json = String::from_utf8(json).expect("UTF-8");
        let both = format!("{EARLIER}{HYPERS}");

        // In one buffer after an earlier answer, and in the last of several.
        let sent_alone = sent(false, async |socket| {
            socket.write_all(both.as_bytes()).await.expect("write");
        })
        .await;
        assert_eq!(sent_alone, format!("{EARLIER}{json}"));
        let sent_vectored = sent(false, async |socket| {
            let bufs = [
                io::IoSlice::new(b"HTTP/1.1 204 No Content\r\n\r\n"),
                io::IoSlice::new(both.as_bytes()),
            ];
            let mut written = 0;
            while written < bufs.iter().map(|buf| buf.len()).sum() {
                let skip = written;
                let rest: Vec<io::IoSlice<'_>> = bufs
                    .iter()
                    .scan(skip, |skip, buf| {
                        let from = (*skip).min(buf.len());
                        *skip -= from;
                        Some(io::IoSlice::new(&buf[from..]))
                    })
                    .collect();
                written += socket.write_vectored(&rest).await.expect("write");
            }
        })
        .await;
        assert_eq!(
            sent_vectored,
            format!("HTTP/1.1 204 No Content\r\n\r\n{EARLIER}{json}")
        );

        // The same bytes while a request is in flight are its answer's.
        let sent_in_flight = sent(true, async |socket| {
            socket.write_all(HYPERS.as_bytes()).await.expect("write");
        })
        .await;
        assert_eq!(sent_in_flight, HYPERS);
    }
}
