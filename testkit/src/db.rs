//! A fresh database per test on each backend, and checks made straight on its tables.

use std::collections::HashSet;
use std::path::Path;

use soloist::uuid::Uuid;
use soloist::{Engine, EngineConfig, SessionId};

use crate::dir::TempDir;
use crate::postgres::{PgSchema, postgres_available, postgres_base_url};
use crate::{Error, Result};

/// The backends every engine test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// An SQLite file in WAL mode (the embedded default).
    SqliteFile,
    /// `sqlite::memory:`, shared by the engine's connections.
    SqliteMemory,
    /// PostgreSQL, one fresh schema per test.
    Postgres,
}

impl Backend {
    /// The name of the backend's module in [`on_every_backend!`](crate::on_every_backend), and
    /// in benchmark ids: `sqlite_file`, `sqlite_memory` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::SqliteFile => "sqlite_file",
            Backend::SqliteMemory => "sqlite_memory",
            Backend::Postgres => "postgres",
        }
    }
}

/// A fresh, empty database for one test, on one backend; removed when dropped (the SQLite
/// file's directory, the PostgreSQL schema), even when the test panics.
#[derive(Debug)]
pub struct TestDb {
    /// The backend.
    pub backend: Backend,
    /// The URL an engine (or a raw connection) opens.
    pub url: String,
    /// Keeps the SQLite file's directory alive for the test.
    dir: Option<TempDir>,
    /// The PostgreSQL schema, dropped with the database.
    schema: Option<PgSchema>,
}

impl TestDb {
    /// A fresh database on `backend`. `Ok(None)` only when PostgreSQL is not answering outside
    /// CI, after saying `SKIPPED` on stderr; under `CI=true` that is
    /// [`Error::PostgresRequired`].
    pub async fn new(backend: Backend) -> Result<Option<TestDb>> {
        match backend {
            Backend::SqliteFile => TestDb::sqlite_file().map(Some),
            Backend::SqliteMemory => Ok(Some(TestDb::sqlite_memory())),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    /// A fresh SQLite file in a new directory under the system's temporary directory.
    pub fn sqlite_file() -> Result<TestDb> {
        TestDb::sqlite_file_in(&std::env::temp_dir())
    }

    /// A fresh SQLite file in a new directory under `parent`.
    pub fn sqlite_file_in(parent: &Path) -> Result<TestDb> {
        let dir = TempDir::new_in(parent, "soloist-test")?;
        Ok(TestDb {
            backend: Backend::SqliteFile,
            url: format!("sqlite://{}", dir.path().join("chat.db").display()),
            dir: Some(dir),
            schema: None,
        })
    }

    /// `sqlite::memory:`: private to the engine that opens it, gone when it shuts down.
    pub fn sqlite_memory() -> TestDb {
        TestDb {
            backend: Backend::SqliteMemory,
            url: "sqlite::memory:".to_owned(),
            dir: None,
            schema: None,
        }
    }

    /// A fresh schema `t_<uuid>` on [`postgres_base_url`]; `Ok(None)` as for [`TestDb::new`].
    pub async fn postgres() -> Result<Option<TestDb>> {
        if !postgres_available().await? {
            eprintln!(
                "SKIPPED: PostgreSQL is not answering at {}",
                postgres_base_url()
            );
            return Ok(None);
        }
        let schema = PgSchema::create(&postgres_base_url(), "t").await?;
        Ok(Some(TestDb {
            backend: Backend::Postgres,
            url: schema.url().to_owned(),
            dir: None,
            schema: Some(schema),
        }))
    }

    /// Whether a second engine can open this database (not so for a private in-memory one).
    pub fn shareable(&self) -> bool {
        self.backend != Backend::SqliteMemory
    }

    /// The PostgreSQL schema's name, for statements on [`postgres_base_url`] that name it.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_ref().map(PgSchema::name)
    }

    /// The SQLite file's directory.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }

    /// The default configuration on this database.
    pub fn config(&self) -> EngineConfig {
        EngineConfig::new(&self.url)
    }

    /// Starts an engine with the default configuration.
    pub async fn engine(&self) -> soloist::Result<Engine> {
        self.engine_with(self.config()).await
    }

    /// Starts an engine with `config` (usually [`TestDb::config`] with changes).
    pub async fn engine_with(&self, config: EngineConfig) -> soloist::Result<Engine> {
        Engine::start(config).await
    }
}

/// `text` with its `{1}`, `{2}`, ... placeholders in the driver's form: `$1` (PostgreSQL) or
/// `?` (SQLite, binding in order).
pub(crate) fn placeholders(text: &str, postgres: bool) -> String {
    (1..=9).fold(text.to_owned(), |text, index| {
        let number = format!("{{{index}}}");
        let placeholder = if postgres {
            format!("${index}")
        } else {
            "?".to_owned()
        };
        text.replace(&number, &placeholder)
    })
}

/// Runs `$body` on a new connection `$connection` to the database at `$url` (PostgreSQL if the
/// URL says so, else SQLite), `$sql` turning a statement's text with `{1}`, `{2}`, ...
/// placeholders into the driver's; closes the connection and answers what the body did. Not
/// through soloist: what is stored, as stored.
macro_rules! with_connection {
    ($url:expr, |$connection:ident, $sql:ident| $body:expr) => {
        if $url.starts_with("postgres") {
            let mut $connection = <sqlx::PgConnection as sqlx::Connection>::connect($url).await?;
            let $sql = |text: &str| sqlx::AssertSqlSafe($crate::db::placeholders(text, true));
            let result = $body;
            let _ = sqlx::Connection::close($connection).await;
            result
        } else {
            let mut $connection =
                <sqlx::SqliteConnection as sqlx::Connection>::connect($url).await?;
            let $sql = |text: &str| sqlx::AssertSqlSafe($crate::db::placeholders(text, false));
            let result = $body;
            let _ = sqlx::Connection::close($connection).await;
            result
        }
    };
}
pub(crate) use with_connection;

/// `(seq, status)` of a session's messages in sequence order, straight from the database at
/// `url`.
pub async fn stored_statuses(url: &str, session: SessionId) -> Result<Vec<(i64, String)>> {
    with_connection!(url, |connection, sql| {
        sqlx::query_as(sql(
            "SELECT seq, status FROM messages WHERE session_id = {1} ORDER BY seq",
        ))
        .bind(session)
        .fetch_all(&mut connection)
        .await
        .map_err(Error::from)
    })
}

/// Runs `statements` (each whole, as written: a trigger's body may hold `;`) on the database
/// at `url`, on one connection, in order.
pub async fn run_sql(url: &str, statements: &[&str]) -> Result<()> {
    with_connection!(url, |connection, _sql| {
        for statement in statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
                .execute(&mut connection)
                .await?;
        }
        Ok::<(), Error>(())
    })
}

/// Rows `(seq, message_id)` of a session in sequence order, straight from the database at `url`
/// (not through soloist).
pub async fn stored_rows(url: &str, session: SessionId) -> Result<Vec<(i64, Uuid)>> {
    with_connection!(url, |connection, sql| {
        sqlx::query_as(sql(
            "SELECT seq, message_id FROM messages WHERE session_id = {1} ORDER BY seq",
        ))
        .bind(session)
        .fetch_all(&mut connection)
        .await
        .map_err(Error::from)
    })
}

/// The process that owns a session by its stored row (the last to claim it), straight from the
/// database at `url`; `None` if no process claimed it.
pub async fn stored_owner(url: &str, session: SessionId) -> Result<Option<Uuid>> {
    let row: Option<(Option<Uuid>,)> = with_connection!(url, |connection, sql| {
        sqlx::query_as(sql("SELECT owner FROM sessions WHERE id = {1}"))
            .bind(session)
            .fetch_optional(&mut connection)
            .await?
    });
    Ok(row.and_then(|(owner,)| owner))
}

/// The stored chunks of a session's drafts, `(seq, byte offset, bytes)` in order, straight
/// from the database at `url`.
pub async fn stored_chunks(url: &str, session: SessionId) -> Result<Vec<(i64, i64, i64)>> {
    with_connection!(url, |connection, sql| {
        sqlx::query_as(sql(
            "SELECT seq, byte_offset, CAST(LENGTH(content) AS BIGINT) FROM message_chunks \
             WHERE session_id = {1} ORDER BY seq, byte_offset",
        ))
        .bind(session)
        .fetch_all(&mut connection)
        .await
        .map_err(Error::from)
    })
}

/// A session's row as stored, for the retention tests: what a delete keeps and an erase
/// clears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    /// The title.
    pub title: Option<String>,
    /// The metadata, as stored (JSON text).
    pub metadata: String,
    /// Prompt and completion tokens.
    pub tokens: (i64, i64),
    /// Whether it is deleted (a tombstone).
    pub deleted: bool,
    /// Whether its content was erased.
    pub erased: bool,
    /// Its time to live in seconds.
    pub ttl_seconds: Option<i64>,
    /// When it expires (microseconds).
    pub expires_at: Option<i64>,
    /// Its idempotency records.
    pub keys: i64,
    /// Its message rows.
    pub messages: i64,
    /// Its draft chunk rows (text of drafts not yet finished).
    pub chunks: i64,
}

/// A session's row (and how many idempotency records it has), straight from the database at
/// `url`; `None` if there is no row.
pub async fn stored_session(url: &str, session: SessionId) -> Result<Option<StoredSession>> {
    type Row = (
        Option<String>,
        String,
        i64,
        i64,
        bool,
        bool,
        Option<i64>,
        Option<i64>,
        i64,
        i64,
        i64,
    );
    let row: Option<Row> = with_connection!(url, |connection, sql| {
        sqlx::query_as(sql(
            "SELECT title, metadata, prompt_tokens, completion_tokens, \
                    deleted_at IS NOT NULL, erased_at IS NOT NULL, ttl_seconds, expires_at, \
                    (SELECT COUNT(*) FROM idempotency_keys k WHERE k.session_id = s.id), \
                    (SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id), \
                    (SELECT COUNT(*) FROM message_chunks c WHERE c.session_id = s.id) \
             FROM sessions s WHERE id = {1}",
        ))
        .bind(session)
        .fetch_optional(&mut connection)
        .await?
    });
    Ok(row.map(
        |(
            title,
            metadata,
            prompt,
            completion,
            deleted,
            erased,
            ttl_seconds,
            expires_at,
            keys,
            messages,
            chunks,
        )| {
            StoredSession {
                title,
                metadata,
                tokens: (prompt, completion),
                deleted,
                erased,
                ttl_seconds,
                expires_at,
                keys,
                messages,
                chunks,
            }
        },
    ))
}

/// Asserts that sequences are exactly 0..n-1 and that no message id appears twice.
#[track_caller]
pub fn assert_contiguous(rows: &[(i64, Uuid)]) {
    for (index, (seq, _)) in rows.iter().enumerate() {
        assert_eq!(
            *seq, index as i64,
            "sequence gap or duplicate at position {index}"
        );
    }
    let ids: HashSet<_> = rows.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), rows.len(), "a message id is stored twice");
}

/// A new session of `alice` on `engine`, created.
pub async fn created_session(engine: &Engine) -> soloist::SessionHandle {
    let session = engine.session("alice", SessionId::new());
    session.create(None, None).await.expect("create");
    session
}

/// Lets `session`'s actor go and waits until it has, so that the next command loads the
/// session from the database.
pub async fn passivated(engine: &Engine, session: SessionId) {
    engine.passivate(session);
    while engine.is_live(session) {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
