//! The writer stage: combines the ready batches of many sessions into one transaction.
//!
//! Session actors hand their staged [`SessionWrite`] to the writer queue and wait for its
//! outcome. A writer task takes everything queued (up to the configured bounds), writes it in
//! one transaction, and answers each session. While a transaction is in flight the next one
//! fills up, so the number of commits grows much slower than the load. SQLite gets one writer
//! task (it has one writer anyway); PostgreSQL gets several, each with its own connection.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::backoff::Backoff;
use crate::config::EngineConfig;
use crate::error::StorageError;
use crate::feed::Committed;
use crate::stats::{EngineStats, Refused};
use crate::store::{FlushOutcome, SessionWrite, Store};

/// One session's write waiting for a transaction.
struct WriteJob {
    write: SessionWrite,
    reply: oneshot::Sender<Result<FlushOutcome, StorageError>>,
}

/// The sending side of the writer queue; cheap to clone.
#[derive(Clone)]
pub(crate) struct Writer {
    jobs: mpsc::Sender<WriteJob>,
    /// Held shared by every flush; a test's fault hook holds it exclusively to pause the
    /// writers between taking writes and sending them (see `Engine::pause_writes`).
    #[cfg(any(test, feature = "fault-injection"))]
    gate: Gate,
}

#[cfg(any(test, feature = "fault-injection"))]
type Gate = Arc<tokio::sync::RwLock<()>>;

/// Attempts for a flush that the database refused before anything committed.
const TRANSIENT_RETRIES: u32 = 5;

impl Writer {
    /// Starts the writer tasks on `tracker`; they stop when `stop` is cancelled and the queue is
    /// empty.
    pub fn start(
        store: Store,
        config: &EngineConfig,
        stats: Arc<EngineStats>,
        tracker: &TaskTracker,
        stop: CancellationToken,
        changes: Option<Arc<dyn Committed>>,
    ) -> Self {
        let (jobs, queue) = mpsc::channel(config.max_sessions_per_flush.max(1) * 4);
        let queue = Arc::new(Mutex::new(queue));
        #[cfg(any(test, feature = "fault-injection"))]
        let gate = Gate::default();
        for worker in 0..store.writer_count(config) {
            let task = WriterTask {
                store: store.clone(),
                queue: queue.clone(),
                stats: stats.clone(),
                max_sessions: config.max_sessions_per_flush.max(1),
                max_rows: config.max_rows_per_flush.max(1),
                max_bytes: config.max_bytes_per_flush.max(1),
                stop: stop.clone(),
                changes: changes.clone(),
                #[cfg(any(test, feature = "fault-injection"))]
                gate: gate.clone(),
            };
            tracker.spawn(task.run().instrument(info_span!("writer", worker)));
        }
        Self {
            jobs,
            #[cfg(any(test, feature = "fault-injection"))]
            gate,
        }
    }

    /// Pauses every flush that has not yet reached the database until the guard is dropped
    /// (a fault hook for tests: a writer stalled between staging and writing, as a paused
    /// process would be).
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn pause(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.gate.clone().write_owned().await
    }

    /// Queues one session's write and waits for the transaction holding it.
    pub async fn write(&self, write: SessionWrite) -> Result<FlushOutcome, StorageError> {
        let (reply, outcome) = oneshot::channel();
        self.jobs
            .send(WriteJob { write, reply })
            .await
            .map_err(|_| StorageError::msg("the writer has stopped"))?;
        outcome
            .await
            .map_err(|_| StorageError::msg("the writer stopped before committing"))?
    }
}

struct WriterTask {
    store: Store,
    queue: Arc<Mutex<mpsc::Receiver<WriteJob>>>,
    stats: Arc<EngineStats>,
    max_sessions: usize,
    max_rows: usize,
    max_bytes: usize,
    stop: CancellationToken,
    /// Where committed `(session, version)` pairs go to be announced to other processes.
    changes: Option<Arc<dyn Committed>>,
    #[cfg(any(test, feature = "fault-injection"))]
    gate: Gate,
}

impl WriterTask {
    async fn run(self) {
        let mut jobs = Vec::with_capacity(self.max_sessions);
        loop {
            {
                let mut queue = self.queue.lock().await;
                tokio::select! {
                    biased;
                    received = queue.recv_many(&mut jobs, self.max_sessions) => {
                        if received == 0 {
                            return;
                        }
                    }
                    () = self.stop.cancelled() => {
                        // Every actor has drained before the writer is stopped; take what is
                        // left without waiting and end once the queue is empty.
                        while jobs.len() < self.max_sessions {
                            match queue.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                        if jobs.is_empty() {
                            return;
                        }
                    }
                }
            }
            // Split what was taken into transactions of bounded rows and bytes; a single
            // session's write always goes whole (the limits on one append keep it bounded).
            while !jobs.is_empty() {
                let (mut rows, mut bytes, mut take) = (0, 0, 0);
                for job in &jobs {
                    let (job_rows, job_bytes) = (job.write.rows.len(), job.write.payload_bytes());
                    if take > 0
                        && (rows + job_rows > self.max_rows || bytes + job_bytes > self.max_bytes)
                    {
                        break;
                    }
                    rows += job_rows;
                    bytes += job_bytes;
                    take += 1;
                }
                let batch: Vec<WriteJob> = jobs.drain(..take).collect();
                self.flush(batch).await;
            }
        }
    }

    async fn flush(&self, batch: Vec<WriteJob>) {
        let (writes, replies): (Vec<SessionWrite>, Vec<_>) =
            batch.into_iter().map(|job| (job.write, job.reply)).unzip();
        let rows: usize = writes.iter().map(|write| write.rows.len()).sum();
        let span = info_span!("flush", sessions = writes.len(), rows);
        #[cfg(any(test, feature = "fault-injection"))]
        let _open = self.gate.read().await;
        let started = Instant::now();
        let mut results = Vec::with_capacity(writes.len());
        self.flush_isolating(&writes, &span, &mut results).await;
        let failed = results.iter().filter(|result| result.is_err()).count();
        if failed > 0 {
            self.stats.record_storage_error(started.elapsed());
        }
        let (mut written_sessions, mut written_rows) = (0, 0);
        let mut refused = Refused::default();
        for (write, result) in writes.iter().zip(&results) {
            match result {
                Ok(FlushOutcome::Committed { took_over, .. }) => {
                    written_sessions += 1;
                    refused.takeovers += u64::from(*took_over);
                    written_rows += write.rows.len();
                }
                Ok(FlushOutcome::Conflict) => refused.conflicts += 1,
                Ok(FlushOutcome::Fenced) => refused.fenced += 1,
                Err(_) => {}
            }
        }
        if failed < results.len() {
            self.stats
                .record_flush(written_sessions, written_rows, refused, started.elapsed());
        }
        if let Some(changes) = &self.changes {
            let mut committed =
                writes
                    .iter()
                    .zip(&results)
                    .filter_map(|(write, result)| match result {
                        Ok(FlushOutcome::Committed { version, .. }) => {
                            Some((write.session_id, *version))
                        }
                        _ => None,
                    });
            changes.committed(&mut committed);
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }

    /// Flushes `writes` in one transaction (retrying transient failures), pushing each
    /// write's result to `results` in order. When the database refuses a statement for what
    /// it carries (a value it cannot store, say), nothing of the transaction committed, and
    /// the writes are flushed again in halves until the refused one is alone: only its
    /// command fails, never the other sessions it was batched with.
    async fn flush_isolating(
        &self,
        writes: &[SessionWrite],
        span: &tracing::Span,
        results: &mut Vec<Result<FlushOutcome, StorageError>>,
    ) {
        match self.flush_retrying(writes, span).await {
            Ok(outcomes) => results.extend(outcomes.into_iter().map(Ok)),
            Err(error) if writes.len() > 1 && self.store.is_refused(&error) => {
                debug!(parent: span, %error, sessions = writes.len(),
                    "a statement was refused; flushing the writes apart to find its session");
                let (first, second) = writes.split_at(writes.len() / 2);
                self.flush_apart(first, span, results).await;
                self.flush_apart(second, span, results).await;
            }
            Err(error) => {
                warn!(parent: span, %error, sessions = writes.len(), "flush failed");
                results.extend(writes.iter().map(|_| Err(error.clone())));
            }
        }
    }

    /// [`Self::flush_isolating`] of a part, boxed: only a refused flush recurses, so the
    /// common flush allocates nothing for it.
    fn flush_apart<'a>(
        &'a self,
        writes: &'a [SessionWrite],
        span: &'a tracing::Span,
        results: &'a mut Vec<Result<FlushOutcome, StorageError>>,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.flush_isolating(writes, span, results))
    }

    /// Flushes `writes` in one transaction, again after a transient failure, a few times.
    async fn flush_retrying(
        &self,
        writes: &[SessionWrite],
        span: &tracing::Span,
    ) -> Result<Vec<FlushOutcome>, StorageError> {
        let mut attempt = 0;
        loop {
            let result = self.store.flush(writes).instrument(span.clone()).await;
            match result {
                Err(error) if self.store.is_transient(&error) && attempt < TRANSIENT_RETRIES => {
                    attempt += 1;
                    self.stats.record_transient_retry();
                    debug!(parent: span, %error, attempt, "transient flush failure; retrying");
                    Backoff::WRITE.sleep(attempt).await;
                }
                other => return other,
            }
        }
    }
}
