//! Model-based property test: random sequences of commands (valid and invalid, by the owner and
//! by an intruder) run against a real engine and against a plain in-memory model written from
//! the documented semantics. Every reply must match the model's: values on success, the error
//! kind on failure.
//!
//! Most cases run on in-memory SQLite (fast); fewer run on an SQLite file and on PostgreSQL,
//! where the sequences may also restart the engine on the same database. Each case picks one of
//! three tunings so that reads cross the boundary between the cached tail and the database,
//! and so that actors passivate and reload between commands.
//!
//! Streamed replies are commands like the others: drafts start, grow by deltas and finish, and
//! reads show each draft's content so far and its status. Drafts never time out here (the
//! timeout is an hour), so a restart or a reload leaves a draft streaming: it only ends
//! incomplete when nothing grew it for the timeout, which no case waits for.
//!
//! `generators.rs` holds the proptest strategies, `reference.rs` the model; this file holds the
//! settings every case shares, runs a case against both and compares them reply by reply.

mod generators;
mod reference;

use std::fmt::Debug;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError};
use soloist::uuid::Uuid;
use soloist::{
    AddUsage, AppendDeltas, AppendMessages, CreateSession, DeleteSession, Delta, Engine,
    EngineConfig, FinishMessage, GetSession, Limits, ListSessions, NewMessage, OnBusy, RawJson,
    SessionCursor, SessionId, SessionPage, UpdateSession, Usage,
};
use soloist_testkit::{Backend, TestDb};

use generators::{
    At, Case, DeltaSpec, DraftRef, Op, StartSpec, Text, build_message, build_start, case,
    finish_tool_calls,
};
use reference::{Expected, Model, kind};

/// `USERS[0]` owns what it creates; `USERS[1]` is mostly an intruder (but owns what it creates
/// first).
const USERS: [&str; 2] = ["owner", "intruder"];
/// Session ids per case.
const SESSIONS: usize = 3;
/// Client message ids per case, shared by every session so that ids get re-sent to the same
/// session (idempotency) and reused in other sessions (where they are new).
const ID_POOL: usize = 6;
/// The page size a listing without a limit asks for (documented default).
const DEFAULT_SESSION_PAGE: usize = 50;

/// `max_content_bytes`: content and refusals.
const CONTENT: usize = 16;
/// `max_text_bytes`: titles, names, tool call ids.
const SHORT: usize = 12;

/// Small limits, so that random input is often over them.
fn limits() -> Limits {
    Limits {
        max_content_bytes: CONTENT,
        max_messages_per_append: 3,
        // Five tool calls fit, six do not.
        max_json_bytes: 130,
        max_text_bytes: SHORT,
        max_page_size: 4,
        // Larger than any page generated: the byte bound has its own test.
        max_page_bytes: 1 << 20,
        // Deeper than anything generated: nesting is checked by the unit tests of `RawJson`.
        max_json_depth: 100,
        max_import_messages: 8,
    }
}

/// The engine configurations a case can run with.
#[derive(Clone, Copy, Debug)]
enum Tuning {
    /// Three cached messages per session: longer sessions read older pages from the database,
    /// and re-sent ids outside the tail are caught by the database's unique constraint.
    TinyCache,
    /// Nothing cached; foreign sessions answer `Forbidden` instead of `NotFound`.
    NoCacheForbidden,
    /// Actors passivate after 1 ms idle and at most one is live: nearly every command reloads.
    Churn,
}

fn config_for(db: &TestDb, tuning: Tuning) -> EngineConfig {
    let mut config = EngineConfig {
        limits: limits(),
        // No case waits this long: drafts end only when a command ends them.
        draft_timeout: Duration::from_secs(3600),
        ..db.config()
    };
    match tuning {
        Tuning::TinyCache => config.cached_messages = 3,
        Tuning::NoCacheForbidden => {
            config.cached_messages = 0;
            config.hide_foreign_sessions = false;
        }
        Tuning::Churn => {
            config.cached_messages = 2;
            config.idle_timeout = Duration::from_millis(1);
            config.max_live_sessions = Some(1);
        }
    }
    config
}

/// Pairs the engine's answer with the model's prediction: both values, both refusals of an
/// expected kind, or a mismatch.
fn pair<T: Debug, M: Debug>(
    actual: &soloist::Result<T>,
    expected: Expected<M>,
) -> Result<Option<(&T, M)>, String> {
    match (actual, expected) {
        (Ok(actual), Ok(expected)) => Ok(Some((actual, expected))),
        (Err(error), Err(kinds)) if kinds.contains(&kind(error)) => Ok(None),
        (actual, expected) => Err(format!(
            "engine answered {actual:?}, model expected {expected:?}"
        )),
    }
}

struct Run<'a> {
    db: &'a TestDb,
    config: EngineConfig,
    engine: Engine,
    ids: Vec<SessionId>,
    pool: Vec<Uuid>,
    /// Every draft start sent, oldest first, for deltas, finishes and resends to name.
    starts: Vec<NewMessage>,
    model: Model,
}

/// The draft's content after `delta` at `offset`, if the delta fits it (to choose the next
/// delta of a command; not a prediction).
fn applied(content: &str, offset: usize, text: &str) -> Option<String> {
    let overlap = content.len().checked_sub(offset)?.min(text.len());
    let fits = content.is_char_boundary(offset)
        && content.as_bytes()[offset..offset + overlap] == text.as_bytes()[..overlap];
    fits.then(|| format!("{content}{}", &text[overlap..]))
}

/// The delta `spec` describes, on a draft whose content is `content`: `(offset, text)`.
fn resolve(spec: &DeltaSpec, content: &str) -> (u64, String) {
    let text = spec.text.render();
    let len = content.len();
    match spec.at {
        At::End => (len as u64, text),
        At::Resend(chars) => {
            let start = content
                .char_indices()
                .rev()
                .nth(usize::from(chars))
                .map_or(0, |(index, _)| index);
            (start as u64, format!("{}{text}", &content[start..]))
        }
        At::Gap(extra) => ((len + 1 + usize::from(extra)) as u64, text),
        // No generated text holds `#`.
        At::Conflict => (0, format!("#{text}")),
        At::Inside(byte) => ((usize::from(byte) % (len + 1)) as u64, text),
    }
}

impl Run<'_> {
    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Create {
                session,
                user,
                title,
                metadata,
            } => {
                let id = self.ids[*session];
                let title = title.as_ref().map(Text::render);
                let metadata = metadata.value().map(RawJson::from);
                let actual = self
                    .engine
                    .create_session(CreateSession {
                        user_id: USERS[*user].into(),
                        session_id: Some(id),
                        title: title.clone(),
                        metadata: metadata.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.create(id, *user, title, metadata);
                if let Some((created, expected)) = pair(&actual, expected)? {
                    if created.created != expected {
                        return Err(format!(
                            "created flag {}, model {expected}",
                            created.created
                        ));
                    }
                    if created.session.id != id {
                        return Err(format!("created {} for {id}", created.session.id));
                    }
                    self.model.check_info(&created.session)?;
                }
            }
            Op::Append {
                session,
                user,
                messages,
            } => {
                let id = self.ids[*session];
                let messages: Vec<NewMessage> = messages
                    .iter()
                    .map(|msg| build_message(msg, &self.pool))
                    .collect();
                let actual = self
                    .engine
                    .append(AppendMessages {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        messages: messages.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.append(id, *user, &messages, OnBusy::Refuse);
                if let Some((appended, expected)) = pair(&actual, expected)?
                    && appended.sequences != expected
                {
                    return Err(format!(
                        "sequences {:?}, model {expected:?}",
                        appended.sequences
                    ));
                }
            }
            Op::Get {
                session,
                user,
                after_seq,
                limit,
            } => {
                let id = self.ids[*session];
                let actual = self.get(id, *user, *after_seq, *limit).await;
                let expected = self.model.get(id, *user, *after_seq, *limit);
                if let Some((page, (range, next))) = pair(&actual, expected)? {
                    self.check_page(id, page, range, next)?;
                }
            }
            Op::Update {
                session,
                user,
                title,
                metadata,
            } => {
                let id = self.ids[*session];
                let title = title.as_ref().map(Text::render);
                let metadata = metadata.value().map(RawJson::from);
                let actual = self
                    .engine
                    .update_session(UpdateSession {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        title: title.clone(),
                        metadata: metadata.clone(),
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.update(id, *user, title, metadata);
                if let Some((info, ())) = pair(&actual, expected)? {
                    self.model.check_info(info)?;
                }
            }
            Op::AddUsage {
                session,
                user,
                prompt,
                completion,
            } => {
                let id = self.ids[*session];
                let actual = self
                    .engine
                    .add_usage(AddUsage {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        prompt_tokens: *prompt,
                        completion_tokens: *completion,
                        ..Default::default()
                    })
                    .await;
                let expected = self.model.add_usage(id, *user, *prompt, *completion);
                if let Some((usage, ())) = pair(&actual, expected)? {
                    let model = self.model.sessions[&id].usage;
                    if *usage != model {
                        return Err(format!("usage totals {usage:?}, model {model:?}"));
                    }
                }
            }
            Op::Delete {
                session,
                user,
                erase,
            } => {
                let id = self.ids[*session];
                let actual = self
                    .engine
                    .delete_session(DeleteSession {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        erase: *erase,
                        ..Default::default()
                    })
                    .await;
                pair(&actual, self.model.delete(id, *user, *erase))?;
            }
            Op::List { user, limit } => self.check_listing(*user, *limit).await?,
            Op::Start {
                session,
                user,
                start,
                interrupt,
            } => {
                let id = self.ids[*session];
                let message = match start {
                    StartSpec::New(spec, text) => build_start(spec, text, &self.pool),
                    StartSpec::Again(back) => match self.starts.iter().rev().nth(*back) {
                        Some(sent) => sent.clone(),
                        None => build_start(&generators::IdSpec::Generated, &None, &self.pool),
                    },
                };
                self.starts.push(message.clone());
                let on_busy = if *interrupt {
                    OnBusy::Interrupt
                } else {
                    OnBusy::Refuse
                };
                let actual = self
                    .engine
                    .append(AppendMessages {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        messages: vec![message.clone()],
                        if_version: None,
                        on_busy,
                    })
                    .await;
                let expected = self.model.append(id, *user, &[message], on_busy);
                if let Some((appended, expected)) = pair(&actual, expected)?
                    && appended.sequences != expected
                {
                    return Err(format!(
                        "sequences {:?}, model {expected:?}",
                        appended.sequences
                    ));
                }
            }
            Op::Deltas {
                session,
                user,
                draft,
                deltas,
            } => {
                let id = self.ids[*session];
                let message_id = self.draft_id(draft);
                let mut content = self.model.text_of(id, &message_id).unwrap_or_default();
                let mut sent = Vec::new();
                for spec in deltas {
                    let (offset, text) = resolve(spec, &content);
                    if let Some(grown) = usize::try_from(offset)
                        .ok()
                        .and_then(|offset| applied(&content, offset, &text))
                    {
                        content = grown;
                    }
                    sent.push((offset, text));
                }
                let actual = self
                    .engine
                    .append_deltas(AppendDeltas {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        message_id,
                        deltas: sent
                            .iter()
                            .map(|(offset, text)| Delta {
                                offset: *offset,
                                content: text.clone(),
                            })
                            .collect(),
                    })
                    .await;
                let expected = self.model.deltas(id, *user, &message_id, &sent);
                if let Some((appended, expected)) = pair(&actual, expected)?
                    && appended.length != expected
                {
                    return Err(format!(
                        "draft length {}, model {expected}",
                        appended.length
                    ));
                }
            }
            Op::Finish {
                session,
                user,
                draft,
                status,
                tool_calls,
                usage,
            } => {
                let id = self.ids[*session];
                let message_id = self.draft_id(draft);
                let tool_calls = finish_tool_calls(*tool_calls);
                let usage = usage.map(|(prompt, completion)| Usage {
                    prompt_tokens: i64::from(prompt),
                    completion_tokens: i64::from(completion),
                });
                let actual = self
                    .engine
                    .finish_message(FinishMessage {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        message_id,
                        status: *status,
                        tool_calls: tool_calls.clone(),
                        refusal: None,
                        usage,
                    })
                    .await;
                let expected =
                    self.model
                        .finish(id, *user, &message_id, *status, tool_calls, usage);
                if let Some((finished, seq)) = pair(&actual, expected)? {
                    self.model.check_finished(id, seq, &finished.message)?;
                }
            }
            Op::Restart => {
                if self.db.shareable() {
                    self.engine.shutdown().await;
                    self.engine = Engine::start(self.config.clone())
                        .await
                        .map_err(|error| format!("restart: {error:?}"))?;
                }
            }
        }
        Ok(())
    }

    /// The message id `draft` names.
    fn draft_id(&self, draft: &DraftRef) -> Uuid {
        match draft {
            DraftRef::Recent(back) => self
                .starts
                .iter()
                .rev()
                .nth(*back)
                .and_then(|start| start.id)
                .unwrap_or_else(Uuid::new_v4),
            DraftRef::Pool(index) => self.pool[*index],
            DraftRef::Unknown => Uuid::new_v4(),
        }
    }

    async fn get(
        &self,
        id: SessionId,
        user: usize,
        after_seq: Option<i64>,
        limit: Option<usize>,
    ) -> soloist::Result<SessionPage> {
        self.engine
            .get_session(GetSession {
                user_id: USERS[user].into(),
                session_id: id,
                after_seq,
                limit,
                fresh: false,
            })
            .await
    }

    fn check_page(
        &mut self,
        id: SessionId,
        page: &SessionPage,
        range: std::ops::Range<usize>,
        next: Option<i64>,
    ) -> Result<(), String> {
        if page.session.id != id {
            return Err(format!("page of {} for {id}", page.session.id));
        }
        self.model.check_info(&page.session)?;
        self.model.check_messages(id, &page.messages, range)?;
        let pending = self.model.pending_calls(id);
        if page.pending_tool_calls != pending {
            return Err(format!(
                "pending tool calls {:?}, model {pending:?}",
                page.pending_tool_calls
            ));
        }
        if page.next_after_seq != next {
            return Err(format!(
                "next_after_seq {:?}, model {next:?}",
                page.next_after_seq
            ));
        }
        Ok(())
    }

    /// Walks the user's listing page by page and compares it with the model.
    async fn check_listing(&mut self, user: usize, limit: Option<usize>) -> Result<(), String> {
        let page_size = limit
            .unwrap_or(DEFAULT_SESSION_PAGE)
            .min(self.model.limits.max_page_size);
        let expected = self.model.listed(user);
        let mut listed = Vec::new();
        let mut before: Option<SessionCursor> = None;
        for _ in 0..=SESSIONS + 1 {
            let page = self
                .engine
                .list_sessions(ListSessions {
                    user_id: USERS[user].into(),
                    before,
                    limit,
                })
                .await
                .map_err(|error| format!("list_sessions: {error:?}"))?;
            if page.sessions.len() > page_size {
                return Err(format!(
                    "listing page of {} over its size {page_size}",
                    page.sessions.len()
                ));
            }
            for info in &page.sessions {
                self.model.check_info(info)?;
                listed.push(info.id);
            }
            let remaining = expected.len() > listed.len();
            match page.next_before {
                // A full page may or may not carry a cursor when nothing is left after it; a
                // short page is the last, and a page with more after it must have one.
                Some(_) if page.sessions.len() < page_size || page_size == 0 => {
                    return Err(format!(
                        "a cursor after a short listing page: {page:?} (page size {page_size})"
                    ));
                }
                None if remaining && page_size > 0 => {
                    return Err(format!(
                        "no cursor although {} sessions are listed of {}",
                        listed.len(),
                        expected.len()
                    ));
                }
                Some(cursor) => before = Some(cursor),
                None => break,
            }
        }
        let expected = if page_size == 0 { Vec::new() } else { expected };
        if listed != expected {
            return Err(format!(
                "listing of {}: engine {listed:?}, model {expected:?}",
                USERS[user]
            ));
        }
        Ok(())
    }

    /// Reads every session in full, as each user, and compares with the model.
    async fn check_everything(&mut self) -> Result<(), String> {
        for index in 0..SESSIONS {
            let id = self.ids[index];
            for user in 0..USERS.len() {
                let mut after_seq = None;
                for _ in 0..100 {
                    let actual = self.get(id, user, after_seq, None).await;
                    let expected = self.model.get(id, user, after_seq, None);
                    let Some((page, (range, next))) = pair(&actual, expected)? else {
                        break;
                    };
                    self.check_page(id, page, range, next)?;
                    match next {
                        Some(next) => after_seq = Some(next),
                        None => break,
                    }
                }
            }
        }
        for user in 0..USERS.len() {
            self.check_listing(user, None).await?;
        }
        // A deleted session keeps its row and nothing else: no message, no draft chunk (an
        // erase, also no title, metadata, usage or idempotency record), whatever was in
        // flight. Read from the database where another connection can.
        if self.db.shareable() {
            for &id in &self.ids {
                let Some(erased) = self.model.deleted(id) else {
                    continue;
                };
                let stored = soloist_testkit::stored_session(&self.db.url, id)
                    .await
                    .map_err(|error| format!("read {id}: {error:?}"))?
                    .ok_or_else(|| format!("deleted session {id} has no row"))?;
                let left = (stored.messages, stored.chunks);
                let kept = stored.keys > 0
                    || stored.tokens != (0, 0)
                    || stored.title.is_some()
                    || stored.metadata != "{}";
                if left != (0, 0) || (erased && kept) {
                    return Err(format!("deleted session {id} left rows: {stored:?}"));
                }
            }
        }
        Ok(())
    }
}

async fn run_case(db: &TestDb, case: &Case) -> Result<(), String> {
    let config = config_for(db, case.tuning);
    let engine = Engine::start(config.clone())
        .await
        .map_err(|error| format!("start: {error:?}"))?;
    let mut run = Run {
        db,
        model: Model::new(config.hide_foreign_sessions, config.limits.clone()),
        config,
        engine,
        ids: (0..SESSIONS).map(|_| SessionId::new()).collect(),
        pool: (0..ID_POOL).map(|_| Uuid::new_v4()).collect(),
        starts: Vec::new(),
    };
    let mut outcome = Ok(());
    for (index, op) in case.ops.iter().enumerate() {
        if let Err(error) = run.step(op).await {
            outcome = Err(format!("step {index} {op:?}: {error}"));
            break;
        }
    }
    if outcome.is_ok() {
        outcome = run
            .check_everything()
            .await
            .map_err(|error| format!("final check: {error}"));
    }
    if outcome.is_ok() && db.shareable() {
        // Everything acknowledged is in the database: a new engine reads the same.
        run.engine.shutdown().await;
        run.engine = Engine::start(run.config.clone())
            .await
            .map_err(|error| format!("restart: {error:?}"))?;
        outcome = run
            .check_everything()
            .await
            .map_err(|error| format!("final check after a restart: {error}"));
    }
    let restarts = run.engine.stats().restarts;
    if outcome.is_ok() && restarts > 0 {
        outcome = Err(format!("{restarts} session actors panicked"));
    }
    run.engine.shutdown().await;
    outcome
}

fn run(backend: Backend, case: &Case) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| TestCaseError::fail(format!("runtime: {error}")))?;
    runtime.block_on(async {
        let Some(db) = TestDb::new(backend).await.expect("database") else {
            // PostgreSQL is not running outside CI: skipped (with a message) by TestDb.
            return Ok(());
        };
        run_case(&db, case).await.map_err(TestCaseError::fail)
    })
}

/// `SOLOIST_MODEL_SEED=<u64>` replays the cases of one seed (a failure reproduces with it).
fn config(cases: u32) -> ProptestConfig {
    let seed = std::env::var("SOLOIST_MODEL_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok());
    ProptestConfig {
        cases,
        rng_seed: seed.map_or(RngSeed::Random, RngSeed::Fixed),
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]
    #[test]
    fn engine_matches_model_on_sqlite_memory(case in case()) {
        run(Backend::SqliteMemory, &case)?;
    }
}

proptest! {
    #![proptest_config(config(48))]
    #[test]
    fn engine_matches_model_on_sqlite_file(case in case()) {
        run(Backend::SqliteFile, &case)?;
    }
}

proptest! {
    #![proptest_config(config(48))]
    #[test]
    fn engine_matches_model_on_postgres(case in case()) {
        run(Backend::Postgres, &case)?;
    }
}
