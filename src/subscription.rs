//! Following a session: its stored messages after a point, then each new one as it commits,
//! gap-free and in order, and the drafts among them as they grow and finish.
//!
//! The session actor hands out the backlog and a listener in one step, so no commit falls
//! between them. The actor publishes each commit: new messages whole, the text drafts grew by,
//! and drafts as they ended (the stream sends on what its subscriber has not seen of them).
//! What the actor holds for listeners that have not taken it is bounded in bytes (a
//! subscriber that stops reading cannot pin more). Anything that could still open a gap — a
//! subscriber that fell behind that bound, the actor passivating (which closes the channel), a
//! write whose outcome was unknown and so was never published — is repaired the same way: the
//! stream notices that the next event does not follow what it gave (or that the channel
//! ended) and re-subscribes from its [`Position`], reading what it missed from the session,
//! the open draft included. Re-subscribing again and again without giving anything backs off,
//! and ends the stream with an error past a bound, so no stream can spin.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fanout::{Listener, Missed};
use crate::model::{Message, MessageStatus, SessionId};
use crate::session::protocol::Published;

/// Re-subscriptions in a row that gave nothing, at most: past it the stream ends with an
/// error rather than read the session again (each is a command to its actor).
const MAX_FRUITLESS_RESUBSCRIBES: u32 = 8;

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
    buffer: VecDeque<Published>,
    /// Events decided but not yet given, each with the position after it.
    ready: VecDeque<(StreamEvent, Position)>,
    /// What commits, once the backlog has been caught up.
    live: Option<Listener<Published>>,
    /// Re-subscriptions in a row that neither gave an event nor waited for the session (a
    /// gap found at once, again and again): past a bound, the stream ends.
    fruitless: u32,
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
            fruitless: 0,
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
                self.fruitless = 0;
                return Ok(event);
            }
            if let Some(published) = self.buffer.pop_front() {
                let follows = match published {
                    Published::Message(message) => self.look_at(message),
                    Published::Delta { seq, offset, text } => {
                        self.look_at_delta(seq, offset, &text)
                    }
                };
                if !follows {
                    // A gap: something was committed but not published to us.
                    self.buffer.clear();
                    self.live = None;
                }
                continue;
            }
            match &mut self.live {
                None => self.resubscribe().await?,
                Some(live) => match live.recv().await {
                    // Waited for the session: re-subscribing after this is not a spin.
                    Ok(published) => {
                        self.fruitless = 0;
                        self.buffer.push_back(published);
                    }
                    // Fell behind past what the session holds for us, or the actor
                    // passivated / the session was deleted: start again from what was given.
                    Err(Missed::Lagged | Missed::Closed) => {
                        self.fruitless = 0;
                        self.live = None;
                    }
                },
            }
        }
    }

    /// Decides what `message` (as committed) gives the subscriber; `false` on a gap.
    fn look_at(&mut self, message: Arc<Message>) -> bool {
        let last = self.queued.last;
        let Some(next) = last.checked_add(1) else {
            return false;
        };
        if message.seq > next {
            return false;
        }
        if message.seq == next {
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

    /// Decides what `text`, which draft `seq` grew by at byte `offset`, gives the subscriber;
    /// `false` on a gap.
    fn look_at_delta(&mut self, seq: i64, offset: u64, text: &str) -> bool {
        if seq > self.queued.last {
            // The draft's start was not given: missed.
            return false;
        }
        let Some((draft, seen)) = self.queued.draft.filter(|&(draft, _)| draft == seq) else {
            // A draft the subscriber was given as ended already.
            return true;
        };
        let end = offset.saturating_add(text.len() as u64);
        if offset > seen {
            // Text before this was not given: missed.
            return false;
        }
        if end <= seen {
            return true;
        }
        let Some(unseen) = usize::try_from(seen - offset)
            .ok()
            .and_then(|start| text.get(start..))
        else {
            return false;
        };
        self.queued.draft = Some((draft, end));
        self.give(StreamEvent::Delta {
            seq,
            offset: seen,
            content: unseen.to_owned(),
        });
        true
    }

    /// Queues `event`, with the position once it is given.
    fn give(&mut self, event: StreamEvent) {
        self.ready.push_back((event, self.queued));
    }

    async fn resubscribe(&mut self) -> Result<()> {
        if self.fruitless > 0 {
            // Nothing given since the last time: something keeps the stream from following.
            // Back off (1, 2, 4, ... ms), and give up past a bound rather than spin.
            if self.fruitless > MAX_FRUITLESS_RESUBSCRIBES {
                return Err(Error::Conflict(
                    "the stream could not follow the session; resume from its last event id".into(),
                ));
            }
            let pause = std::time::Duration::from_millis(1 << (self.fruitless - 1));
            tokio::time::sleep(pause).await;
        }
        self.fruitless += 1;
        // With the open draft as it stands now, if any: it may have grown or ended meanwhile.
        let subscribed = self
            .engine
            .subscribe_raw(
                &self.user_id,
                self.session_id,
                self.queued.last,
                self.queued.draft,
            )
            .await?;
        self.buffer
            .extend(subscribed.backlog.into_iter().map(Published::Message));
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
