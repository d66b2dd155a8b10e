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
//! `generators.rs` holds the proptest strategies, `reference.rs` the model; this file holds the
//! settings every case shares, runs a case against both and compares them reply by reply.

mod generators;
mod reference;

use std::fmt::Debug;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use soloist::uuid::Uuid;
use soloist::{
    AddUsage, AppendMessages, CreateSession, DeleteSession, Engine, EngineConfig, GetSession,
    Limits, ListSessions, NewMessage, RawJson, SessionCursor, SessionId, SessionPage,
    UpdateSession,
};
use soloist_testkit::{Backend, TestDb};

use generators::{Case, Op, Text, build_message, case};
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
        max_json_bytes: 64,
        max_text_bytes: SHORT,
        max_page_size: 4,
        // Deeper than anything generated: nesting is checked by the unit tests of `RawJson`.
        max_json_depth: 100,
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
    model: Model,
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
                let expected = self.model.append(id, *user, &messages);
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
            Op::Delete { session, user } => {
                let id = self.ids[*session];
                let actual = self
                    .engine
                    .delete_session(DeleteSession {
                        user_id: USERS[*user].into(),
                        session_id: id,
                        ..Default::default()
                    })
                    .await;
                pair(&actual, self.model.delete(id, *user))?;
            }
            Op::List { user, limit } => self.check_listing(*user, *limit).await?,
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

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
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
