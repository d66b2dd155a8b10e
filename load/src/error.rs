//! Errors of the benchmark's own plumbing: provisioning a database, opening pools, starting
//! server processes, checking, writing the report. A run that hits one is recorded as failed
//! and the matrix goes on.
//!
//! The errors the *strategies* surface to their callers during a run are not these: they are
//! counted by kind in the run's result (see [`crate::strategy::OpError`]).

/// Something the benchmark itself could not do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A database statement of the harness (not of a strategy under test) failed.
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    /// A run's fresh database (its schema, its directory) could not be made.
    #[error("provisioning: {0}")]
    Provision(#[from] soloist_testkit::Error),
    /// The soloist engine failed to start or to create the workload's sessions.
    #[error("soloist: {0}")]
    Engine(#[from] soloist::Error),
    /// Redis could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Reading `/proc`, writing the report.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Serializing the JSON report.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing the SVG plot.
    #[error("plot: {0}")]
    Plot(String),
    /// A latency histogram could not be created or merged.
    #[error("histogram: {0}")]
    Histogram(String),
    /// A flag or URL the benchmark refuses (e.g. a host that is not loopback).
    #[error("{0}")]
    Config(String),
    /// A `soloist-server` process of a cluster run: its binary is missing, it did not start,
    /// or it did not answer.
    #[error("server: {0}")]
    Server(String),
    /// An HTTP request of the harness (not of a writer under test) failed.
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    /// A writer task panicked.
    #[error("a writer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}
