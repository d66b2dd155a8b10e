//! Where the test PostgreSQL is, whether it answers, what to do when it does not, and schemas of
//! their own for tests and runs.

use std::sync::OnceLock;
use std::time::Duration;

use soloist::uuid::Uuid;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::{Error, Result};

/// The server the tests use unless `SOLOIST_TEST_POSTGRES` names another (trust authentication
/// on loopback, database `test`, as `.ci/start-postgres` sets it up).
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// How long [`postgres_answers`] waits for a connection: a refused one fails at once, this only
/// bounds a host that drops packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The PostgreSQL database tests, benches and the server tests use: `SOLOIST_TEST_POSTGRES` if
/// set, else `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_base_url() -> String {
    std::env::var("SOLOIST_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Whether this is a CI run (`CI=true`), where a test that cannot run must fail, never skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci == "true")
}

/// Whether a PostgreSQL server answers at `url` (within 10 s).
pub async fn postgres_answers(url: &str) -> bool {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(connection)) => {
            // Only a polite goodbye: the answer is already known.
            let _ = connection.close().await;
            true
        }
        _ => false,
    }
}

/// Whether PostgreSQL tests run: `Ok(true)` when [`postgres_base_url`] answers, `Ok(false)` when
/// it does not (the caller skips, saying so), and [`Error::PostgresRequired`] when it does not
/// under `CI=true`. The server is asked once per process.
pub async fn postgres_available() -> Result<bool> {
    static ANSWERS: OnceLock<bool> = OnceLock::new();
    let answers = match ANSWERS.get() {
        Some(&answers) => answers,
        None => {
            let answers = postgres_answers(&postgres_base_url()).await;
            *ANSWERS.get_or_init(|| answers)
        }
    };
    if answers {
        Ok(true)
    } else if ci() {
        Err(Error::PostgresRequired {
            url: postgres_base_url(),
        })
    } else {
        Ok(false)
    }
}

/// `base_url` with its connections' `search_path` set to `schema`, so that everything they
/// create and read is in that schema.
pub fn search_path_url(base_url: &str, schema: &str) -> String {
    let separator = if base_url.contains('?') { '&' } else { '?' };
    format!("{base_url}{separator}options=-c%20search_path%3D{schema}")
}

/// A fresh schema of its own in a PostgreSQL database, and a URL whose connections use it.
///
/// Dropped (`CASCADE`) by [`PgSchema::remove`], or else when the value is dropped, best effort:
/// a schema left behind by a killed process is named `<prefix>_<32 hex digits>`, which is what
/// `.ci/start-postgres` looks for (with the tests' prefix, `t`).
#[derive(Debug)]
pub struct PgSchema {
    /// The database the schema is in; its connections use the default `search_path`.
    base_url: String,
    name: String,
    url: String,
    /// Cleared once the schema is dropped, so that `Drop` does not try again.
    live: bool,
}

impl PgSchema {
    /// Creates `<prefix>_<uuid>` in the database at `base_url`. The prefix must be a plain
    /// lower-case identifier, since the name is written into statements unquoted.
    pub async fn create(base_url: &str, prefix: &str) -> Result<PgSchema> {
        let plain = prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(Error::SchemaPrefix(prefix.to_owned()));
        }
        let name = format!("{prefix}_{}", Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(base_url).await?;
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut connection)
            .await?;
        let _ = connection.close().await;
        Ok(PgSchema {
            base_url: base_url.to_owned(),
            url: search_path_url(base_url, &name),
            name,
            live: true,
        })
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL whose connections use the schema (see [`search_path_url`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database the schema is in, as given to [`PgSchema::create`].
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Drops the schema and everything in it, and says whether that worked.
    pub async fn remove(mut self) -> Result<()> {
        self.live = false;
        drop_schema(&self.base_url, &self.name).await
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        // Best effort, on a thread of its own: `drop` cannot await, and the runtime of the
        // test that owned the schema may be the one going away. Joined, so that the schema is
        // gone before the test (or the process) ends.
        let (base_url, name) = (self.base_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                let _ = runtime.block_on(drop_schema(&base_url, &name));
            }
        })
        .join();
    }
}

async fn drop_schema(base_url: &str, name: &str) -> Result<()> {
    let mut connection = PgConnection::connect(base_url).await?;
    let dropped = sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {name} CASCADE"
    )))
    .execute(&mut connection)
    .await;
    let _ = connection.close().await;
    dropped.map(|_| ()).map_err(Error::from)
}
