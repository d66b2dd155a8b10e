//! # soloist
//!
//! A single-writer, actor-per-session engine that chat servers link in to keep their
//! conversations safe under concurrent load. Each live session is owned by one tokio task fed
//! through a bounded mailbox: it assigns sequence numbers in memory, batches what queued up while
//! its previous write was in flight, and answers each command only after the transaction holding
//! it committed. Across processes, the database's unique constraints and a per-session version
//! check catch every interleaving, and the engine resolves them by reloading and restaging:
//! callers never see a raw constraint error.
//!
//! ```no_run
//! # async fn demo() -> soloist::Result<()> {
//! use soloist::{Engine, NewMessage, SessionId};
//!
//! let engine = Engine::connect("sqlite://chat.db").await?;
//! let session = engine.session("alice", SessionId::new());
//! session.create(Some("Trip planning".into()), None).await?;
//! let sequences = session
//!     .append(vec![NewMessage::user("Where should we go?")])
//!     .await?;
//! assert_eq!(sequences, vec![0]);
//! let page = session.get(None, None).await?;
//! assert_eq!(page.messages.len(), 1);
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! ## Layout
//! - [`engine`]: the [`Engine`] facade; [`SessionHandle`], one session acting as one user.
//! - [`command`]: the message-passing API, commands as data and their replies.
//! - [`model`]: the chat data model (messages, sessions, usage).
//! - [`config`]: [`EngineConfig`] and input [`Limits`].
//! - [`error`]: the one public [`Error`] type.
//! - [`stats`]: what the engine counts and measures, emitted through the `metrics` facade and
//!   read back as [`Stats`].
//! - [`subscription`]: [`MessageStream`], following a session's messages as they commit.
//! - `openapi` (feature `openapi`): OpenAPI schemas of the wire types whose JSON is written by
//!   hand; the others derive `utoipa::ToSchema`.
//! - `session`: the session actor, the only code that changes a session.
//! - `writer`: the writer stage that combines many sessions' batches into one transaction.
//! - `store`: the SQLite and PostgreSQL backends and their migrations.
//! - `feed`: the change feed between processes sharing a database; on PostgreSQL
//!   (`store::postgres::changes`), announcing committed versions to the others and catching up
//!   on theirs (LISTEN/NOTIFY).
//!
//! The generic actor runtime (activation, mailboxes, passivation, supervision, drain) is the
//! `soloist-actors` crate.

mod backoff;
pub mod cluster;
pub mod command;
pub mod config;
mod drafts;
pub mod engine;
pub mod error;
mod fanout;
mod faults;
mod feed;
mod handle;
mod idempotency;
mod members;
pub mod model;
#[cfg(feature = "openapi")]
mod openapi;
mod retention;
mod session;
pub mod stats;
mod store;
pub mod subscription;
mod writer;

pub use command::{
    AddUsage, AppendDeltas, AppendMessages, Appended, Command, CreateSession, Created,
    DeleteSession, Delta, DeltasAppended, FinishMessage, GetSession, ImportSession, Imported,
    ListSessions, MAX_DELTAS, MAX_USAGE_DELTA, MAX_USAGE_TOTAL, MessageFinished, OnBusy, Reply,
    SessionCursor, SessionList, SessionPage, UpdateSession,
};
pub use config::{EngineConfig, Limits, SqliteSync};
pub use engine::Engine;
#[cfg(any(test, feature = "fault-injection"))]
pub use engine::{ChangeFeedPaused, WritesPaused};
pub use error::{Error, Result, StorageError};
pub use handle::SessionHandle;
/// The metrics facade the engine emits through (the same version, for installing a recorder).
pub use metrics;
pub use model::{
    Content, ImportedMessage, Member, Message, MessageStatus, NewMessage, PendingToolCall, RawJson,
    Role, SessionId, SessionInfo, Usage,
};
pub use retention::ErasedSessions;
pub use stats::Stats;
pub use subscription::{MessageStream, Position, StreamEvent};
pub use uuid;

/// The README's example, compiled as a doctest so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
