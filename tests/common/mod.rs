//! Shared test support: one fresh database per test on each backend, and a macro that runs a
//! backend-independent test on every backend.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use soloist::{Engine, EngineConfig};
use sqlx::Connection;
use uuid::Uuid;

pub mod history;

/// The backends every engine test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file in WAL mode (the embedded default).
    SqliteFile,
    /// `sqlite::memory:`, shared by the engine's connections.
    SqliteMemory,
    /// PostgreSQL, one fresh schema per test.
    Postgres,
}

/// A fresh, empty database for one test, on one backend.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    /// Keeps the SQLite file's directory alive for the test.
    _dir: Option<TempDir>,
    /// The PostgreSQL schema to drop afterwards.
    schema: Option<String>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: `drop` cannot await, and the test's runtime may
        // be going away.
        if let Some(schema) = self.schema.take() {
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        if let Ok(mut connection) =
                            sqlx::PgConnection::connect(&postgres_base_url()).await
                        {
                            let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                                .execute(&mut connection)
                                .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PostgreSQL server tests use; override with `SOLOIST_TEST_POSTGRES`.
pub fn postgres_base_url() -> String {
    std::env::var("SOLOIST_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether PostgreSQL answers. Without it, PostgreSQL tests are skipped with a message, except
/// under `CI=true`, where they fail: a missing database must never pass silently there.
pub async fn postgres_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    if let Some(&available) = AVAILABLE.get() {
        return available;
    }
    let available = sqlx::PgConnection::connect(&postgres_base_url())
        .await
        .is_ok();
    if !available && std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!(
            "PostgreSQL is not answering at {} and CI=true: start it (see .ci/run)",
            postgres_base_url()
        );
    }
    *AVAILABLE.get_or_init(|| available)
}

impl TestDb {
    /// A fresh database; `None` only when PostgreSQL is missing outside CI.
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::SqliteFile => {
                let dir = std::env::temp_dir().join(format!("soloist-test-{}", Uuid::new_v4()));
                std::fs::create_dir_all(&dir).expect("create temp dir");
                let url = format!("sqlite://{}", dir.join("chat.db").display());
                Some(TestDb {
                    backend,
                    url,
                    _dir: Some(TempDir(dir)),
                    schema: None,
                })
            }
            Backend::SqliteMemory => Some(TestDb {
                backend,
                url: "sqlite::memory:".to_owned(),
                _dir: None,
                schema: None,
            }),
            Backend::Postgres => {
                if !postgres_available().await {
                    eprintln!(
                        "SKIPPED: PostgreSQL is not answering at {}",
                        postgres_base_url()
                    );
                    return None;
                }
                let schema = format!("t_{}", Uuid::new_v4().simple());
                let mut connection = sqlx::PgConnection::connect(&postgres_base_url())
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut connection)
                    .await
                    .expect("create schema");
                let url = format!(
                    "{}?options=-c%20search_path%3D{schema}",
                    postgres_base_url()
                );
                Some(TestDb {
                    backend,
                    url,
                    _dir: None,
                    schema: Some(schema),
                })
            }
        }
    }

    /// Whether a second engine can open this database (not so for a private in-memory one).
    pub fn shareable(&self) -> bool {
        self.backend != Backend::SqliteMemory
    }

    /// The default configuration on this database.
    pub fn config(&self) -> EngineConfig {
        EngineConfig::new(&self.url)
    }

    /// An engine with the default configuration.
    pub async fn engine(&self) -> Engine {
        self.engine_with(self.config()).await
    }

    /// An engine with a custom configuration.
    pub async fn engine_with(&self, config: EngineConfig) -> Engine {
        Engine::start(config).await.expect("start engine")
    }
}

/// Rows `(seq, message_id)` of a session, straight from the database (not through soloist).
pub async fn stored_rows(url: &str, session: Uuid) -> Vec<(i64, Uuid)> {
    if url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_as("SELECT seq, message_id FROM messages WHERE session_id = $1 ORDER BY seq")
            .bind(session)
            .fetch_all(&mut connection)
            .await
            .expect("read rows")
    } else {
        let mut connection = sqlx::SqliteConnection::connect(url).await.expect("connect");
        sqlx::query_as("SELECT seq, message_id FROM messages WHERE session_id = ? ORDER BY seq")
            .bind(session)
            .fetch_all(&mut connection)
            .await
            .expect("read rows")
    }
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
    let ids: std::collections::HashSet<_> = rows.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), rows.len(), "a message id is stored twice");
}

/// Runs each listed `async fn name(db: TestDb)` on every backend, as
/// `sqlite_file::name`, `sqlite_memory::name` and `postgres::name`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = $crate::common::TestDb::new($crate::common::Backend::SqliteFile).await;
                    super::$name(db.expect("sqlite is always available")).await;
                }
            )*
        }
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = $crate::common::TestDb::new($crate::common::Backend::SqliteMemory).await;
                    super::$name(db.expect("sqlite is always available")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

/// Runs each listed `async fn name(db: TestDb)` on the backends a second engine can share (an
/// SQLite file and PostgreSQL), as `sqlite_file::name` and `postgres::name`.
#[macro_export]
macro_rules! on_shared_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = $crate::common::TestDb::new($crate::common::Backend::SqliteFile).await;
                    super::$name(db.expect("sqlite is always available")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::new($crate::common::Backend::Postgres).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}
