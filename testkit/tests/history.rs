//! The history checker itself, on hand-made histories: each violation it counts is shown to
//! fire, so that a clean report from a real test means something.

use std::sync::Arc;

use soloist::uuid::Uuid;
use soloist::{Error, Message, NewMessage, Role, SessionId, StorageError};
use soloist_testkit::history::{FinalRows, History, Outcome, Report};

/// A hand-written history of one session.
struct Script {
    history: Arc<History>,
    session: SessionId,
}

impl Script {
    fn new() -> Script {
        Script {
            history: History::new(),
            session: SessionId::new(),
        }
    }

    fn client(&self, name: &str) -> usize {
        self.history.client(name).id()
    }

    /// An append by `client` of one message per id (content = the id), ending with `outcome`
    /// (`None`: never answered).
    fn append(&self, client: usize, ids: &[Uuid], outcome: Option<Outcome>) {
        let mut messages: Vec<NewMessage> = ids
            .iter()
            .map(|id| NewMessage::user(id.to_string()).with_id(*id))
            .collect();
        let index = self
            .history
            .invoke_append(client, self.session, &mut messages);
        if let Some(outcome) = outcome {
            self.history.complete_append(index, outcome);
        }
    }

    fn ack(&self, client: usize, ids: &[Uuid], sequences: &[i64]) {
        self.append(client, ids, Some(Outcome::of(Ok(sequences))));
    }

    fn fail(&self, client: usize, ids: &[Uuid], error: Error) {
        self.append(client, ids, Some(Outcome::of(Err(&error))));
    }

    /// A page read by `client`: `rows` as `(seq, id)`, of a session of `count` messages.
    fn read(&self, client: usize, rows: &[(i64, Uuid)], count: i64) {
        let start = self.history.start_read();
        let messages: Vec<Arc<Message>> = rows.iter().map(|&(seq, id)| message(seq, id)).collect();
        self.history.complete_read(
            client,
            self.session,
            start,
            &messages,
            Some((count, count + 1)),
        );
    }

    fn check(&self, rows: &[(i64, Uuid)]) -> Report {
        let final_rows = FinalRows::from([(self.session, rows.to_vec())]);
        let report = self.history.check(&final_rows);
        report.print("unit");
        report
    }
}

/// A stored message whose content is its id, as [`Script::append`] sends it.
fn message(seq: i64, id: Uuid) -> Arc<Message> {
    Arc::new(Message {
        seq,
        id,
        role: Role::User,
        content: Some(id.to_string().into()),
        name: None,
        tool_calls: None,
        tool_call_id: None,
        function_call: None,
        refusal: None,
        metadata: None,
        status: Default::default(),
        created_at: chrono::Utc::now(),
    })
}

fn ids<const N: usize>() -> [Uuid; N] {
    std::array::from_fn(|_| Uuid::now_v7())
}

/// The counts of a report, in the order of its one-line summary.
fn counts(report: &Report) -> [usize; 7] {
    [
        report.lost.count,
        report.duplicates.count,
        report.same_seq_two_values.count,
        report.read_of_failed_write.count,
        report.non_monotonic.count,
        report.stale_own_write.count,
        report.never_sent.count,
    ]
}

#[test]
fn a_clean_history_passes() {
    let script = Script::new();
    let [a, b, c, d, e] = ids();
    let (one, two, refused, timed_out) = (
        script.client("one"),
        script.client("two"),
        script.client("refused"),
        script.client("gave up"),
    );
    script.ack(one, &[a, b], &[0, 1]);
    script.read(one, &[(0, a), (1, b)], 2);
    script.ack(two, &[c], &[2]);
    // A retry of the same ids is answered with the original sequences.
    script.ack(two, &[c], &[2]);
    script.read(two, &[(2, c)], 3);
    script.read(one, &[(1, b), (2, c)], 3);
    // Refused, never stored; an ambiguous error and an abandoned call may go either way.
    script.fail(refused, &[e], Error::invalid("messages[0].role", "bad"));
    script.fail(
        two,
        &[d],
        Error::Storage(StorageError::msg("connection reset")),
    );
    script.append(timed_out, &[d], None);
    let report = script.check(&[(0, a), (1, b), (2, c), (3, d)]);
    assert_eq!(counts(&report), [0; 7], "{report:#?}");
    report.assert_clean();
    assert_eq!(
        (
            report.appends,
            report.acknowledged,
            report.not_applied,
            report.unknown
        ),
        (6, 3, 1, 2)
    );
    assert_eq!(report.reads, 3);
}

#[test]
fn a_lost_write_is_counted() {
    let script = Script::new();
    let [a, b] = ids();
    let client = script.client("writer");
    script.ack(client, &[a], &[0]);
    script.ack(client, &[b], &[1]);
    // `a` vanished and `b` moved.
    let report = script.check(&[(0, b)]);
    assert_eq!(report.lost.count, 2, "{report:#?}");
    assert!(!report.is_clean());
}

#[test]
#[should_panic(expected = "lost")]
fn assert_clean_fails_with_the_details() {
    let script = Script::new();
    let [a] = ids();
    script.ack(script.client("writer"), &[a], &[0]);
    script.check(&[]).assert_clean();
}

#[test]
fn a_duplicate_is_counted() {
    let script = Script::new();
    let [a, b] = ids();
    let client = script.client("writer");
    script.ack(client, &[a], &[0]);
    // Stored twice.
    assert_eq!(script.check(&[(0, a), (1, a)]).duplicates.count, 1);
    // Acknowledged at two sequences (and so also lost at one of them).
    script.ack(client, &[b], &[1]);
    script.ack(client, &[b], &[2]);
    let report = script.check(&[(0, a), (1, b)]);
    assert_eq!(report.duplicates.count, 1, "{report:#?}");
}

#[test]
fn two_values_at_one_sequence_are_counted() {
    let script = Script::new();
    let [a, b, c] = ids();
    let (one, two) = (script.client("one"), script.client("two"));
    // Two acknowledgements at seq 0.
    script.ack(one, &[a], &[0]);
    script.ack(two, &[b], &[0]);
    let report = script.check(&[(0, a)]);
    assert_eq!(report.same_seq_two_values.count, 1, "{report:#?}");

    // A read that saw at seq 0 another id than the one finally stored.
    let script = Script::new();
    let (one, two, reader) = (
        script.client("one"),
        script.client("two"),
        script.client("reader"),
    );
    script.ack(one, &[c], &[0]);
    script.read(reader, &[(0, c)], 1);
    let [d] = ids();
    script.ack(two, &[d], &[1]);
    let report = script.check(&[(0, d), (1, c)]);
    assert!(report.same_seq_two_values.count >= 1, "{report:#?}");
}

#[test]
fn a_read_of_a_failed_write_is_counted() {
    let script = Script::new();
    let [a, b] = ids();
    let (writer, reader) = (script.client("writer"), script.client("reader"));
    script.fail(
        writer,
        &[a],
        Error::Overloaded(std::time::Duration::from_millis(1)),
    );
    script.fail(writer, &[a], Error::ShuttingDown);
    script.read(reader, &[(0, a)], 1);
    let report = script.check(&[(0, a)]);
    assert_eq!(report.read_of_failed_write.count, 1, "{report:#?}");

    // Once one invocation of the id may have applied it, it may be stored.
    script.fail(writer, &[a], Error::ActorFailed);
    assert!(script.check(&[(0, a)]).is_clean());

    // Seen only in the final rows counts too.
    script.fail(writer, &[b], Error::Conflict("kept changing".into()));
    let report = script.check(&[(0, a), (1, b)]);
    assert_eq!(report.read_of_failed_write.count, 1, "{report:#?}");
}

#[test]
fn a_timed_out_append_leaves_the_outcome_unknown() {
    let timeout = Error::Timeout(std::time::Duration::from_secs(3));
    assert!(matches!(Outcome::of(Err(&timeout)), Outcome::Unknown(_)));

    // The timed-out command is applied later; the retry with the same id is acknowledged at
    // the stored sequence, and a reader sees it: nothing to report.
    let script = Script::new();
    let [a] = ids();
    let (writer, reader) = (script.client("writer"), script.client("reader"));
    script.fail(writer, &[a], timeout);
    script.read(reader, &[(0, a)], 1);
    script.ack(writer, &[a], &[0]);
    assert!(script.check(&[(0, a)]).is_clean());
}

#[test]
fn a_read_going_back_is_counted() {
    let script = Script::new();
    let [a, b, c] = ids();
    let (writer, reader) = (script.client("writer"), script.client("reader"));
    script.ack(writer, &[a, b, c], &[0, 1, 2]);
    script.read(reader, &[(0, a), (1, b), (2, c)], 3);
    script.read(reader, &[(0, a), (1, b)], 2);
    // Another reader's older view is no violation of this one's.
    script.read(script.client("late reader"), &[(0, a)], 1);
    let report = script.check(&[(0, a), (1, b), (2, c)]);
    assert_eq!(report.non_monotonic.count, 1, "{report:#?}");
}

#[test]
fn a_read_missing_its_own_write_is_counted() {
    let script = Script::new();
    let [a, b] = ids();
    let client = script.client("writer");
    script.ack(client, &[a], &[0]);
    script.ack(client, &[b], &[1]);
    // Starts after both acknowledgements, sees only the first.
    script.read(client, &[(0, a)], 1);
    // A page that covers seq 1 but does not hold `b` there.
    script.read(client, &[(0, a), (2, b)], 3);
    let report = script.check(&[(0, a), (1, b)]);
    assert_eq!(report.stale_own_write.count, 2, "{report:#?}");
}

#[test]
fn a_message_never_sent_is_counted() {
    let script = Script::new();
    let [a, stray, read_only] = ids();
    let (writer, reader) = (script.client("writer"), script.client("reader"));
    script.ack(writer, &[a], &[0]);
    script.read(reader, &[(0, a), (2, read_only)], 3);
    let report = script.check(&[(0, a), (1, stray)]);
    assert_eq!(report.never_sent.count, 2, "{report:#?}");
}

#[test]
fn a_read_with_content_never_sent_is_counted() {
    let script = Script::new();
    let [a] = ids();
    let (writer, reader) = (script.client("writer"), script.client("reader"));
    script.ack(writer, &[a], &[0]);
    let start = script.history.start_read();
    let mut changed = (*message(0, a)).clone();
    changed.content = Some("something else".into());
    script.history.complete_read(
        reader,
        script.session,
        start,
        &[Arc::new(changed)],
        Some((1, 1)),
    );
    let report = script.check(&[(0, a)]);
    assert_eq!(report.never_sent.count, 1, "{report:#?}");
}
