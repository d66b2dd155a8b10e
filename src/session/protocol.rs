//! What goes through a session's mailbox: each command with the responder its answer goes to.
//!
//! A command stays plain data (the types of [`crate::command`]); the actor pairs it with a
//! typed [`Responder`] when it is sent, so the answer's type is fixed by the command's and a
//! reply can only reach the caller that asked. Writes are staged (see `stage`), which records
//! a [`Decision`] in the command's own [`Pending`]; reads answer from the committed state
//! before the batch's write (see `read`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::command::{
    AddUsage, AppendDeltas, AppendMessages, CreateSession, DeleteSession, FinishMessage,
    GetSession, ImportSession, Reply, SessionCommand, UpdateSession,
};
use crate::error::{Error, Result};
use crate::fanout::Listener;
use crate::idempotency::Keyed;
use crate::model::Message;

/// One mailbox slot: a request boxed whole, so that a slot is one pointer. Every live session's
/// mailbox keeps a block of 32 slots allocated for as long as it lives, idle or not; boxing the
/// payloads alone left a reply sender and a tag in each slot (24 bytes: 768 per block instead
/// of 256). The box costs nothing extra: each request allocated its payload anyway.
pub(crate) type Mail = Box<Request>;

/// Everything a session actor is sent. Always boxed (as [`Mail`]) and short-lived, so the
/// variants' sizes need not match.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Request {
    /// A command that changes the session, answered once its batch committed.
    Write(Write),
    /// A command answered from the session as committed.
    Read(Read),
    /// Another process committed this version of the session: catch up before the next read.
    /// Nobody waits for an answer. (Sent by the PostgreSQL change listener only.)
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Refresh(i64),
}

/// The write commands. Adding one: a variant here, its line in `each_write!`, and its
/// [`StageWrite`](super::stage::StageWrite) implementation.
#[derive(Debug)]
pub(crate) enum Write {
    Create(Pending<CreateSession>),
    Append(Pending<AppendMessages>),
    Update(Pending<UpdateSession>),
    AddUsage(Pending<AddUsage>),
    Delete(Pending<DeleteSession>),
    Deltas(Pending<AppendDeltas>),
    Finish(Pending<FinishMessage>),
    Import(Pending<ImportSession>),
}

/// Runs `$body` with `$pending` bound to the [`Pending`] of whichever write `$write` is.
macro_rules! each_write {
    ($write:expr, $pending:ident => $body:expr) => {
        match $write {
            Write::Create($pending) => $body,
            Write::Append($pending) => $body,
            Write::Update($pending) => $body,
            Write::AddUsage($pending) => $body,
            Write::Delete($pending) => $body,
            Write::Deltas($pending) => $body,
            Write::Finish($pending) => $body,
            Write::Import($pending) => $body,
        }
    };
}
pub(crate) use each_write;

/// The read commands, answered in `read`.
#[derive(Debug)]
pub(crate) enum Read {
    Get(GetSession, Responder<crate::command::SessionPage>),
    Subscribe(Subscribe, Responder<Subscribed>),
}

/// Ask for the messages after `after_seq` and for every message committed from then on.
#[derive(Debug)]
pub(crate) struct Subscribe {
    pub user_id: String,
    pub after_seq: i64,
    /// A draft at or before `after_seq` to give first, as it stands now, and how many bytes
    /// of its content the subscriber has.
    pub draft: Option<(i64, u64)>,
}

/// The answer to a [`Subscribe`]: taken in one step of the actor, so that no commit can fall
/// between the backlog and the first live message.
#[derive(Debug)]
pub(crate) struct Subscribed {
    /// The draft asked for, then the stored messages after `after_seq`, at most a page.
    pub backlog: Vec<Arc<Message>>,
    /// Whether `backlog` reaches the newest message; if not, page again before listening.
    pub caught_up: bool,
    /// Everything committed after the backlog.
    pub live: Listener<Published>,
}

/// What a session publishes to its subscribers as each commit lands. A draft that grows is
/// published as the text it grew by, not as a copy of itself: a subscriber that stops
/// reading then holds on to what was sent, not to every state the draft went through.
#[derive(Clone, Debug)]
pub(crate) enum Published {
    /// A new message, or a draft as it ended (or grew, when its earlier state is not at
    /// hand), whole.
    Message(Arc<Message>),
    /// Text a draft grew by, at its byte offset.
    Delta {
        seq: i64,
        offset: u64,
        text: Arc<str>,
    },
}

impl Published {
    /// Bytes the event holds, roughly: what counts against a session's buffer for
    /// subscribers that have not taken it.
    pub fn weight(&self) -> usize {
        // The Arc, the enum and the fields around the payload.
        const OVERHEAD: usize = 128;
        OVERHEAD
            + match self {
                Published::Message(message) => message.payload_bytes(),
                Published::Delta { text, .. } => text.len(),
            }
    }
}

impl Request {
    /// When the command was sent (`None` for a refresh, which nobody waits for).
    pub fn sent(&self) -> Option<Instant> {
        match self {
            Request::Write(write) => Some(each_write!(write, pending => pending.respond.sent())),
            Request::Read(Read::Get(_, respond)) => Some(respond.sent()),
            Request::Read(Read::Subscribe(_, respond)) => Some(respond.sent()),
            Request::Refresh(_) => None,
        }
    }
}

impl Read {
    /// Who sent the command.
    pub fn user(&self) -> &str {
        match self {
            Read::Get(get, _) => &get.user_id,
            Read::Subscribe(subscribe, _) => &subscribe.user_id,
        }
    }

    /// Answers the command with `error`.
    pub fn fail(self, error: Error) {
        match self {
            Read::Get(_, respond) => respond.send(Err(error)),
            Read::Subscribe(_, respond) => respond.send(Err(error)),
        }
    }
}

impl Write {
    /// Who sent the command.
    pub fn user(&self) -> &str {
        each_write!(self, pending => pending.command.user_id())
    }

    /// The command's idempotency key, if it has one.
    pub fn keyed(&self) -> Option<&Keyed> {
        each_write!(self, pending => pending.keyed.as_ref())
    }

    /// The message ids the command names (an append's resends, an import's messages), looked
    /// up after a conflict.
    pub fn message_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        let messages = match self {
            Write::Append(pending) => pending.command.messages.as_slice(),
            _ => &[],
        };
        let imported = match self {
            Write::Import(pending) => pending.command.messages.as_slice(),
            _ => &[],
        };
        let imported = imported.iter().map(|message| message.id);
        messages
            .iter()
            .filter_map(|message| message.id)
            .chain(imported)
    }

    /// The message a delta or a finish names.
    pub fn named_message(&self) -> Option<Uuid> {
        match self {
            Write::Deltas(pending) => Some(pending.command.message_id),
            Write::Finish(pending) => Some(pending.command.message_id),
            _ => None,
        }
    }

    /// Answers the command with `error`, whatever staging decided.
    pub fn fail(self, error: Error) {
        each_write!(self, pending => pending.respond.send(Err(error)))
    }

    /// Sends the command its answer: what staging decided, given how the batch's write ended
    /// (`Err`: it did not commit, or its outcome is unknown).
    pub fn settle(self, written: &Result<()>) {
        each_write!(self, pending => pending.settle(written))
    }
}

/// Where an actor sends a command's answer: exactly once, typed by the command.
#[derive(Debug)]
pub(crate) struct Responder<T> {
    sender: oneshot::Sender<Result<T>>,
    /// When the command was sent (for the time it waited for its actor).
    sent: Instant,
}

impl<T> Responder<T> {
    /// Answers through `sender`; the command is being sent now.
    pub fn new(sender: oneshot::Sender<Result<T>>) -> Self {
        Self {
            sender,
            sent: Instant::now(),
        }
    }

    /// When the command was sent.
    pub fn sent(&self) -> Instant {
        self.sent
    }

    /// Sends the answer (counted by the engine when the caller gets it).
    pub fn send(self, result: Result<T>) {
        // The caller may have gone away; the command's effect stands regardless.
        let _ = self.sender.send(result);
    }
}

/// What staging decided for one write command.
///
/// A batch is linearized as: every read first, against the session as it was before the batch,
/// then every write in command order. So each write answers with the session as it stood right
/// after that write (an `add_usage` does not report the deltas of commands queued behind it).
#[derive(Debug)]
pub(crate) enum Decision<T> {
    /// Not staged (yet): the batch failed before staging it, and its error is the answer.
    Unstaged,
    /// Refused while staging: answered with this error whatever the write does.
    Refused(Error),
    /// Answered with this once the batch committed (staging set its version and time).
    OnCommit(T),
    /// The stored answer of an earlier command with the same idempotency key (a JSON
    /// [`Reply`]); `with_this_write`: that command is in this batch, so the answer stands only
    /// if the write commits.
    Replay {
        response: String,
        with_this_write: bool,
    },
}

/// A write command in the actor: the command, its idempotency key, its responder, and what the
/// latest staging decided for it.
#[derive(Debug)]
pub(crate) struct Pending<C: SessionCommand> {
    pub command: C,
    pub keyed: Option<Keyed>,
    pub respond: Responder<C::Reply>,
    pub decision: Decision<C::Reply>,
}

impl<C: SessionCommand> Pending<C> {
    /// A command not yet staged.
    pub fn new(command: C, keyed: Option<Keyed>, respond: Responder<C::Reply>) -> Self {
        Self {
            command,
            keyed,
            respond,
            decision: Decision::Unstaged,
        }
    }

    fn settle(self, written: &Result<()>) {
        let answer = match (self.decision, written) {
            (Decision::Refused(error), _) => Err(error),
            (
                Decision::Replay {
                    response,
                    with_this_write,
                },
                written,
            ) if !with_this_write || written.is_ok() => replay::<C>(&response),
            (_, Err(error)) => Err(error.clone()),
            (Decision::OnCommit(reply), Ok(())) => Ok(reply),
            // Every write that reaches a committed batch was staged by it: `written` is `Ok`
            // only after a staging that decided every command of the batch.
            (Decision::Unstaged | Decision::Replay { .. }, Ok(())) => Err(Error::ActorFailed),
        };
        self.respond.send(answer);
    }
}

/// The recorded answer of the first command with an idempotency key, as the command's reply.
/// The fingerprint covers the command's kind, so a record of another kind (or one this version
/// cannot read) means the key was used for something else.
fn replay<C: SessionCommand>(response: &str) -> Result<C::Reply> {
    serde_json::from_str::<Reply>(response)
        .ok()
        .and_then(|reply| C::Reply::try_from(reply).ok())
        .ok_or(Error::IdempotencyKeyReused)
}
