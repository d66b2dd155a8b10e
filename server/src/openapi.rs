//! The API's OpenAPI 3.1 description, generated from the code and served at `GET /openapi.json`
//! (the same bytes are checked in as `docs/openapi.json`; a test fails when they differ).
//!
//! Built with utoipa 5 and utoipa-axum rather than aide and schemars: utoipa describes plain
//! axum handlers (an attribute next to each handler, derives on the wire types) and
//! utoipa-axum registers each route from that same attribute, so a route's path and method are
//! written once, for the router and the description alike, while the router stays an ordinary
//! `axum::Router` with our own extractors, fallbacks and layers. aide would need its own router
//! type and an `OperationInput` implementation for every extractor, and its schemas come from
//! schemars, a second derive beside serde on every engine type. (utoipa 6 needs a newer Rust
//! than the engine's MSRV, so 5.)
//!
//! What is written by hand here, because no derive can see it: the headers the extractors read
//! (`x-user-id`, `Idempotency-Key`, `If-Match`, and the path ids), the error body and the error
//! codes each route can answer ([`ErrorCode`] is the list of every code; the route's entry in
//! the `route_errors!` table below says which of them it may answer).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::extensions::ExtensionsBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::{Ref, RefOr, Required, Response};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};

use crate::error::ErrorCode::*;
use crate::error::{ErrorBody, ErrorCode, ErrorDetail};
use crate::{IdempotencyKey, IfMatch, MAX_USER_ID_BYTES, MessagePath, SessionPath, UserId};

/// The description as served: pretty-printed JSON with a trailing newline, rendered once.
pub fn openapi_json() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let mut text = crate::openapi()
            .to_pretty_json()
            .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
        text.push('\n');
        text
    });
    &DOCUMENT
}

/// What the description says beside its paths: the API as a whole, the schemas no route names
/// directly, and the tags.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "soloist-server",
        description = "A chat-session server: sessions of OpenAI-format messages, appended \
            in order, streamed as drafts, followed live over Server-Sent Events.\n\n\
            Every `/v1` route takes the caller's identity in the `x-user-id` header, set by a \
            trusted authentication proxy in front of the server. Every error is a JSON body \
            `{\"error\": {\"code\", \"message\"}}` whose `code` is one of `ErrorCode`; each \
            operation lists the codes it may answer (also as `x-error-codes` on each error \
            response). Answers with status 429 or 503 carry `Retry-After` (seconds). Any \
            request may send `x-request-id`; the answer carries it back (or a new one).\n\n\
            Besides each operation's own, any request can be answered before it reaches a \
            route: `invalid_request` (400), `uri_too_long` (414), `headers_too_large` (431), \
            `too_many_connections` (503); a path no route has is `not_found` (404), a method \
            the route does not take `method_not_allowed` (405).",
        license(name = "MIT OR Apache-2.0"),
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, DeltaEvent, Health, HealthMember)),
    tags(
        (name = "sessions", description = "Sessions: create, read, list, update, delete, export."),
        (name = "messages", description = "Appending messages, and streaming a draft reply."),
        (name = "events", description = "Following a session live (Server-Sent Events)."),
        (name = "operations", description = "Health, metrics and this description."),
    ),
)]
pub struct ApiDoc;

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        let mut description = String::from(
            "Every code an error answer can carry, with its status and what it means:\n",
        );
        for code in ErrorCode::ALL {
            description.push_str(&format!(
                "\n- `{}` ({}): {}",
                code.as_str(),
                code.status().as_u16(),
                code.meaning()
            ));
        }
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(ErrorCode::ALL.iter().map(|code| code.as_str())))
            .description(Some(description))
            .into()
    }
}

impl ToSchema for ErrorCode {}

/// The data of a `message.delta` event: text a draft grew by, once durable.
#[derive(serde::Serialize, ToSchema)]
pub struct DeltaEvent<'a> {
    /// The draft's sequence.
    pub seq: i64,
    /// Bytes of the draft's content before this text.
    pub offset: u64,
    /// The text.
    pub content: &'a str,
}

/// `GET /healthz` while serving.
#[derive(serde::Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` (a draining server answers 503 `shutting_down` instead).
    pub status: HealthStatus,
    /// This process, when it is a member of a cluster (`null` when it is not).
    #[schema(required = true)]
    pub member: Option<HealthMember>,
    /// The live members as this process last read them, itself included.
    pub members: Vec<HealthMember>,
}

/// The `status` of `GET /healthz`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Serving.
    Ok,
}

/// A member of the cluster: a process sharing the database.
#[derive(serde::Serialize, ToSchema)]
pub struct HealthMember {
    /// The process's id.
    pub id: soloist::uuid::Uuid,
    /// Where its peers reach it.
    pub address: String,
}

/// A string parameter's schema.
fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn header(name: &str, required: bool, description: &str, schema: ObjectBuilder) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(if required {
            Required::True
        } else {
            Required::False
        })
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

fn uuid_path(name: &str, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(description))
        .schema(Some(
            string_schema().format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))),
        ))
        .build()
}

/// Visible ASCII, `!` to `~`: no spaces, no control characters.
const VISIBLE_ASCII: &str = "^[!-~]+$";

impl IntoParams for UserId {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![header(
            "x-user-id",
            true,
            "The caller, as the trusted authentication proxy in front of the server sets it: \
             1 to 1,024 characters of visible ASCII. Missing or empty is `unauthenticated` \
             (401); several, or other characters, `invalid_input` (400).",
            string_schema()
                .min_length(Some(1))
                .max_length(Some(MAX_USER_ID_BYTES))
                .pattern(Some(VISIBLE_ASCII)),
        )]
    }
}

impl IntoParams for IdempotencyKey {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![header(
            "Idempotency-Key",
            false,
            "Makes the request retryable: a retry with the same key (within 24 hours by \
             default) applies nothing and gets the first answer; the same key with another \
             request is `idempotency_key_reused` (409). 1 to 255 characters of visible ASCII.",
            string_schema()
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some(VISIBLE_ASCII)),
        )]
    }
}

impl IntoParams for IfMatch {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![header(
            "If-Match",
            false,
            "Applies the write only if the session is still at this version: its `ETag` as a \
             previous answer gave it (such as `\"7\"`, quotes included), or `*` for any. A \
             session at another version is `precondition_failed` (412) and nothing changes.",
            string_schema().pattern(Some(r#"^\s*("[0-9]+"|\*)\s*$"#)),
        )]
    }
}

impl IntoParams for SessionPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![uuid_path(
            "id",
            "The session id; anything but a UUID is `invalid_input` (400).",
        )]
    }
}

impl IntoParams for MessagePath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            uuid_path(
                "id",
                "The session id; anything but a UUID is `invalid_input` (400).",
            ),
            uuid_path(
                "message_id",
                "The draft's message id; anything but a UUID is `invalid_input` (400).",
            ),
        ]
    }
}

/// The `Last-Event-ID` header of `GET /v1/sessions/{id}/events`.
pub struct LastEventId;

impl IntoParams for LastEventId {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![header(
            "Last-Event-ID",
            false,
            "The `id` of the last event a reconnecting client received (`7`, `7:120` or \
             `8/7:120`): the stream resumes right after it, with no gap and no repeat, and \
             `after_seq` is ignored. Anything else is `invalid_input` (400).",
            string_schema().pattern(Some(r"^\s*(-?[0-9]+|([0-9]+/)?[0-9]+:[0-9]+)\s*$")),
        )]
    }
}

/// The error answers for `codes`: one response per status, listing its codes.
fn error_responses(codes: &[&[ErrorCode]]) -> BTreeMap<String, RefOr<Response>> {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for code in codes.iter().flat_map(|codes| codes.iter()) {
        let listed = by_status.entry(code.status().as_u16()).or_default();
        if !listed.contains(code) {
            listed.push(*code);
        }
    }
    by_status
        .into_iter()
        .map(|(status, codes)| {
            let mut description = String::from("An error:");
            for code in &codes {
                description.push_str(&format!("\n- `{}`: {}", code.as_str(), code.meaning()));
            }
            let names: Vec<&str> = codes.iter().map(|code| code.as_str()).collect();
            let mut response = ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .extensions(Some(
                    ExtensionsBuilder::new()
                        .add("x-error-codes", serde_json::json!(names))
                        .build(),
                ));
            if status == 429 || status == 503 {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        )
                        .description(Some("Seconds to wait before retrying."))
                        .build(),
                );
            }
            (status.to_string(), response.build().into())
        })
        .collect()
}

/// Any request: a handler that panicked.
const ANY: &[ErrorCode] = &[Internal];
/// Routes that read `x-user-id` (and count against the per-user rate limit).
const USER: &[ErrorCode] = &[Unauthenticated, InvalidInput, RateLimited];
/// Routes that name a session in their path.
const SESSION: &[ErrorCode] = &[InvalidInput, NotFound, Forbidden];
/// Routes that read a JSON body.
const BODY: &[ErrorCode] = &[
    UnsupportedMediaType,
    InvalidInput,
    TooLarge,
    BodyTimeout,
    Busy,
];
/// Commands the engine runs.
const COMMAND: &[ErrorCode] = &[
    Overloaded,
    ShuttingDown,
    ActorFailed,
    Timeout,
    OwnerUnreachable,
    Storage,
];
/// Commands that write.
const WRITE: &[ErrorCode] = &[Conflict];

/// Declares, for each route, a type whose `IntoResponses` are the route's error answers.
macro_rules! route_errors {
    ($($(#[doc = $doc:literal])+ $name:ident: [$($codes:expr),+ $(,)?];)+) => {
        $(
            $(#[doc = $doc])+
            pub struct $name;

            impl utoipa::IntoResponses for $name {
                fn responses() -> BTreeMap<String, RefOr<Response>> {
                    error_responses(&[$($codes),+])
                }
            }
        )+
    };
}

route_errors! {
    /// `GET /healthz`.
    HealthErrors: [ANY, &[ShuttingDown]];
    /// `GET /metrics`, `GET /openapi.json`.
    PlainErrors: [ANY];
    /// `POST /v1/sessions`.
    CreateErrors: [ANY, USER, BODY, COMMAND, WRITE,
        &[IdempotencyKeyReused, SessionIdTaken, QuotaExceeded]];
    /// `GET /v1/sessions`.
    ListErrors: [ANY, USER, COMMAND, &[Busy]];
    /// `GET /v1/sessions/{id}`, `GET /v1/sessions/{id}/export`.
    ReadErrors: [ANY, USER, SESSION, COMMAND, &[Busy]];
    /// `PATCH /v1/sessions/{id}`.
    UpdateErrors: [ANY, USER, SESSION, BODY, COMMAND, WRITE,
        &[PreconditionFailed, IdempotencyKeyReused]];
    /// `DELETE /v1/sessions/{id}`.
    DeleteErrors: [ANY, USER, SESSION, COMMAND, WRITE, &[PreconditionFailed, IdempotencyKeyReused]];
    /// `POST /v1/sessions/{id}/messages`.
    AppendErrors: [ANY, USER, SESSION, BODY, COMMAND, WRITE, &[
        PreconditionFailed,
        MessageIdReused,
        TurnInProgress,
        UnknownToolCall,
        ToolCallAnswered,
    ]];
    /// `POST /v1/sessions/{id}/usage`.
    UsageErrors: [ANY, USER, SESSION, BODY, COMMAND, WRITE, &[IdempotencyKeyReused]];
    /// `POST /v1/sessions/{id}/messages/{message_id}/deltas`.
    DeltasErrors: [ANY, USER, SESSION, BODY, COMMAND, WRITE,
        &[MessageNotFound, MessageFinished, OffsetGap, OffsetConflict]];
    /// `POST /v1/sessions/{id}/messages/{message_id}/finish`.
    FinishErrors: [ANY, USER, SESSION, BODY, COMMAND, WRITE,
        &[MessageNotFound, MessageFinished, FinishConflict]];
    /// `GET /v1/sessions/{id}/events`.
    EventsErrors: [ANY, USER, SESSION, COMMAND];
    /// `DELETE /v1/users/me/sessions`.
    EraseAllErrors: [ANY, USER, COMMAND];
    /// `POST /v1/sessions/import`.
    ImportErrors: [ANY, USER, BODY, COMMAND, WRITE, &[
        NotFound,
        Forbidden,
        QuotaExceeded,
        SessionIdTaken,
        MessageIdReused,
        UnknownToolCall,
        ToolCallAnswered,
        TurnInProgress,
    ]];
}
