//! Importing a session, on every backend: the session and all its messages in one write (all
//! or nothing), every message checked as an append would check it, idempotent by its ids,
//! refused when the id is someone else's or holds other messages, bounded.

use soloist::uuid::Uuid;
use soloist::{
    Content, Engine, EngineConfig, Error, FinishMessage, ImportSession, ImportedMessage, Limits,
    Message, MessageStatus, NewMessage, RawJson, Role, SessionId, SessionInfo, Usage,
};
use soloist_testkit::{
    TestDb, assert_contiguous, created_session, on_every_backend, on_shared_backends, passivated,
    stored_rows,
};

/// A result with the error as its debug text, to compare.
fn plain<T>(result: soloist::Result<T>) -> Result<T, String> {
    result.map_err(|error| format!("{error:?}"))
}

/// `error` as [`plain`] shows it.
fn err<T>(error: Error) -> Result<T, String> {
    Err(format!("{error:?}"))
}

fn json(text: &str) -> RawJson {
    RawJson::parse(text).expect("json")
}

/// Every message of `user`'s session, a page at a time.
async fn all_messages(engine: &Engine, user: &str, session: SessionId) -> Vec<Message> {
    let handle = engine.session(user, session);
    let mut messages = Vec::new();
    let mut after = None;
    loop {
        let page = handle.get(after, Some(1000)).await.expect("read");
        messages.extend(page.messages.iter().map(|message| Message::clone(message)));
        match page.next_after_seq {
            Some(next) => after = Some(next),
            None => return messages,
        }
    }
}

/// A session of alice's with something of everything an export holds: a system prompt, parts,
/// tool calls and their answers, a refusal, names and metadata, drafts that ended every way,
/// a draft still streaming, and usage. Returns it as an import of it (under its own id) would
/// carry it.
async fn rich_session(engine: &Engine) -> (SessionInfo, Vec<ImportedMessage>) {
    let session = created_session(engine).await;
    engine
        .update_session(soloist::UpdateSession {
            user_id: "alice".into(),
            session_id: session.id(),
            title: Some("Trip planning".into()),
            metadata: Some(json(r#"{"tags":["travel"],"n":18446744073709551616}"#)),
            ..Default::default()
        })
        .await
        .expect("title");
    let parts = r#"[{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"https://example.com/a.png"}}]"#;
    let calls = r#"[{"id":"call_1","type":"function","function":{"name":"weather","arguments":"{\"city\":\"Oslo\"}"}}]"#;
    session
        .append(vec![
            NewMessage::new(Role::System, "You are terse."),
            NewMessage {
                role: Role::User,
                content: Some(Content::Parts(json(parts))),
                name: Some("alice".into()),
                metadata: Some(json(r#"{"client":"web"}"#)),
                ..NewMessage::default()
            },
            NewMessage {
                role: Role::Assistant,
                tool_calls: Some(json(calls)),
                ..NewMessage::default()
            },
            NewMessage {
                role: Role::Tool,
                tool_call_id: Some("call_1".into()),
                content: Some("-3 C".into()),
                ..NewMessage::default()
            },
        ])
        .await
        .expect("append");
    // A draft cut short, one aborted, one that ends with a tool call (answered), and one with
    // nothing at all that still completes.
    let (cut, _) = session
        .start_message(NewMessage::assistant("It is"))
        .await
        .expect("start");
    session.append_delta(cut, 5, " cold").await.expect("delta");
    session
        .finish_message(cut, MessageStatus::Incomplete, None)
        .await
        .expect("cut");
    let (stopped, _) = session
        .start_message(NewMessage::assistant("Let me"))
        .await
        .expect("start");
    session
        .finish_message(stopped, MessageStatus::Aborted, None)
        .await
        .expect("abort");
    let (calling, _) = session
        .start_message(NewMessage::assistant("Checking"))
        .await
        .expect("start");
    engine
        .finish_message(FinishMessage {
            user_id: "alice".into(),
            session_id: session.id(),
            message_id: calling,
            status: MessageStatus::Completed,
            tool_calls: Some(json(
                r#"[{"id":"call_2","type":"function","function":{"name":"w","arguments":"{}"}}]"#,
            )),
            refusal: None,
            usage: Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
            }),
        })
        .await
        .expect("finish with a call");
    let (empty, _) = session
        .start_message(NewMessage {
            role: Role::Assistant,
            ..NewMessage::default()
        })
        .await
        .expect("start empty");
    session
        .finish_message(empty, MessageStatus::Completed, None)
        .await
        .expect("finish empty");
    session
        .append(vec![
            NewMessage {
                role: Role::Tool,
                tool_call_id: Some("call_2".into()),
                content: Some("ok".into()),
                ..NewMessage::default()
            },
            NewMessage {
                role: Role::Assistant,
                refusal: Some("I cannot help with that.".into()),
                ..NewMessage::default()
            },
            NewMessage::user("Then say something"),
        ])
        .await
        .expect("append");
    session.add_usage(100, 20).await.expect("usage");
    let (_draft, _) = session
        .start_message(NewMessage::assistant("Something, so far"))
        .await
        .expect("a draft still streaming");
    let info = session.get(None, Some(1)).await.expect("read").session;
    let messages = all_messages(engine, "alice", session.id()).await;
    assert_eq!(messages.len(), 12);
    assert_eq!(messages[11].status, MessageStatus::InProgress);
    (
        info,
        messages.into_iter().map(ImportedMessage::from).collect(),
    )
}

/// An import of `messages` by `user` under `session_id`, with `info`'s title, metadata and
/// usage.
fn import_of(
    user: &str,
    session_id: SessionId,
    info: &SessionInfo,
    messages: Vec<ImportedMessage>,
) -> ImportSession {
    ImportSession {
        user_id: user.into(),
        session_id,
        title: info.title.clone(),
        metadata: Some(info.metadata.clone()),
        usage: info.usage,
        messages,
    }
}

/// `count` plain messages with ids of their own.
fn plain_messages(count: usize) -> Vec<ImportedMessage> {
    (0..count)
        .map(|index| {
            let role = if index % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            ImportedMessage {
                seq: Some(index as i64),
                id: Uuid::now_v7(),
                role,
                content: Some(format!("message {index}").into()),
                name: None,
                tool_calls: None,
                tool_call_id: None,
                function_call: None,
                refusal: None,
                metadata: None,
                status: MessageStatus::Completed,
                created_at: None,
            }
        })
        .collect()
}

/// The messages an import stored, as `original` had them: the same but for the draft still
/// streaming, stored `incomplete`.
fn assert_imported(imported: &[Message], original: &[ImportedMessage]) {
    assert_eq!(imported.len(), original.len());
    for (index, (stored, sent)) in imported.iter().zip(original).enumerate() {
        let mut expected = sent.clone();
        if expected.status == MessageStatus::InProgress {
            expected.status = MessageStatus::Incomplete;
        }
        assert_eq!(
            ImportedMessage::from(stored.clone()),
            expected,
            "message {index}: fields, status, id, seq and time kept"
        );
    }
}

async fn an_import_stores_the_session_and_every_message_as_exported(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let (info, messages) = rich_session(&engine).await;
    let copy = SessionId::new();
    let imported = engine
        .import_session(import_of("bob", copy, &info, messages.clone()))
        .await
        .expect("import");
    assert!(imported.created);
    let session = &imported.session;
    assert_eq!(session.id, copy);
    assert_eq!(
        session.user_id, "bob",
        "the importer owns it, whoever did before"
    );
    assert_eq!(session.title.as_deref(), Some("Trip planning"));
    assert_eq!(
        session.metadata, info.metadata,
        "metadata as sent, digits and all"
    );
    assert_eq!(session.usage, info.usage);
    assert_eq!(session.message_count, 12);
    assert_eq!(session.version, 1, "one write");

    assert_imported(&all_messages(&engine, "bob", copy).await, &messages);
    passivated(&engine, copy).await;
    assert_imported(&all_messages(&engine, "bob", copy).await, &messages);
    let read = engine
        .session("bob", copy)
        .get(None, Some(1))
        .await
        .expect("read");
    assert_eq!(read.session, *session, "as answered, from the database");
    assert!(
        read.pending_tool_calls.is_empty(),
        "both calls answered: {:?}",
        read.pending_tool_calls
    );
    if db.shareable() {
        let rows = stored_rows(&db.url, copy).await.expect("rows");
        assert_eq!(rows.len(), 12);
        assert_contiguous(&rows);
    }

    // The imported session goes on like any other: tool pairing carried over, a new turn.
    let bob = engine.session("bob", copy);
    assert_eq!(
        plain(
            bob.append(vec![NewMessage {
                role: Role::Tool,
                tool_call_id: Some("call_1".into()),
                content: Some("again".into()),
                ..NewMessage::default()
            }])
            .await
        ),
        err(Error::ToolCallAnswered {
            id: "call_1".into()
        })
    );
    let (_, seq) = bob
        .start_message(NewMessage::assistant("new"))
        .await
        .expect("no draft in progress: the imported one is incomplete");
    assert_eq!(seq, 12);
}

async fn a_bad_third_message_stores_nothing(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            limits: Limits {
                max_content_bytes: 100,
                ..Limits::default()
            },
            ..db.config()
        })
        .await
        .expect("engine");
    let info = created_session(&engine)
        .await
        .get(None, None)
        .await
        .expect("read")
        .session;
    let id = SessionId::new();
    let with_third = |third: ImportedMessage| {
        let mut messages = plain_messages(5);
        messages[2] = ImportedMessage {
            seq: Some(2),
            ..third
        };
        import_of("alice", id, &info, messages)
    };
    let base = plain_messages(3).remove(2);
    let too_long = ImportedMessage {
        content: Some("x".repeat(101).into()),
        ..base.clone()
    };
    let unknown_call = ImportedMessage {
        role: Role::Tool,
        tool_call_id: Some("call_9".into()),
        ..base.clone()
    };
    let user_draft = ImportedMessage {
        role: Role::User,
        status: MessageStatus::Incomplete,
        ..base.clone()
    };
    let empty = ImportedMessage {
        role: Role::User,
        content: None,
        ..base.clone()
    };
    let nil = ImportedMessage {
        id: Uuid::nil(),
        ..base.clone()
    };
    let cases = [
        (
            too_long,
            Error::TooLarge {
                field: "messages[2].content".into(),
                size: 101,
                limit: 100,
            },
        ),
        (
            unknown_call,
            Error::UnknownToolCall {
                id: "call_9".into(),
            },
        ),
        (
            user_draft,
            Error::invalid(
                "messages[2].status",
                "only a draft (an assistant message) ends incomplete",
            ),
        ),
        (
            empty,
            Error::invalid(
                "messages[2].content",
                "a message needs content, tool_calls, function_call or refusal",
            ),
        ),
        (
            nil,
            Error::invalid("messages[2].id", "the nil UUID is not a message id"),
        ),
    ];
    for (third, error) in cases {
        assert_eq!(
            plain(engine.import_session(with_third(third)).await),
            err(error)
        );
        assert_eq!(
            plain(engine.session("alice", id).get(None, None).await),
            err(Error::NotFound),
            "no session"
        );
        if db.shareable() {
            assert!(stored_rows(&db.url, id).await.expect("rows").is_empty());
        }
    }
    let good = engine
        .import_session(with_third(base))
        .await
        .expect("the same file, mended");
    assert!(good.created);
    assert_eq!(good.session.message_count, 5);
}

async fn importing_again_changes_nothing(db: TestDb) {
    // Two cached messages: the repeat compares most of them as read from the database.
    let engine = db
        .engine_with(EngineConfig {
            cached_messages: 2,
            ..db.config()
        })
        .await
        .expect("engine");
    let (info, messages) = rich_session(&engine).await;
    let copy = SessionId::new();
    let import = import_of("alice", copy, &info, messages.clone());
    let first = engine.import_session(import.clone()).await.expect("import");
    assert!(first.created);
    let again = engine.import_session(import.clone()).await.expect("again");
    assert!(!again.created, "a repeat");
    assert_eq!(
        again.session, first.session,
        "the same answer; nothing changed"
    );
    passivated(&engine, copy).await;
    let again = engine.import_session(import.clone()).await.expect("again");
    assert_eq!(
        again.session, first.session,
        "the same, loaded from the database"
    );
    assert!(!again.created);

    // Messages added since do not make it another import.
    let alice = engine.session("alice", copy);
    alice
        .append(vec![NewMessage::user("one more")])
        .await
        .expect("append");
    let again = engine.import_session(import).await.expect("again");
    assert!(!again.created);
    assert_eq!(again.session.message_count, 13);
    assert_imported(&all_messages(&engine, "alice", copy).await[..12], &messages);

    // Many at once, on one engine: one creates, the others are repeats.
    let id = SessionId::new();
    let import = import_of("alice", id, &info, plain_messages(300));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (engine, import) = (engine.clone(), import.clone());
            tokio::spawn(async move { engine.import_session(import).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        let imported = task.await.expect("task").expect("import");
        created += usize::from(imported.created);
        assert_eq!(imported.session.message_count, 300);
    }
    assert_eq!(created, 1);
    if db.shareable() {
        let rows = stored_rows(&db.url, id).await.expect("rows");
        assert_eq!(rows.len(), 300);
        assert_contiguous(&rows);
    }
}

async fn another_import_under_a_taken_id_is_refused(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let info = created_session(&engine)
        .await
        .get(None, None)
        .await
        .expect("read")
        .session;
    let id = SessionId::new();
    let messages = plain_messages(4);
    let first = engine
        .import_session(import_of("alice", id, &info, messages.clone()))
        .await
        .expect("import");

    let mut edited = messages.clone();
    edited[1].content = Some("edited".into());
    assert_eq!(
        plain(
            engine
                .import_session(import_of("alice", id, &info, edited))
                .await
        ),
        err(Error::MessageIdReused { id: messages[1].id }),
        "an id stored with other content"
    );
    let mut moved = messages.clone();
    moved.swap(0, 1);
    for (seq, message) in moved.iter_mut().enumerate() {
        message.seq = Some(seq as i64);
    }
    let moved_id = moved[0].id;
    assert_eq!(
        plain(
            engine
                .import_session(import_of("alice", id, &info, moved))
                .await
        ),
        err(Error::MessageIdReused { id: moved_id }),
        "an id stored at another sequence"
    );
    assert_eq!(
        plain(
            engine
                .import_session(import_of("alice", id, &info, plain_messages(4)))
                .await
        ),
        err(Error::SessionIdTaken),
        "other messages"
    );
    let mut longer = messages.clone();
    longer.extend(plain_messages(5).into_iter().skip(4));
    assert_eq!(
        plain(
            engine
                .import_session(import_of("alice", id, &info, longer))
                .await
        ),
        err(Error::SessionIdTaken),
        "more messages than the session holds"
    );
    // A session created empty under the id is not this import either.
    let empty = created_session(&engine).await;
    assert_eq!(
        plain(
            engine
                .import_session(import_of("alice", empty.id(), &info, messages.clone()))
                .await
        ),
        err(Error::SessionIdTaken)
    );

    let now = engine
        .session("alice", id)
        .get(None, None)
        .await
        .expect("read");
    assert_eq!(now.session, first.session, "nothing changed");
    assert_eq!(now.messages.len(), 4);
    for (stored, sent) in now.messages.iter().zip(&messages) {
        assert_eq!(
            (stored.id, stored.text()),
            (sent.id, sent.content.as_ref().and_then(Content::as_text))
        );
    }
}

async fn someone_elses_id_is_not_found(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let info = created_session(&engine)
        .await
        .get(None, None)
        .await
        .expect("read")
        .session;
    let id = SessionId::new();
    let messages = plain_messages(3);
    let first = engine
        .import_session(import_of("alice", id, &info, messages.clone()))
        .await
        .expect("import");
    for import in [
        import_of("mallory", id, &info, messages.clone()),
        import_of("mallory", id, &info, plain_messages(3)),
    ] {
        assert_eq!(
            plain(engine.import_session(import).await),
            err(Error::NotFound),
            "as every command on another user's session is answered"
        );
    }
    let now = engine
        .session("alice", id)
        .get(None, None)
        .await
        .expect("read");
    assert_eq!(now.session, first.session, "still alice's, unchanged");

    // Deleted: not found to anyone, its owner included, and never reused.
    engine.session("alice", id).delete().await.expect("delete");
    for user in ["alice", "mallory"] {
        assert_eq!(
            plain(
                engine
                    .import_session(import_of(user, id, &info, messages.clone()))
                    .await
            ),
            err(Error::NotFound),
            "{user}"
        );
    }

    // With foreign sessions revealed, another user's is forbidden, as elsewhere.
    engine.shutdown().await;
    let engine = db
        .engine_with(EngineConfig {
            hide_foreign_sessions: false,
            ..db.config()
        })
        .await
        .expect("engine");
    let id = SessionId::new();
    engine
        .import_session(import_of("alice", id, &info, messages.clone()))
        .await
        .expect("import");
    assert_eq!(
        plain(
            engine
                .import_session(import_of("mallory", id, &info, messages))
                .await
        ),
        err(Error::Forbidden)
    );
}

async fn an_import_is_bounded_and_checked_whole(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            limits: Limits {
                max_import_messages: 10,
                ..Limits::default()
            },
            ..db.config()
        })
        .await
        .expect("engine");
    let info = created_session(&engine)
        .await
        .get(None, None)
        .await
        .expect("read")
        .session;
    let id = SessionId::new();
    let import = |messages| import_of("alice", id, &info, messages);
    assert_eq!(
        plain(engine.import_session(import(plain_messages(11))).await),
        err(Error::TooLarge {
            field: "messages".into(),
            size: 11,
            limit: 10
        })
    );
    let mut gap = plain_messages(3);
    gap[2].seq = Some(3);
    assert_eq!(
        plain(engine.import_session(import(gap)).await),
        err(Error::invalid(
            "messages[2].seq",
            "is not 2: messages are imported in sequence order, from 0, without gaps"
        ))
    );
    let mut twice = plain_messages(3);
    twice[2].id = twice[0].id;
    assert_eq!(
        plain(engine.import_session(import(twice)).await),
        err(Error::invalid(
            "messages[2].id",
            "the same message id appears twice in one import"
        ))
    );
    let negative = ImportSession {
        usage: Usage {
            prompt_tokens: -1,
            completion_tokens: 0,
        },
        ..import(plain_messages(1))
    };
    assert_eq!(
        plain(engine.import_session(negative).await),
        err(Error::invalid(
            "usage.prompt_tokens",
            format!("must be 0 to {}", soloist::MAX_USAGE_TOTAL)
        ))
    );
    assert_eq!(
        plain(
            engine
                .import_session(import_of(
                    "alice",
                    SessionId::from_uuid(Uuid::nil()),
                    &info,
                    plain_messages(1)
                ))
                .await
        ),
        err(Error::invalid(
            "session_id",
            "the nil UUID is not a session id"
        ))
    );
    let untitled = ImportSession {
        title: Some("\0".into()),
        ..import(plain_messages(1))
    };
    assert!(matches!(
        engine.import_session(untitled).await,
        Err(Error::InvalidInput { ref field, .. }) if field == "title"
    ));
    assert_eq!(
        plain(engine.session("alice", id).get(None, None).await),
        err(Error::NotFound),
        "none of them stored anything"
    );
    // No seq and no time: positions from the order, times from the import.
    let mut bare = plain_messages(10);
    for message in &mut bare {
        message.seq = None;
    }
    let before = chrono::Utc::now();
    let imported = engine
        .import_session(import(bare))
        .await
        .expect("at the limit");
    assert_eq!(imported.session.message_count, 10);
    let stored = all_messages(&engine, "alice", id).await;
    assert!(
        stored
            .iter()
            .all(|message| message.created_at >= before - chrono::Duration::milliseconds(1))
    );
    // An empty session imports too.
    let empty = engine
        .import_session(import_of("alice", SessionId::new(), &info, Vec::new()))
        .await
        .expect("empty");
    assert_eq!(empty.session.message_count, 0);
}

/// The import's write fails in the database at its third row (a trigger refuses it): the
/// session row and the two rows before went in within the same transaction, and none of it
/// stays. Once the trigger is gone, the same import goes through whole.
async fn a_write_that_fails_midway_leaves_nothing(db: TestDb) {
    let engine = db
        .engine_with(EngineConfig {
            max_conflict_retries: 1,
            ..db.config()
        })
        .await
        .expect("engine");
    let refuse = if db.url.starts_with("postgres") {
        vec![
            "CREATE FUNCTION refuse_third() RETURNS trigger AS $$ BEGIN \
             RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_third BEFORE INSERT ON messages FOR EACH ROW \
             WHEN (NEW.seq = 2) EXECUTE FUNCTION refuse_third()",
        ]
    } else {
        vec![
            "CREATE TRIGGER refuse_third BEFORE INSERT ON messages WHEN NEW.seq = 2 \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        ]
    };
    run_sql(&db.url, &refuse).await;
    let info = SessionInfo {
        title: Some("t".into()),
        ..created_session(&engine)
            .await
            .get(None, None)
            .await
            .expect("read")
            .session
    };
    let id = SessionId::new();
    let import = import_of("alice", id, &info, plain_messages(50));
    let failed = engine.import_session(import.clone()).await;
    assert!(
        matches!(&failed, Err(Error::InvalidInput { field, .. }) if field == "command"),
        "refused by the database, not to be retried: {failed:?}"
    );
    assert!(stored_rows(&db.url, id).await.expect("rows").is_empty());
    assert_eq!(
        plain(engine.session("alice", id).get(None, None).await),
        err(Error::NotFound),
        "no session row either"
    );
    let drop = if db.url.starts_with("postgres") {
        "DROP TRIGGER refuse_third ON messages"
    } else {
        "DROP TRIGGER refuse_third"
    };
    run_sql(&db.url, &[drop]).await;
    let imported = engine.import_session(import).await.expect("import");
    assert!(imported.created);
    let rows = stored_rows(&db.url, id).await.expect("rows");
    assert_eq!(rows.len(), 50);
    assert_contiguous(&rows);
}

/// Two processes import the same file at once: one creates the session, the other finds it
/// (through the database's refusal of a second row) and answers a repeat.
async fn two_processes_import_the_same_file(db: TestDb) {
    let (a, b) = (
        db.engine().await.expect("engine a"),
        db.engine().await.expect("engine b"),
    );
    let info = created_session(&a)
        .await
        .get(None, None)
        .await
        .expect("read")
        .session;
    for round in 0..5 {
        let id = SessionId::new();
        let import = import_of("alice", id, &info, plain_messages(200));
        let (first, second) = tokio::join!(
            a.import_session(import.clone()),
            b.import_session(import.clone())
        );
        let (first, second) = (first.expect("a"), second.expect("b"));
        assert_eq!(
            u8::from(first.created) + u8::from(second.created),
            1,
            "round {round}: exactly one created it"
        );
        let rows = stored_rows(&db.url, id).await.expect("rows");
        assert_eq!(rows.len(), 200);
        assert_contiguous(&rows);
    }
}

/// Runs each statement on a connection of its own to the database at `url`.
async fn run_sql(url: &str, statements: &[&str]) {
    soloist_testkit::run_sql(url, statements)
        .await
        .expect("statements run");
}

on_every_backend!(
    an_import_stores_the_session_and_every_message_as_exported,
    a_bad_third_message_stores_nothing,
    importing_again_changes_nothing,
    another_import_under_a_taken_id_is_refused,
    someone_elses_id_is_not_found,
    an_import_is_bounded_and_checked_whole,
);

/// What needs a second connection to the same database: not `sqlite::memory:`.
mod shared {
    use super::*;

    on_shared_backends!(
        a_write_that_fails_midway_leaves_nothing,
        two_processes_import_the_same_file,
    );
}
