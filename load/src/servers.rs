//! The `soloist-server` processes of a cluster run: found, started on free ports, waited for,
//! read and stopped.
//!
//! Each process runs `soloist-server --database-url <url> --listen 127.0.0.1:<port>` with
//! `RUST_LOG=warn` and nothing else, so the benchmark works against any server that keeps those
//! two flags and the HTTP API. Its stdout and stderr go to `process-<i>.log` in the run's log
//! directory (under `--out`), never to the terminal. The port is a free one: bind
//! `127.0.0.1:0`, read the port the kernel chose, close, pass it on; a process that loses the
//! port to someone else in between exits with "address in use" and is started again on
//! another.
//!
//! Process 0 starts first and alone, so that it runs the migrations on the fresh database; the
//! others start together once it answers. A process is ready when `GET /healthz` answers 200;
//! one that exits or stays silent for [`HEALTH_TIMEOUT`] fails the run with the tail of its log.
//!
//! [`Servers`] is a guard: dropping it stops every process still running (SIGTERM, then
//! SIGKILL after [`STOP_TIMEOUT`]), so no error path leaves servers behind. The normal path
//! stops them with [`Servers::stop`], which waits without blocking the runtime.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use soloist::uuid::Uuid;

use crate::error::LoadError;

/// How long the benchmark waits once the members see each other, for every one of them to be
/// given sessions (the servers' settling time, with the default member lease: 1.5 s).
const SETTLE: Duration = Duration::from_secs(2);

/// How long a process may take to answer `GET /healthz` after it is started.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Times a process is started again after losing its port to another program.
const PORT_ATTEMPTS: usize = 3;
/// Lines of a process's log quoted in an error.
const TAIL_LINES: usize = 20;

/// The server binary `--server-bin` names, or by default the `soloist-server` next to this
/// executable (both are built into `target/release/`). Fails with how to build it when there is
/// no such file.
pub fn server_binary(chosen: Option<&Path>) -> Result<PathBuf, LoadError> {
    let path = match chosen {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?.with_file_name("soloist-server"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LoadError::Server(format!(
            "no soloist-server binary at {}: build it with `cargo build --release -p \
             soloist-server` (it is looked for next to soloist-load), or pass --server-bin PATH",
            path.display()
        )))
    }
}

/// A port on 127.0.0.1 that nothing listens on now: the one the kernel picks for port 0.
pub fn free_port() -> Result<u16, LoadError> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// One running server process.
#[derive(Debug)]
struct Server {
    /// `http://127.0.0.1:<port>`.
    base_url: String,
    child: Child,
    log: PathBuf,
}

/// The server processes of one run; dropping it stops the ones still running.
#[derive(Debug)]
pub struct Servers {
    servers: Vec<Server>,
    /// Each process's `--worker-threads`.
    threads: usize,
}

/// The worker threads each of `count` processes on this machine gets: its share of the cores
/// (at least one), as a CPU limit of cores / `count` per process would give it. More would
/// only add switches between threads competing for the same cores.
pub fn threads_per_process(count: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / count.max(1)).max(1)
}

impl Servers {
    /// Starts `count` processes of `binary` on `database_url`, each with its share of the
    /// cores ([`threads_per_process`]), logging into `log_dir`, and waits until each answers
    /// `GET /healthz`.
    pub async fn start(
        binary: &Path,
        database_url: &str,
        count: usize,
        log_dir: &Path,
        client: &reqwest::Client,
    ) -> Result<Self, LoadError> {
        std::fs::create_dir_all(log_dir)?;
        let mut servers = Servers {
            servers: Vec::with_capacity(count),
            threads: threads_per_process(count),
        };
        // Process 0 alone first: it migrates the fresh database.
        servers.launch(0, binary, database_url, log_dir)?;
        servers
            .ready(0, binary, database_url, log_dir, client)
            .await?;
        for index in 1..count {
            servers.launch(index, binary, database_url, log_dir)?;
        }
        for index in 1..count {
            servers
                .ready(index, binary, database_url, log_dir, client)
                .await?;
        }
        Ok(servers)
    }

    /// The base URL of every process, in process order.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| server.base_url.clone())
            .collect()
    }

    /// The process ids, for the CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .map(|server| server.child.id())
            .collect()
    }

    /// Starts process `index` on a free port (in place of an earlier attempt, if any).
    fn launch(
        &mut self,
        index: usize,
        binary: &Path,
        database_url: &str,
        log_dir: &Path,
    ) -> Result<(), LoadError> {
        let port = free_port()?;
        let log = log_dir.join(format!("process-{index}.log"));
        let stdout = OpenOptions::new().create(true).append(true).open(&log)?;
        let stderr = stdout.try_clone()?;
        let child = Command::new(binary)
            .arg("--database-url")
            .arg(database_url)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--worker-threads")
            .arg(self.threads.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|error| {
                LoadError::Server(format!("starting {}: {error}", binary.display()))
            })?;
        let server = Server {
            base_url: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        if let Some(slot) = self.servers.get_mut(index) {
            // The earlier attempt has exited: reap it before replacing it.
            let _ = slot.child.wait();
            *slot = server;
        } else {
            self.servers.push(server);
        }
        Ok(())
    }

    /// Waits until process `index` answers `GET /healthz` with 200; starts it again on another
    /// port if it lost its port.
    async fn ready(
        &mut self,
        index: usize,
        binary: &Path,
        database_url: &str,
        log_dir: &Path,
        client: &reqwest::Client,
    ) -> Result<(), LoadError> {
        for attempt in 1..=PORT_ATTEMPTS {
            match self.wait_healthy(index, client).await? {
                Health::Ready => return Ok(()),
                Health::Exited(status) => {
                    let tail = self.tail(index);
                    if attempt < PORT_ATTEMPTS && tail.contains("in use") {
                        self.launch(index, binary, database_url, log_dir)?;
                        continue;
                    }
                    return Err(LoadError::Server(format!(
                        "soloist-server process {index} exited ({status}) before answering GET \
                         /healthz; the end of its log ({}):\n{tail}",
                        self.log_path(index)
                    )));
                }
                Health::Silent => {
                    return Err(LoadError::Server(format!(
                        "soloist-server process {index} did not answer GET /healthz with 200 \
                         within {} s; the end of its log ({}):\n{}",
                        HEALTH_TIMEOUT.as_secs(),
                        self.log_path(index),
                        self.tail(index)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Waits until every process sees all of them as members (their views have converged),
    /// then for a newly joined member to settle, and returns each process's member id (empty
    /// if the servers are not members: a build without routing).
    pub async fn converge(&self, client: &reqwest::Client) -> Result<Vec<Uuid>, LoadError> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let count = self.servers.len();
        loop {
            let mut ids = Vec::with_capacity(count);
            let mut converged = true;
            for server in &self.servers {
                let health: serde_json::Value = client
                    .get(format!("{}/healthz", server.base_url))
                    .send()
                    .await?
                    .json()
                    .await
                    .unwrap_or_default();
                let Some(id) = health["member"]["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                else {
                    return Ok(Vec::new());
                };
                ids.push(id);
                converged &= health["members"].as_array().map(Vec::len) == Some(count);
            }
            if converged {
                // A member that started later than the first by more than a heartbeat and a
                // half second takes sessions only that long after its start.
                tokio::time::sleep(SETTLE).await;
                return Ok(ids);
            }
            if Instant::now() > deadline {
                return Err(LoadError::Server(
                    "the processes did not all see each other as members".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_healthy(
        &mut self,
        index: usize,
        client: &reqwest::Client,
    ) -> Result<Health, LoadError> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let Some(server) = self.servers.get_mut(index) else {
            return Err(LoadError::Server(format!("no process {index}")));
        };
        let url = format!("{}/healthz", server.base_url);
        while Instant::now() < deadline {
            if let Some(status) = server.child.try_wait()? {
                return Ok(Health::Exited(status.to_string()));
            }
            let answer = client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status() == reqwest::StatusCode::OK) {
                return Ok(Health::Ready);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Health::Silent)
    }

    fn log_path(&self, index: usize) -> String {
        self.servers
            .get(index)
            .map_or_else(String::new, |server| server.log.display().to_string())
    }

    /// The last lines of process `index`'s log.
    fn tail(&self, index: usize) -> String {
        let Some(server) = self.servers.get(index) else {
            return String::new();
        };
        let text = std::fs::read(&server.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    /// Reads `GET /metrics` of every process and keeps the counters whose names contain one of
    /// `needles`, summed over their labels (see [`parse_counters`]).
    pub async fn counters(
        &self,
        client: &reqwest::Client,
        needles: &[&str],
    ) -> Result<Vec<BTreeMap<String, f64>>, LoadError> {
        let mut all = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            let text = client
                .get(format!("{}/metrics", server.base_url))
                .timeout(Duration::from_secs(10))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            all.push(parse_counters(&text, needles));
        }
        Ok(all)
    }

    /// Stops every process: SIGTERM to all, then waits for each (without blocking the runtime)
    /// and kills the ones still running after [`STOP_TIMEOUT`]. Answers the processes that had to
    /// be killed or did not exit cleanly, as warnings.
    pub async fn stop(mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        for server in &mut self.servers {
            terminate(&mut server.child);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (index, server) in self.servers.iter_mut().enumerate() {
            loop {
                match server.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            warnings.push(format!(
                                "soloist-server process {index} exited with {status} (log: {})",
                                server.log.display()
                            ));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(None) | Err(_) => {
                        let _ = server.child.kill();
                        let _ = server.child.wait();
                        warnings.push(format!(
                            "soloist-server process {index} did not stop within {} s of SIGTERM \
                             and was killed (log: {})",
                            STOP_TIMEOUT.as_secs(),
                            server.log.display()
                        ));
                        break;
                    }
                }
            }
        }
        // Every child is reaped: nothing left for the drop.
        self.servers.clear();
        warnings
    }
}

enum Health {
    Ready,
    Exited(String),
    Silent,
}

/// Asks `child` to stop with SIGTERM (through `kill(1)`: the crate has no unsafe code to call
/// `kill(2)` with), or kills it if that cannot be sent.
fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !sent {
        let _ = child.kill();
    }
}

impl Drop for Servers {
    /// The error path: stop whatever still runs, blocking (a drop cannot await).
    fn drop(&mut self) {
        if self.servers.is_empty() {
            return;
        }
        for server in &mut self.servers {
            terminate(&mut server.child);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for server in &mut self.servers {
            while matches!(server.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(server.child.try_wait(), Ok(None)) {
                let _ = server.child.kill();
            }
            let _ = server.child.wait();
        }
    }
}

/// The counters of a Prometheus text exposition whose metric names contain one of `needles`,
/// each summed over its label sets. Comments, histogram series (`_bucket`, `_sum`, `_count`)
/// and unparsable lines are skipped.
pub fn parse_counters(text: &str, needles: &[&str]) -> BTreeMap<String, f64> {
    let mut counters = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        if !needles.iter().any(|needle| name.contains(needle))
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.ends_with(suffix))
        {
            continue;
        }
        let rest = match line[name_end..].rfind('}') {
            Some(close) if line[name_end..].starts_with('{') => &line[name_end + close + 1..],
            _ => &line[name_end..],
        };
        // The value, then an optional timestamp.
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        if value.is_finite() {
            *counters.entry(name.to_owned()).or_insert(0.0) += value;
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_can_be_bound() -> Result<(), Box<dyn std::error::Error>> {
        let port = free_port()?;
        assert_ne!(port, 0);
        // Closed again: a server can take it.
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        assert_eq!(listener.local_addr()?.port(), port);
        Ok(())
    }

    #[test]
    fn missing_binary_says_how_to_build_it() {
        let Err(error) = server_binary(Some(Path::new("/nonexistent/soloist-server"))) else {
            panic!("a missing server binary must be an error");
        };
        let error = error.to_string();
        assert!(
            error.contains("cargo build --release -p soloist-server"),
            "{error}"
        );
        assert!(error.contains("--server-bin"), "{error}");
    }

    #[test]
    fn counters_by_name_summed_over_labels() {
        let text = "\
# HELP soloist_takeovers_total Writes that took a session over.
# TYPE soloist_takeovers_total counter
soloist_takeovers_total 7
soloist_flushes_total 120
soloist_forwarded_total{peer=\"a\"} 3
soloist_forwarded_total{peer=\"b\",kind=\"x}y\"} 4 1700000000000
soloist_forward_latency_bucket{le=\"1\"} 9
soloist_forward_latency_sum 12
soloist_forward_latency_count 9
soloist_takeover_garbage not-a-number
";
        let counters = parse_counters(text, &["takeover", "forward"]);
        assert_eq!(counters.get("soloist_takeovers_total"), Some(&7.0));
        assert_eq!(counters.get("soloist_forwarded_total"), Some(&7.0));
        assert_eq!(counters.len(), 2, "{counters:?}");
        assert!(parse_counters("", &["takeover"]).is_empty());
    }
}
