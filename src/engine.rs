//! The engine facade: configuration, lifecycle, and the typed entry points of the
//! message-passing API.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use soloist_actors::{AskError, Registry, RegistryConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::cluster::{Directory, Forward, MAX_HOPS, Placement, Undelivered};
use crate::command::{
    AddUsage, AppendDeltas, AppendMessages, Appended, Command, CreateSession, Created,
    DeleteSession, DeltasAppended, FinishMessage, GetSession, ImportSession, Imported,
    ListSessions, MessageFinished, Reply, SessionCommand, SessionList, SessionPage, UpdateSession,
    check_user,
};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::faults::FeedPause;
use crate::handle::SessionHandle;
use crate::idempotency::CreateIds;
use crate::model::{Member, SessionId, SessionInfo, Usage};
use crate::session::protocol::{Mail, Read, Request, Responder, Subscribe, Subscribed};
use crate::session::{SessionActor, Shared};
use crate::stats::{EngineStats, Stats};
use crate::store::Store;
use crate::writer::Writer;

/// The session engine. Cheap to clone; every clone drives the same sessions.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    registry: Registry<SessionActor>,
    pub(crate) shared: Arc<Shared>,
    /// The writer tasks, waited for at shutdown.
    writers: TaskTracker,
    /// Tells the writer tasks to stop once their queue is empty.
    stop_writers: CancellationToken,
    /// Stops announcing and listening for other processes' commits (PostgreSQL), and handing
    /// sessions over.
    stop_feed: CancellationToken,
    /// Stops renewing this process's membership.
    stop_heartbeat: CancellationToken,
    /// Test hook: while `true`, the change listener drops its connection and waits.
    #[cfg(any(test, feature = "fault-injection"))]
    feed_pause: tokio::sync::watch::Sender<bool>,
    /// This process's id (the owner it writes into sessions, its member id).
    instance: Uuid,
    /// The members and the placement of sessions on them, when this process is a member.
    directory: Option<Arc<Directory>>,
    /// The secret peers authenticate forwarded commands with, when this process is a member.
    cluster_secret: Option<String>,
    /// Derives the ids of keyed creates, with the secret every process sharing the database
    /// reads from it.
    create_ids: CreateIds,
    /// How commands reach their session's owner, once the embedding server provides it.
    forwarder: OnceLock<Arc<dyn Forward>>,
    /// Whether a change listener runs.
    #[cfg(any(test, feature = "fault-injection"))]
    feed_listens: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field(
                "database_url",
                &redact(&self.inner.shared.config.database_url),
            )
            .finish_non_exhaustive()
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl Engine {
    /// Starts an engine on `database_url` with the default configuration.
    pub async fn connect(database_url: &str) -> Result<Engine> {
        Self::start(EngineConfig::new(database_url)).await
    }

    /// Connects to the database, runs the migrations and starts the writer stage.
    pub async fn start(config: EngineConfig) -> Result<Engine> {
        // This process's id: the owner it writes into the sessions it takes over, and the
        // sender of its change announcements.
        let instance = Uuid::new_v4();
        let store = Store::connect(&config, instance).await?;
        let stats = Arc::new(EngineStats::default());
        let writers = TaskTracker::new();
        let stop_writers = CancellationToken::new();
        let stop_feed = CancellationToken::new();
        let stop_heartbeat = stop_feed.child_token();
        let (feed_pause, feed_paused) = FeedPause::new();
        let feed = store.change_feed(instance);
        // Stopped with the writers: after the last commit, so that it is announced.
        let committed = feed.as_ref().map(|feed| {
            feed.announce(&writers, stop_writers.clone());
            feed.committed()
        });
        let writer = Writer::start(
            store.clone(),
            &config,
            stats.clone(),
            &writers,
            stop_writers.clone(),
            committed,
        );
        let feed_listens = feed.is_some() && config.listen_for_changes;
        let runtime = RegistryConfig {
            mailbox_capacity: config.mailbox_capacity.max(1),
            max_batch: config.mailbox_capacity.max(1),
            idle_timeout: Some(config.idle_timeout),
            send_timeout: config.send_timeout,
            max_live_actors: config.max_live_sessions,
        };
        let shared = Arc::new(Shared {
            store,
            writer,
            stats,
            // Until the feed listens for the first time, reads check the stored version.
            feed_down: AtomicBool::new(feed_listens),
            drafts: Arc::default(),
            config,
            #[cfg(any(test, feature = "fault-injection"))]
            faults: Default::default(),
        });
        // Set by the first process on the database, read by every other: they all derive the
        // same ids.
        let create_id_secret = crate::cluster::new_secret();
        let create_id_secret = shared
            .store
            .cluster_setting("create_id_secret", &create_id_secret)
            .await?;
        let create_ids = CreateIds::new(&create_id_secret);
        let registry = Registry::new(shared.clone(), runtime);
        let mut directory = None;
        let mut cluster_secret = None;
        if let Some(address) = &shared.config.advertise_url {
            let lease = shared.config.member_lease;
            let members = Arc::new(Directory::new(instance, lease));
            cluster_secret = Some(match &shared.config.cluster_secret {
                Some(secret) => secret.clone(),
                None => {
                    let initial = crate::cluster::new_secret();
                    shared.store.cluster_setting("secret", &initial).await?
                }
            });
            shared.store.join_member(instance, address).await?;
            crate::members::refresh(&shared.store, &members, lease).await?;
            writers.spawn(crate::members::heartbeat(
                shared.store.clone(),
                instance,
                address.clone(),
                lease,
                members.clone(),
                stop_heartbeat.clone(),
            ));
            writers.spawn(crate::members::hand_over(
                registry.clone(),
                members.clone(),
                lease,
                stop_feed.clone(),
            ));
            directory = Some(members);
        }
        writers.spawn(crate::idempotency::purge_expired(
            shared.store.clone(),
            shared.config.idempotency_retention,
            stop_feed.clone(),
        ));
        if let (Some(feed), true) = (&feed, feed_listens) {
            let live = Arc::new(registry.clone());
            feed.listen(&writers, live, feed_paused, stop_feed.clone());
        }
        #[cfg(not(any(test, feature = "fault-injection")))]
        let () = feed_pause;
        writers.close();
        info!(database = %redact(&shared.config.database_url), "soloist engine started");
        let engine = Engine {
            inner: Arc::new(Inner {
                registry,
                shared,
                writers,
                stop_writers,
                stop_feed,
                stop_heartbeat,
                instance,
                directory,
                cluster_secret,
                create_ids,
                forwarder: OnceLock::new(),
                #[cfg(any(test, feature = "fault-injection"))]
                feed_pause,
                #[cfg(any(test, feature = "fault-injection"))]
                feed_listens,
            }),
        };
        let inner = &engine.inner;
        // As often as drafts time out (within bounds).
        let look_for_orphans = inner
            .shared
            .config
            .draft_timeout
            .clamp(Duration::from_millis(100), Duration::from_secs(60));
        inner.writers.spawn(crate::drafts::adopt_orphans(
            inner.shared.store.clone(),
            inner.shared.drafts.clone(),
            inner.shared.config.draft_timeout,
            look_for_orphans,
            inner.stop_feed.clone(),
        ));
        inner.writers.spawn(crate::drafts::finish_abandoned(
            Arc::downgrade(inner),
            inner.shared.drafts.clone(),
            inner.shared.config.draft_timeout,
            inner.stop_feed.clone(),
        ));
        if let Some(interval) = inner.shared.config.purge_interval {
            inner.writers.spawn(crate::retention::purge_expired(
                Arc::downgrade(inner),
                interval,
                inner.shared.config.purge_batch,
                inner.stop_feed.clone(),
            ));
        }
        Ok(engine)
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.shared.config
    }

    /// A handle on one session, acting as `user_id`. Cheap; clone it freely.
    pub fn session(&self, user_id: impl Into<String>, session_id: SessionId) -> SessionHandle {
        SessionHandle {
            engine: self.clone(),
            user_id: user_id.into(),
            session_id,
        }
    }

    /// Runs any command; the typed methods below do the same with typed replies.
    pub async fn execute(&self, command: Command) -> Result<Reply> {
        command.execute(self, 0).await
    }

    /// Runs a command another process forwarded here, which has travelled `hops` times. It
    /// runs here unless this process places its session on a third one and the command may
    /// travel once more ([`MAX_HOPS`]). The sender's identity travels in the command and is
    /// checked here like any other; authenticating the sending process is the transport's
    /// business ([`Engine::cluster_secret`]).
    pub async fn execute_forwarded(&self, command: Command, hops: u8) -> Result<Reply> {
        command.execute(self, hops.max(1)).await
    }

    /// Routes the commands that must run at their session's owner through `forwarder` when
    /// the owner is another member. Set once; later calls are ignored. Without it, or when
    /// this process is not a member ([`EngineConfig::advertise_url`]), every command runs here.
    pub fn route_through(&self, forwarder: Arc<dyn Forward>) {
        let _ = self.inner.forwarder.set(forwarder);
    }

    /// The secret peers authenticate the commands they forward with: the configured
    /// [`EngineConfig::cluster_secret`], else the one stored in the database. `None` when this
    /// process is not a member.
    pub fn cluster_secret(&self) -> Option<&str> {
        self.inner.cluster_secret.as_deref()
    }

    /// Where `session_id`'s commands run, by this process's current view of the members.
    pub fn placement(&self, session_id: SessionId) -> Placement {
        match &self.inner.directory {
            Some(directory) => directory.place(session_id),
            None => Placement::Here,
        }
    }

    /// Reads the live members into this process's view now, instead of at the next heartbeat
    /// (three times per member lease). Does nothing when this process is not a member.
    pub async fn refresh_members(&self) -> Result<()> {
        let Some(directory) = &self.inner.directory else {
            return Ok(());
        };
        let shared = &self.inner.shared;
        let refresh = crate::members::refresh(&shared.store, directory, shared.config.member_lease);
        self.within_command_timeout(async { Ok(refresh.await?) })
            .await
    }

    /// The live members as this process last read them (refreshed three times per member
    /// lease); empty when this process is not a member.
    pub fn member_view(&self) -> Vec<Member> {
        match &self.inner.directory {
            Some(directory) => directory.members().to_vec(),
            None => Vec::new(),
        }
    }

    /// Creates a session (idempotent on its id).
    pub async fn create_session(&self, command: CreateSession) -> Result<Created> {
        self.run(command).await
    }

    /// Appends messages; answers with their sequences once they are committed.
    pub async fn append(&self, command: AppendMessages) -> Result<Appended> {
        self.run(command).await
    }

    /// Reads a session's metadata and a page of its messages.
    pub async fn get_session(&self, command: GetSession) -> Result<SessionPage> {
        self.run(command).await
    }

    /// Lists a user's sessions, newest first. Served by the database, which holds every
    /// acknowledged change.
    pub async fn list_sessions(&self, command: ListSessions) -> Result<SessionList> {
        let span = info_span!("list_sessions", user_id = %command.user_id);
        let shared = &self.inner.shared;
        let list = command.run(&shared.store, &shared.config.limits);
        self.within_command_timeout(list.instrument(span)).await
    }

    /// Changes a session's title and/or metadata.
    pub async fn update_session(&self, command: UpdateSession) -> Result<SessionInfo> {
        self.run(command).await
    }

    /// Adds token usage deltas; answers with the new totals.
    pub async fn add_usage(&self, command: AddUsage) -> Result<Usage> {
        self.run(command).await
    }

    /// Deletes a session and its messages.
    pub async fn delete_session(&self, command: DeleteSession) -> Result<()> {
        self.run(command).await
    }

    /// Appends text to a draft; answers with its length once the text is durable.
    pub async fn append_deltas(&self, command: AppendDeltas) -> Result<DeltasAppended> {
        self.run(command).await
    }

    /// Ends a draft; answers with the message as finished.
    pub async fn finish_message(&self, command: FinishMessage) -> Result<MessageFinished> {
        self.run(command).await
    }

    /// Creates a session with all its messages in one write (see [`ImportSession`]);
    /// idempotent by its ids.
    pub async fn import_session(&self, command: ImportSession) -> Result<Imported> {
        self.run(command).await
    }

    /// Runs a command at its session's owner: here, or forwarded to the member that owns the
    /// session.
    pub(crate) async fn run<C: SessionCommand>(&self, command: C) -> Result<C::Reply> {
        self.run_routed(command, 0).await
    }

    /// [`Self::run`] for a command that has travelled `hops` times.
    pub(crate) async fn run_routed<C: SessionCommand>(
        &self,
        mut command: C,
        hops: u8,
    ) -> Result<C::Reply> {
        let session_id = command.place(&self.inner.create_ids);
        let route = match (&self.inner.directory, self.inner.forwarder.get()) {
            (Some(directory), Some(forwarder)) if command.at_owner() => {
                Some((directory, forwarder, directory.place(session_id)))
            }
            _ => None,
        };
        let Some((directory, forwarder, placement)) = route else {
            return self.run_here(command).await;
        };
        let peer = match placement {
            Placement::Peer(peer) if hops < MAX_HOPS => peer,
            Placement::Peer(_) => {
                // Travelled enough: run here, taking the session over, and let it go at once so
                // that its owner's next write finds it unclaimed by a live actor here.
                let result = self.run_here(command).await;
                self.passivate(session_id);
                return result;
            }
            Placement::Here => return self.run_here(command).await,
        };
        let command = command.into();
        let forward = self.forward(
            directory,
            forwarder.as_ref(),
            peer,
            &command,
            session_id,
            hops,
        );
        let reply = match self.within_command_timeout(forward).await? {
            Some(reply) => reply,
            // No member could be reached: the session is this process's now.
            None => Box::pin(command.execute(self, MAX_HOPS)).await?,
        };
        C::Reply::try_from(reply).map_err(|_| {
            Error::OwnerUnreachable("the owner answered with another command's reply".into())
        })
    }

    /// Sends `command` to `peer` and returns its answer. A peer that cannot be reached is
    /// suspected and the session placed again; `None` when it lands here.
    async fn forward(
        &self,
        directory: &Directory,
        forwarder: &dyn Forward,
        mut peer: Member,
        command: &Command,
        session_id: SessionId,
        hops: u8,
    ) -> Result<Option<Reply>> {
        let deadline = self
            .config()
            .command_timeout
            .map(|limit| Instant::now() + limit);
        let stats = &self.inner.shared.stats;
        loop {
            let budget =
                deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
            let started = Instant::now();
            match forwarder.forward(&peer, command, hops + 1, budget).await {
                Ok(answer) => {
                    let lost = matches!(answer, Err(Error::OwnerUnreachable(_)));
                    stats.record_forward(started.elapsed(), !lost);
                    return answer.map(Some);
                }
                Err(Undelivered(reason)) => {
                    stats.record_forward(started.elapsed(), false);
                    if directory.suspect(peer.id) {
                        warn!(
                            peer = %peer.id,
                            address = %peer.address,
                            %reason,
                            "could not reach a member; placing its sessions elsewhere for one \
                             member lease"
                        );
                    }
                    match directory.place(session_id) {
                        Placement::Peer(next) => peer = next,
                        Placement::Here => return Ok(None),
                    }
                }
            }
        }
    }

    /// Refuses a new session of a user who has [`EngineConfig::max_sessions_per_user`]
    /// already (the session existing, the command is a repeat or is refused as usual).
    async fn check_session_quota(&self, user_id: &str, session_id: SessionId) -> Result<()> {
        let Some(limit) = self.config().max_sessions_per_user else {
            return Ok(());
        };
        let store = &self.inner.shared.store;
        self.within_command_timeout(async {
            if store.count_user_sessions(user_id, limit).await? < limit
                || store.version(session_id).await?.is_some()
            {
                return Ok(());
            }
            Err(Error::QuotaExceeded { limit })
        })
        .await
    }

    /// Runs a command here, through its session's actor: validated here, whole, before it is
    /// sent.
    async fn run_here<C: SessionCommand>(&self, mut command: C) -> Result<C::Reply> {
        self.measured(C::NAME, async {
            // The key is fingerprinted as sent, before validation fills anything in.
            let keyed = command.keyed()?;
            command.settle_id(&self.inner.create_ids)?;
            command.validate(&self.config().limits)?;
            let session_id = command.session_id();
            if command.may_create() {
                self.check_session_quota(command.user_id(), session_id)
                    .await?;
            }
            self.ask(session_id, C::NAME, |respond| {
                Box::new(command.into_request(keyed, respond))
            })
            .await
        })
        .await
    }

    /// Runs `command` (named `name`), counting its answer and timing it.
    async fn measured<T>(
        &self,
        name: &'static str,
        command: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = command.await;
        let error = result.as_ref().err().map(Error::code);
        self.inner
            .shared
            .stats
            .record_command(name, started.elapsed(), error);
        result
    }

    /// One subscription step, through the session's actor.
    pub(crate) async fn subscribe_raw(
        &self,
        user_id: &str,
        session_id: SessionId,
        after_seq: i64,
        draft: Option<(i64, u64)>,
    ) -> Result<Subscribed> {
        check_user(user_id, &self.config().limits)?;
        let subscribe = Subscribe {
            user_id: user_id.to_owned(),
            after_seq,
            draft,
        };
        let subscribed = self.ask(session_id, "subscribe", |respond| {
            Box::new(Request::Read(Read::Subscribe(subscribe, respond)))
        });
        self.measured("subscribe", subscribed).await
    }

    /// Asks a session's actor to passivate (finish what is queued, then free its memory); the
    /// next command reloads it from the database. Does not wait. Useful before a planned
    /// hand-over and for measuring cold loads.
    pub fn passivate(&self, session_id: SessionId) {
        self.inner.registry.passivate(&session_id);
    }

    /// Fault injection for tests of supervision: the session's next batch panics after
    /// `pause`, as a bug in the actor would. The commands of that batch get
    /// [`Error::ActorFailed`]; the actor is restarted (reloading the session from the database)
    /// and handles the commands queued behind. Never call this in production.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_panic(&self, session_id: SessionId, pause: std::time::Duration) {
        self.inner.shared.faults.arm_panic(session_id, pause);
    }

    /// Fault injection for tests of fencing: holds back every write this engine has not yet
    /// sent to the database until the returned guard is dropped, as if the process were paused
    /// (a stop-the-world pause, a stalled network) between staging a batch and writing it.
    /// Never call this in production.
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn pause_writes(&self) -> WritesPaused {
        WritesPaused {
            _guard: self.inner.shared.writer.pause().await,
        }
    }

    /// Fault injection for tests of freshness: disconnects the change listener (PostgreSQL
    /// LISTEN) until the returned guard is dropped, as a lost connection would, and returns once
    /// it is down. Meanwhile other processes' notices are missed and every read checks the
    /// stored version; on reconnection the live sessions that missed a write catch up. Never
    /// call this in production.
    #[cfg(any(test, feature = "fault-injection"))]
    pub async fn pause_change_feed(&self) -> ChangeFeedPaused {
        self.inner.feed_pause.send_replace(true);
        // Without a listener (SQLite, or `listen_for_changes` off) there is nothing to wait for.
        let down = || {
            self.inner
                .shared
                .feed_down
                .load(std::sync::atomic::Ordering::Acquire)
        };
        while self.inner.feed_listens && !down() && !self.inner.stop_feed.is_cancelled() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        ChangeFeedPaused {
            pause: self.inner.feed_pause.clone(),
        }
    }

    /// This process's id: the owner it writes into the sessions it takes over, and its member
    /// id when it registers ([`EngineConfig::advertise_url`]).
    pub fn instance_id(&self) -> Uuid {
        self.inner.instance
    }

    /// The processes registered on this database whose heartbeat is younger than
    /// [`EngineConfig::member_lease`], by id (this one included if it registered).
    pub async fn members(&self) -> Result<Vec<Member>> {
        let lease = i64::try_from(self.config().member_lease.as_micros()).unwrap_or(i64::MAX);
        let members = self.inner.shared.store.live_members(lease);
        self.within_command_timeout(async { Ok(members.await?) })
            .await
    }

    /// Leaves the cluster ahead of a shutdown: stops renewing this process's membership,
    /// removes it from the database, and from now on sends every command that must run at an
    /// owner to the other members, handing over the sessions this process owned (each finishes
    /// the batch in hand). Returns whether other members were in the view: they keep sending
    /// commands here until they read the members again (within a third of the member lease),
    /// so a server should keep serving that long before it closes its listener. Idempotent;
    /// [`Engine::shutdown`] calls it.
    pub async fn leave_cluster(&self) -> bool {
        let Some(directory) = &self.inner.directory else {
            return false;
        };
        if self.inner.stop_heartbeat.is_cancelled() {
            return false;
        }
        self.inner.stop_heartbeat.cancel();
        directory.leave();
        let shared = &self.inner.shared;
        // Bounded: a database that cannot be reached must not hold the shutdown up.
        let leave = shared.store.leave_member(self.inner.instance);
        match tokio::time::timeout(shared.config.database_timeout, leave).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "could not remove this process's membership"),
            Err(_) => warn!("removing this process's membership timed out"),
        }
        info!("left the cluster");
        directory
            .members()
            .iter()
            .any(|member| member.id != self.inner.instance)
    }

    /// Whether the session currently has a live actor in this engine.
    pub fn is_live(&self, session_id: SessionId) -> bool {
        self.inner.registry.is_live(&session_id)
    }

    /// A snapshot of the engine's counters.
    pub fn stats(&self) -> Stats {
        let members = self
            .inner
            .directory
            .as_ref()
            .map_or(0, |directory| directory.members().len() as u64);
        self.inner
            .shared
            .stats
            .snapshot(self.inner.registry.stats(), members)
    }

    /// Stops taking commands, lets every session finish what is queued, waits for the final
    /// writes, and closes the database. Commands sent afterwards get
    /// [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        // Leave first, so that peers stop counting on this process while it drains.
        self.leave_cluster().await;
        self.inner.stop_feed.cancel();
        self.inner.registry.shutdown().await;
        self.inner.stop_writers.cancel();
        self.inner.writers.wait().await;
        self.inner.shared.store.close().await;
        info!("soloist engine stopped");
    }

    async fn ask<T: Send + 'static>(
        &self,
        session_id: SessionId,
        command: &'static str,
        make: impl FnOnce(Responder<T>) -> Mail,
    ) -> Result<T> {
        let span = info_span!("command", command, session_id = %session_id);
        let ask = self
            .inner
            .registry
            .ask(session_id, |sender| make(Responder::new(sender)))
            .instrument(span);
        // On timeout the reply channel is dropped: the actor's later answer goes nowhere, and
        // the command may still be applied (the caller retries with the same ids).
        self.within_command_timeout(async {
            match ask.await {
                Ok(result) => result,
                Err(AskError::Overloaded) => Err(Error::Overloaded(
                    self.config().send_timeout.unwrap_or_default(),
                )),
                Err(AskError::ShuttingDown) => Err(Error::ShuttingDown),
                Err(AskError::ActorFailed) => Err(Error::ActorFailed),
            }
        })
        .await
    }

    /// Bounds `work` by [`EngineConfig::command_timeout`].
    async fn within_command_timeout<T>(
        &self,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.config().command_timeout {
            Some(limit) => tokio::time::timeout(limit, work)
                .await
                .unwrap_or(Err(Error::Timeout(limit))),
            None => work.await,
        }
    }
}

/// Returned by [`Engine::pause_writes`]: the engine's writes resume when it is dropped.
#[cfg(any(test, feature = "fault-injection"))]
#[must_use = "writes resume as soon as this is dropped"]
pub struct WritesPaused {
    _guard: tokio::sync::OwnedRwLockWriteGuard<()>,
}

/// Returned by [`Engine::pause_change_feed`]: the change listener reconnects when it is dropped.
#[cfg(any(test, feature = "fault-injection"))]
#[must_use = "the change feed resumes as soon as this is dropped"]
pub struct ChangeFeedPaused {
    pause: tokio::sync::watch::Sender<bool>,
}

#[cfg(any(test, feature = "fault-injection"))]
impl Drop for ChangeFeedPaused {
    fn drop(&mut self) {
        self.pause.send_replace(false);
    }
}
