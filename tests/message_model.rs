//! The chat message model, on every backend: content as a text or as an array of typed parts,
//! and per-message metadata, stored and returned exactly as sent (the JSON text, byte for
//! byte), part of a resend's identity, and checked before anything is stored.

use soloist::{Content, Error, NewMessage, RawJson, Role};
use soloist_testkit::{TestDb, created_session, on_every_backend, passivated};

/// A message parsed from JSON, as the server reads a request body.
fn message(json: &str) -> NewMessage {
    serde_json::from_str(json).expect("a message")
}

/// Text with odd spacing, a key order that is not sorted, a number with more digits than an
/// `f64` holds, and a duplicate key: nothing of it survives a parse into a tree.
const PARTS: &str = r#"[ {"type":"text", "text":"What is in this image?"},
    {"image_url": {"url": "https://example.com/cat.png", "detail":"low"}, "type": "image_url"},
    {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}},
    {"type": "file", "file": {"file_id": "file-1", "size": 1.000000000000000000001}}]"#;
const METADATA: &str = r#"{"z": 1, "a": [true, null], "score": 0.1000000000000000000001, "z": 2}"#;

async fn parts_and_metadata_round_trip_exactly(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let user = message(&format!(
        r#"{{"role": "user", "content": {PARTS}, "metadata": {METADATA}}}"#
    ));
    let assistant = message(
        r#"{"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}"#,
    );
    let plain = message(r#"{"role": "user", "content": "plain text", "metadata": {}}"#);
    let seqs = session
        .append(vec![user.clone(), assistant.clone(), plain])
        .await
        .expect("append");
    assert_eq!(seqs, vec![0, 1, 2]);
    passivated(&engine, session.id()).await;

    let page = session.get(None, None).await.expect("read");
    let stored = &page.messages;
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored[0].content,
        Some(Content::Parts(RawJson::parse(PARTS).expect("json")))
    );
    let json = serde_json::to_string(stored[0].as_ref()).expect("serialize");
    let compact_parts = RawJson::parse(PARTS).expect("json").get().to_owned();
    assert!(
        json.contains(&format!(r#""content":{compact_parts}"#)),
        "the parts come back as sent: {json}"
    );
    assert!(
        json.contains(&format!(r#""metadata":{METADATA}"#)),
        "the metadata comes back as sent: {json}"
    );
    assert_eq!(stored[0].text(), None);
    assert_eq!(stored[1].role, Role::Assistant);
    assert!(matches!(&stored[1].content, Some(Content::Parts(_))));
    assert_eq!(stored[2].text(), Some("plain text"));
    assert_eq!(
        stored[2].metadata.as_ref().map(RawJson::get),
        Some("{}"),
        "an empty object is kept"
    );
    assert_eq!(stored[1].metadata, None, "no metadata is none, not {{}}");

    // A resend of the same message (same id) is recognised: parts and metadata count.
    let id = stored[0].id;
    let again = session
        .append(vec![user.clone().with_id(id)])
        .await
        .expect("resend");
    assert_eq!(again, vec![0], "the resend answers the first sequence");
    let mut other_metadata = user.clone().with_id(id);
    other_metadata.metadata = Some(RawJson::parse(r#"{"z": 3}"#).expect("json"));
    let refused = session.append(vec![other_metadata]).await;
    assert!(
        matches!(refused, Err(Error::MessageIdReused { id: reused }) if reused == id),
        "{refused:?}"
    );
    let mut as_text = user.with_id(id);
    as_text.content = Some(Content::Text(PARTS.into()));
    let refused = session.append(vec![as_text]).await;
    assert!(
        matches!(refused, Err(Error::MessageIdReused { .. })),
        "a text with the parts' JSON is other content: {refused:?}"
    );
    let page = session.get(None, None).await.expect("read");
    assert_eq!(page.session.message_count, 3, "nothing more was stored");
}

async fn malformed_parts_and_metadata_are_refused_whole(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let cases = [
        (r#"{"role": "user", "content": []}"#, "messages[1].content"),
        (r#"{"role": "user", "content": [1]}"#, "messages[1].content"),
        (
            r#"{"role": "user", "content": [{"text": "no type"}]}"#,
            "messages[1].content",
        ),
        (
            r#"{"role": "user", "content": [{"type": "video", "video": {}}]}"#,
            "messages[1].content[0].type",
        ),
        (
            r#"{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}"#,
            "messages[1].content[0].type",
        ),
        (
            r#"{"role": "system", "content": [{"type": "refusal", "refusal": "no"}]}"#,
            "messages[1].content[0].type",
        ),
        (
            r#"{"role": "user", "content": [{"type": "text"}]}"#,
            "messages[1].content[0].text",
        ),
        (
            r#"{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}"#,
            "messages[1].content[0].text",
        ),
        (
            r#"{"role": "user", "content": [{"type": "image_url", "image_url": "https://x"}]}"#,
            "messages[1].content[0].image_url",
        ),
        (
            r#"{"role": "user", "content": "x", "metadata": [1]}"#,
            "messages[1].metadata",
        ),
        (
            r#"{"role": "user", "content": "x", "metadata": "text"}"#,
            "messages[1].metadata",
        ),
    ];
    for (json, field) in cases {
        let good = NewMessage::user("fine");
        let refused = session.append(vec![good, message(json)]).await;
        match refused {
            Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field, "{json}"),
            other => panic!("{json}: expected invalid input at {field}, got {other:?}"),
        }
    }
    // Too deep, and too large.
    let deep = format!(
        r#"{{"role": "user", "content": [{{"type": "text", "text": "x", "extra": {}1{}}}]}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let refused = session.append(vec![message(&deep)]).await;
    assert!(
        matches!(&refused, Err(Error::InvalidInput { field, .. }) if field == "messages[0].content"),
        "{refused:?}"
    );
    let limit = engine.config().limits.max_content_bytes;
    let large = format!(
        r#"{{"role": "user", "content": [{{"type": "text", "text": "{}"}}]}}"#,
        "x".repeat(limit)
    );
    let refused = session.append(vec![message(&large)]).await;
    assert!(
        matches!(&refused, Err(Error::TooLarge { field, .. }) if field == "messages[0].content"),
        "{refused:?}"
    );
    let page = session.get(None, None).await.expect("read");
    assert_eq!(page.session.message_count, 0, "no append stored anything");
    // Content that is neither a string nor an array does not parse at all.
    let parsed = serde_json::from_str::<NewMessage>(r#"{"role": "user", "content": 5}"#);
    assert!(parsed.is_err(), "{parsed:?}");
}

fn tool_result(call: &str) -> NewMessage {
    NewMessage {
        tool_call_id: Some(call.into()),
        ..NewMessage::new(Role::Tool, format!("result of {call}"))
    }
}

fn pending(page: &soloist::SessionPage) -> Vec<(String, i64)> {
    page.pending_tool_calls
        .iter()
        .map(|call| (call.id.clone(), call.seq))
        .collect()
}

/// A tool message answers, by its `tool_call_id`, a call an earlier assistant message made and
/// nobody answered: an unknown call and a second answer are refused and store nothing; call
/// ids are unique in a session; the calls waiting for an answer show in every read, also once
/// the calls are older than the cached messages and the session was loaded again.
async fn tool_results_pair_with_tool_calls(db: TestDb) {
    let config = soloist::EngineConfig {
        cached_messages: 2,
        ..db.config()
    };
    let engine = db.engine_with(config).await.expect("engine");
    let session = created_session(&engine).await;
    let calls = message(
        r#"{"role": "assistant", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}"#,
    );
    session.append(vec![calls]).await.expect("calls");
    let page = session.get(None, None).await.expect("read");
    assert_eq!(
        pending(&page),
        vec![("call_a".into(), 0), ("call_b".into(), 0)]
    );

    let answer = tool_result("call_a").with_id(soloist::uuid::Uuid::now_v7());
    assert_eq!(
        session.append(vec![answer.clone()]).await.expect("answer"),
        vec![1]
    );
    assert_eq!(
        session
            .append(vec![answer])
            .await
            .expect("the same answer again"),
        vec![1],
        "a resend is not a second answer"
    );
    let twice = session.append(vec![tool_result("call_a")]).await;
    assert!(
        matches!(&twice, Err(Error::ToolCallAnswered { id }) if id == "call_a"),
        "{twice:?}"
    );
    let unknown = session.append(vec![tool_result("call_z")]).await;
    assert!(
        matches!(&unknown, Err(Error::UnknownToolCall { id }) if id == "call_z"),
        "{unknown:?}"
    );
    let reused = session
        .append(vec![message(
            r#"{"role": "assistant", "tool_calls": [{"id": "call_b", "type": "function",
                "function": {"name": "g", "arguments": "{}"}}]}"#,
        )])
        .await;
    assert!(
        matches!(&reused, Err(Error::InvalidInput { field, .. }) if field == "messages[0].tool_calls"),
        "{reused:?}"
    );
    // In one append: a call and its answer; a second answer to it in the same append is
    // refused, and refuses the whole append.
    let both = session
        .append(vec![
            message(
                r#"{"role": "assistant", "tool_calls": [{"id": "call_c", "type": "function",
                    "function": {"name": "h", "arguments": "{}"}}]}"#,
            ),
            tool_result("call_c"),
            tool_result("call_c"),
        ])
        .await;
    assert!(
        matches!(&both, Err(Error::ToolCallAnswered { .. })),
        "{both:?}"
    );
    let page = session.get(None, None).await.expect("read");
    assert_eq!(
        page.session.message_count, 2,
        "no refused append stored anything"
    );
    assert_eq!(pending(&page), vec![("call_b".into(), 0)]);

    // The calls fall out of the two cached messages, and the session is loaded again.
    for turn in 0..4 {
        session
            .append(vec![NewMessage::user(format!("turn {turn}"))])
            .await
            .expect("user");
    }
    passivated(&engine, session.id()).await;
    let page = session.get(Some(4), None).await.expect("read");
    assert_eq!(pending(&page), vec![("call_b".into(), 0)]);
    let twice = session.append(vec![tool_result("call_a")]).await;
    assert!(
        matches!(&twice, Err(Error::ToolCallAnswered { .. })),
        "{twice:?}"
    );
    session
        .append(vec![tool_result("call_b")])
        .await
        .expect("the other answer");
    // A streamed reply's tool calls come with its finish.
    let (draft, seq) = session
        .start_message(NewMessage::assistant("Checking"))
        .await
        .expect("draft");
    let finish = soloist::FinishMessage {
        user_id: "alice".into(),
        session_id: session.id(),
        message_id: draft,
        status: soloist::MessageStatus::Completed,
        tool_calls: Some(
            RawJson::parse(
                r#"[{"id": "call_d", "type": "function", "function": {"name": "d", "arguments": "{}"}}]"#,
            )
            .expect("json"),
        ),
        refusal: None,
        usage: None,
    };
    engine.finish_message(finish).await.expect("finish");
    let page = session.get(None, Some(0)).await.expect("read");
    assert_eq!(pending(&page), vec![("call_d".into(), seq)]);
    session
        .append(vec![tool_result("call_d")])
        .await
        .expect("answered");
}

/// `tool_calls` in the chat format's shape, wherever they enter (an append, a draft's
/// finish): anything else is refused, naming the field, and stores nothing.
async fn tool_calls_have_the_chat_format_s_shape(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = created_session(&engine).await;
    let refused = [
        (r#"[1, 2]"#, "tool_calls"),
        (r#"[[]]"#, "tool_calls"),
        (r#"[]"#, "tool_calls"),
        (r#"{"id": "c1"}"#, "tool_calls"),
        (r#"[{"foo": 1}]"#, "tool_calls[0].id"),
        (r#"[{"id": "", "type": "function"}]"#, "tool_calls[0].id"),
        (r#"[{"id": 7, "type": "function"}]"#, "tool_calls"),
        (r#"[{"id": "c1"}]"#, "tool_calls[0].type"),
        (
            r#"[{"id": "c1", "type": "function"}]"#,
            "tool_calls[0].function",
        ),
        (
            r#"[{"id": "c1", "type": "function", "function": {"arguments": "{}"}}]"#,
            "tool_calls[0].function",
        ),
        (
            r#"[{"id": "c1", "type": "custom", "custom": {}}, {"id": "c1", "type": "custom"}]"#,
            "tool_calls[1].id",
        ),
    ];
    for (tool_calls, field) in refused {
        let appended = session
            .append(vec![message(&format!(
                r#"{{"role": "assistant", "tool_calls": {tool_calls}}}"#
            ))])
            .await;
        let expected = format!("messages[0].{field}");
        assert!(
            matches!(&appended, Err(Error::InvalidInput { field, .. }) if *field == expected),
            "{tool_calls}: {appended:?}"
        );
        let (draft, _) = session
            .start_message(NewMessage::assistant("thinking"))
            .await
            .expect("start");
        let finished = engine
            .finish_message(soloist::FinishMessage {
                user_id: "alice".into(),
                session_id: session.id(),
                message_id: draft,
                status: soloist::MessageStatus::Completed,
                tool_calls: Some(RawJson::parse(tool_calls).expect("JSON")),
                refusal: None,
                usage: None,
            })
            .await;
        assert!(
            matches!(&finished, Err(Error::InvalidInput { field: refused, .. }) if refused == field),
            "finish with {tool_calls}: {finished:?}"
        );
        session
            .finish_message(draft, soloist::MessageStatus::Incomplete, None)
            .await
            .expect("finished otherwise");
    }
    // A call of another type than function passes with its own fields.
    let other = r#"[{"id": "c9", "type": "custom", "custom": {"name": "grep", "input": "x"}}]"#;
    session
        .append(vec![message(&format!(
            r#"{{"role": "assistant", "tool_calls": {other}}}"#
        ))])
        .await
        .expect("a custom tool call");
    // Only a draft finishes: a user's message is not one.
    let seq = session
        .append(vec![NewMessage::user("hello")])
        .await
        .expect("user")[0];
    let page = session.get(Some(seq - 1), Some(1)).await.expect("read");
    let finished = session
        .finish_message(page.messages[0].id, soloist::MessageStatus::Completed, None)
        .await;
    assert!(
        matches!(finished, Err(Error::MessageFinished { .. })),
        "{finished:?}"
    );
}

on_every_backend!(
    parts_and_metadata_round_trip_exactly,
    malformed_parts_and_metadata_are_refused_whole,
    tool_results_pair_with_tool_calls,
    tool_calls_have_the_chat_format_s_shape,
);
