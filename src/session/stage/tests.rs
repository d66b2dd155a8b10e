//! Staging on its own: batches of commands on a session in memory, no database.

use std::collections::HashMap;

use tokio::sync::oneshot;

use super::*;
use crate::command::{AddUsage, AppendMessages, CreateSession, DeleteSession, UpdateSession};
use crate::idempotency::Keyed;
use crate::model::{NewMessage, Role};
use crate::session::protocol::Responder;
use crate::store::LoadedSession;

const RULES: StageRules = StageRules {
    hide_foreign: true,
    key_retention: i64::MAX,
    max_content_bytes: 64 * 1024,
    default_ttl: None,
};
const NOW: i64 = 1_700_000_000_000_000;

fn session_id() -> SessionId {
    SessionId::from_uuid(Uuid::from_u128(7))
}

/// A session of `alice` at version 5 with `count` messages, none cached.
fn state(count: i64) -> SessionState {
    let info = SessionInfo {
        id: session_id(),
        user_id: "alice".into(),
        title: None,
        metadata: RawJson::empty_object(),
        usage: Usage::default(),
        message_count: count,
        version: 5,
        created_at: from_micros(0),
        updated_at: from_micros(0),
        ttl_seconds: None,
        expires_at: None,
    };
    SessionState::from_store(Some(LoadedSession {
        info,
        deleted: false,
        epoch: 2,
        tail: Vec::new(),
        older_tool_messages: Vec::new(),
        partial: false,
    }))
}

fn pending<C: SessionCommand>(command: C, keyed: Option<Keyed>) -> Pending<C> {
    let (sender, _receiver) = oneshot::channel();
    Pending::new(command, keyed, Responder::new(sender))
}

fn append(user: &str, messages: Vec<NewMessage>, if_version: Option<i64>) -> Write {
    Write::Append(pending(
        AppendMessages {
            user_id: user.into(),
            session_id: session_id(),
            messages,
            if_version,
            on_busy: Default::default(),
        },
        None,
    ))
}

fn run(state: Option<&SessionState>, writes: &mut [Write]) -> Staged {
    stage(session_id(), state, writes, &HashMap::new(), RULES, NOW)
}

/// The sequences an append was decided with.
fn sequences(write: &Write) -> Vec<i64> {
    match write {
        Write::Append(Pending {
            decision: Decision::OnCommit(appended),
            ..
        }) => appended.sequences.clone(),
        other => panic!("not an accepted append: {other:?}"),
    }
}

fn refusal(write: &Write) -> &Error {
    let decision = each_write!(write, pending => match &pending.decision {
        Decision::Refused(error) => Some(error),
        _ => None,
    });
    decision.unwrap_or_else(|| panic!("not refused: {write:?}"))
}

#[test]
fn appends_of_a_batch_take_consecutive_sequences_and_one_version_each() {
    let state = state(3);
    let mut writes = vec![
        append(
            "alice",
            vec![NewMessage::user("a"), NewMessage::user("b")],
            None,
        ),
        append("alice", vec![NewMessage::assistant("c")], None),
    ];
    let staged = run(Some(&state), &mut writes);
    assert_eq!(sequences(&writes[0]), vec![3, 4]);
    assert_eq!(sequences(&writes[1]), vec![5]);
    let rows: Vec<i64> = staged.write.rows.iter().map(|row| row.seq).collect();
    assert_eq!(rows, vec![3, 4, 5]);
    assert_eq!((staged.write.expected_version, staged.write.steps), (5, 2));
    assert_eq!((staged.write.epoch, staged.write.claim), (2, true));
    let info = staged.info.expect("the session");
    assert_eq!((info.version, info.message_count), (7, 6));
    assert_eq!(staged.messages.len(), 3);
}

#[test]
fn a_resend_in_the_same_batch_gets_the_first_sequence_and_no_row() {
    let state = state(0);
    let id = Uuid::from_u128(42);
    let message = NewMessage::user("once").with_id(id);
    let mut writes = vec![
        append("alice", vec![message.clone()], None),
        append("alice", vec![message], None),
        append("alice", vec![NewMessage::user("other").with_id(id)], None),
    ];
    let staged = run(Some(&state), &mut writes);
    assert_eq!(sequences(&writes[0]), vec![0]);
    assert_eq!(sequences(&writes[1]), vec![0]);
    assert!(matches!(
        refusal(&writes[2]),
        Error::MessageIdReused { id: reused } if *reused == id
    ));
    assert_eq!(staged.write.rows.len(), 1);
    assert_eq!(staged.write.steps, 1, "the resend changed nothing");
}

#[test]
fn a_precondition_sees_the_changes_queued_before_it() {
    let state = state(0);
    let mut writes = vec![
        append("alice", vec![NewMessage::user("a")], Some(5)),
        append("alice", vec![NewMessage::user("b")], Some(5)),
        append("alice", vec![NewMessage::user("c")], Some(6)),
    ];
    let staged = run(Some(&state), &mut writes);
    assert_eq!(sequences(&writes[0]), vec![0]);
    assert!(matches!(
        refusal(&writes[1]),
        Error::PreconditionFailed { current: 6 }
    ));
    assert_eq!(sequences(&writes[2]), vec![1]);
    assert_eq!(staged.write.steps, 2);
}

#[test]
fn other_users_are_told_nothing_and_change_nothing() {
    let state = state(1);
    let mut writes = vec![
        append("mallory", vec![NewMessage::user("x")], None),
        Write::Delete(pending(
            DeleteSession {
                user_id: "mallory".into(),
                session_id: session_id(),
                ..DeleteSession::default()
            },
            None,
        )),
    ];
    let staged = run(Some(&state), &mut writes);
    assert!(matches!(refusal(&writes[0]), Error::NotFound));
    assert!(matches!(refusal(&writes[1]), Error::NotFound));
    assert!(staged.write.is_empty());
    let visible = StageRules {
        hide_foreign: false,
        ..RULES
    };
    let staged = stage(
        session_id(),
        Some(&state),
        &mut writes,
        &HashMap::new(),
        visible,
        NOW,
    );
    assert!(matches!(refusal(&writes[0]), Error::Forbidden));
    assert!(staged.write.is_empty());
}

#[test]
fn a_create_makes_the_row_once_and_repeats_answer_with_it() {
    let missing = SessionState::default();
    let create = |user: &str| {
        Write::Create(pending(
            CreateSession {
                user_id: user.into(),
                session_id: Some(session_id()),
                title: Some("t".into()),
                metadata: Some(RawJson::empty_object()),
                ttl_seconds: None,
                idempotency_key: None,
            },
            None,
        ))
    };
    let mut writes = vec![create("alice"), create("alice"), create("bob")];
    let staged = run(Some(&missing), &mut writes);
    let created = |write: &Write| match write {
        Write::Create(Pending {
            decision: Decision::OnCommit(created),
            ..
        }) => (created.created, created.session.version),
        other => panic!("not created: {other:?}"),
    };
    assert_eq!(created(&writes[0]), (true, 1));
    assert_eq!(created(&writes[1]), (false, 1));
    assert!(matches!(refusal(&writes[2]), Error::SessionIdTaken));
    assert!(staged.write.create.is_some());
    assert_eq!(staged.write.steps, 1);
}

#[test]
fn a_key_sent_twice_in_a_batch_replays_the_first_answer_only_with_the_write() {
    let state = state(0);
    let keyed = Keyed {
        key: "k".into(),
        fingerprint: vec![1, 2, 3],
    };
    let usage = |keyed: Keyed| {
        Write::AddUsage(pending(
            AddUsage {
                user_id: "alice".into(),
                session_id: session_id(),
                prompt_tokens: 10,
                completion_tokens: 1,
                idempotency_key: Some(keyed.key.clone()),
            },
            Some(keyed),
        ))
    };
    let other = Keyed {
        fingerprint: vec![9],
        ..keyed.clone()
    };
    let mut writes = vec![usage(keyed.clone()), usage(keyed), usage(other)];
    let staged = run(Some(&state), &mut writes);
    assert_eq!(staged.write.usage.prompt_tokens, 10, "applied once");
    assert_eq!(staged.write.keys.len(), 1);
    match &writes[1] {
        Write::AddUsage(Pending {
            decision:
                Decision::Replay {
                    response,
                    with_this_write: true,
                },
            ..
        }) => assert_eq!(response, &staged.write.keys[0].response),
        other => panic!("not replayed: {other:?}"),
    }
    assert!(matches!(refusal(&writes[2]), Error::IdempotencyKeyReused));
}

#[test]
fn an_update_and_a_delete_each_take_a_version() {
    let state = state(2);
    let mut writes = vec![
        Write::Update(pending(
            UpdateSession {
                user_id: "alice".into(),
                session_id: session_id(),
                title: Some("new".into()),
                ..UpdateSession::default()
            },
            None,
        )),
        append(
            "alice",
            vec![NewMessage::new(Role::System, "after the update")],
            Some(6),
        ),
        Write::Delete(pending(
            DeleteSession {
                user_id: "alice".into(),
                session_id: session_id(),
                if_version: Some(7),
                ..DeleteSession::default()
            },
            None,
        )),
        append("alice", vec![NewMessage::user("too late")], None),
    ];
    let staged = run(Some(&state), &mut writes);
    match &writes[0] {
        Write::Update(Pending {
            decision: Decision::OnCommit(info),
            ..
        }) => assert_eq!((info.title.as_deref(), info.version), (Some("new"), 6)),
        other => panic!("not updated: {other:?}"),
    }
    assert_eq!(sequences(&writes[1]), vec![2]);
    assert!(matches!(refusal(&writes[3]), Error::NotFound));
    assert!(staged.deleted && staged.write.delete);
    assert_eq!(staged.write.title.as_deref(), Some("new"));
    assert_eq!(staged.write.steps, 3);
}
