//! Errors returned when a message cannot be delivered or answered.

use std::fmt;

/// Why [`Registry::send`](crate::Registry::send) did not accept a message. The message is
/// handed back so the caller can retry or answer it.
pub enum SendError<M> {
    /// The actor's mailbox stayed full for the whole
    /// [`send_timeout`](crate::RegistryConfig::send_timeout).
    Overloaded(M),
    /// The registry is shutting down and accepts no new messages.
    ShuttingDown(M),
}

impl<M> SendError<M> {
    /// Gives back the message that was not delivered.
    pub fn into_inner(self) -> M {
        match self {
            Self::Overloaded(message) | Self::ShuttingDown(message) => message,
        }
    }
}

// Written by hand so that `M` need not be `Debug`: messages often carry reply senders.
impl<M> fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overloaded(_) => f.write_str("Overloaded(..)"),
            Self::ShuttingDown(_) => f.write_str("ShuttingDown(..)"),
        }
    }
}

impl<M> fmt::Display for SendError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overloaded(_) => f.write_str("actor mailbox full: send timed out"),
            Self::ShuttingDown(_) => f.write_str("actor registry is shutting down"),
        }
    }
}

impl<M> std::error::Error for SendError<M> {}

/// Why [`Registry::ask`](crate::Registry::ask) got no reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AskError {
    /// The actor's mailbox stayed full for the whole
    /// [`send_timeout`](crate::RegistryConfig::send_timeout); the request was not sent.
    Overloaded,
    /// The registry is shutting down; the request was not sent.
    ShuttingDown,
    /// The request was delivered but its reply sender was dropped unanswered: the actor
    /// panicked while handling it, or dropped it.
    ActorFailed,
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overloaded => f.write_str("actor mailbox full: send timed out"),
            Self::ShuttingDown => f.write_str("actor registry is shutting down"),
            Self::ActorFailed => f.write_str("actor failed before replying"),
        }
    }
}

impl std::error::Error for AskError {}

impl<M> From<SendError<M>> for AskError {
    fn from(error: SendError<M>) -> Self {
        match error {
            SendError::Overloaded(_) => Self::Overloaded,
            SendError::ShuttingDown(_) => Self::ShuttingDown,
        }
    }
}
