//! The client side of a cluster run: which process each request goes to, the append over HTTP
//! with its bounded retries, the sessions created up front, and how error answers are counted.
//!
//! - **Routing.** `round-robin`: every request (a retry too) goes to the next process, one
//!   counter shared by all writers. `sticky`: every request for a session goes to the process
//!   that owns it (rendezvous hashing over the processes' member ids, as the servers place
//!   sessions), as a load balancer with perfect session affinity would send it: no request is
//!   forwarded. Without member ids (a server that is not a member), `fnv1a(session id) % N`.
//! - **Append.** `POST /v1/sessions/{id}/messages` with `x-user-id` and one message with a
//!   client-chosen id. A retryable answer (408, 429, 502, 503, 504, a 409 `conflict`, or no
//!   answer at all) is sent again with the **same** message id, at most [`MAX_RETRIES`] times:
//!   the server answers a message id it already stored with its original sequence, so a retry
//!   can neither lose nor duplicate the message.
//! - **Errors** are counted by kind: the HTTP status and the JSON error code
//!   (`503 timeout`, `409 conflict`), or the transport failure (`connect`, `timeout`,
//!   `transport`).
//!
//! One [`reqwest::Client`] serves every writer; it keeps its connections alive between
//! requests.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use soloist::uuid::Uuid;

use crate::error::LoadError;
use crate::workload::{Outgoing, USER_ID};

/// Times a retryable answer is retried (with the same message id) before it counts as an error.
pub const MAX_RETRIES: u32 = 5;
/// Pause before the first retry; doubled for each next one.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// The longest a request may take before it counts as a transport timeout (the server's own
/// command timeout is 30 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How requests are spread over the processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Each session's requests always to the process that owns it.
    Sticky,
    /// Every request to the next process in turn.
    RoundRobin,
}

impl Routing {
    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Routing::Sticky => "sticky",
            Routing::RoundRobin => "round-robin",
        }
    }
}

/// Chooses the process of each request.
#[derive(Debug)]
pub struct Targets {
    routing: Routing,
    processes: usize,
    /// Each process's member id, by process, when every process is a member.
    members: Option<Vec<Uuid>>,
    next: AtomicUsize,
}

impl Targets {
    /// A chooser over `processes` processes (at least 1), whose member ids are `members` (one
    /// per process, or empty).
    pub fn new(routing: Routing, processes: usize, members: Vec<Uuid>) -> Self {
        let processes = processes.max(1);
        Self {
            routing,
            processes,
            members: (members.len() == processes).then_some(members),
            next: AtomicUsize::new(0),
        }
    }

    /// The process (`0..N`) the next request for `session` goes to.
    pub fn pick(&self, session: Uuid) -> usize {
        match (self.routing, &self.members) {
            (Routing::Sticky, Some(members)) => owner(members, session),
            (Routing::Sticky, None) => sticky_process(session, self.processes),
            (Routing::RoundRobin, _) => self.next.fetch_add(1, Relaxed) % self.processes,
        }
    }
}

/// The process that owns `session` among the processes with member ids `members`: the one
/// rendezvous hashing places it on, exactly as the servers do.
pub fn owner(members: &[Uuid], session: Uuid) -> usize {
    let session = soloist::SessionId::from(session);
    (0..members.len())
        .max_by_key(|&index| {
            (
                soloist::cluster::score(members[index], session),
                members[index],
            )
        })
        .unwrap_or(0)
}

/// The process a session sticks to: the 64-bit FNV-1a hash of its 16 bytes, modulo
/// `processes`. Stable across runs and builds (unlike `std`'s hasher).
pub fn sticky_process(session: Uuid, processes: usize) -> usize {
    (fnv1a(session.as_bytes()) % processes.max(1) as u64) as usize
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// An answer that was not a success, reduced to a kind for counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `503 timeout`, `409 conflict`, `connect`, ...
    pub kind: String,
    /// Whether sending the same request again may succeed.
    pub retryable: bool,
}

impl Failure {
    /// Classifies an error answer from its status and body.
    pub fn answer(status: u16, body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: ErrorCode,
        }
        #[derive(Deserialize)]
        struct ErrorCode {
            code: String,
        }
        let code = serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .map(|body| body.error.code);
        let retryable = match status {
            408 | 429 | 502 | 503 | 504 => true,
            409 => code.as_deref() == Some("conflict"),
            _ => false,
        };
        let kind = match code {
            Some(code) => format!("{status} {code}"),
            None => status.to_string(),
        };
        Self { kind, retryable }
    }

    /// A request that got no answer: the server may or may not have applied it, which a retry
    /// with the same message id settles.
    fn transport(error: &reqwest::Error) -> Self {
        let kind = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect"
        } else {
            "transport"
        };
        Self {
            kind: kind.to_owned(),
            retryable: true,
        }
    }

    fn answer_unreadable() -> Self {
        Self {
            kind: "unreadable_answer".to_owned(),
            retryable: false,
        }
    }
}

/// What the retries of one append went through.
#[derive(Debug, Default)]
pub struct Attempts {
    /// The retryable failures that were retried, by kind.
    pub retried: Vec<String>,
}

/// The HTTP client of a run, with the processes' base URLs and the routing.
#[derive(Debug)]
pub struct Cluster {
    client: reqwest::Client,
    urls: Vec<String>,
    targets: Targets,
}

#[derive(Serialize)]
struct AppendBody<'a> {
    messages: [&'a soloist::NewMessage; 1],
}

#[derive(Deserialize)]
struct Appended {
    sequences: Vec<i64>,
}

#[derive(Serialize)]
struct CreateBody {
    title: String,
}

#[derive(Deserialize)]
struct Created {
    session_id: Uuid,
}

/// The client every request of the benchmark goes through: keep-alive connections, no proxy,
/// a bound on every request.
pub fn client() -> Result<reqwest::Client, LoadError> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()?)
}

impl Cluster {
    /// The processes at `urls` (with member ids `members`), reached through `client`, routed
    /// by `routing`.
    pub fn new(
        client: reqwest::Client,
        urls: Vec<String>,
        members: Vec<Uuid>,
        routing: Routing,
    ) -> Self {
        let targets = Targets::new(routing, urls.len(), members);
        Self {
            client,
            urls,
            targets,
        }
    }

    /// The client the requests go through.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn url(&self, process: usize) -> &str {
        self.urls.get(process).map_or("", String::as_str)
    }

    /// Appends `message` to `session`, retrying retryable failures with the same message id;
    /// answers its sequence, or the last failure.
    pub async fn append(
        &self,
        session: Uuid,
        message: &Outgoing,
        attempts: &mut Attempts,
    ) -> Result<i64, Failure> {
        let new_message = message.to_new_message();
        let body = serde_json::to_vec(&AppendBody {
            messages: [&new_message],
        })
        .map_err(|_| Failure::answer_unreadable())?;
        let answer = self.send(session, "messages", body, attempts).await?;
        serde_json::from_slice::<Appended>(&answer)
            .ok()
            .and_then(|appended| appended.sequences.first().copied())
            .ok_or_else(Failure::answer_unreadable)
    }

    /// POSTs `body` to `/v1/sessions/{session}/{path}` through the process the routing picks,
    /// sending the same body again after a retryable failure (at most [`MAX_RETRIES`] times,
    /// each retry to the process picked then); answers the body of the 2xx answer, or the last
    /// failure. Only for requests that are idempotent by their body (a message id, an offset).
    pub async fn send(
        &self,
        session: Uuid,
        path: &str,
        body: Vec<u8>,
        attempts: &mut Attempts,
    ) -> Result<Vec<u8>, Failure> {
        let mut backoff = FIRST_BACKOFF;
        let mut retries = 0;
        loop {
            let url = format!("{}/{path}", self.session_url(session));
            let failure = match self.post(&url, body.clone(), None).await {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            if !failure.retryable || retries >= MAX_RETRIES {
                return Err(failure);
            }
            retries += 1;
            attempts.retried.push(failure.kind);
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// `/v1/sessions/{session}` at the process the routing picks for this request.
    pub fn session_url(&self, session: Uuid) -> String {
        let process = self.targets.pick(session);
        format!("{}/v1/sessions/{session}", self.url(process))
    }

    /// Creates `count` sessions owned by [`USER_ID`], `parallel` requests at a time. Servers
    /// that route (members) create each at its owner, whichever process gets the create, so
    /// every session made is kept. Otherwise each is made through its **home** process, the
    /// one sticky routing sends it to, as follows.
    ///
    /// A create claims its session for the process that made it for the servers' ownership
    /// lease (10 s by default), and a write through another process within it counts as a
    /// takeover. Sessions made through one process would start every sticky run with takeovers
    /// that routing has nothing to do with. The ids are the server's to choose, so creates go
    /// round-robin over the processes and a session whose id hashes to another process than
    /// the one that made it is left unused (about N - 1 of every N creates; with one process,
    /// none). Each create carries an `Idempotency-Key` (`run` and its attempt number), so a
    /// retry reaches the same session.
    pub async fn create_sessions(
        self: &std::sync::Arc<Self>,
        run: Uuid,
        count: usize,
        parallel: usize,
    ) -> Result<Vec<Uuid>, LoadError> {
        let processes = self.urls.len().max(1);
        // Servers that route create each session at its owner, whichever process gets it.
        let routed = self.targets.members.is_some();
        // Far beyond what a fair hash needs (N per session on average).
        let max_attempts = count.saturating_mul(processes).saturating_mul(8) + 64;
        let next_attempt = std::sync::Arc::new(AtomicUsize::new(0));
        let found = std::sync::Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..parallel.clamp(1, count.max(1)) {
            let cluster = self.clone();
            let next_attempt = next_attempt.clone();
            let found = found.clone();
            workers.spawn(async move {
                let mut kept = Vec::new();
                while found.load(Relaxed) < count {
                    let attempt = next_attempt.fetch_add(1, Relaxed);
                    if attempt >= max_attempts {
                        return Err(LoadError::Server(format!(
                            "{attempt} creates did not yield {count} sessions whose ids hash to \
                             the process that made them"
                        )));
                    }
                    let process = attempt % processes;
                    let id = cluster
                        .create_session(run, attempt, process)
                        .await
                        .map_err(|failure| {
                            LoadError::Server(format!(
                                "creating a session through process {process}: {}",
                                failure.kind
                            ))
                        })?;
                    if routed || sticky_process(id, processes) == process {
                        found.fetch_add(1, Relaxed);
                        kept.push((attempt, id));
                    }
                }
                Ok::<_, LoadError>(kept)
            });
        }
        let mut kept = Vec::with_capacity(count + parallel);
        while let Some(joined) = workers.join_next().await {
            kept.extend(joined??);
        }
        kept.sort_unstable();
        kept.truncate(count);
        Ok(kept.into_iter().map(|(_, id)| id).collect())
    }

    async fn create_session(
        &self,
        run: Uuid,
        attempt: usize,
        process: usize,
    ) -> Result<Uuid, Failure> {
        let body = serde_json::to_vec(&CreateBody {
            title: format!("load session {attempt}"),
        })
        .map_err(|_| Failure::answer_unreadable())?;
        let key = format!("soloist-load-{}-{attempt}", run.simple());
        let url = format!("{}/v1/sessions", self.url(process));
        let mut backoff = FIRST_BACKOFF;
        let mut retries = 0;
        loop {
            let failure = match self.post(&url, body.clone(), Some(&key)).await {
                Ok(answer) => {
                    return serde_json::from_slice::<Created>(&answer)
                        .map(|created| created.session_id)
                        .map_err(|_| Failure::answer_unreadable());
                }
                Err(failure) => failure,
            };
            if !failure.retryable || retries >= MAX_RETRIES {
                return Err(failure);
            }
            retries += 1;
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    /// One POST of a JSON body; answers the body of a 2xx answer.
    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, Failure> {
        let mut request = self
            .client
            .post(url)
            .header("x-user-id", USER_ID)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request
            .send()
            .await
            .map_err(|error| Failure::transport(&error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| Failure::transport(&error))?;
        if status.is_success() {
            Ok(bytes.to_vec())
        } else {
            Err(Failure::answer(status.as_u16(), &bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_every_process_in_turn() {
        let targets = Targets::new(Routing::RoundRobin, 3, Vec::new());
        let session = Uuid::now_v7();
        let picked: Vec<usize> = (0..7).map(|_| targets.pick(session)).collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn sticky_keeps_each_session_on_one_process_and_spreads_sessions() {
        let targets = Targets::new(Routing::Sticky, 3, Vec::new());
        let mut per_process = [0usize; 3];
        for _ in 0..3_000 {
            let session = Uuid::new_v4();
            let first = targets.pick(session);
            assert!((0..5).all(|_| targets.pick(session) == first));
            per_process[first] += 1;
        }
        // 1,000 expected each; a fair hash stays well within +-20%.
        assert!(
            per_process
                .iter()
                .all(|&count| (800..=1_200).contains(&count)),
            "{per_process:?}"
        );
        // Stable across runs and builds: a fixed session always lands on the same process.
        let fixed = Uuid::from_u128(0x0193f1a2_0000_7000_8000_000000000001);
        assert_eq!(fnv1a(fixed.as_bytes()), 0xc7f8_a258_d32c_0b85);
        assert_eq!(sticky_process(fixed, 3), 1);
        assert_eq!(sticky_process(Uuid::new_v4(), 1), 0);
    }

    #[test]
    fn sticky_goes_to_the_owner_when_the_processes_are_members() {
        let members: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let targets = Targets::new(Routing::Sticky, 3, members.clone());
        for _ in 0..300 {
            let session = Uuid::now_v7();
            let picked = targets.pick(session);
            let best = members
                .iter()
                .map(|&member| soloist::cluster::score(member, soloist::SessionId::from(session)))
                .max();
            assert_eq!(
                Some(soloist::cluster::score(
                    members[picked],
                    soloist::SessionId::from(session)
                )),
                best
            );
        }
    }

    #[test]
    fn error_answers_by_status_and_code() {
        let body = br#"{"error":{"code":"timeout","message":"retry"}}"#;
        assert_eq!(
            Failure::answer(503, body),
            Failure {
                kind: "503 timeout".into(),
                retryable: true
            }
        );
        let conflict = br#"{"error":{"code":"conflict","message":"gave up"}}"#;
        assert!(Failure::answer(409, conflict).retryable);
        let reused = br#"{"error":{"code":"message_id_reused","message":"no"}}"#;
        assert!(!Failure::answer(409, reused).retryable);
        assert_eq!(Failure::answer(404, b"not json").kind, "404");
        assert!(!Failure::answer(400, b"").retryable);
    }
}
