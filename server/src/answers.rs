//! The memory budget of answers in flight. A large answer (a page of long messages, a list of
//! sessions with large metadata) is built whole before it is sent, and stays in memory until
//! the client has read it: clients that ask for large answers and read them slowly could
//! otherwise hold any amount of memory between them. An answer of a known length of at least
//! [`LARGE_ANSWER_BYTES`] holds its bytes of a shared budget until it has been sent (or its
//! connection ends); one that finds no room is answered `503 busy` instead, at once. Smaller
//! answers, and streamed ones (events, exports: each holds a bounded buffer), pass untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

use crate::error::{ApiError, ErrorCode};

/// Answers of at least this many bytes hold their size of the budget while they are sent.
pub const LARGE_ANSWER_BYTES: u64 = 64 * 1024;

/// Holds each large answer's bytes of a shared budget until it is sent.
#[derive(Clone, Debug)]
pub struct HoldAnswers {
    /// One permit per KiB of large answers in flight.
    kibibytes: Arc<Semaphore>,
}

impl HoldAnswers {
    /// A budget of `bytes` for the large answers in flight.
    pub fn new(bytes: usize) -> Self {
        Self {
            kibibytes: Arc::new(Semaphore::new(bytes.div_ceil(1024))),
        }
    }
}

impl<S> Layer<S> for HoldAnswers {
    type Service = Held<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Held {
            inner,
            kibibytes: self.kibibytes.clone(),
        }
    }
}

/// The service of [`HoldAnswers`].
#[derive(Clone, Debug)]
pub struct Held<S> {
    inner: S,
    kibibytes: Arc<Semaphore>,
}

impl<S, B> Service<Request<B>> for Held<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Holding<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Holding {
            inner: self.inner.call(request),
            kibibytes: self.kibibytes.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A route's answer, taking its share of the budget when it is ready.
    pub struct Holding<F> {
        #[pin]
        inner: F,
        kibibytes: Arc<Semaphore>,
    }
}

impl<F, E> Future for Holding<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let Some(length) = response.body().size_hint().exact() else {
            return Poll::Ready(Ok(response));
        };
        if length < LARGE_ANSWER_BYTES {
            return Poll::Ready(Ok(response));
        }
        let permits = u32::try_from(length.div_ceil(1024)).unwrap_or(u32::MAX);
        let answer = match this.kibibytes.clone().try_acquire_many_owned(permits) {
            Ok(permit) => response.map(|body| {
                Body::new(Permitted {
                    body,
                    pending: Bytes::new(),
                    _permit: permit,
                })
            }),
            Err(_) => ApiError::new(
                ErrorCode::Busy,
                "too many large answers are being sent; retry, or ask for a smaller page",
            )
            .into_response(),
        };
        Poll::Ready(Ok(answer))
    }
}

/// Bytes of an answer handed to the connection at a time: it takes the next piece only once
/// it has room for it, so the answer is held here, with its share of the budget, until the
/// client has read most of it (handed over whole, it would leave the budget at once and stay
/// in the connection's buffer for as long as the client takes).
const PIECE_BYTES: usize = 64 * 1024;

/// An answer's body with its share of the budget, given back when the body is dropped (its
/// last piece taken, or its connection ended).
struct Permitted {
    body: Body,
    /// What the body gave and was not yet handed over.
    pending: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Permitted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            if !self.pending.is_empty() {
                let length = self.pending.len().min(PIECE_BYTES);
                // A copy: a slice would keep the whole answer alive in the connection's buffer
                // after the permit is given back with the last piece.
                let piece = Bytes::copy_from_slice(&self.pending[..length]);
                self.pending = self.pending.split_off(length);
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.pending = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.body.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + pending);
        }
        hint.set_lower(rest.lower() + pending);
        hint
    }
}
