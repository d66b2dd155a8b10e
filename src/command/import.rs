
#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use crate::model::{Content, Role};

    /// An import travels between processes as JSON: its messages must come back exactly,
    /// raw JSON, statuses and times included.
    #[test]
    fn an_import_round_trips_as_a_command() {
        let message = ImportedMessage {
            seq: Some(0),
            id: uuid::Uuid::now_v7(),
            role: Role::Assistant,
            content: Some(Content::Text("so far".into())),
            name: None,
            tool_calls: Some(RawJson::parse(r#"[{"id":"c","n":1.50}]"#).expect("json")),
            tool_call_id: None,
            function_call: None,
            refusal: None,
            metadata: None,
            status: MessageStatus::Incomplete,
            created_at: Some(chrono::DateTime::UNIX_EPOCH),
        };
        let import = ImportSession {
            user_id: "alice".into(),
            session_id: SessionId::new(),
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
            },
            messages: vec![message.clone()],
            ..ImportSession::default()
        };
        let text = serde_json::to_string(&Command::from(import)).expect("serialize");
        let Command::ImportSession(back) = Command::from_json(&text).expect("parse") else {
            panic!("another command: {text}");
        };
        assert_eq!(back.messages, vec![message]);
        assert_eq!(back.usage.completion_tokens, 4);
    }
}
