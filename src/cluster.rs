//! Routing between processes: each session's commands run at one process, its owner.
//!
//! The processes that share a database are its [members](crate::members). Each process keeps a
//! view of the live members (refreshed with its heartbeat, three times per member lease) and
//! places every session by **rendezvous hashing** over that view: the owner of a session is the
//! member with the highest `score(member, session)`. Every process computes the same owner from
//! the same view, with no directory entry per session to look up or to go stale; a member that
//! joins or leaves moves only the sessions it wins or held (about 1/N of them).
//!
//! A command that must run at the owner (every write, and reads that ask for `fresh` data)
//! and reaches another process is sent on to the owner through the [`Forward`] transport the
//! embedding server provides ([`Engine::route_through`](crate::Engine::route_through)); the
//! owner's answer is relayed as is. Forwarding is an optimisation, never a correctness
//! condition: the ownership epoch in the session row still fences every write, so a command
//! that runs at a process that is not (or no longer) the owner is correct, only slower (it
//! takes the session over). Hence:
//! - a command travels at most [`MAX_HOPS`] times: a process that receives a forwarded command
//!   and places the session elsewhere forwards it once more, and past that runs it itself;
//! - a peer that cannot be reached (connection refused, connect timeout) is suspected for one
//!   member lease: it drops out of this process's view, its sessions are placed on the others,
//!   and the command is placed again (nothing ran at the unreachable peer);
//! - when this process's view changes, the live sessions it no longer owns are passivated: they
//!   finish the batch in hand and free their memory, and the new owner claims them (one epoch
//!   move per session per membership change).
//!
//! Without a transport, or when the process is not a member (no
//! [`advertise_url`](crate::EngineConfig::advertise_url)), every command runs where it is sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::command::{Command, Reply};
use crate::error::{Error, Result, StorageError};
use crate::model::{Member, MessageStatus, SessionId};

/// How many times a command may travel between processes: sent on by the process that got it,
/// and at most once more by a receiver that places the session elsewhere. A command that has
/// travelled this many times runs where it is.
pub const MAX_HOPS: u8 = 2;

/// The transport between processes, provided by the embedding server (soloist-server sends
/// commands over HTTP/2 to an internal route of the peer, which hands them to
/// [`Engine::execute_forwarded`](crate::Engine::execute_forwarded)).
pub trait Forward: Send + Sync + 'static {
    /// Sends `command` to `peer` and returns its answer. `hops` is how many times the command
    /// will have travelled once it arrives (1 for the first forward); `budget` is how long the
    /// caller still waits (`None`: no limit), which the peer should not exceed.
    ///
    /// [`Undelivered`] means the command surely did not run at the peer (the connection was
    /// refused or timed out before the request was sent, or the peer refused it unread): the
    /// engine places it again. Any failure after the command may have reached the peer must be
    /// an `Ok(Err(..))`, typically [`Error::OwnerUnreachable`], which the caller may retry with
    /// the same message ids.
    fn forward<'a>(
        &'a self,
        peer: &'a Member,
        command: &'a Command,
        hops: u8,
        budget: Option<Duration>,
    ) -> BoxFuture<'a, Result<Result<Reply>, Undelivered>>;
}

/// A forward that did not reach the peer: nothing ran there.
#[derive(Clone, Debug)]
pub struct Undelivered(pub String);

/// Where a session's commands run, by this process's view of the members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Here: this process owns the session, or is not part of a cluster.
    Here,
    /// At this peer.
    Peer(Member),
}

/// The rendezvous score of `member` for `session`: the owner is the member with the highest.
/// A fixed function of the two ids (SplitMix64's finalizer over their words), so that every
/// process, whatever its build, places a session on the same member.
pub fn score(member: Uuid, session: SessionId) -> u64 {
    let (m1, m2) = member.as_u64_pair();
    let (s1, s2) = session.as_uuid().as_u64_pair();
    let mut hash = mix(m1 ^ mix(m2));
    hash = mix(hash ^ s1);
    mix(hash ^ mix(s2))
}

/// SplitMix64's finalizer: a bijection that spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// This process's view of the live members, and the placement it gives.
#[derive(Debug)]
pub(crate) struct Directory {
    /// This process's member id.
    me: Uuid,
    /// The live members as last read from the database (this one included), by id.
    members: watch::Sender<Arc<Vec<Member>>>,
    /// Peers found unreachable, left out of the view until the given time.
    suspects: Mutex<HashMap<Uuid, Instant>>,
    /// How long a suspect stays out of the view: one member lease, by which time the database
    /// tells whether it is gone.
    suspicion: Duration,
    /// Set when this process leaves: it places every session on the others from then on.
    left: std::sync::atomic::AtomicBool,
    /// How long a member that joins a running cluster waits before sessions are placed on it:
    /// one heartbeat period and a margin, so that every member has read it by then and they
    /// all start placing sessions on it at about the same moment.
    settle: Duration,
}

impl Directory {
    pub fn new(me: Uuid, suspicion: Duration) -> Directory {
        Directory {
            me,
            members: watch::Sender::new(Arc::new(Vec::new())),
            suspects: Mutex::new(HashMap::new()),
            suspicion,
            left: std::sync::atomic::AtomicBool::new(false),
            settle: suspicion / 3 + Duration::from_millis(500),
        }
    }

    /// This process leaves: from now on it places every session on the other members (those
    /// it owned are handed over), and runs a command itself only when no other is left.
    pub fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::Release);
        self.members.send_modify(|_| {});
    }

    /// Replaces the view with the members read from the database; returns whether it changed
    /// (a member joined or left; heartbeats alone do not count).
    pub fn update(&self, mut members: Vec<Member>) -> bool {
        members.sort_by_key(|member| member.id);
        self.members.send_if_modified(|view| {
            let same = view.len() == members.len()
                && view
                    .iter()
                    .zip(&members)
                    .all(|(old, new)| old.id == new.id && old.address == new.address);
            *view = Arc::new(members);
            !same
        })
    }

    /// The live members as last read (suspects included).
    pub fn members(&self) -> Arc<Vec<Member>> {
        self.members.borrow().clone()
    }

    /// Notified when the view changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.members.subscribe()
    }

    /// Leaves `peer` out of the placement for one member lease; returns whether it was not
    /// suspected already.
    pub fn suspect(&self, peer: Uuid) -> bool {
        if peer == self.me {
            return false;
        }
        let now = Instant::now();
        let earlier = self
            .suspects
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer, now + self.suspicion);
        // Wakes the hand-over, which passivates nothing here but keeps the view's readers
        // current.
        self.members.send_modify(|_| {});
        earlier.is_none_or(|until| until <= now)
    }

    /// Where `session`'s commands run. With no member in the view (not registered yet, or the
    /// database unreachable since start), here.
    pub fn place(&self, session: SessionId) -> Placement {
        self.placing().place(session)
    }

    /// The current view less the suspects, to place many sessions with.
    pub fn placing(&self) -> View {
        let now = Instant::now();
        let mut suspects = self.suspects.lock().unwrap_or_else(PoisonError::into_inner);
        suspects.retain(|_, until| *until > now);
        let left = self.left.load(std::sync::atomic::Ordering::Acquire);
        let members = self.members();
        // The members that started together with the first (within one settling time) take
        // sessions at once; one that joined later, once it has settled.
        let settle = chrono::Duration::from_std(self.settle).unwrap_or(chrono::Duration::MAX);
        let founders = members
            .iter()
            .map(|member| member.started_at)
            .min()
            .and_then(|first| first.checked_add_signed(settle));
        let settled = chrono::Utc::now().checked_sub_signed(settle);
        let eligible = members
            .iter()
            .map(|member| {
                let reachable = match member.id == self.me {
                    true => !left,
                    false => !suspects.contains_key(&member.id),
                };
                let started = founders.is_some_and(|founders| member.started_at <= founders)
                    || settled.is_some_and(|settled| member.started_at <= settled);
                reachable && started
            })
            .collect();
        View {
            me: self.me,
            members,
            eligible,
        }
    }
}

/// The members to place sessions on, from one process's point of view: the view's members,
/// and which of them take sessions (not suspected, not left, settled).
#[derive(Clone, Debug)]
pub(crate) struct View {
    me: Uuid,
    members: Arc<Vec<Member>>,
    eligible: Vec<bool>,
}

impl View {
    /// Where `session`'s commands run by this view.
    pub fn place(&self, session: SessionId) -> Placement {
        let owner = self
            .members
            .iter()
            .zip(&self.eligible)
            .filter(|(_, eligible)| **eligible)
            .map(|(member, _)| member)
            .max_by_key(|member| (score(member.id, session), member.id));
        match owner {
            Some(owner) if owner.id != self.me => Placement::Peer(owner.clone()),
            _ => Placement::Here,
        }
    }

    /// Whether this view places `session` on this process, with other members in it (a
    /// process alone owns everything, and has nothing to hand over).
    pub fn owns(&self, session: SessionId) -> bool {
        self.place(session) == Placement::Here
    }
}

/// The answer of a forwarded command as it travels back: a [`Reply`] or an [`Error`], as JSON.
/// Errors keep their variant and fields; a storage error keeps its message only.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Answer(Wire);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Wire {
    Reply(Reply),
    Error(WireError),
}

/// [`Error`] as data.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "code")]
enum WireError {
    NotFound,
    Forbidden,
    QuotaExceeded {
        limit: u64,
    },
    InvalidInput {
        field: String,
        reason: String,
    },
    TooLarge {
        field: String,
        size: usize,
        limit: usize,
    },
    Conflict {
        message: String,
    },
    SessionIdTaken,
    MessageIdReused {
        id: Uuid,
    },
    PreconditionFailed {
        current: i64,
    },
    IdempotencyKeyReused,
    MessageNotFound,
    MessageFinished {
        status: MessageStatus,
    },
    OffsetGap {
        length: u64,
    },
    OffsetConflict {
        length: u64,
    },
    FinishConflict {
        status: MessageStatus,
    },
    TurnInProgress {
        id: Uuid,
    },
    UnknownToolCall {
        id: String,
    },
    ToolCallAnswered {
        id: String,
    },
    Overloaded {
        millis: u64,
    },
    ShuttingDown,
    ActorFailed,
    Timeout {
        millis: u64,
    },
    OwnerUnreachable {
        message: String,
    },
    Storage {
        message: String,
    },
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<Result<Reply>> for Answer {
    fn from(result: Result<Reply>) -> Answer {
        Answer(match result {
            Ok(reply) => Wire::Reply(reply),
            Err(error) => Wire::Error(match error {
                Error::NotFound => WireError::NotFound,
                Error::Forbidden => WireError::Forbidden,
                Error::QuotaExceeded { limit } => WireError::QuotaExceeded { limit },
                Error::InvalidInput { field, reason } => WireError::InvalidInput { field, reason },
                Error::TooLarge { field, size, limit } => {
                    WireError::TooLarge { field, size, limit }
                }
                Error::Conflict(message) => WireError::Conflict { message },
                Error::SessionIdTaken => WireError::SessionIdTaken,
                Error::MessageIdReused { id } => WireError::MessageIdReused { id },
                Error::PreconditionFailed { current } => WireError::PreconditionFailed { current },
                Error::IdempotencyKeyReused => WireError::IdempotencyKeyReused,
                Error::MessageNotFound => WireError::MessageNotFound,
                Error::MessageFinished { status } => WireError::MessageFinished { status },
                Error::OffsetGap { length } => WireError::OffsetGap { length },
                Error::OffsetConflict { length } => WireError::OffsetConflict { length },
                Error::FinishConflict { status } => WireError::FinishConflict { status },
                Error::TurnInProgress { id } => WireError::TurnInProgress { id },
                Error::UnknownToolCall { id } => WireError::UnknownToolCall { id },
                Error::ToolCallAnswered { id } => WireError::ToolCallAnswered { id },
                Error::Overloaded(wait) => WireError::Overloaded {
                    millis: millis(wait),
                },
                Error::ShuttingDown => WireError::ShuttingDown,
                Error::ActorFailed => WireError::ActorFailed,
                Error::Timeout(limit) => WireError::Timeout {
                    millis: millis(limit),
                },
                Error::OwnerUnreachable(message) => WireError::OwnerUnreachable { message },
                Error::Storage(error) => WireError::Storage {
                    message: error.to_string(),
                },
            }),
        })
    }
}

impl From<Answer> for Result<Reply> {
    fn from(answer: Answer) -> Result<Reply> {
        let error = match answer.0 {
            Wire::Reply(reply) => return Ok(reply),
            Wire::Error(error) => error,
        };
        Err(match error {
            WireError::NotFound => Error::NotFound,
            WireError::Forbidden => Error::Forbidden,
            WireError::QuotaExceeded { limit } => Error::QuotaExceeded { limit },
            WireError::InvalidInput { field, reason } => Error::InvalidInput { field, reason },
            WireError::TooLarge { field, size, limit } => Error::TooLarge { field, size, limit },
            WireError::Conflict { message } => Error::Conflict(message),
            WireError::SessionIdTaken => Error::SessionIdTaken,
            WireError::MessageIdReused { id } => Error::MessageIdReused { id },
            WireError::PreconditionFailed { current } => Error::PreconditionFailed { current },
            WireError::IdempotencyKeyReused => Error::IdempotencyKeyReused,
            WireError::MessageNotFound => Error::MessageNotFound,
            WireError::MessageFinished { status } => Error::MessageFinished { status },
            WireError::OffsetGap { length } => Error::OffsetGap { length },
            WireError::OffsetConflict { length } => Error::OffsetConflict { length },
            WireError::FinishConflict { status } => Error::FinishConflict { status },
            WireError::TurnInProgress { id } => Error::TurnInProgress { id },
            WireError::UnknownToolCall { id } => Error::UnknownToolCall { id },
            WireError::ToolCallAnswered { id } => Error::ToolCallAnswered { id },
            WireError::Overloaded { millis } => Error::Overloaded(Duration::from_millis(millis)),
            WireError::ShuttingDown => Error::ShuttingDown,
            WireError::ActorFailed => Error::ActorFailed,
            WireError::Timeout { millis } => Error::Timeout(Duration::from_millis(millis)),
            WireError::OwnerUnreachable { message } => Error::OwnerUnreachable(message),
            WireError::Storage { message } => Error::Storage(StorageError::msg(message)),
        })
    }
}

/// A new random cluster secret: 32 random bytes as hex (two UUIDv4s' worth of randomness).
pub(crate) fn new_secret() -> String {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    format!("{}{}", a.simple(), b.simple())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::model::from_micros;

    fn member(id: Uuid) -> Member {
        Member {
            id,
            address: format!("http://{id}"),
            started_at: from_micros(0),
            heartbeat_at: from_micros(0),
        }
    }

    /// Every process places a session on the same member, and the members share the sessions
    /// evenly.
    #[test]
    fn placement_agrees_across_processes_and_balances() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let directories: Vec<Directory> = ids
            .iter()
            .map(|&id| {
                let directory = Directory::new(id, Duration::from_secs(3));
                // Each process reads the members in its own order.
                let mut view: Vec<Member> = ids.iter().copied().map(member).collect();
                view.rotate_left(usize::try_from(id.as_u128() % 3).unwrap_or(0));
                directory.update(view);
                directory
            })
            .collect();
        let mut owned = HashMap::<Uuid, usize>::new();
        for _ in 0..3000 {
            let session = SessionId::new();
            let owners: Vec<Uuid> = directories
                .iter()
                .map(|directory| match directory.place(session) {
                    Placement::Here => directory.me,
                    Placement::Peer(peer) => peer.id,
                })
                .collect();
            assert!(owners.iter().all(|&owner| owner == owners[0]), "{owners:?}");
            *owned.entry(owners[0]).or_default() += 1;
        }
        assert_eq!(owned.len(), 3);
        for (&id, &count) in &owned {
            assert!((850..=1150).contains(&count), "{id}: {count} of 3000");
        }
    }

    /// A member that leaves moves only its own sessions; a suspect is left out until its
    /// suspicion ends.
    #[test]
    fn a_departure_moves_only_the_departed_members_sessions() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let directory = Directory::new(ids[0], Duration::from_millis(50));
        assert!(directory.update(ids.iter().copied().map(member).collect()));
        assert!(!directory.update(ids.iter().rev().copied().map(member).collect()));
        let sessions: Vec<SessionId> = (0..600).map(|_| SessionId::new()).collect();
        let before: Vec<Placement> = sessions.iter().map(|&s| directory.place(s)).collect();
        directory.suspect(ids[2]);
        let mut moved = 0;
        for (session, old) in sessions.iter().zip(&before) {
            let new = directory.place(*session);
            match old {
                Placement::Peer(peer) if peer.id == ids[2] => {
                    assert_ne!(new, *old);
                    moved += 1;
                }
                _ => assert_eq!(new, *old),
            }
        }
        assert!(moved > 100, "moved {moved}");
        std::thread::sleep(Duration::from_millis(60));
        let after: Vec<Placement> = sessions.iter().map(|&s| directory.place(s)).collect();
        assert_eq!(after, before);
        assert!(directory.update(ids[..2].iter().copied().map(member).collect()));
    }

    /// A member that joins a running cluster takes no session until it has settled; the
    /// members that started together take theirs at once.
    #[test]
    fn a_joining_member_takes_sessions_once_settled() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let lease = Duration::from_secs(3);
        let directory = Directory::new(ids[0], lease);
        let now = chrono::Utc::now();
        let at = |id: Uuid, started_at| Member {
            started_at,
            ..member(id)
        };
        // Two founders a second apart, both placed on; a third joined just now.
        let founders = [
            at(ids[0], now - chrono::Duration::seconds(60)),
            at(ids[1], now - chrono::Duration::seconds(59)),
        ];
        let mut view = founders.to_vec();
        view.push(at(ids[2], now));
        directory.update(view);
        let sessions: Vec<SessionId> = (0..300).map(|_| SessionId::new()).collect();
        let owners = |directory: &Directory| -> HashSet<Uuid> {
            sessions
                .iter()
                .map(|&session| match directory.place(session) {
                    Placement::Here => ids[0],
                    Placement::Peer(peer) => peer.id,
                })
                .collect()
        };
        assert_eq!(owners(&directory), HashSet::from([ids[0], ids[1]]));
        // Once it started longer ago than a heartbeat and half a second, it takes its share.
        let mut view = founders.to_vec();
        view.push(at(ids[2], now - chrono::Duration::milliseconds(1600)));
        directory.update(view);
        assert_eq!(owners(&directory), HashSet::from([ids[0], ids[1], ids[2]]));
    }

    /// Every error crosses the wire as itself.
    #[test]
    fn errors_cross_the_wire_intact() {
        let errors = [
            Error::NotFound,
            Error::invalid("messages[0].role", "unknown"),
            Error::TooLarge {
                field: "content".into(),
                size: 9,
                limit: 8,
            },
            Error::Conflict("busy".into()),
            Error::MessageIdReused { id: Uuid::new_v4() },
            Error::PreconditionFailed { current: 7 },
            Error::MessageNotFound,
            Error::MessageFinished {
                status: MessageStatus::Aborted,
            },
            Error::OffsetGap { length: 12 },
            Error::OffsetConflict { length: 3 },
            Error::FinishConflict {
                status: MessageStatus::Incomplete,
            },
            Error::TurnInProgress { id: Uuid::new_v4() },
            Error::UnknownToolCall {
                id: "call_1".into(),
            },
            Error::ToolCallAnswered {
                id: "call_2".into(),
            },
            Error::Overloaded(Duration::from_millis(250)),
            Error::Timeout(Duration::from_secs(30)),
            Error::OwnerUnreachable("reset".into()),
            Error::Storage(StorageError::msg("down")),
        ];
        for error in errors {
            let text = serde_json::to_string(&Answer::from(Err(error.clone()))).expect("json");
            let answer: Answer = serde_json::from_str(&text).expect("parse");
            let back = Result::<Reply>::from(answer).expect_err("an error");
            assert_eq!(back.to_string(), error.to_string(), "{text}");
            assert_eq!(back.code(), error.code());
        }
    }
}
