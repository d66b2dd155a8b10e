//! Following a session: its stored messages after a point, then each new one as it commits,
//! gap-free and in order.
//!
//! The session actor hands out the backlog and a broadcast receiver in one step, so no commit
//! falls between them. Anything that could still open a gap — a subscriber too slow for the
//! broadcast buffer, the actor passivating (which closes the broadcast), a write whose outcome
//! was unknown and so was never published — is repaired the same way: the stream notices that
//! the next message is not `last + 1` (or that the channel ended) and re-subscribes from the
//! last message it delivered, reading what it missed from the session.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::engine::Engine;
use crate::error::Result;
use crate::model::{Message, SessionId};

/// Messages of one session in `seq` order: the stored ones after the starting point, then
/// each new one as it commits. Get one with
/// [`SessionHandle::subscribe`](crate::SessionHandle::subscribe).
pub struct MessageStream {
    engine: Engine,
    user_id: String,
    session_id: SessionId,
    /// The last sequence delivered (or the starting point).
    last: i64,
    /// Fetched but not yet delivered, ascending.
    buffer: VecDeque<Arc<Message>>,
    /// Live messages, once the backlog has been caught up.
    live: Option<broadcast::Receiver<Arc<Message>>>,
}

impl std::fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStream")
            .field("session_id", &self.session_id)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl MessageStream {
    pub(crate) async fn start(
        engine: Engine,
        user_id: String,
        session_id: SessionId,
        after_seq: i64,
    ) -> Result<MessageStream> {
        let mut stream = MessageStream {
            engine,
            user_id,
            session_id,
            last: after_seq.max(-1),
            buffer: VecDeque::new(),
            live: None,
        };
        // Subscribing now reports a missing or foreign session at once.
        stream.resubscribe().await?;
        Ok(stream)
    }

    /// The session followed.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The sequence of the last message delivered.
    pub fn last_seq(&self) -> i64 {
        self.last
    }

    /// The next message, waiting for one to be committed if need be. An error ends the stream:
    /// [`Error::NotFound`](crate::Error::NotFound) once the session is deleted,
    /// [`Error::ShuttingDown`](crate::Error::ShuttingDown) when the engine stops.
    pub async fn next(&mut self) -> Result<Arc<Message>> {
        loop {
            if let Some(message) = self.buffer.pop_front() {
                if message.seq <= self.last {
                    continue; // already delivered (a backlog and a broadcast overlapped)
                }
                if message.seq == self.last + 1 {
                    self.last = message.seq;
                    return Ok(message);
                }
                // A gap: something was committed but not published to us.
                self.buffer.clear();
                self.live = None;
                continue;
            }
            match &mut self.live {
                None => self.resubscribe().await?,
                Some(live) => match live.recv().await {
                    Ok(message) => self.buffer.push_back(message),
                    // Lagged past the buffer, or the actor passivated / the session was
                    // deleted: start again from the last delivered message.
                    Err(broadcast::error::RecvError::Lagged(_))
                    | Err(broadcast::error::RecvError::Closed) => self.live = None,
                },
            }
        }
    }

    async fn resubscribe(&mut self) -> Result<()> {
        let subscribed = self
            .engine
            .subscribe_raw(&self.user_id, self.session_id, self.last)
            .await?;
        self.buffer.extend(subscribed.backlog);
        // Behind by more than a page: deliver it, then page again before listening.
        self.live = subscribed.caught_up.then_some(subscribed.live);
        Ok(())
    }
}
