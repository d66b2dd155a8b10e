//! The workloads (who writes what, how often) and the messages they write.
//!
//! Every strategy writes the same messages: a user message of about 100 bytes, and in the
//! chat-turn workload an assistant message with a `tool_calls` JSON array as well. Message ids
//! are client-supplied UUIDv7s (the engine's own default), so every strategy inserts in the same
//! index order.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Value, json};
use soloist::uuid::Uuid;
use soloist::{NewMessage, Role};

/// The owner of every session the benchmark creates.
pub const USER_ID: &str = "soloist-load";

/// Messages the chat-turn workload reads back after each user message.
pub const HISTORY_MESSAGES: usize = 50;

/// A workload: a number of sessions, a number of concurrent writers per session, and the loop
/// each writer runs until the run's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Hot session: 1 session, 64 writers, each appending one user message at a time.
    Hot,
    /// Many sessions: 1,000 sessions x 4 writers, each appending one user message at a time.
    Many,
    /// Chat turn: 200 sessions x 2 writers; each turn appends a user message, reads the last
    /// 50 messages, appends an assistant message with tool calls, and adds token usage.
    ChatTurn,
}

impl Workload {
    /// Sessions when `--sessions` is not given.
    pub fn default_sessions(self) -> usize {
        match self {
            Workload::Hot => 1,
            Workload::Many => 1_000,
            Workload::ChatTurn => 200,
        }
    }

    /// Writers per session when `--writers` is not given.
    pub fn default_writers(self) -> usize {
        match self {
            Workload::Hot => 64,
            Workload::Many => 4,
            Workload::ChatTurn => 2,
        }
    }

    /// A short human name for tables.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Hot => "hot session",
            Workload::Many => "many sessions",
            Workload::ChatTurn => "chat turn",
        }
    }

    /// The name used on the command line and in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Hot => "hot",
            Workload::Many => "many",
            Workload::ChatTurn => "chat-turn",
        }
    }
}

/// One message as every strategy writes it.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Client-supplied message id (the idempotency key).
    pub id: Uuid,
    /// `user` or `assistant`.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The tool calls of an assistant message, as JSON.
    pub tool_calls: Option<Value>,
    /// The same, serialized once for the raw-SQL strategies (the engine serializes its own).
    pub tool_calls_text: Option<String>,
}

impl Outgoing {
    /// The user message number `turn` of writer `writer`.
    pub fn user(writer: usize, turn: u64) -> Self {
        Self {
            id: Uuid::now_v7(),
            role: Role::User,
            content: format!(
                "writer {writer}, message {turn}: what will the weather be like in Paris \
                 tomorrow, and should I bring an umbrella?"
            ),
            tool_calls: None,
            tool_calls_text: None,
        }
    }

    /// The assistant's answer to turn `turn` of writer `writer`: a short text and one tool call.
    pub fn assistant(writer: usize, turn: u64) -> Self {
        let tool_calls = json!([{
            "id": format!("call_{writer}_{turn}"),
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": "{\"city\":\"Paris\",\"unit\":\"celsius\",\"days\":1}"
            }
        }]);
        let text = tool_calls.to_string();
        Self {
            id: Uuid::now_v7(),
            role: Role::Assistant,
            content: format!("Let me look up tomorrow's forecast for Paris (turn {turn})."),
            tool_calls: Some(tool_calls),
            tool_calls_text: Some(text),
        }
    }

    /// The message as the engine takes it, with its id set.
    pub fn to_new_message(&self) -> NewMessage {
        NewMessage {
            id: Some(self.id),
            role: self.role,
            content: Some(self.content.clone().into()),
            tool_calls: self.tool_calls.clone().map(Into::into),
            ..NewMessage::default()
        }
    }
}

/// Microseconds since the Unix epoch, the unit both schemas store times in.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
