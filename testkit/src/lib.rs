//! Test support shared by soloist's engine tests, server tests, benches and load tool.
//!
//! - [`TestDb`]: a fresh, empty database for one test on one [`Backend`] (an SQLite file in a
//!   directory of its own, `sqlite::memory:`, or a PostgreSQL schema of its own), removed when
//!   dropped; [`on_every_backend!`] and [`on_shared_backends!`] run one backend-independent
//!   test on each backend.
//! - The PostgreSQL rules every test follows: the server is [`postgres_base_url`]
//!   (`SOLOIST_TEST_POSTGRES` overrides it); when it does not answer, PostgreSQL tests are
//!   skipped with a message, except under `CI=true` ([`ci`]), where they fail: a missing
//!   database must never pass silently there. The kit does not start PostgreSQL itself:
//!   `.ci/start-postgres` does, before the tests.
//! - The pieces below a [`TestDb`], for tools that provision their own databases: [`PgSchema`]
//!   (a schema of its own, and a URL whose connections use it) and [`TempDir`].
//! - Checks made straight on the database, not through soloist: [`stored_rows`],
//!   [`assert_contiguous`]; and the [`history`] checker of multi-writer tests.
//!
//! Functions that provision or read a database or the file system return a [`Result`] and leave
//! to the test whether to `expect` it (so that a failure points at the test's line). The kit
//! panics only in the assertions whose job is to fail a test ([`assert_contiguous`],
//! [`history::Report::assert_clean`], [`history::History::verify`]).

mod db;
mod dir;
pub mod history;
mod postgres;

pub use db::{
    Backend, StoredSession, TestDb, assert_contiguous, created_session, passivated, run_sql,
    stored_chunks, stored_owner, stored_rows, stored_session, stored_statuses,
};
pub use dir::TempDir;
pub use postgres::{
    PgSchema, ci, postgres_answers, postgres_available, postgres_base_url, search_path_url,
};

/// What the kit could not do.
#[derive(thiserror::Error)]
pub enum Error {
    /// PostgreSQL does not answer and `CI=true`: the test must fail, not skip.
    #[error(
        "PostgreSQL is not answering at {url} and CI=true: start it (.ci/start-postgres does) or \
         point SOLOIST_TEST_POSTGRES at a server"
    )]
    PostgresRequired {
        /// The URL that was tried.
        url: String,
    },
    /// A schema name prefix that is not a plain lower-case SQL identifier.
    #[error("schema prefix {0:?}: use lower-case letters, digits and `_`, starting with a letter")]
    SchemaPrefix(String),
    /// A statement or a connection failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A directory could not be created or removed.
    #[error("file system: {0}")]
    Io(#[from] std::io::Error),
}

/// As the message: a test's `expect` prints the `Debug` form, and it should read as the
/// sentence (what to start, which URL) rather than as a struct.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The kit's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs each listed `async fn name(db: TestDb)` on every backend, as `sqlite_file::name`,
/// `sqlite_memory::name` and `postgres::name`: each is a `#[tokio::test]` on a 4-worker runtime
/// with a fresh [`TestDb`]. The PostgreSQL variant returns early (after [`TestDb::new`] said
/// why) when PostgreSQL is missing outside CI.
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::__on_backend!(sqlite_file, SqliteFile, $($name),*);
        $crate::__on_backend!(sqlite_memory, SqliteMemory, $($name),*);
        $crate::__on_backend!(postgres, Postgres, $($name),*);
    };
}

/// Runs each listed `async fn name(db: TestDb)` on the backends a second engine can share (an
/// SQLite file and PostgreSQL), as `sqlite_file::name` and `postgres::name`; otherwise as
/// [`on_every_backend!`].
#[macro_export]
macro_rules! on_shared_backends {
    ($($name:ident),* $(,)?) => {
        $crate::__on_backend!(sqlite_file, SqliteFile, $($name),*);
        $crate::__on_backend!(postgres, Postgres, $($name),*);
    };
}

/// One module of [`on_every_backend!`]: `$module::name` for each name, on `Backend::$backend`.
#[doc(hidden)]
#[macro_export]
macro_rules! __on_backend {
    ($module:ident, $backend:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = $crate::TestDb::new($crate::Backend::$backend)
                        .await
                        .expect("a fresh test database");
                    // `None` only for PostgreSQL missing outside CI, reported by `TestDb::new`.
                    if let Some(db) = db {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}
