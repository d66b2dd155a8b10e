//! `POST /v1/sessions/import`: a session's export (NDJSON) back in, as one session created with
//! all its messages in one transaction.
//!
//! The body is what `GET /v1/sessions/{id}/export` answers: a line with the session, then a line
//! per message in sequence order. It is parsed line by line as it arrives, under the route's
//! body limit and the shared body budget (whose reservation is held until the import is
//! answered: the parsed messages take about what the body did), and refused at the first line
//! that is not what it should be, with that line's number. The checks of the messages
//! themselves are the engine's ([`soloist::ImportSession`]), the same as an append's; their
//! errors name the line too.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde::de::IgnoredAny;
use soloist::{Error, ImportSession, ImportedMessage, RawJson, SessionId, Usage};

use crate::api::SessionSummary;
use crate::body::{media_type, read_frames};
use crate::{ApiError, AppState, ErrorCode, UserId, with_etag};

/// The media types an import's body may be sent as: the one an export answers with, and the
/// other names the same format goes by.
const NDJSON_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
];

/// The first line: the session as an export writes it (as `GET` shows it, without messages).
/// Whose it was and when it was created are read and set aside: the importer owns the imported
/// session, which is created now.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionLine {
    session_id: SessionId,
    title: Option<String>,
    metadata: Option<RawJson>,
    usage: Option<Usage>,
    /// The messages the session had when the export began: a file with fewer was cut short.
    message_count: Option<i64>,
    #[allow(dead_code)]
    user_id: Option<IgnoredAny>,
    #[allow(dead_code)]
    created_at: Option<IgnoredAny>,
    #[allow(dead_code)]
    updated_at: Option<IgnoredAny>,
    /// The time to live is not carried over: the imported session gets the server's default,
    /// as a create without one does.
    #[allow(dead_code)]
    ttl_seconds: Option<IgnoredAny>,
    #[allow(dead_code)]
    expires_at: Option<IgnoredAny>,
}

/// The line an export that failed midway ends with.
#[derive(Deserialize)]
struct ErrorLine {
    error: serde_json::Value,
}

/// What has been read of the body so far.
struct Lines {
    max_messages: usize,
    /// Lines seen, blank ones included.
    number: u32,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    session: Option<SessionLine>,
    messages: Vec<ImportedMessage>,
    /// The line number of each message.
    numbers: Vec<u32>,
}

fn invalid(number: u32, reason: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, format!("line {number}: {reason}"))
}

impl Lines {
    fn new(max_messages: usize) -> Self {
        Self {
            max_messages,
            number: 0,
            partial: Vec::new(),
            session: None,
            messages: Vec::new(),
            numbers: Vec::new(),
        }
    }

    /// Takes the next piece of the body: each line it ends, then keeps the rest.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), ApiError> {
        while let Some(end) = data.iter().position(|&byte| byte == b'\n') {
            if self.partial.is_empty() {
                self.line(&data[..end])?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&data[..end]);
                self.line(&line)?;
            }
            data = &data[end + 1..];
        }
        self.partial.extend_from_slice(data);
        Ok(())
    }

    /// The body ended: its last line (which needs no newline), then the whole.
    fn finish(mut self) -> Result<(SessionLine, Vec<ImportedMessage>, Vec<u32>), ApiError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
        }
        let Some(session) = self.session else {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "the body is empty: an import is a session's export, its first line the session",
            ));
        };
        let count = self.messages.len() as i64;
        if let Some(expected) = session.message_count.filter(|&expected| expected > count) {
            return Err(invalid(
                self.number + 1,
                format!(
                    "the file ends after {count} messages, but its session line says the session \
                     had {expected}: it was cut short; export the session again"
                ),
            ));
        }
        Ok((session, self.messages, self.numbers))
    }

    /// One line: the session's if it is the first, else a message. Blank lines are skipped.
    fn line(&mut self, line: &[u8]) -> Result<(), ApiError> {
        self.number += 1;
        let number = self.number;
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let failed_export = || {
            serde_json::from_slice::<ErrorLine>(line).ok().map(|line| {
                invalid(
                    number,
                    format!(
                        "the export this file comes from failed here ({}); export the session \
                         again",
                        line.error
                    ),
                )
            })
        };
        if self.session.is_none() {
            let session = serde_json::from_slice::<SessionLine>(line).map_err(|error| {
                failed_export().unwrap_or_else(|| {
                    invalid(
                        number,
                        format!("not the session's line of an export: {error}"),
                    )
                })
            })?;
            self.session = Some(session);
            return Ok(());
        }
        if self.messages.len() == self.max_messages {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "line {number}: an import carries at most {} messages",
                    self.max_messages
                ),
            ));
        }
        let message = serde_json::from_slice::<ImportedMessage>(line).map_err(|error| {
            failed_export()
                .unwrap_or_else(|| invalid(number, format!("not a message of an export: {error}")))
        })?;
        self.messages.push(message);
        self.numbers.push(number);
        Ok(())
    }
}

/// Is `media` one of [`NDJSON_TYPES`]?
fn is_ndjson(media: Option<&str>) -> bool {
    media.is_some_and(|media| NDJSON_TYPES.contains(&media))
}

/// Import a session.
///
/// The body is a session's export (NDJSON: the session's line, then its messages in order).
/// The session is created under its id, with its title, metadata, usage and every message
/// (ids, fields, statuses and times kept; a draft in progress stored `incomplete`), owned by
/// the caller, in one transaction: all or nothing. `201` with the session (as a create
/// answers) when imported; `200` with it when the caller's session of that id holds the file's
/// messages already (a repeat changes nothing); `409` when it holds others; `404` when the id
/// is another user's session (or a deleted one), as for every command on it. A refused line is
/// named in the error's message (`line 7: ...`).
#[utoipa::path(
    post,
    path = "/v1/sessions/import",
    tag = "sessions",
    params(UserId),
    request_body(
        content = String,
        content_type = "application/x-ndjson",
        description = "A session's export: its line, then one line per message."
    ),
    responses(
        (status = 201, description = "Imported.", body = SessionSummary,
            headers(("ETag" = String, description = "The session's version."))),
        (status = 200, description = "Imported before: nothing changed.", body = SessionSummary,
            headers(("ETag" = String, description = "The session's version."))),
        crate::openapi::ImportErrors,
    ),
)]
pub(crate) async fn import_session(
    State(state): State<AppState>,
    UserId(user_id): UserId,
    request: Request,
) -> Result<Response, ApiError> {
    let media = media_type(&request);
    if !is_ndjson(media.as_deref()) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "an import is NDJSON, as an export answers it (content-type: application/x-ndjson)",
        ));
    }
    let bodies = state.bodies.clone();
    let limit = bodies.limits().import_bytes;
    let mut lines = Lines::new(state.engine.config().limits.max_import_messages);
    let _reserved = read_frames(request, limit, &bodies, |data| lines.feed(data)).await?;
    let (session, messages, numbers) = lines.finish()?;
    let imported = state
        .engine
        .import_session(ImportSession {
            user_id,
            session_id: session.session_id,
            title: session.title,
            metadata: session.metadata,
            usage: session.usage.unwrap_or_default(),
            messages,
        })
        .await
        .map_err(|error| at_line(error, &numbers))?;
    let status = if imported.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let version = imported.session.version;
    Ok(with_etag(
        status,
        version,
        SessionSummary::from(imported.session),
    ))
}

/// The engine's refusal of a field, with the line of the file it is on (`numbers`: each
/// message's line).
fn at_line(error: Error, numbers: &[u32]) -> ApiError {
    let field = match &error {
        Error::InvalidInput { field, .. } | Error::TooLarge { field, .. } => field.as_str(),
        _ => return ApiError::from(error),
    };
    let number = match field.strip_prefix("messages[") {
        Some(rest) => rest
            .split(']')
            .next()
            .and_then(|index| index.parse::<usize>().ok())
            .and_then(|index| numbers.get(index).copied()),
        None if ["title", "metadata", "usage"].contains(&field) => Some(1),
        None => None,
    };
    match number {
        Some(number) => {
            let message = format!("line {number}: {error}");
            ApiError::from(error).with_message(message)
        }
        None => ApiError::from(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = r#"{"session_id":"0190f1c4-4a3e-7000-8000-000000000001","user_id":"alice","title":"t","metadata":{},"usage":{"prompt_tokens":1,"completion_tokens":2},"message_count":2,"created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z"}"#;
    const FIRST: &str = r#"{"seq":0,"id":"0190f1c4-4a3e-7000-8000-000000000002","role":"user","content":"hi","status":"completed","created_at":"2024-01-01T00:00:00Z"}"#;
    const SECOND: &str = r#"{"seq":1,"id":"0190f1c4-4a3e-7000-8000-000000000003","role":"assistant","content":"hello","status":"completed","created_at":"2024-01-01T00:00:01Z"}"#;

    fn read(pieces: &[&[u8]]) -> Result<(SessionLine, Vec<ImportedMessage>, Vec<u32>), String> {
        let mut lines = Lines::new(10);
        for piece in pieces {
            lines
                .feed(piece)
                .map_err(|error| error.body().to_string())?;
        }
        lines.finish().map_err(|error| error.body().to_string())
    }

    #[test]
    fn lines_split_anywhere_read_the_same() {
        let body = format!("{SESSION}\n{FIRST}\r\n\n{SECOND}");
        let whole = read(&[body.as_bytes()]).expect("whole");
        assert_eq!(whole.1.len(), 2);
        assert_eq!(whole.2, vec![2, 4], "the blank line counts");
        assert_eq!(
            whole.0.usage,
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 2
            })
        );
        for split in 0..body.len() {
            let (a, b) = body.as_bytes().split_at(split);
            let parts = read(&[a, b]).expect("split");
            assert_eq!(parts.1, whole.1, "split at {split}");
            assert_eq!(parts.2, whole.2);
        }
    }

    #[test]
    fn a_bad_line_is_named() {
        let body = format!("{SESSION}\n{FIRST}\n{{\"role\": \"user\"\n{SECOND}\n");
        let error = read(&[body.as_bytes()]).expect_err("malformed");
        assert!(error.contains("line 3:"), "{error}");
        let body = format!("{SESSION}\n{FIRST}\n{{\"error\":{{\"code\":\"storage\"}}}}\n");
        let error = read(&[body.as_bytes()]).expect_err("failed export");
        assert!(
            error.contains("line 3:") && error.contains("failed here"),
            "{error}"
        );
        let body = format!("{SESSION}\n{FIRST}\n");
        let error = read(&[body.as_bytes()]).expect_err("cut short");
        assert!(error.contains("cut short"), "{error}");
        let body = format!("{FIRST}\n");
        let error = read(&[body.as_bytes()]).expect_err("no session line");
        assert!(error.contains("line 1:"), "{error}");
        let error = read(&[b"\n\n"]).expect_err("empty");
        assert!(error.contains("empty"), "{error}");
    }

    #[test]
    fn more_messages_than_the_limit_stop_the_read() {
        let mut lines = Lines::new(1);
        let body = format!("{SESSION}\n{FIRST}\n{SECOND}\n");
        let error = lines.feed(body.as_bytes()).expect_err("over the limit");
        assert_eq!(error.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn engine_errors_name_their_line() {
        let error = at_line(Error::invalid("messages[1].content", "bad"), &[2, 4]);
        assert!(
            error.body().to_string().contains("line 4:"),
            "{:?}",
            error.body()
        );
        let error = at_line(Error::invalid("metadata", "bad"), &[]);
        assert!(error.body().to_string().contains("line 1:"));
        assert!(is_ndjson(Some("application/x-ndjson")));
        assert!(!is_ndjson(Some("application/json")));
        assert!(!is_ndjson(None));
    }
}
