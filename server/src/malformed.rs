//! The JSON error for requests hyper answers itself.
//!
//! A request whose head hyper cannot parse never reaches the service: hyper writes an answer of
//! its own, a bare head with `content-length: 0` (`Server::on_error` in hyper's `proto/h1`), and
//! closes the connection. hyper has no hook to give that answer a body, so the connection's
//! socket ([`crate::serve`]) recognises the head by its exact bytes, when no request of the
//! connection is in flight, and writes the JSON error answer of [`automatic_answer`] instead.

use axum::http::StatusCode;

use crate::error::{ApiError, ErrorCode};

/// The most a request head (request line and header fields) may take (hyper's
/// `max_header_size`); a longer one is answered 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// hyper's limit on a request's header fields; more are answered 431 too.
const MAX_HEADER_FIELDS: usize = 100;

/// The error codes of the statuses hyper answers a request head with.
const AUTOMATIC: [ErrorCode; 3] = [
    ErrorCode::InvalidRequest,
    ErrorCode::UriTooLong,
    ErrorCode::HeadersTooLarge,
];

/// The length of an IMF-fixdate (`Mon, 30 Nov 2026 13:06:53 GMT`), the value of hyper's `date`.
const DATE_LENGTH: usize = 29;

/// One of hyper's automatic answers, found at the end of bytes being written.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Automatic<'a> {
    /// Where it starts in the bytes: what precedes it is the end of an earlier answer.
    pub(crate) start: usize,
    version: &'a [u8],
    status: StatusCode,
    code: ErrorCode,
    date: &'a [u8],
}

/// Whether `written` ends with an answer of hyper's own to a head it could not parse: exactly
/// `HTTP/1.x <status> <reason>\r\n[connection: close\r\n]content-length: 0\r\ndate: <date>\r\n\r\n`
/// with one of the statuses of [`AUTOMATIC`] (hyper writes `connection: close` unless the
/// client spoke HTTP/1.0). No answer of the app looks like that: its errors all have a JSON
/// body, and a body never ends with a bare CRLF.
pub(crate) fn automatic_answer(written: &[u8]) -> Option<Automatic<'_>> {
    let rest = written.strip_suffix(b"\r\n\r\n")?;
    let (rest, date) = rest.split_at(rest.len().checked_sub(DATE_LENGTH)?);
    if !date
        .iter()
        .all(|byte| byte.is_ascii_graphic() || *byte == b' ')
    {
        return None;
    }
    let rest = rest.strip_suffix(b"content-length: 0\r\ndate: ")?;
    let rest = rest.strip_suffix(b"connection: close\r\n").unwrap_or(rest);
    let rest = rest.strip_suffix(b"\r\n")?;
    AUTOMATIC.into_iter().find_map(|code| {
        let status = code.status();
        let reason = status.canonical_reason()?;
        let rest = rest
            .strip_suffix(reason.as_bytes())?
            .strip_suffix(b" ")?
            .strip_suffix(status.as_str().as_bytes())?
            .strip_suffix(b" ")?;
        let version = [b"HTTP/1.1", b"HTTP/1.0"]
            .into_iter()
            .find(|version| rest.ends_with(*version))?;
        Some(Automatic {
            start: rest.len() - version.len(),
            version,
            status,
            code,
            date,
        })
    })
}

impl Automatic<'_> {
    /// The answer to write instead: the same status and date, with the JSON error and
    /// `connection: close`.
    pub(crate) fn json(&self) -> Vec<u8> {
        let message = match self.status {
            StatusCode::URI_TOO_LONG => "the request URI is too long".to_owned(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
                "the request head is too large: at most {} KiB and {MAX_HEADER_FIELDS} header fields",
                MAX_HEAD_BYTES / 1024
            ),
            _ => "malformed HTTP request".to_owned(),
        };
        let body = ApiError::new(self.code, message).body().to_string();
        let mut answer = Vec::with_capacity(160 + body.len());
        answer.extend_from_slice(self.version);
        answer.extend_from_slice(
            format!(
                " {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\ndate: ",
                self.status.as_str(),
                self.status.canonical_reason().unwrap_or_default(),
                body.len()
            )
            .as_bytes(),
        );
        answer.extend_from_slice(self.date);
        answer.extend_from_slice(b"\r\n\r\n");
        answer.extend_from_slice(body.as_bytes());
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: &str = "Mon, 30 Nov 2026 13:06:53 GMT";

    #[test]
    fn recognises_hypers_automatic_answers() {
        let head = format!(
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"
        );
        let found = automatic_answer(head.as_bytes()).expect("a 400");
        assert_eq!(found.start, 0);
        let json = String::from_utf8(found.json()).expect("UTF-8");
        let body = r#"{"error":{"code":"invalid_request","message":"malformed HTTP request"}}"#;
        assert_eq!(
            json,
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\ndate: {DATE}\r\n\r\n{body}",
                body.len()
            )
        );

        // After the end of an earlier answer, and from an HTTP/1.0 client.
        let earlier = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        let head = format!(
            "{earlier}HTTP/1.0 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
             date: {DATE}\r\n\r\n"
        );
        let found = automatic_answer(head.as_bytes()).expect("a 431");
        assert_eq!(found.start, earlier.len());
        let json = String::from_utf8(found.json()).expect("UTF-8");
        assert!(json.starts_with("HTTP/1.0 431 Request Header Fields Too Large\r\n"));
        assert!(json.contains(r#""code":"headers_too_large""#), "{json}");

        let head = format!(
            "HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"
        );
        let found = automatic_answer(head.as_bytes()).expect("a 414");
        assert!(
            String::from_utf8(found.json())
                .expect("UTF-8")
                .contains("uri_too_long")
        );
    }

    #[test]
    fn leaves_other_answers_alone() {
        for other in [
            // The app's own 400, its 204, and a head without a body of another status.
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 content-length: 0\r\ndate: {DATE}\r\n\r\n"
            ),
            format!("HTTP/1.1 204 No Content\r\ndate: {DATE}\r\n\r\n"),
            format!(
                "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\n"
            ),
            format!(
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: {DATE}\r\n\r\nx"
            ),
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".to_owned(),
            String::new(),
            "\r\n\r\n".to_owned(),
        ] {
            assert_eq!(automatic_answer(other.as_bytes()), None, "{other:?}");
        }
    }
}
