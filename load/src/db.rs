//! Fresh databases, one per run, and the raw sqlx pools the baselines use.
//!
//! - **PostgreSQL:** a new schema `soloist_load_<uuid>` in the configured database; every
//!   connection of the run (the engine's and the baselines') selects it with
//!   `?options=-c search_path=<schema>`, and it is dropped (`CASCADE`) afterwards.
//! - **SQLite:** a new file in a new directory under the system temp dir, in WAL mode with
//!   `synchronous=FULL` (the engine's default); the directory is removed afterwards.
//!
//! The schema and the directory are the test kit's ([`PgSchema`], [`TempDir`]), so the load
//! tool provisions the way the tests do.
//!
//! Either way the schema is the engine's own: a soloist [`Engine`] is started once on the fresh
//! database, which runs its migrations, creates the run's sessions, and is shut down before the
//! strategy under test starts.

use std::str::FromStr;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;
use soloist::Engine;
use soloist::uuid::Uuid;
use soloist_testkit::{PgSchema, TempDir};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Executor};
use tokio::task::JoinSet;

use crate::error::LoadError;
use crate::settings::Settings;
use crate::workload::USER_ID;

/// How long SQLite connections of the baselines wait for a lock (the engine's default too).
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a task waits for a pooled connection before the pool gives up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which database a run is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    /// PostgreSQL on 127.0.0.1.
    Postgres,
    /// An SQLite file in WAL mode, `synchronous=FULL`.
    Sqlite,
}

impl DbKind {
    /// The name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DbKind::Postgres => "postgres",
            DbKind::Sqlite => "sqlite",
        }
    }

    /// The name used in prose.
    pub fn title(self) -> &'static str {
        match self {
            DbKind::Postgres => "PostgreSQL",
            DbKind::Sqlite => "SQLite",
        }
    }
}

/// A raw sqlx pool on one run's database.
#[derive(Clone, Debug)]
pub enum Pool {
    /// PostgreSQL.
    Pg(PgPool),
    /// SQLite.
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$p` bound to the concrete pool, once per backend. The SQL the baselines
/// use is written once (`$1`-style placeholders work on both) and compiled for each driver.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::db::Pool::Pg($p) => $body,
            $crate::db::Pool::Sqlite($p) => $body,
        }
    };
}

impl Pool {
    /// The backend.
    pub fn kind(&self) -> DbKind {
        match self {
            Pool::Pg(_) => DbKind::Postgres,
            Pool::Sqlite(_) => DbKind::Sqlite,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}

enum Cleanup {
    /// Drop this schema.
    Schema(PgSchema),
    /// Remove this directory.
    Directory(TempDir),
}

/// A fresh, empty database for one run.
pub struct Database {
    /// The backend.
    pub kind: DbKind,
    /// The URL the engine and the baselines connect to.
    pub url: String,
    cleanup: Cleanup,
}

impl Database {
    /// Creates a fresh schema (PostgreSQL) or file (SQLite).
    pub async fn provision(kind: DbKind, settings: &Settings) -> Result<Self, LoadError> {
        match kind {
            DbKind::Postgres => {
                let schema = PgSchema::create(&settings.postgres_url, "soloist_load").await?;
                Ok(Self {
                    kind,
                    url: schema.url().to_owned(),
                    cleanup: Cleanup::Schema(schema),
                })
            }
            DbKind::Sqlite => {
                let directory = TempDir::new("soloist-load")?;
                let url = format!("sqlite://{}", directory.path().join("load.db").display());
                Ok(Self {
                    kind,
                    url,
                    cleanup: Cleanup::Directory(directory),
                })
            }
        }
    }

    /// Starts a soloist engine on the database (running its migrations), creates `count`
    /// sessions owned by [`USER_ID`], and shuts the engine down. Returns the session ids.
    pub async fn create_sessions(
        &self,
        count: usize,
        settings: &Settings,
    ) -> Result<Vec<Uuid>, LoadError> {
        let engine =
            Engine::start(settings.engine_config(&self.url, self.kind == DbKind::Postgres)).await?;
        let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        let mut creating = JoinSet::new();
        for (index, &id) in ids.iter().enumerate() {
            let session = engine.session(USER_ID, id.into());
            creating.spawn(async move {
                session
                    .create(Some(format!("load session {index}")), None)
                    .await
            });
        }
        let mut outcome = Ok(());
        while let Some(created) = creating.join_next().await {
            if let Err(error) = created
                .map_err(LoadError::from)
                .and_then(|created| created.map(|_| ()).map_err(LoadError::from))
            {
                outcome = Err(error);
            }
        }
        engine.shutdown().await;
        outcome.map(|()| ids)
    }

    /// A raw sqlx pool of `size` connections on the database. SQLite connections use the
    /// engine's settings: WAL, `synchronous=FULL`, foreign keys on, busy timeout 5 s.
    ///
    /// The pool does not test a connection before handing it out (sqlx's default is a ping,
    /// one more round trip per checkout), as the engine's writer pool does not: a baseline pays
    /// for its statements, not for pool upkeep. sqlx still pings a connection when it comes
    /// back, off the caller's path.
    pub async fn pool(&self, size: u32) -> Result<Pool, LoadError> {
        match self.kind {
            DbKind::Postgres => Ok(Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(size.max(1))
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .test_before_acquire(false)
                    .connect(&self.url)
                    .await?,
            )),
            DbKind::Sqlite => {
                let options = SqliteConnectOptions::from_str(&self.url)?
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT)
                    .foreign_keys(true);
                Ok(Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(size.max(1))
                        .acquire_timeout(ACQUIRE_TIMEOUT)
                        .test_before_acquire(false)
                        .connect_with(options)
                        .await?,
                ))
            }
        }
    }

    /// PostgreSQL: forces a checkpoint so that no run pays for the previous run's dirty pages.
    pub async fn checkpoint(&self) -> Result<(), LoadError> {
        if let Cleanup::Schema(schema) = &self.cleanup {
            let mut admin = PgConnection::connect(schema.base_url()).await?;
            admin.execute("CHECKPOINT").await?;
            admin.close().await?;
        }
        Ok(())
    }

    /// Drops the schema or removes the SQLite directory. Failures are reported on stderr and
    /// otherwise ignored: they cannot change the run's numbers.
    pub async fn dispose(self) {
        match self.cleanup {
            Cleanup::Schema(schema) => {
                let name = schema.name().to_owned();
                if let Err(error) = schema.remove().await {
                    eprintln!("warning: could not drop schema {name}: {error}");
                }
            }
            Cleanup::Directory(directory) => {
                let path = directory.path().to_owned();
                if let Err(error) = directory.remove() {
                    eprintln!("warning: could not remove {}: {error}", path.display());
                }
            }
        }
    }
}
