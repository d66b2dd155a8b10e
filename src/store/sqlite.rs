//! The embedded SQLite backend: one writer connection (SQLite has one writer at a time anyway)
//! and a pool of readers, in WAL mode with `synchronous=FULL` by default.
//!
//! `sqlite::memory:` opens a private in-memory database through SQLite's `memdb` VFS, which
//! every connection of the engine shares with real locking between them. Each task gets its own
//! connection and its own transaction from the pool, so one task's rollback can never touch
//! another task's writes (incident 3).

use std::str::FromStr;

use sqlx::error::BoxDynError;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Arguments, Sqlite};
use uuid::Uuid;

use super::Ownership;
use super::backend::Backend;
use super::dialect::{Batch, Dialect};
use super::rows::{Value, WriteRow};
use super::sql::Sql;
use crate::config::{EngineConfig, SqliteSync};
use crate::error::{Error, StorageError};

/// The SQLite store.
#[derive(Clone, Debug)]
pub(crate) struct SqliteStore {
    /// The writer connection (one: SQLite has one writer at a time) and the readers.
    pub sql: Sql<Sqlite>,
}

impl Backend for Sqlite {
    const DIALECT: Dialect = Dialect {
        numbered: false,
        // SQLite allows 32766 bound parameters; a message row binds 11, a session change 12.
        batch: Batch::Values { max: 256 },
        // The processes sharing an SQLite file share the machine, and its clock.
        clock: None,
        // `BEGIN IMMEDIATE` takes the write lock up front: a deferred transaction that reads
        // first could fail to upgrade with SQLITE_BUSY when another process writes. What the
        // flush reads then stays true until its commit.
        lock: "",
        begin_write: "BEGIN IMMEDIATE",
        begin_snapshot: "BEGIN",
        row_address: "rowid",
    };

    fn bind_rows<R: WriteRow>(args: &mut SqliteArguments, rows: &[R]) -> Result<(), BoxDynError> {
        for row in rows {
            for value in row.values() {
                match value {
                    Value::Uuid(value) => args.add(value)?,
                    Value::Int(value) => args.add(value)?,
                    Value::Bool(value) => args.add(value)?,
                    Value::Text(value) => args.add(value)?,
                    Value::Bytes(value) => args.add(value)?,
                }
            }
        }
        Ok(())
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn is_transient(error: &StorageError) -> bool {
        // SQLITE_BUSY and SQLITE_LOCKED, with any extended code: the lock was not granted, so
        // nothing was written.
        error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6))
    }

    fn is_refused(error: &StorageError) -> bool {
        // SQLITE_TOOBIG, SQLITE_CONSTRAINT (a trigger's RAISE included), SQLITE_MISMATCH,
        // SQLITE_RANGE, with any extended code.
        error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 18 | 19 | 20 | 25))
    }
}

/// Whether `url` names a private in-memory database.
fn is_memory_url(url: &str) -> bool {
    matches!(
        url,
        "sqlite::memory:" | "sqlite://:memory:" | "sqlite::memory"
    )
}

impl SqliteStore {
    /// Opens (or creates) the database, connects the writer and the readers, and runs the
    /// migrations.
    pub async fn connect(config: &EngineConfig, ownership: Ownership) -> Result<Self, Error> {
        let url = config.database_url.as_str();
        let options = if is_memory_url(url) {
            // A name starting with '/' makes memdb share the database between this process's
            // connections; the UUID keeps each engine's database private.
            SqliteConnectOptions::new()
                .filename(format!("/soloist-{}", Uuid::new_v4()))
                .vfs("memdb")
                .journal_mode(SqliteJournalMode::Memory)
        } else {
            SqliteConnectOptions::from_str(url)
                .map_err(|error| Error::invalid("database_url", error.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(match config.sqlite_sync {
                    SqliteSync::Full => SqliteSynchronous::Full,
                    SqliteSync::Normal => SqliteSynchronous::Normal,
                })
        }
        .busy_timeout(config.busy_timeout)
        .foreign_keys(true);
        let options = match config.sqlite_max_pages {
            Some(pages) => options.pragma("max_page_count", pages.to_string()),
            None => options,
        };

        // The pools never close their last connection: an in-memory database lives only as long
        // as one connection is open.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await
            .map_err(StorageError::from)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(StorageError::from)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(config.read_pool_size.max(1))
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(StorageError::from)?;
        Ok(Self {
            sql: Sql::new(writer, readers, ownership),
        })
    }
}
