//! What the server's test binaries share: starting the real `soloist-server` binary as a child
//! process (killed when dropped, even when a test panics), its memory as `/proc` reports it,
//! JSON requests, and raw HTTP/1 over TCP. Fresh databases come from `soloist_testkit`.
//!
//! `SOLOIST_SERVER_BIN` points the tests at another build of the binary (e.g.
//! `target/release/soloist-server`, to measure the release build).

// Each test binary compiles its own copy of this module and uses only some of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use soloist_testkit::{Backend, TempDir, TestDb};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The binary under test: `SOLOIST_SERVER_BIN` if set, else the one cargo built for the tests.
pub fn server_binary() -> String {
    std::env::var("SOLOIST_SERVER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_soloist-server").to_owned())
}

/// A process's memory, from `/proc/<pid>/status`, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `VmHWM`: the peak resident set size.
    pub peak_kib: u64,
    /// `VmRSS`: the resident set size now.
    pub rss_kib: u64,
    /// `VmPeak`: the peak address space (what `ulimit -v` bounds).
    pub address_space_peak_kib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmHWM {:.1} MiB, VmRSS {:.1} MiB, VmPeak {:.1} MiB",
            self.peak_kib as f64 / 1024.0,
            self.rss_kib as f64 / 1024.0,
            self.address_space_peak_kib as f64 / 1024.0
        )
    }
}

/// A server process, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>`, as the server printed it.
    base: String,
    /// The SQLite database's directory, removed with the server.
    dir: Option<TempDir>,
    /// The `--database-url` and extra arguments it was started with, for [`Server::restart`].
    database_url: String,
    extra: Vec<String>,
}

impl Server {
    /// Starts the binary on a fresh SQLite file.
    pub fn sqlite(extra: &[&str]) -> Server {
        let dir = TempDir::new("soloist-server-test").expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let mut server = Server::start(&url, extra);
        server.dir = Some(dir);
        server
    }

    /// Starts the binary on a free port.
    pub fn start(database_url: &str, extra: &[&str]) -> Server {
        Server::try_start("127.0.0.1:0", database_url, extra)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts the binary listening on `listen` and waits until it is accepting connections;
    /// an error if it exits first (e.g. the port is still taken).
    pub fn try_start(listen: &str, database_url: &str, extra: &[&str]) -> Result<Server, String> {
        Server::try_start_command(Command::new(server_binary()), listen, database_url, extra)
    }

    /// Starts the binary on a fresh SQLite file with at most `open_files` descriptors (the
    /// shell's `ulimit -n`, which the binary inherits through `exec`, so its process id is the
    /// server's).
    pub fn sqlite_with_open_files(open_files: u32, extra: &[&str]) -> Server {
        Server::sqlite_under_ulimit(&format!("-n {open_files}"), extra)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// Starts the binary on a fresh SQLite file with at most `kib` KiB of address space
    /// (`ulimit -v`, `RLIMIT_AS`: every mapping counts, resident or not); an error if it does
    /// not start under that limit.
    pub fn sqlite_with_address_space(kib: u64, extra: &[&str]) -> Result<Server, String> {
        Server::sqlite_under_ulimit(&format!("-v {kib}"), extra)
    }

    /// Starts the binary on a fresh SQLite file under `ulimit <limit>`.
    fn sqlite_under_ulimit(limit: &str, extra: &[&str]) -> Result<Server, String> {
        let dir =
            TempDir::new("soloist-server-test").map_err(|error| format!("temp dir: {error}"))?;
        let url = format!("sqlite://{}", dir.path().join("chat.db").display());
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit {limit} && exec \"$0\" \"$@\""),
            &server_binary(),
        ]);
        let mut server = Server::try_start_command(command, "127.0.0.1:0", &url, extra)?;
        server.dir = Some(dir);
        Ok(server)
    }

    fn try_start_command(
        mut command: Command,
        listen: &str,
        database_url: &str,
        extra: &[&str],
    ) -> Result<Server, String> {
        let mut child = command
            .args(["--listen", listen, "--database-url", database_url])
            .args(extra)
            // Not the slow-statement warnings of sqlx, which quote a whole multi-row insert.
            .env("RUST_LOG", "warn,sqlx::query=error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start soloist-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        match line.trim().strip_prefix("listening on ") {
            Some(base) if read.is_ok() => Ok(Server {
                base: base.to_owned(),
                child,
                dir: None,
                database_url: database_url.to_owned(),
                extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            }),
            _ => {
                let _ = child.kill();
                let status = child.wait();
                Err(format!(
                    "soloist-server did not start on {listen}: first line {line:?}, {status:?}"
                ))
            }
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The address it listens on, to start a successor on the same port.
    pub fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// The directory of the SQLite database started by [`Server::sqlite`].
    pub fn sqlite_dir(&self) -> &Path {
        self.dir.as_ref().expect("an SQLite server").path()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its peak and current resident set size.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/<pid>/status"))
        };
        Memory {
            peak_kib: field("VmHWM:"),
            rss_kib: field("VmRSS:"),
            address_space_peak_kib: field("VmPeak:"),
        }
    }

    /// Kills the process (SIGKILL) and starts the binary again on the same database (and the
    /// same arguments, on a new port), so that what a test reads next comes from storage.
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let next = Server::start(&self.database_url, &extra);
        let dir = self.dir.take();
        *self = next;
        self.dir = dir;
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        self.child.wait().expect("wait")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGKILL (the process gets no chance to finish anything) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("request");
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// Like [`send`], with the answer's `ETag` header (the session's version) when it has one.
pub async fn send_tagged(request: reqwest::RequestBuilder) -> (StatusCode, Value, Option<i64>) {
    let response = request.send().await.expect("request");
    let etag = response.headers().get(reqwest::header::ETAG).map(|value| {
        let text = value.to_str().expect("ETag is ASCII");
        text.strip_prefix('"')
            .and_then(|rest| rest.strip_suffix('"'))
            .and_then(|version| version.parse().ok())
            .unwrap_or_else(|| panic!("ETag {text:?} is not a quoted version"))
    });
    let status = response.status();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body, etag)
}

/// `POST path` as `user` with a JSON body.
pub async fn post(
    client: &Client,
    server: &Server,
    path: &str,
    user: &str,
    body: &Value,
) -> (StatusCode, Value) {
    send(
        client
            .post(server.url(path))
            .header("x-user-id", user)
            .json(body),
    )
    .await
}

/// `GET path` as `user`.
pub async fn get(client: &Client, server: &Server, path: &str, user: &str) -> (StatusCode, Value) {
    send(client.get(server.url(path)).header("x-user-id", user)).await
}

/// Creates a session owned by `user` and returns its id.
pub async fn create(client: &Client, server: &Server, user: &str) -> String {
    let (status, body) = post(client, server, "/v1/sessions", user, &json!({"title": "t"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["session_id"].as_str().expect("session_id").to_owned()
}

#[track_caller]
pub fn assert_error(actual: (StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(actual.0, status, "{}", actual.1);
    assert_eq!(actual.1["error"]["code"], code, "{}", actual.1);
    assert!(actual.1["error"]["message"].is_string(), "{}", actual.1);
}

/// A fresh schema on the test PostgreSQL (`db.url` connects to it, `db.schema()` names it),
/// dropped with `db` even when the test panics. `None` (skipped, with a message) outside CI when
/// PostgreSQL is not answering; under `CI=true` that fails the test instead.
pub async fn postgres_db() -> Option<TestDb> {
    TestDb::new(Backend::Postgres).await.expect("database")
}

/// A pool on the database that holds `db`'s schema, for statements that name the schema.
pub async fn admin_pool() -> sqlx::PgPool {
    sqlx::PgPool::connect(&soloist_testkit::postgres_base_url())
        .await
        .expect("connect to PostgreSQL")
}

/// Reads until `end` has been read (or the connection ends), a byte at a time so that nothing
/// after it is consumed.
pub async fn read_until(stream: &mut TcpStream, end: &[u8]) -> String {
    let mut read = Vec::new();
    let mut byte = [0u8; 1];
    while !read.ends_with(end) {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await {
            Ok(Ok(1)) => read.push(byte[0]),
            Ok(_) => break,
            Err(_) => panic!("nothing read for 10 s; so far {read:?}"),
        }
    }
    String::from_utf8_lossy(&read).into_owned()
}

/// Reads one response with a `content-length`: status, lower-cased head, body.
pub async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let head = read_until(stream, b"\r\n\r\n").await.to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|length| length.trim().parse().expect("content-length"))
        .unwrap_or_else(|| panic!("no content-length in {head:?}"));
    let mut body = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut body))
        .await
        .expect("body within 10 s")
        .expect("body");
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Reads `count` SSE events `(id, event name, data JSON)` from a response.
pub async fn read_named_events(
    response: reqwest::Response,
    count: usize,
) -> Vec<(String, String, Value)> {
    use futures::StreamExt;
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body = response.bytes_stream();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(20), body.next())
            .await
            .expect("an event within 20 s")
            .expect("stream open")
            .expect("chunk");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                event
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .map(|value| value.trim().to_owned())
            };
            if let (Some(id), Some(name), Some(data)) =
                (field("id:"), field("event:"), field("data:"))
            {
                events.push((id, name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
        }
    }
    events
}

/// Waits until the server closes the connection (end of stream or reset), at most `limit`,
/// reading and dropping what it sends meanwhile; how long that took.
pub async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    let mut sink = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Sends `GET path` as alice on a connection with a receive buffer of a few KiB, and reads
/// nothing: a client that stops reading fills it, and the server's socket, at once.
pub async fn stalled_get(address: &str, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket
        .connect(address.parse().expect("address"))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: soloist\r\nx-user-id: alice\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("request");
    stream
}
