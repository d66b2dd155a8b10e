//! Reading request bodies without letting one request take the server's memory or time.
//!
//! Every JSON body goes through [`JsonBody`], which, in this order:
//! 1. refuses a declared `Content-Length` over the route's limit before reading a byte (413);
//! 2. reserves the body's size from a budget shared by every request in flight, so that many
//!    large bodies at once wait their turn instead of adding up (503 `busy` if the budget stays
//!    taken);
//! 3. reads the body frame by frame, refusing it as soon as it passes the limit (413) or falls
//!    behind a minimum transfer rate (408: a client that trickles its body cannot hold a
//!    connection, a task and its buffer for long);
//! 4. parses it straight into the route's typed body: no intermediate `serde_json::Value`, JSON
//!    fields kept as raw text ([`soloist::RawJson`]), unknown fields refused;
//! 5. refuses JSON fields nested deeper than [`MAX_JSON_DEPTH`]. Raw text is validated without
//!    serde_json's recursion limit (which only bounds parsing into typed values), so without
//!    this a field nested 10,000 deep would be stored and then served in responses that
//!    clients parsing with such a limit (serde_json's default is 128) cannot read.
//!
//! An import's NDJSON body takes steps 1 to 3 the same way ([`read_frames`]), parsed a line at
//! a time as it arrives instead of whole at the end.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::{ApiError, AppState, ErrorCode};

/// Limits on what a request body may take.
#[derive(Clone, Debug)]
pub struct BodyLimits {
    /// Largest body of `POST /v1/sessions/{id}/messages`.
    pub append_bytes: usize,
    /// Largest body of a create or update of a session (title and metadata).
    pub session_bytes: usize,
    /// Largest body of the small commands (usage deltas).
    pub small_bytes: usize,
    /// Largest body of `POST /v1/sessions/import` (a session's NDJSON export).
    pub import_bytes: usize,
    /// Body bytes all requests in flight may hold at once.
    pub memory_bytes: usize,
    /// Bytes of large answers (see [`crate::LARGE_ANSWER_BYTES`]) all requests in flight may
    /// hold at once, until they are sent.
    pub answer_memory_bytes: usize,
    /// How long a body may take beyond what the minimum rate allows.
    pub grace: Duration,
    /// Bytes per second a body must arrive at, at least, after the grace.
    pub min_bytes_per_second: u64,
}

impl BodyLimits {
    /// Limits that fit the engine's input limits: a session body holds at most a title and a
    /// metadata object; an append is capped at `append_bytes` (8 MiB by default), which the
    /// operator raises when clients append many large messages at once.
    pub fn for_engine(limits: &soloist::Limits) -> Self {
        Self {
            append_bytes: 8 * 1024 * 1024,
            // The metadata is measured as sent; a title may be escaped six bytes per byte
            // (`\u0000`); plus the id and the JSON around them.
            session_bytes: limits.max_json_bytes + 6 * limits.max_text_bytes + 1024,
            small_bytes: 1024,
            import_bytes: 64 * 1024 * 1024,
            memory_bytes: 128 * 1024 * 1024,
            answer_memory_bytes: 128 * 1024 * 1024,
            grace: Duration::from_secs(10),
            min_bytes_per_second: 64 * 1024,
        }
    }
}

/// The shared budget of body bytes in flight.
#[derive(Debug)]
pub struct BodyBudget {
    limits: BodyLimits,
    /// One permit per KiB of body held by a request in flight.
    kibibytes: Semaphore,
}

impl BodyBudget {
    /// A budget of `limits.memory_bytes`.
    pub fn new(limits: BodyLimits) -> Arc<Self> {
        let kibibytes = Semaphore::new(limits.memory_bytes.div_ceil(1024));
        Arc::new(Self { limits, kibibytes })
    }

    /// The limits.
    pub fn limits(&self) -> &BodyLimits {
        &self.limits
    }
}

/// Which limit a body type is held to.
pub trait BodyKind {
    /// The largest body of this kind.
    fn limit(limits: &BodyLimits) -> usize;
}

/// A JSON body parsed into `T` under the limits above; every refusal is an [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + BodyKind + Send> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let budget = &state.bodies;
        let limit = T::limit(budget.limits());
        let bytes = read_body(request, limit, budget).await?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| invalid_json(&error))
    }
}

fn invalid_json(error: &serde_json::Error) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidInput,
        format!("invalid JSON body: {error}"),
    )
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!("the request body is larger than this route's limit of {limit} bytes"),
    )
}

/// The media type of a request (its `content-type` without parameters, lower case); `None`
/// when it has none.
pub(crate) fn media_type(request: &Request) -> Option<String> {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|essence| essence.trim().to_ascii_lowercase())
}

/// Reads a whole JSON body under the limit, the budget and the minimum rate.
async fn read_body(
    request: Request,
    limit: usize,
    budget: &BodyBudget,
) -> Result<Vec<u8>, ApiError> {
    match media_type(&request) {
        Some(essence) if essence == "application/json" || essence.ends_with("+json") => {}
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "the body must be JSON (content-type: application/json)",
            ));
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "missing content-type: application/json",
            ));
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<usize>().ok());
    let mut bytes = Vec::with_capacity(declared.unwrap_or(limit).min(limit).min(64 * 1024));
    let _reserved = read_frames(request, limit, budget, |data| {
        bytes.extend_from_slice(data);
        Ok(())
    })
    .await?;
    Ok(bytes)
}

/// Reads a body under the limit, the budget and the minimum rate, handing each piece to
/// `take` as it arrives (an error from `take` ends the read with it); returns the body's
/// reservation in the budget, to hold while what was made of the body is in use.
pub(crate) async fn read_frames(
    request: Request,
    limit: usize,
    budget: &BodyBudget,
    mut take: impl FnMut(&[u8]) -> Result<(), ApiError>,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    let headers = request.headers();
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidInput, "invalid content-length"))?,
        ),
    };
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(limit));
    }
    // The budget is taken as bytes arrive, never for what a request declares: a request that
    // sends nothing holds nothing (and times out after the grace), and one budget share
    // cannot be claimed by a length alone.
    let Ok(mut held) = budget.kibibytes.try_acquire_many(0) else {
        // Closed never happens: the semaphore lives as long as the server.
        return Err(busy());
    };
    let limits = &budget.limits;
    let started = Instant::now();
    // The deadline moves with what has arrived: the grace, then the minimum rate.
    let deadline_for = |bytes: usize| {
        started
            + limits.grace
            + Duration::from_secs_f64(bytes as f64 / limits.min_bytes_per_second as f64)
    };
    let mut body = request.into_body();
    let mut read = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline_for(read), body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::BodyTimeout,
                    format!(
                        "the request body arrived slower than {} bytes per second",
                        limits.min_bytes_per_second
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!("the request body could not be read: {error}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if read + data.len() > limit {
                return Err(too_large(limit));
            }
            read += data.len();
            // No waiting for room: bodies that hold budget while they wait for more could
            // wait for each other, and what is held is bytes that did arrive.
            let needed = read.div_ceil(1024).saturating_sub(held.num_permits());
            if needed > 0 {
                let more = u32::try_from(needed)
                    .ok()
                    .and_then(|needed| budget.kibibytes.try_acquire_many(needed).ok())
                    .ok_or_else(busy)?;
                held.merge(more);
            }
            take(&data)?;
        }
    }
    Ok(held)
}

/// The answer when the bodies in flight hold the whole budget.
fn busy() -> ApiError {
    ApiError::new(
        ErrorCode::Busy,
        "too many large request bodies in flight; retry",
    )
}
