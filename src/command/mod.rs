//! The message-passing API: commands are plain data (serde-friendly), each answered with a typed
//! [`Reply`] or an [`Error`]. Each command has a file of its own here holding everything about
//! it: its type, its answer, its validation (a command is refused whole, before it reaches its
//! session or any SQL, if any part of it is invalid) and, for a write, how the session's actor
//! stages it. Adding a command means: its file here, its variant in [`Command`] and [`Reply`],
//! its variant in the actor's mailbox (`session::protocol`), and its route in the server.

use serde::{Deserialize, Serialize};

use crate::config::Limits;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::idempotency::{CreateIds, Keyed, check_key};
use crate::model::{SessionId, SessionInfo, Usage};
use crate::session::protocol::{Request, Responder};

mod append;
mod create;
mod delete;
mod get;
mod import;
mod list;
mod stream;
mod update;
mod usage;
mod validate;

pub use append::{AppendMessages, Appended, OnBusy};
pub use create::{CreateSession, Created};
pub use delete::DeleteSession;
pub use get::{DEFAULT_MESSAGE_PAGE, GetSession, SessionPage};
pub use import::{ImportSession, Imported};
pub use list::{DEFAULT_SESSION_PAGE, ListSessions, SessionCursor, SessionList};
pub use stream::{AppendDeltas, Delta, DeltasAppended, FinishMessage, MAX_DELTAS, MessageFinished};
pub use update::UpdateSession;
pub use usage::AddUsage;
pub use validate::{MAX_TTL_SECONDS, MAX_USAGE_DELTA, MAX_USAGE_TOTAL};
pub(crate) use validate::{check_user, validate_page};

/// Every command the engine understands. As JSON, externally tagged:
/// `{"append_messages": {"user_id": ..., "session_id": ..., "messages": [...]}}` (an internal
/// tag would make serde buffer the command, which cannot hold the raw JSON fields).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Create a session.
    CreateSession(CreateSession),
    /// Append messages to a session.
    AppendMessages(AppendMessages),
    /// Read a session's metadata and a page of its messages.
    GetSession(GetSession),
    /// List a user's sessions, newest first.
    ListSessions(ListSessions),
    /// Change a session's title and/or metadata.
    UpdateSession(UpdateSession),
    /// Add token usage deltas.
    AddUsage(AddUsage),
    /// Delete a session and its messages.
    DeleteSession(DeleteSession),
    /// Append text to a draft.
    AppendDeltas(AppendDeltas),
    /// End a draft.
    FinishMessage(FinishMessage),
    /// Create a session with all its messages, as an export gives them.
    ImportSession(ImportSession),
}

impl Command {
    /// Parses a JSON command; a malformed one (unknown role, missing field...) is an
    /// [`Error::InvalidInput`].
    pub fn from_json(json: &str) -> Result<Command> {
        serde_json::from_str(json).map_err(|error| Error::invalid("command", error.to_string()))
    }

    /// Runs the command on `engine`, as one that has travelled `hops` times between
    /// processes.
    pub(crate) async fn execute(self, engine: &Engine, hops: u8) -> Result<Reply> {
        match self {
            Command::CreateSession(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::AppendMessages(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::GetSession(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::ListSessions(list) => engine.list_sessions(list).await.map(Reply::from),
            Command::UpdateSession(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::AddUsage(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::DeleteSession(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::AppendDeltas(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::FinishMessage(c) => engine.run_routed(c, hops).await.map(Reply::from),
            Command::ImportSession(c) => engine.run_routed(c, hops).await.map(Reply::from),
        }
    }
}

/// The answer to a [`Command`], one variant per command; externally tagged like [`Command`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Command::CreateSession`].
    SessionCreated(Created),
    /// Answer to [`Command::AppendMessages`].
    MessagesAppended(Appended),
    /// Answer to [`Command::GetSession`].
    Session(SessionPage),
    /// Answer to [`Command::ListSessions`].
    Sessions(SessionList),
    /// Answer to [`Command::UpdateSession`].
    SessionUpdated(SessionInfo),
    /// Answer to [`Command::AddUsage`]: the new totals.
    UsageAdded(Usage),
    /// Answer to [`Command::DeleteSession`].
    SessionDeleted,
    /// Answer to [`Command::AppendDeltas`].
    DeltasAppended(DeltasAppended),
    /// Answer to [`Command::FinishMessage`].
    MessageFinished(MessageFinished),
    /// Answer to [`Command::ImportSession`].
    SessionImported(Imported),
}

/// Each answer as its [`Reply`] variant and back (what an idempotency record stores and
/// replays).
macro_rules! replies {
    ($($answer:ty => $variant:ident),* $(,)?) => {$(
        impl From<$answer> for Reply {
            fn from(answer: $answer) -> Reply {
                Reply::$variant(answer)
            }
        }

        impl TryFrom<Reply> for $answer {
            type Error = Reply;

            fn try_from(reply: Reply) -> Result<Self, Reply> {
                match reply {
                    Reply::$variant(answer) => Ok(answer),
                    other => Err(other),
                }
            }
        }
    )*};
}

replies! {
    Created => SessionCreated,
    Appended => MessagesAppended,
    SessionPage => Session,
    SessionList => Sessions,
    SessionInfo => SessionUpdated,
    Usage => UsageAdded,
    DeltasAppended => DeltasAppended,
    MessageFinished => MessageFinished,
    Imported => SessionImported,
}

/// A delete answers with nothing.
impl From<()> for Reply {
    fn from((): ()) -> Reply {
        Reply::SessionDeleted
    }
}

impl TryFrom<Reply> for () {
    type Error = Reply;

    fn try_from(reply: Reply) -> Result<(), Reply> {
        match reply {
            Reply::SessionDeleted => Ok(()),
            other => Err(other),
        }
    }
}

/// Each command as its [`Command`] variant (how it travels to another process).
macro_rules! commands {
    ($($command:ident),* $(,)?) => {$(
        impl From<$command> for Command {
            fn from(command: $command) -> Command {
                Command::$command(command)
            }
        }
    )*};
}

commands! {
    CreateSession,
    AppendMessages,
    GetSession,
    ListSessions,
    UpdateSession,
    AddUsage,
    DeleteSession,
    AppendDeltas,
    FinishMessage,
    ImportSession,
}

/// A command addressed to one session's actor: how it is checked, where it goes, and how it
/// travels through the session's mailbox.
pub(crate) trait SessionCommand: Send + Sized + Into<Command> + 'static {
    /// What the command is answered with: one of the [`Reply`] variants' payloads.
    type Reply: Send + 'static + Into<Reply> + TryFrom<Reply>;
    /// The command's name, in spans.
    const NAME: &'static str;

    /// Who sends the command.
    fn user_id(&self) -> &str;

    /// The session the command goes to (once validated: a create may leave it to
    /// [`Self::validate`] to choose).
    fn session_id(&self) -> SessionId;

    /// The session the command goes to, fixed for routing before it is validated (a create
    /// that leaves its id open gets one here, unless its key derives one with `ids`). Unlike
    /// [`Self::validate`], leaves every field the key's fingerprint covers as sent.
    fn place(&mut self, ids: &CreateIds) -> SessionId {
        let _ = ids;
        self.session_id()
    }

    /// Whether the command may create its session (a create, an import): it counts against
    /// the user's sessions.
    fn may_create(&self) -> bool {
        false
    }

    /// Fills in, or checks, the session id where it depends on the ids this server issues
    /// (see [`CreateIds`]): once the key's fingerprint is taken, before [`Self::validate`].
    fn settle_id(&mut self, ids: &CreateIds) -> Result<()> {
        let _ = ids;
        Ok(())
    }

    /// Whether the command must run at the session's owner process (every write; a read that
    /// asks for fresh data) or may run wherever it is received.
    fn at_owner(&self) -> bool {
        true
    }

    /// Checks the command against `limits`; a command that fails is refused whole, before it
    /// reaches its session. Every command checks its sender.
    fn validate(&mut self, limits: &Limits) -> Result<()> {
        check_user(self.user_id(), limits)
    }

    /// The command's idempotency key with the command's fingerprint, if it carries a key.
    fn keyed(&self) -> Result<Option<Keyed>> {
        Ok(None)
    }

    /// The command, its key and its responder, as the session's mailbox carries them.
    fn into_request(self, keyed: Option<Keyed>, respond: Responder<Self::Reply>) -> Request;
}

/// The [`SessionCommand`] accessors of the commands that name their sender and session in
/// fields `user_id` and `session_id`.
macro_rules! addressed {
    () => {
        fn user_id(&self) -> &str {
            &self.user_id
        }

        fn session_id(&self) -> crate::model::SessionId {
            self.session_id
        }
    };
}
use addressed;

/// The key of a command that carries one, and the fingerprint of the command without it:
/// `strip` clears the key of a copy and wraps it as a [`Command`].
fn keyed_by<C: Clone>(
    command: &C,
    key: &Option<String>,
    strip: impl FnOnce(C) -> Command,
) -> Result<Option<Keyed>> {
    let Some(key) = key else {
        return Ok(None);
    };
    check_key(key)?;
    Ok(Keyed::of(Some(key), &strip(command.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RawJson;

    /// Commands and replies travel as JSON (idempotency records, and between processes): the
    /// raw JSON fields must survive the round trip exactly.
    #[test]
    fn commands_and_replies_round_trip_with_raw_json() {
        let metadata = RawJson::parse(r#"{"n":18446744073709551616,"k":"v"}"#).expect("json");
        let command = Command::CreateSession(CreateSession {
            user_id: "alice".into(),
            metadata: Some(metadata.clone()),
            idempotency_key: Some("k".into()),
            ..CreateSession::default()
        });
        let text = serde_json::to_string(&command).expect("serialize");
        let Command::CreateSession(back) = Command::from_json(&text).expect("parse") else {
            panic!("another command: {text}");
        };
        assert_eq!(back.metadata, Some(metadata.clone()));

        let info = SessionInfo {
            id: SessionId::default(),
            user_id: "alice".into(),
            title: None,
            metadata: metadata.clone(),
            usage: Usage::default(),
            message_count: 0,
            version: 3,
            created_at: chrono::DateTime::UNIX_EPOCH,
            updated_at: chrono::DateTime::UNIX_EPOCH,
            ttl_seconds: None,
            expires_at: None,
        };
        let reply = Reply::SessionUpdated(info.clone());
        let text = serde_json::to_string(&reply).expect("serialize");
        let Ok(Reply::SessionUpdated(back)) = serde_json::from_str::<Reply>(&text) else {
            panic!("not read back: {text}");
        };
        assert_eq!(back, info);
    }
}
