//! Following a session: its stored messages after a point, then each new one as it commits,
//! gap-free and in order, and the drafts among them as they grow and finish.
//!
//! The session actor hands out the backlog and a broadcast receiver in one step, so no commit
//! falls between them. The broadcast carries each message as committed: new ones, and drafts
//! each time a commit grew or finished them (the whole message as it stands; the stream sends
//! on what its subscriber has not seen of it). Anything that could still open a gap — a
//! subscriber too slow for the broadcast buffer, the actor passivating (which closes the
//! broadcast), a write whose outcome was unknown and so was never published — is repaired the
//! same way: the stream notices that the next message is not `last + 1` (or that the channel
//! ended) and re-subscribes from its [`Position`], reading what it missed from the session,
//! the open draft included.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::{Message, MessageStatus, SessionId};

/// How far a subscriber has followed a session: the last message it was given, and, if a
/// draft it was given is still streaming, how many bytes of the draft's content it has. As
/// text (an SSE event id, which a client that reconnects sends back as `Last-Event-ID`):
/// `7` (message 7, no draft open), `7:120` (message 7 is a draft, 120 bytes of it seen), or
/// `8/7:120` (message 8 seen, draft 7 open at 120 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The last message given (-1: none).
    pub last: i64,
    /// The draft still streaming that was given, and the bytes of its content given.
    pub draft: Option<(i64, u64)>,
}

impl Position {
    /// After message `seq`, no draft open.
    pub fn after(seq: i64) -> Self {
        Self {
            last: seq.max(-1),
            draft: None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.draft {
            None => write!(f, "{}", self.last),
            Some((seq, offset)) if seq == self.last => write!(f, "{seq}:{offset}"),
            Some((seq, offset)) => write!(f, "{}/{seq}:{offset}", self.last),
        }
    }
}

impl FromStr for Position {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let invalid = || Error::invalid("position", format!("not a stream position: {text:?}"));
        let number = |text: &str| text.parse::<i64>().map_err(|_| invalid());
        let (last, draft) = match text.split_once('/') {
            Some((last, draft)) => (Some(last), draft),
            None => (None, text),
        };
        let draft = match draft.split_once(':') {
            Some((seq, offset)) => {
                Some((number(seq)?, offset.parse::<u64>().map_err(|_| invalid())?))
            }
            None if last.is_none() => return Ok(Position::after(number(draft)?)),
            None => return Err(invalid()),
        };
        let last = match last {
            Some(last) => number(last)?,
            None => draft.map_or(-1, |(seq, _)| seq),
        };
        match draft {
            Some((seq, _)) if seq > last || seq < 0 => Err(invalid()),
            _ => Ok(Position { last, draft }),
        }
    }
}

/// What a subscriber is given, in commit order.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// A new message, whole.
    Message(Arc<Message>),
    /// A new draft, with its content so far.
    Created(Arc<Message>),
    /// Text a draft grew by (durable), at its byte offset.
    Delta {
        /// The draft's sequence.
        seq: i64,
        /// Bytes of the draft's content before this text.
        offset: u64,
        /// The text.
        content: String,
    },
    /// A draft ended: the message as finished.
    Finished(Arc<Message>),
}

/// Messages of one session in `seq` order: the stored ones after the starting point, then
/// each new one as it commits, and the drafts among them as they grow and finish. Get one with
/// [`SessionHandle::subscribe`](crate::SessionHandle::subscribe).
pub struct MessageStream {
    engine: Engine,
    user_id: String,
    session_id: SessionId,
    /// What the subscriber has been given.
    position: Position,
    /// What the subscriber will have been given once `ready` is.
    queued: Position,
    /// Fetched but not yet looked at, in commit order.
    buffer: VecDeque<Arc<Message>>,
    /// Events decided but not yet given, each with the position after it.
    ready: VecDeque<(StreamEvent, Position)>,
    /// Live messages, once the backlog has been caught up.
    live: Option<broadcast::Receiver<Arc<Message>>>,
}

impl std::fmt::Debug for MessageStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStream")
            .field("session_id", &self.session_id)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

impl MessageStream {
    pub(crate) async fn start(
        engine: Engine,
        user_id: String,
        session_id: SessionId,
        position: Position,
    ) -> Result<MessageStream> {
        let mut stream = MessageStream {
            engine,
            user_id,
            session_id,
            position,
            queued: position,
            buffer: VecDeque::new(),
            ready: VecDeque::new(),
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
        self.position.last
    }

    /// How far the stream has been followed (see [`Position`]): where to resume.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The next new message, waiting for one to be committed if need be: each message once,
    /// as first committed (a draft with its content so far; [`Self::next_event`] follows
    /// drafts as they grow). An error ends the stream:
    /// [`Error::NotFound`](crate::Error::NotFound) once the session is deleted,
    /// [`Error::ShuttingDown`](crate::Error::ShuttingDown) when the engine stops.
    pub async fn next(&mut self) -> Result<Arc<Message>> {
        loop {
            match self.next_event().await? {
                StreamEvent::Message(message) | StreamEvent::Created(message) => {
                    return Ok(message);
                }
                StreamEvent::Delta { .. } | StreamEvent::Finished(_) => {}
            }
        }
    }

    /// The next event: a new message, a new draft, a draft's delta, or its finish, in commit
    /// order, each once. Errors as [`Self::next`].
    pub async fn next_event(&mut self) -> Result<StreamEvent> {
        loop {
            if let Some((event, position)) = self.ready.pop_front() {
                self.position = position;
                return Ok(event);
            }
            if let Some(message) = self.buffer.pop_front() {
                if !self.look_at(message) {
                    // A gap: something was committed but not published to us.
                    self.buffer.clear();
                    self.live = None;
                }
                continue;
            }
            match &mut self.live {
                None => self.resubscribe().await?,
                Some(live) => match live.recv().await {
                    Ok(message) => self.buffer.push_back(message),
                    // Lagged past the buffer, or the actor passivated / the session was
                    // deleted: start again from what was given.
                    Err(broadcast::error::RecvError::Lagged(_))
                    | Err(broadcast::error::RecvError::Closed) => self.live = None,
                },
            }
        }
    }

    /// Decides what `message` (as committed) gives the subscriber; `false` on a gap.
    fn look_at(&mut self, message: Arc<Message>) -> bool {
        let last = self.queued.last;
        if message.seq > last + 1 {
            return false;
        }
        if message.seq == last + 1 {
            self.queued.last = message.seq;
            if message.status == MessageStatus::InProgress {
                let length = message.text().map_or(0, str::len) as u64;
                self.queued.draft = Some((message.seq, length));
                self.give(StreamEvent::Created(message));
            } else {
                self.give(StreamEvent::Message(message));
            }
            return true;
        }
        // An earlier message: news only of the open draft.
        let Some((seq, offset)) = self.queued.draft.filter(|&(seq, _)| seq == message.seq) else {
            return true;
        };
        let content = message.text().unwrap_or_default();
        if let Some(grown) = usize::try_from(offset)
            .ok()
            .and_then(|offset| content.get(offset..))
            .filter(|grown| !grown.is_empty())
        {
            self.queued.draft = Some((seq, content.len() as u64));
            self.give(StreamEvent::Delta {
                seq,
                offset,
                content: grown.to_owned(),
            });
        }
        if message.status != MessageStatus::InProgress {
            self.queued.draft = None;
            self.give(StreamEvent::Finished(message));
        }
        true
    }

    /// Queues `event`, with the position once it is given.
    fn give(&mut self, event: StreamEvent) {
        self.ready.push_back((event, self.queued));
    }

    async fn resubscribe(&mut self) -> Result<()> {
        // With the open draft as it stands now, if any: it may have grown or ended meanwhile.
        let draft = self.queued.draft.map(|(seq, _)| seq);
        let subscribed = self
            .engine
            .subscribe_raw(&self.user_id, self.session_id, self.queued.last, draft)
            .await?;
        self.buffer.extend(subscribed.backlog);
        // Behind by more than a page: deliver it, then page again before listening.
        self.live = subscribed.caught_up.then_some(subscribed.live);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Position;

    #[test]
    fn positions_read_back_as_written() {
        let cases = [
            ("-1", Position::after(-1)),
            ("7", Position::after(7)),
            (
                "7:120",
                Position {
                    last: 7,
                    draft: Some((7, 120)),
                },
            ),
            (
                "8/7:120",
                Position {
                    last: 8,
                    draft: Some((7, 120)),
                },
            ),
        ];
        for (text, position) in cases {
            assert_eq!(text.parse::<Position>().ok(), Some(position), "{text}");
            assert_eq!(position.to_string(), text);
        }
        for bad in [
            "", "x", "7:", ":3", "7:-1", "7/8:1", "8/7", "1.5", "7:1:2", "-3:0",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?} parsed");
        }
    }
}
