//! A history of what clients saw, and a checker over it.
//!
//! Tests with many writers record every append and read through a [`Client`] as it happens
//! (invocation, then completion), then [`History::verify`] compares the history with the rows
//! finally stored and counts each kind of anomaly: lost writes, duplicates, two values at one
//! sequence, reads of failed writes, non-monotonic reads, reads missing the reader's own
//! acknowledged write, and messages stored that no client ever sent.
//!
//! An append's error is sorted by what it says about the outcome: a *not applied* error
//! (refused input, unknown session, full mailbox, shutting down, conflict after the engine's
//! retries) promises nothing was written; any other error (storage, a failed actor, the
//! engine's `Error::Timeout`, a caller that gave up waiting) leaves the outcome unknown, and the
//! checker accepts either outcome.
//!
//! Drafts (streamed replies) are followed too, through [`Client::start_message`],
//! [`Client::append_delta`], [`Client::finish_message`] and the reads: every acknowledged
//! delta's text is in the draft's final content at its offset (a durable delta is never lost),
//! every byte of that content was sent by some delta that may have applied, two reads of a
//! draft one after the other never see its content go back (shorter, or not an extension), and
//! a finished draft never changes once its finish was acknowledged.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use soloist::uuid::Uuid;
use soloist::{
    AppendMessages, Appended, Content, Engine, Error, GetSession, Message, MessageStatus,
    MessageStream, NewMessage, SessionHandle, SessionId, SessionPage, Usage,
};

use crate::{TestDb, stored_rows};

/// Rows `(seq, message_id)` of each session, as finally stored.
pub type FinalRows = HashMap<SessionId, Vec<(i64, Uuid)>>;

/// Each draft's final status and text (its content so far, for one still in progress).
pub type FinalDrafts = HashMap<(SessionId, Uuid), (MessageStatus, String)>;

/// How many examples of each violation a report keeps.
const EXAMPLES: usize = 5;

/// What clients did and saw, in the order the recorder's clock saw it. Share it as
/// `Arc<History>`; each recording takes the lock for a few pushes only.
#[derive(Default)]
pub struct History {
    log: Mutex<Log>,
}

#[derive(Default)]
struct Log {
    /// Logical time: each invocation, completion and read start takes the next tick, so that
    /// "B started after A completed" is `B.start > A.end`.
    clock: u64,
    clients: Vec<String>,
    appends: Vec<AppendRecord>,
    reads: Vec<ReadRecord>,
    /// The drafts clients started.
    drafts: HashSet<(SessionId, Uuid)>,
    /// Text sent to drafts: each start's text (at offset 0) and each delta.
    deltas: Vec<DeltaRecord>,
    finishes: Vec<FinishRecord>,
    draft_reads: Vec<DraftRead>,
}

/// Text sent to a draft at a byte offset: a delta, or a start's text.
struct DeltaRecord {
    session: SessionId,
    message: Uuid,
    offset: usize,
    text: String,
    end: Option<u64>,
    /// The draft's length as answered, once acknowledged.
    acknowledged: Option<u64>,
    may_have_applied: bool,
}

/// An acknowledged finish: the draft as it was answered.
struct FinishRecord {
    session: SessionId,
    message: Uuid,
    end: u64,
    status: MessageStatus,
    text: String,
}

/// A draft as one read saw it.
struct DraftRead {
    session: SessionId,
    message: Uuid,
    start: u64,
    end: u64,
    status: MessageStatus,
    text: String,
}

/// One invocation of an append; a client's retry with the same ids is another invocation.
struct AppendRecord {
    session: SessionId,
    client: usize,
    /// Each message's id and content digest, in the order sent.
    messages: Vec<(Uuid, u64)>,
    /// `None` while pending, and forever when the caller stopped waiting.
    end: Option<u64>,
    outcome: Outcome,
}

/// How an append invocation ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No answer (yet): the caller gave up waiting, or the task was cancelled.
    Pending,
    /// Acknowledged: each message's sequence.
    Acknowledged(Vec<i64>),
    /// An error promising that nothing of the command was written.
    NotApplied(String),
    /// An error after which the command may or may not have been written.
    Unknown(String),
}

impl Outcome {
    /// The outcome a client infers from an append's result.
    pub fn of(result: Result<&[i64], &Error>) -> Outcome {
        match result {
            Ok(sequences) => Outcome::Acknowledged(sequences.to_vec()),
            Err(error) if not_applied(error) => Outcome::NotApplied(format!("{error:?}")),
            Err(error) => Outcome::Unknown(format!("{error:?}")),
        }
    }

    fn may_have_applied(&self) -> bool {
        !matches!(self, Outcome::NotApplied(_))
    }
}

/// Whether `error` promises that the append was not written. Refusals happen before anything
/// is staged; `Overloaded` and `ShuttingDown` mean the command never reached the actor;
/// `Conflict` is answered only after every attempt was refused by the database. `Storage` and
/// `ActorFailed` may come after a commit, `Timeout` leaves the command to be applied later, and
/// unknown future variants are treated the same.
fn not_applied(error: &Error) -> bool {
    matches!(
        error,
        Error::NotFound
            | Error::Forbidden
            | Error::InvalidInput { .. }
            | Error::TooLarge { .. }
            | Error::Conflict(_)
            | Error::Overloaded(_)
            | Error::ShuttingDown
            | Error::MessageIdReused { .. }
            | Error::MessageNotFound
            | Error::MessageFinished { .. }
            | Error::OffsetGap { .. }
            | Error::OffsetConflict { .. }
            | Error::FinishConflict { .. }
            | Error::TurnInProgress { .. }
            | Error::UnknownToolCall { .. }
            | Error::ToolCallAnswered { .. }
    )
}

/// One successful read: a page, or one message delivered by a subscription.
struct ReadRecord {
    session: SessionId,
    client: usize,
    start: u64,
    end: u64,
    /// `(seq, id, content digest)` of each message seen, ascending.
    messages: Vec<(i64, Uuid, u64)>,
    message_count: Option<i64>,
    version: Option<i64>,
}

impl ReadRecord {
    /// How far into the session the read saw: its message count, or past its last message.
    fn reach(&self) -> i64 {
        let past_last = self.messages.last().map_or(0, |&(seq, _, _)| seq + 1);
        self.message_count.unwrap_or(0).max(past_last)
    }
}

/// The digest of a message's content, to tell two values under one id apart.
fn digest(content: Option<&Content>) -> u64 {
    let mut hasher = DefaultHasher::new();
    match content {
        Some(Content::Text(text)) => (0u8, text.as_str()).hash(&mut hasher),
        Some(Content::Parts(parts)) => (1u8, parts.get()).hash(&mut hasher),
        None => 2u8.hash(&mut hasher),
    }
    hasher.finish()
}

impl History {
    /// An empty history, to share between the clients of one test.
    pub fn new() -> Arc<History> {
        Arc::new(History::default())
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        // A panicking test task must not hide the history of the others.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A client (a task, a reader, a process...) whose operations are recorded under `name`.
    pub fn client(self: &Arc<Self>, name: impl Into<String>) -> Client {
        let mut log = self.log();
        log.clients.push(name.into());
        Client {
            history: self.clone(),
            id: log.clients.len() - 1,
        }
    }

    /// Records an append invocation, giving each message without an id a fresh one (what the
    /// engine would do) so that the checker can follow it. Returns the record's index.
    pub fn invoke_append(
        &self,
        client: usize,
        session: SessionId,
        messages: &mut [NewMessage],
    ) -> usize {
        let messages = messages
            .iter_mut()
            .map(|message| {
                let id = *message.id.get_or_insert_with(Uuid::now_v7);
                (id, digest(message.content.as_ref()))
            })
            .collect();
        let mut log = self.log();
        // The invocation takes its tick, as the clock is defined, although no check reads when
        // an append started (only when it completed).
        log.clock += 1;
        log.appends.push(AppendRecord {
            session,
            client,
            messages,
            end: None,
            outcome: Outcome::Pending,
        });
        log.appends.len() - 1
    }

    /// Records how the append invocation `index` ended.
    pub fn complete_append(&self, index: usize, outcome: Outcome) {
        let mut log = self.log();
        log.clock += 1;
        let end = log.clock;
        let record = &mut log.appends[index];
        record.end = Some(end);
        record.outcome = outcome;
    }

    /// The clock reading at which a read starts.
    pub fn start_read(&self) -> u64 {
        let mut log = self.log();
        log.clock += 1;
        log.clock
    }

    /// Records a successful read that started at `start`.
    pub fn complete_read(
        &self,
        client: usize,
        session: SessionId,
        start: u64,
        messages: &[Arc<Message>],
        info: Option<(i64, i64)>,
    ) {
        let digests = messages
            .iter()
            .map(|m| (m.seq, m.id, digest(m.content.as_ref())))
            .collect();
        let mut log = self.log();
        log.clock += 1;
        let end = log.clock;
        for message in messages {
            if log.drafts.contains(&(session, message.id)) {
                log.draft_reads.push(DraftRead {
                    session,
                    message: message.id,
                    start,
                    end,
                    status: message.status,
                    text: message.text().unwrap_or_default().to_owned(),
                });
            }
        }
        let messages = digests;
        log.reads.push(ReadRecord {
            session,
            client,
            start,
            end,
            messages,
            message_count: info.map(|(count, _)| count),
            version: info.map(|(_, version)| version),
        });
    }

    /// Records text sent to draft `message` at byte `offset` (a delta, or with offset 0 a
    /// start's text); returns the record's index.
    pub fn invoke_delta(
        &self,
        session: SessionId,
        message: Uuid,
        offset: u64,
        text: &str,
    ) -> usize {
        let mut log = self.log();
        log.clock += 1;
        log.drafts.insert((session, message));
        log.deltas.push(DeltaRecord {
            session,
            message,
            offset: usize::try_from(offset).unwrap_or(usize::MAX),
            text: text.to_owned(),
            end: None,
            acknowledged: None,
            may_have_applied: true,
        });
        log.deltas.len() - 1
    }

    /// Records how the delta `index` ended: the draft's length, or an error.
    pub fn complete_delta(&self, index: usize, result: Result<u64, &Error>) {
        let mut log = self.log();
        log.clock += 1;
        let end = log.clock;
        let record = &mut log.deltas[index];
        record.end = Some(end);
        match result {
            Ok(length) => record.acknowledged = Some(length),
            Err(error) => record.may_have_applied = !not_applied(error),
        }
    }

    /// Records an acknowledged finish of draft `message`, as answered.
    pub fn complete_finish(&self, session: SessionId, message: &Message) {
        let mut log = self.log();
        log.clock += 1;
        let end = log.clock;
        log.drafts.insert((session, message.id));
        log.finishes.push(FinishRecord {
            session,
            message: message.id,
            end,
            status: message.status,
            text: message.text().unwrap_or_default().to_owned(),
        });
    }

    /// The drafts the history followed, by session.
    fn drafts(&self) -> Vec<(SessionId, Uuid)> {
        let mut drafts: Vec<_> = self.log().drafts.iter().copied().collect();
        drafts.sort();
        drafts
    }

    /// The final status and text of every draft the history followed: from the database when
    /// another connection can open it (the message row, and the chunks of one in progress),
    /// else through `engine` as `user` (skipping sessions it can no longer read).
    pub async fn final_drafts(
        &self,
        db: &TestDb,
        engine: &Engine,
        user: &str,
    ) -> crate::Result<FinalDrafts> {
        let mut drafts = FinalDrafts::new();
        for (session, id) in self.drafts() {
            let found = if db.shareable() {
                stored_draft(&db.url, session, id).await?
            } else {
                read_draft_through(engine, user, session, id).await
            };
            if let Some(found) = found {
                drafts.insert((session, id), found);
            }
        }
        Ok(drafts)
    }

    /// Every session the history touched.
    pub fn sessions(&self) -> BTreeSet<SessionId> {
        self.log().sessions()
    }

    /// The stored rows of every session the history touched: from the database when another
    /// connection can open it, else through `engine` as `user` (skipping sessions it can no
    /// longer read, e.g. after shutdown).
    pub async fn final_rows(
        &self,
        db: &TestDb,
        engine: &Engine,
        user: &str,
    ) -> crate::Result<FinalRows> {
        let mut rows = FinalRows::new();
        for session in self.sessions() {
            if db.shareable() {
                rows.insert(session, stored_rows(&db.url, session).await?);
            } else if let Some(read) = read_through(engine, user, session).await {
                rows.insert(session, read);
            }
        }
        Ok(rows)
    }

    /// Checks the history against the stored rows, prints the counts as `name` (with the
    /// backend) and fails the test on any violation.
    ///
    /// # Panics
    ///
    /// On any violation, and when the stored rows cannot be read: either way the test fails.
    pub async fn verify(&self, name: &str, db: &TestDb, engine: &Engine, user: &str) -> Report {
        let rows = match self.final_rows(db, engine, user).await {
            Ok(rows) => rows,
            Err(error) => panic!("history {name}: cannot read the stored rows: {error}"),
        };
        let drafts = match self.final_drafts(db, engine, user).await {
            Ok(drafts) => drafts,
            Err(error) => panic!("history {name}: cannot read the stored drafts: {error}"),
        };
        let mut report = self.check(&rows);
        self.check_drafts(&drafts, &mut report);
        report.print(&format!("{name} ({:?})", db.backend));
        report.assert_clean();
        report
    }

    /// Counts every violation of the history against `final_rows` (sessions missing from it are
    /// checked on the history alone).
    pub fn check(&self, final_rows: &FinalRows) -> Report {
        let log = self.log();
        let mut report = Report {
            appends: log.appends.len(),
            reads: log.reads.len(),
            sessions: log.sessions().len(),
            sessions_with_final_rows: final_rows.len(),
            ..Report::default()
        };
        let client = |index: usize| log.clients[index].as_str();

        // Every logical write: the digests sent under its id, and whether some invocation may
        // have written it.
        let mut sent: HashMap<(SessionId, Uuid), (HashSet<u64>, bool)> = HashMap::new();
        // Acknowledged sequences of each write.
        let mut acknowledged: HashMap<(SessionId, Uuid), BTreeSet<i64>> = HashMap::new();
        // Every id seen at each sequence: acknowledged, read, or stored.
        let mut values: HashMap<(SessionId, i64), BTreeSet<Uuid>> = HashMap::new();
        for append in &log.appends {
            match &append.outcome {
                Outcome::Acknowledged(_) => report.acknowledged += 1,
                Outcome::NotApplied(_) => report.not_applied += 1,
                Outcome::Pending | Outcome::Unknown(_) => report.unknown += 1,
            }
            for (index, &(id, content)) in append.messages.iter().enumerate() {
                let entry = sent.entry((append.session, id)).or_default();
                entry.0.insert(content);
                entry.1 |= append.outcome.may_have_applied();
                if let Outcome::Acknowledged(sequences) = &append.outcome {
                    let Some(&seq) = sequences.get(index) else {
                        report.lost.add(|| {
                            format!(
                                "{}: {} sequences acknowledged for {} messages",
                                client(append.client),
                                sequences.len(),
                                append.messages.len()
                            )
                        });
                        continue;
                    };
                    acknowledged
                        .entry((append.session, id))
                        .or_default()
                        .insert(seq);
                    values.entry((append.session, seq)).or_default().insert(id);
                }
            }
        }
        for read in &log.reads {
            for &(seq, id, _) in &read.messages {
                values.entry((read.session, seq)).or_default().insert(id);
            }
        }
        let mut stored: HashMap<(SessionId, Uuid), Vec<i64>> = HashMap::new();
        for (&session, rows) in final_rows {
            for &(seq, id) in rows {
                stored.entry((session, id)).or_default().push(seq);
                values.entry((session, seq)).or_default().insert(id);
            }
        }

        // 1. Lost: acknowledged, but not stored at (only) the acknowledged sequence.
        for (&(session, id), sequences) in sorted(&acknowledged) {
            if !final_rows.contains_key(&session) {
                continue;
            }
            let at = stored.get(&(session, id));
            if at.is_none_or(|at| sequences.iter().any(|seq| !at.contains(seq))) {
                report.lost.add(|| {
                    format!("{session}/{id}: acknowledged at {sequences:?}, stored at {at:?}")
                });
            }
        }
        // 2. Duplicates: one id stored twice, or acknowledged at two sequences.
        let mut duplicated: BTreeSet<(SessionId, Uuid)> = BTreeSet::new();
        duplicated.extend(
            stored
                .iter()
                .filter(|(_, at)| at.len() > 1)
                .map(|(k, _)| *k),
        );
        duplicated.extend(
            acknowledged
                .iter()
                .filter(|(_, at)| at.len() > 1)
                .map(|(k, _)| *k),
        );
        for (session, id) in duplicated {
            report.duplicates.add(|| {
                format!(
                    "{session}/{id}: stored at {:?}, acknowledged at {:?}",
                    stored.get(&(session, id)),
                    acknowledged.get(&(session, id))
                )
            });
        }
        // 3. Two ids at one sequence, between acknowledgements, reads and stored rows.
        for (&(session, seq), ids) in sorted(&values) {
            if ids.len() > 1 {
                report
                    .same_seq_two_values
                    .add(|| format!("{session} seq {seq}: ids {ids:?}"));
            }
        }
        // 4 and never sent: each id read or stored must have been sent, with that content, by
        // an invocation that may have written it.
        let mut seen: BTreeSet<(SessionId, Uuid)> = stored.keys().copied().collect();
        let mut wrong_content: BTreeSet<(SessionId, Uuid)> = BTreeSet::new();
        for read in &log.reads {
            for &(_, id, content) in &read.messages {
                seen.insert((read.session, id));
                // A draft's content grows by deltas: its own checks follow it.
                if !log.drafts.contains(&(read.session, id))
                    && sent
                        .get(&(read.session, id))
                        .is_some_and(|(contents, _)| !contents.contains(&content))
                {
                    wrong_content.insert((read.session, id));
                }
            }
        }
        for (session, id) in seen {
            match sent.get(&(session, id)) {
                None => report
                    .never_sent
                    .add(|| format!("{session}/{id}: read or stored, never sent")),
                Some((_, false)) => report.read_of_failed_write.add(|| {
                    format!("{session}/{id}: read or stored, but every append of it was refused")
                }),
                Some(_) => {}
            }
        }
        for (session, id) in wrong_content {
            report
                .never_sent
                .add(|| format!("{session}/{id}: read with content no append sent"));
        }

        // 5. Per client and session: reads never go back, and see the client's own writes.
        let mut by_reader: HashMap<(usize, SessionId), Vec<&ReadRecord>> = HashMap::new();
        for read in &log.reads {
            by_reader
                .entry((read.client, read.session))
                .or_default()
                .push(read);
        }
        // What was acknowledged to each client: `(end, id, seq)`.
        type Acks = Vec<(u64, Uuid, i64)>;
        let mut own_acks: HashMap<(usize, SessionId), Acks> = HashMap::new();
        for append in &log.appends {
            if let (Outcome::Acknowledged(sequences), Some(end)) = (&append.outcome, append.end) {
                let acks = own_acks.entry((append.client, append.session)).or_default();
                for (&(id, _), &seq) in append.messages.iter().zip(sequences) {
                    acks.push((end, id, seq));
                }
            }
        }
        for (key, reads) in sorted(&by_reader) {
            for read in reads {
                let earlier = reads.iter().filter(|earlier| earlier.end < read.start);
                let (reach, version) = earlier.fold((0, None), |(reach, version), e| {
                    (reach.max(e.reach()), version.max(e.version))
                });
                let older_version = matches!((read.version, version), (Some(v), Some(w)) if v < w);
                if read.reach() < reach || older_version {
                    report.non_monotonic.add(|| {
                        format!(
                            "{} on {}: saw {} messages, version {:?} after {reach}, {version:?}",
                            client(key.0),
                            key.1,
                            read.reach(),
                            read.version
                        )
                    });
                }
                let first = read.messages.first().map(|m| m.0);
                let last = read.messages.last().map(|m| m.0);
                let missed = own_acks
                    .get(key)
                    .into_iter()
                    .flatten()
                    .find(|&&(end, id, seq)| {
                        end < read.start
                            && (read.reach() <= seq
                                || (first.is_some_and(|first| first <= seq)
                                    && last.is_some_and(|last| seq <= last)
                                    && !read.messages.iter().any(|m| (m.0, m.1) == (seq, id))))
                    });
                if let Some((_, id, seq)) = missed {
                    report.stale_own_write.add(|| {
                        format!(
                            "{} on {}: read of {} messages misses its acknowledged {id} at {seq}",
                            client(key.0),
                            key.1,
                            read.reach()
                        )
                    });
                }
            }
        }
        report
    }

    /// Counts the violations of the drafts' history against their final status and text
    /// (`final_drafts`; drafts missing from it are checked on the history alone) into `report`.
    pub fn check_drafts(&self, final_drafts: &FinalDrafts, report: &mut Report) {
        let log = self.log();
        report.deltas = log.deltas.len();
        report.acknowledged_deltas = log
            .deltas
            .iter()
            .filter(|delta| delta.acknowledged.is_some())
            .count();
        report.finishes = log.finishes.len();
        report.draft_reads = log.draft_reads.len();
        let holds = |text: &str, offset: usize, part: &str| {
            offset
                .checked_add(part.len())
                .and_then(|end| text.as_bytes().get(offset..end))
                == Some(part.as_bytes())
        };
        // 1. A durable delta is never lost: in the final content and in every later read.
        for delta in &log.deltas {
            let (Some(length), Some(end)) = (delta.acknowledged, delta.end) else {
                continue;
            };
            let reach = (delta.offset + delta.text.len()) as u64;
            if length < reach {
                report.lost_deltas.add(|| {
                    format!(
                        "{}/{}: {:?} at {} acknowledged with length {length}",
                        delta.session, delta.message, delta.text, delta.offset
                    )
                });
            }
            if let Some((_, text)) = final_drafts.get(&(delta.session, delta.message))
                && !holds(text, delta.offset, &delta.text)
            {
                report.lost_deltas.add(|| {
                    format!(
                        "{}/{}: acknowledged {:?} at {}, final content {text:?}",
                        delta.session, delta.message, delta.text, delta.offset
                    )
                });
            }
            let stale = log.draft_reads.iter().find(|read| {
                (read.session, read.message) == (delta.session, delta.message)
                    && read.start > end
                    && !holds(&read.text, delta.offset, &delta.text)
            });
            if let Some(read) = stale {
                report.lost_deltas.add(|| {
                    format!(
                        "{}/{}: acknowledged {:?} at {}, a later read saw {:?}",
                        delta.session, delta.message, delta.text, delta.offset, read.text
                    )
                });
            }
        }
        // 2. Every byte of a draft's final content was sent there by a delta that may have
        //    applied.
        for (&(session, message), (_, text)) in sorted(final_drafts) {
            let mut covered = vec![false; text.len()];
            let sent = log.deltas.iter().filter(|delta| {
                (delta.session, delta.message) == (session, message)
                    && delta.may_have_applied
                    && holds(text, delta.offset, &delta.text)
            });
            for delta in sent {
                covered[delta.offset..delta.offset + delta.text.len()].fill(true);
            }
            if let Some(at) = covered.iter().position(|covered| !covered) {
                report.draft_never_sent.add(|| {
                    format!("{session}/{message}: byte {at} of {text:?} was never sent there")
                });
            }
        }
        // 3. Reads of a draft never go back: a read that started after another ended sees
        //    the same content or an extension of it, and the same end once it ended; so does
        //    the final content.
        let went_back = |earlier: (MessageStatus, &str), later: (MessageStatus, &str)| {
            !later.1.starts_with(earlier.1)
                || (earlier.0 != MessageStatus::InProgress && earlier != later)
        };
        for read in &log.draft_reads {
            let key = (read.session, read.message);
            let earlier = (read.status, read.text.as_str());
            let later = log.draft_reads.iter().find(|later| {
                (later.session, later.message) == key
                    && later.start > read.end
                    && went_back(earlier, (later.status, later.text.as_str()))
            });
            if let Some(later) = later {
                report.draft_went_back.add(|| {
                    format!(
                        "{}/{}: read {:?} {:?}, then {:?} {:?}",
                        key.0, key.1, read.status, read.text, later.status, later.text
                    )
                });
            }
            if let Some((status, text)) = final_drafts.get(&key)
                && went_back(earlier, (*status, text.as_str()))
            {
                report.draft_went_back.add(|| {
                    format!(
                        "{}/{}: read {:?} {:?}, finally {status:?} {text:?}",
                        key.0, key.1, read.status, read.text
                    )
                });
            }
        }
        // 4. A finished draft never changes once its finish was acknowledged.
        for finish in &log.finishes {
            let key = (finish.session, finish.message);
            let answered = (finish.status, finish.text.as_str());
            let changed = log.draft_reads.iter().find(|read| {
                (read.session, read.message) == key
                    && read.start > finish.end
                    && (read.status, read.text.as_str()) != answered
            });
            if let Some(read) = changed {
                report.finished_changed.add(|| {
                    format!(
                        "{}/{}: finished {answered:?}, a later read saw {:?} {:?}",
                        key.0, key.1, read.status, read.text
                    )
                });
            }
            if let Some((status, text)) = final_drafts.get(&key)
                && (*status, text.as_str()) != answered
            {
                report.finished_changed.add(|| {
                    format!(
                        "{}/{}: finished {answered:?}, finally {status:?} {text:?}",
                        key.0, key.1
                    )
                });
            }
        }
    }
}

/// Draft `id` of `session` straight from the database at `url`: its status and text (the
/// message row's content, and the chunks of one in progress); `None` if it is not stored.
async fn stored_draft(
    url: &str,
    session: SessionId,
    id: Uuid,
) -> crate::Result<Option<(MessageStatus, String)>> {
    type Row = (i64, String, Option<Vec<u8>>);
    type Chunk = (i64, Vec<u8>);
    let message = "SELECT seq, status, content FROM messages WHERE session_id = {1} \
                   AND message_id = {2}";
    let chunks = "SELECT byte_offset, content FROM message_chunks WHERE session_id = {1} \
                  AND seq = {2} ORDER BY byte_offset";
    let (row, chunks): (Option<Row>, Vec<Chunk>) =
        crate::db::with_connection!(url, |connection, sql| {
            let row: Option<Row> = sqlx::query_as(sql(message))
                .bind(session)
                .bind(id)
                .fetch_optional(&mut connection)
                .await?;
            let mut found = Vec::new();
            if let Some((seq, ..)) = &row {
                found = sqlx::query_as(sql(chunks))
                    .bind(session)
                    .bind(*seq)
                    .fetch_all(&mut connection)
                    .await?;
            }
            (row, found)
        });
    let Some((_, status, content)) = row else {
        return Ok(None);
    };
    // A status or text the engine could not have written reads as what it is: a violation.
    let status = status.parse().unwrap_or(MessageStatus::Completed);
    let mut text = String::from_utf8_lossy(&content.unwrap_or_default()).into_owned();
    if status == MessageStatus::InProgress {
        for (offset, chunk) in chunks {
            if usize::try_from(offset).ok() != Some(text.len()) {
                // A gap or an overlap between chunks: the text after it is not the draft's.
                text.push('\u{fffd}');
            }
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    Ok(Some((status, text)))
}

/// Draft `id` of `session` read through `engine` as `user`; `None` if it cannot be read.
async fn read_draft_through(
    engine: &Engine,
    user: &str,
    session: SessionId,
    id: Uuid,
) -> Option<(MessageStatus, String)> {
    let handle = engine.session(user, session);
    let mut after = None;
    loop {
        let page = handle.get(after, Some(1000)).await.ok()?;
        if let Some(message) = page.messages.iter().find(|message| message.id == id) {
            return Some((
                message.status,
                message.text().unwrap_or_default().to_owned(),
            ));
        }
        after = Some(page.next_after_seq?);
    }
}

impl Log {
    fn sessions(&self) -> BTreeSet<SessionId> {
        let appended = self.appends.iter().map(|append| append.session);
        appended
            .chain(self.reads.iter().map(|read| read.session))
            .collect()
    }
}

/// A map's entries in key order, so that examples come out the same way each run.
fn sorted<K: Ord, V>(map: &HashMap<K, V>) -> Vec<(&K, &V)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Every row of a session, page by page through the engine; `None` if it cannot be read.
async fn read_through(engine: &Engine, user: &str, session: SessionId) -> Option<Vec<(i64, Uuid)>> {
    let handle = engine.session(user, session);
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = handle.get(after, Some(1000)).await.ok()?;
        rows.extend(page.messages.iter().map(|m| (m.seq, m.id)));
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => return Some(rows),
        }
    }
}

/// One client of a [`History`]: performs operations and records them. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    history: Arc<History>,
    id: usize,
}

impl Client {
    /// The client's index in its history.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Appends through `session`, recording the invocation and its outcome.
    pub async fn append(
        &self,
        session: &SessionHandle,
        mut messages: Vec<NewMessage>,
    ) -> soloist::Result<Vec<i64>> {
        let index = self
            .history
            .invoke_append(self.id, session.id(), &mut messages);
        let result = session.append(messages).await;
        self.history
            .complete_append(index, Outcome::of(result.as_deref()));
        result
    }

    /// [`Engine::append`], recorded.
    pub async fn append_command(
        &self,
        engine: &Engine,
        mut command: AppendMessages,
    ) -> soloist::Result<Appended> {
        let index = self
            .history
            .invoke_append(self.id, command.session_id, &mut command.messages);
        let result = engine.append(command).await;
        let sequences = result
            .as_ref()
            .map(|appended| appended.sequences.as_slice());
        self.history.complete_append(index, Outcome::of(sequences));
        result
    }

    /// [`SessionHandle::start_message`], recorded: as an append, and its text as the draft's
    /// first delta.
    pub async fn start_message(
        &self,
        session: &SessionHandle,
        mut message: NewMessage,
    ) -> soloist::Result<(Uuid, i64)> {
        let id = *message.id.get_or_insert_with(Uuid::now_v7);
        message.status = Some(MessageStatus::InProgress);
        let text = message.text().unwrap_or_default().to_owned();
        let delta = self.history.invoke_delta(session.id(), id, 0, &text);
        let mut messages = vec![message];
        let index = self
            .history
            .invoke_append(self.id, session.id(), &mut messages);
        let message = messages.pop().unwrap_or_default();
        let result = session.start_message(message).await;
        let seq = result.as_ref().map(|&(_, seq)| [seq]);
        let sequences = seq
            .as_ref()
            .map(|seq| seq.as_slice())
            .map_err(|error| *error);
        self.history.complete_append(index, Outcome::of(sequences));
        let length = result.as_ref().map(|_| text.len() as u64);
        self.history.complete_delta(delta, length);
        result
    }

    /// [`SessionHandle::append_delta`], recorded.
    pub async fn append_delta(
        &self,
        session: &SessionHandle,
        message_id: Uuid,
        offset: u64,
        text: &str,
    ) -> soloist::Result<u64> {
        let index = self
            .history
            .invoke_delta(session.id(), message_id, offset, text);
        let result = session.append_delta(message_id, offset, text).await;
        self.history
            .complete_delta(index, result.as_ref().map(|&length| length));
        result
    }

    /// [`SessionHandle::finish_message`], recorded.
    pub async fn finish_message(
        &self,
        session: &SessionHandle,
        message_id: Uuid,
        status: MessageStatus,
        usage: Option<Usage>,
    ) -> soloist::Result<Message> {
        let result = session.finish_message(message_id, status, usage).await;
        if let Ok(message) = &result {
            self.history.complete_finish(session.id(), message);
        }
        result
    }

    /// [`SessionHandle::get`], recorded.
    pub async fn get(
        &self,
        session: &SessionHandle,
        after_seq: Option<i64>,
        limit: Option<usize>,
    ) -> soloist::Result<SessionPage> {
        let start = self.history.start_read();
        let result = session.get(after_seq, limit).await;
        self.record_page(session.id(), start, &result);
        result
    }

    /// [`Engine::get_session`], recorded.
    pub async fn get_session(
        &self,
        engine: &Engine,
        command: GetSession,
    ) -> soloist::Result<SessionPage> {
        let session = command.session_id;
        let start = self.history.start_read();
        let result = engine.get_session(command).await;
        self.record_page(session, start, &result);
        result
    }

    /// [`MessageStream::next`], recorded as a read of one message.
    pub async fn next(&self, stream: &mut MessageStream) -> soloist::Result<Arc<Message>> {
        let start = self.history.start_read();
        let result = stream.next().await;
        if let Ok(message) = &result {
            let messages = std::slice::from_ref(message);
            self.history
                .complete_read(self.id, stream.session_id(), start, messages, None);
        }
        result
    }

    fn record_page(&self, session: SessionId, start: u64, result: &soloist::Result<SessionPage>) {
        if let Ok(page) = result {
            let info = (page.session.message_count, page.session.version);
            self.history
                .complete_read(self.id, session, start, &page.messages, Some(info));
        }
    }
}

/// A list of one kind of violation: how many, and the first few.
#[derive(Debug, Default)]
pub struct Violations {
    /// How many were found.
    pub count: usize,
    /// The first few, described.
    pub examples: Vec<String>,
}

impl Violations {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(example());
        }
    }
}

/// What [`History::check`] found.
#[derive(Debug, Default)]
pub struct Report {
    /// Append invocations (retries count once each).
    pub appends: usize,
    /// Appends acknowledged with their sequences.
    pub acknowledged: usize,
    /// Appends refused with an error that promises nothing was written.
    pub not_applied: usize,
    /// Ended with an error that leaves the outcome open, or never answered.
    pub unknown: usize,
    /// Successful reads: pages, and messages delivered by subscriptions.
    pub reads: usize,
    /// Sessions the history touched.
    pub sessions: usize,
    /// Sessions whose final rows were known (read from the database or through the engine).
    pub sessions_with_final_rows: usize,
    /// Acknowledged writes not stored at their acknowledged sequence.
    pub lost: Violations,
    /// Message ids stored twice in a session, or acknowledged at two sequences.
    pub duplicates: Violations,
    /// Sequences at which two different ids were acknowledged, read or stored.
    pub same_seq_two_values: Violations,
    /// Ids read or stored whose every append got a "not applied" error.
    pub read_of_failed_write: Violations,
    /// Reads that saw fewer messages or a lower version than an earlier read of their client.
    pub non_monotonic: Violations,
    /// Reads that miss a write acknowledged to their client before they started.
    pub stale_own_write: Violations,
    /// Ids read or stored that no client sent (or read with content no client sent).
    pub never_sent: Violations,
    /// Text sent to drafts: starts' texts and deltas (retries count once each).
    pub deltas: usize,
    /// Of those, acknowledged.
    pub acknowledged_deltas: usize,
    /// Acknowledged finishes.
    pub finishes: usize,
    /// Drafts seen by reads.
    pub draft_reads: usize,
    /// Acknowledged deltas missing from the draft's final content, or from a later read.
    pub lost_deltas: Violations,
    /// Bytes of a draft's final content that no delta that may have applied sent there.
    pub draft_never_sent: Violations,
    /// Reads of a draft that saw its content go back after an earlier read (or the final
    /// content going back after a read).
    pub draft_went_back: Violations,
    /// Finished drafts read or stored otherwise than their acknowledged finish.
    pub finished_changed: Violations,
}

impl Report {
    fn kinds(&self) -> [(&'static str, &Violations); 11] {
        [
            ("lost", &self.lost),
            ("duplicate", &self.duplicates),
            ("same-seq-two-values", &self.same_seq_two_values),
            ("read-of-failed-write", &self.read_of_failed_write),
            ("non-monotonic", &self.non_monotonic),
            ("stale-own-write", &self.stale_own_write),
            ("never-sent", &self.never_sent),
            ("lost-delta", &self.lost_deltas),
            ("draft-never-sent", &self.draft_never_sent),
            ("draft-went-back", &self.draft_went_back),
            ("finished-changed", &self.finished_changed),
        ]
    }

    /// Whether no violation was found.
    pub fn is_clean(&self) -> bool {
        self.kinds().iter().all(|(_, found)| found.count == 0)
    }

    /// The one-line summary.
    pub fn summary(&self, name: &str) -> String {
        let mut line = format!(
            "history {name}: {} appends ({} acked, {} not applied, {} unknown), {} reads, \
             {} deltas ({} acked), {} finishes, {} draft reads, {}/{} sessions with final rows:",
            self.appends,
            self.acknowledged,
            self.not_applied,
            self.unknown,
            self.reads,
            self.deltas,
            self.acknowledged_deltas,
            self.finishes,
            self.draft_reads,
            self.sessions_with_final_rows,
            self.sessions
        );
        for (kind, found) in self.kinds() {
            let _ = write!(line, " {} {kind},", found.count);
        }
        line.pop();
        line
    }

    /// Prints the one-line summary (visible with `--nocapture`).
    pub fn print(&self, name: &str) {
        println!("{}", self.summary(name));
    }

    /// Fails with the counts and the first examples of each violation.
    #[track_caller]
    pub fn assert_clean(&self) {
        if self.is_clean() {
            return;
        }
        let mut details = self.summary("check failed");
        for (kind, found) in self.kinds() {
            for example in &found.examples {
                let _ = write!(details, "\n  {kind}: {example}");
            }
        }
        panic!("{details}");
    }
}
