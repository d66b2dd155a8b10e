//! What every run shares: where the services are, pool sizes, durations, lock timings.

use std::time::Duration;

use serde::Serialize;
use soloist::EngineConfig;
use sqlx::postgres::PgConnectOptions;

use crate::error::LoadError;

/// The PostgreSQL database the benchmark uses unless told otherwise (trust auth on loopback).
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The Redis server strategy (c) locks on.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// Settings shared by all runs of one invocation.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Base PostgreSQL URL; each run gets a fresh schema in this database.
    pub postgres_url: String,
    /// Redis URL for strategy (c).
    pub redis_url: String,
    /// Connections per run on PostgreSQL, for the engine (writers + readers) and for every
    /// baseline alike.
    pub postgres_pool: u32,
    /// Connections per run on SQLite: the engine's own default (one writer connection plus
    /// its default reader pool); the baselines get a pool of the same size.
    pub sqlite_pool: u32,
    /// How long each run keeps starting new operations.
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
    /// Rows per multi-row INSERT (and per commit) of the `limit` strategy.
    pub limit_batch: usize,
    /// Strategy (c): sleep between two `SET NX` attempts.
    #[serde(serialize_with = "seconds")]
    pub lock_poll: Duration,
    /// Strategy (c): give up waiting for the lock after this long (counted as an error).
    #[serde(serialize_with = "seconds")]
    pub lock_wait: Duration,
    /// Strategy (c): the lock's expiry (`PX`).
    #[serde(serialize_with = "seconds")]
    pub lock_ttl: Duration,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl Settings {
    /// Checks that both services are on this machine's loopback interface: the benchmark only
    /// ever talks to 127.0.0.1.
    pub fn check_loopback(&self) -> Result<(), LoadError> {
        let options: PgConnectOptions = self
            .postgres_url
            .parse()
            .map_err(|error| LoadError::Config(format!("--postgres-url: {error}")))?;
        if !is_loopback(options.get_host()) {
            return Err(LoadError::Config(format!(
                "--postgres-url must point at 127.0.0.1 (or a local socket), not {:?}",
                options.get_host()
            )));
        }
        let redis_host = redis_host(&self.redis_url)
            .ok_or_else(|| LoadError::Config("--redis-url: cannot find the host".into()))?;
        if !is_loopback(redis_host) {
            return Err(LoadError::Config(format!(
                "--redis-url must point at 127.0.0.1, not {redis_host:?}"
            )));
        }
        Ok(())
    }

    /// The engine configuration a run uses on `database_url`: the defaults, with the
    /// PostgreSQL connections split between writers and readers to total the pool size.
    pub fn engine_config(&self, database_url: &str, postgres: bool) -> EngineConfig {
        let mut config = EngineConfig::new(database_url);
        if postgres {
            let writers = (self.postgres_pool / 2).max(1);
            config.writer_connections = writers;
            config.read_pool_size = self.postgres_pool.saturating_sub(writers).max(1);
        }
        config
    }
}

/// The engine's default SQLite connection count: one writer plus the default reader pool.
pub fn engine_default_sqlite_connections() -> u32 {
    EngineConfig::new("sqlite::memory:").read_pool_size + 1
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host == "::1" || host.starts_with("127.") || host.starts_with('/')
}

fn redis_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    if let Some(bracketed) = host_port.strip_prefix('[') {
        return bracketed.split(']').next();
    }
    host_port.split(':').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("10.0.0.1"));
        assert_eq!(redis_host("redis://127.0.0.1:6379/"), Some("127.0.0.1"));
        assert_eq!(redis_host("redis://:pw@localhost/0"), Some("localhost"));
        assert_eq!(redis_host("redis://[::1]:6379"), Some("::1"));
    }
}
