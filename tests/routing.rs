//! Routing between processes: engines that share a database run each session's commands at
//! its owner (rendezvous placement over the live members), whichever engine receives them.
//! The transport here is in-process (each engine's forwarder calls the owner engine's
//! `execute_forwarded`), so that hops, unreachable peers and stale views can be arranged
//! exactly; the databases are real. The HTTP/2 transport is tested in the server's tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use soloist::cluster::{Forward, Placement, Undelivered};
use soloist::uuid::Uuid;
use soloist::{
    AppendMessages, Command, CreateSession, Engine, EngineConfig, Error, Member, NewMessage, Reply,
    SessionId,
};
use soloist_testkit::{TestDb, assert_contiguous, on_shared_backends, stored_owner, stored_rows};

/// An in-process transport between engines, which logs every forward's hop count and can
/// make a member unreachable.
#[derive(Default)]
struct Direct {
    engines: Mutex<HashMap<Uuid, Engine>>,
    down: Mutex<HashSet<Uuid>>,
    /// `(to, hops)` of every forward, delivered or not.
    log: Mutex<Vec<(Uuid, u8)>>,
}

impl Forward for Direct {
    fn forward<'a>(
        &'a self,
        peer: &'a Member,
        command: &'a Command,
        hops: u8,
        _budget: Option<Duration>,
    ) -> BoxFuture<'a, Result<Result<Reply, Error>, Undelivered>> {
        Box::pin(async move {
            self.log.lock().expect("log").push((peer.id, hops));
            if self.down.lock().expect("down").contains(&peer.id) {
                return Err(Undelivered("connection refused".into()));
            }
            let engine = self.engines.lock().expect("engines").get(&peer.id).cloned();
            let Some(engine) = engine else {
                return Err(Undelivered("no such peer".into()));
            };
            Ok(engine.execute_forwarded(command.clone(), hops).await)
        })
    }
}

impl Direct {
    fn hops(&self) -> Vec<(Uuid, u8)> {
        self.log.lock().expect("log").clone()
    }
}

/// `count` member engines on `db`, routing through one [`Direct`] transport.
async fn cluster(db: &TestDb, count: usize, lease: Duration) -> (Vec<Engine>, Arc<Direct>) {
    let direct = Arc::new(Direct::default());
    let mut engines = Vec::new();
    for index in 0..count {
        let engine = db
            .engine_with(EngineConfig {
                advertise_url: Some(format!("http://member-{index}")),
                member_lease: lease,
                ..db.config()
            })
            .await
            .expect("engine");
        engine.route_through(direct.clone());
        direct
            .engines
            .lock()
            .expect("engines")
            .insert(engine.instance_id(), engine.clone());
        engines.push(engine);
    }
    // Each reads the members at start: the earlier ones would see the later ones at their
    // next beat.
    for engine in &engines {
        engine.refresh_members().await.expect("members");
        assert_eq!(engine.member_view().len(), count);
    }
    (engines, direct)
}

/// Waits until `engine` sees `count` members.
async fn wait_for_view(engine: &Engine, count: usize) {
    for _ in 0..500 {
        if engine.member_view().len() == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the engine never saw {count} members");
}

/// The member a session is placed on, by `engine`'s view.
fn owner_by(engine: &Engine, session: SessionId) -> Uuid {
    match engine.placement(session) {
        Placement::Here => engine.instance_id(),
        Placement::Peer(peer) => peer.id,
    }
}

/// A session that `engine` places on `owner`.
fn session_placed_on(engine: &Engine, owner: Uuid) -> SessionId {
    loop {
        let session = SessionId::new();
        if owner_by(engine, session) == owner {
            return session;
        }
    }
}

async fn append(engine: &Engine, session: SessionId, text: &str) -> soloist::Result<Vec<i64>> {
    engine
        .append(AppendMessages {
            user_id: "alice".into(),
            session_id: session,
            messages: vec![NewMessage::user(text)],
            if_version: None,
            on_busy: Default::default(),
        })
        .await
        .map(|appended| appended.sequences)
}

async fn create(engine: &Engine, session: SessionId) {
    engine
        .create_session(CreateSession {
            user_id: "alice".into(),
            session_id: Some(session),
            ..CreateSession::default()
        })
        .await
        .expect("create");
}

async fn shutdown(engines: &[Engine]) {
    for engine in engines {
        engine.shutdown().await;
    }
}

/// Commands sent to every member in turn run at each session's owner: every session's row
/// names the member rendezvous hashing places it on, no write took a session over, and each
/// session's sequences are contiguous.
async fn commands_run_at_the_owner_wherever_they_arrive(db: TestDb) {
    let (engines, direct) = cluster(&db, 3, Duration::from_secs(3)).await;
    let sessions: Vec<SessionId> = (0..24).map(|_| SessionId::new()).collect();
    for (index, &session) in sessions.iter().enumerate() {
        create(&engines[index % 3], session).await;
    }
    for turn in 0..5 {
        for (index, &session) in sessions.iter().enumerate() {
            let sequences = append(&engines[(index + turn) % 3], session, "hi")
                .await
                .expect("append");
            assert_eq!(sequences, vec![turn as i64]);
        }
    }
    let mut owners = HashSet::new();
    for &session in &sessions {
        let owner = stored_owner(&db.url, session).await.expect("owner");
        let placed = owner_by(&engines[0], session);
        assert_eq!(owner, Some(placed), "session {session}");
        owners.insert(placed);
        assert_contiguous(&stored_rows(&db.url, session).await.expect("rows"));
    }
    assert_eq!(owners.len(), 3, "24 sessions spread over the 3 members");
    let stats: Vec<_> = engines.iter().map(Engine::stats).collect();
    let total = |field: fn(&soloist::Stats) -> u64| stats.iter().map(field).sum::<u64>();
    assert_eq!(total(|s| s.takeovers), 0, "{stats:?}");
    assert_eq!(total(|s| s.fenced), 0, "{stats:?}");
    assert_eq!(total(|s| s.conflicts), 0, "{stats:?}");
    assert_eq!(total(|s| s.forward_errors), 0, "{stats:?}");
    // Two thirds of the commands arrive away from their owner.
    let forwarded = total(|s| s.forwarded);
    assert_eq!(forwarded as usize, direct.hops().len());
    assert!(forwarded >= 24 * 6 / 3, "forwarded {forwarded}");
    assert!(direct.hops().iter().all(|&(_, hops)| hops == 1));
    shutdown(&engines).await;
}

/// Two views that each place a session on the other (one member has left, the other has not
/// noticed yet) bounce a command at most [`soloist::cluster::MAX_HOPS`] times: the second
/// receiver runs it.
async fn a_loop_between_two_views_stops_at_the_hop_limit(db: TestDb) {
    // A long lease: the first member does not notice the other leaving during the test.
    let (engines, direct) = cluster(&db, 2, Duration::from_secs(60)).await;
    let (a, b) = (&engines[0], &engines[1]);
    let session = session_placed_on(a, b.instance_id());
    create(a, session).await;
    assert!(b.leave_cluster().await, "b had a peer");
    assert_eq!(owner_by(b, session), a.instance_id());
    assert_eq!(owner_by(a, session), b.instance_id());
    let before = direct.hops().len();
    let sequences = append(a, session, "bounced").await.expect("append");
    assert_eq!(sequences, vec![0]);
    let hops = direct.hops()[before..].to_vec();
    assert_eq!(
        hops,
        vec![(b.instance_id(), 1), (a.instance_id(), 2)],
        "a → b → a, which runs it"
    );
    assert_eq!(
        stored_owner(&db.url, session).await.expect("owner"),
        Some(a.instance_id())
    );
    assert_contiguous(&stored_rows(&db.url, session).await.expect("rows"));
    shutdown(&engines).await;
}

/// The owner moved while another process still held the session (its view out of date): the
/// new owner takes the session over through the epoch, the old one is fenced on its next write
/// and reloads, and every append lands once, in order.
async fn a_moved_owner_fences_the_old_one_and_appends_land_once_in_order(db: TestDb) {
    let (engines, _direct) = cluster(&db, 2, Duration::from_secs(3)).await;
    let (a, b) = (&engines[0], &engines[1]);
    let session = session_placed_on(a, b.instance_id());
    // A process outside the cluster's routing (an older deployment, or one whose view was
    // stale) owns the session first.
    let stale = db.engine().await.expect("engine");
    create(&stale, session).await;
    let mut acked = Vec::new();
    for round in 0..3 {
        for text in ["stale 1", "stale 2"] {
            acked.extend(append(&stale, session, text).await.expect("stale append"));
        }
        assert_eq!(
            stored_owner(&db.url, session).await.expect("owner"),
            Some(stale.instance_id()),
            "round {round}"
        );
        for text in ["routed 1", "routed 2"] {
            acked.extend(append(a, session, text).await.expect("routed append"));
        }
        assert_eq!(
            stored_owner(&db.url, session).await.expect("owner"),
            Some(b.instance_id()),
            "round {round}"
        );
    }
    assert_eq!(acked, (0..12).collect::<Vec<i64>>());
    let rows = stored_rows(&db.url, session).await.expect("rows");
    assert_eq!(rows.len(), 12);
    assert_contiguous(&rows);
    assert!(b.stats().takeovers >= 3, "{:?}", b.stats());
    stale.shutdown().await;
    shutdown(&engines).await;
}

/// A member that cannot be reached is suspected: its sessions are placed on the others at
/// once (the command runs there, taking the session over), and it is not tried again until
/// its suspicion ends.
async fn an_unreachable_owner_is_suspected_and_its_sessions_placed_elsewhere(db: TestDb) {
    let (engines, direct) = cluster(&db, 2, Duration::from_secs(3)).await;
    let (a, b) = (&engines[0], &engines[1]);
    let session = session_placed_on(a, b.instance_id());
    create(a, session).await;
    assert_eq!(append(a, session, "one").await.expect("append"), vec![0]);
    direct.down.lock().expect("down").insert(b.instance_id());
    let before = direct.hops().len();
    assert_eq!(append(a, session, "two").await.expect("append"), vec![1]);
    assert_eq!(append(a, session, "three").await.expect("append"), vec![2]);
    assert_eq!(
        direct.hops()[before..].to_vec(),
        vec![(b.instance_id(), 1)],
        "tried once, then suspected"
    );
    assert_eq!(owner_by(a, session), a.instance_id());
    assert_eq!(
        stored_owner(&db.url, session).await.expect("owner"),
        Some(a.instance_id())
    );
    assert_eq!(a.stats().forward_errors, 1);
    assert_contiguous(&stored_rows(&db.url, session).await.expect("rows"));
    shutdown(&engines).await;
}

/// A member that leaves hands its sessions over: its live actors for them passivate, and the
/// others place the sessions on themselves once they read the members again.
async fn a_member_that_leaves_hands_its_sessions_over(db: TestDb) {
    let (engines, direct) = cluster(&db, 2, Duration::from_millis(600)).await;
    let (a, b) = (&engines[0], &engines[1]);
    let session = session_placed_on(a, b.instance_id());
    create(a, session).await;
    assert_eq!(append(a, session, "one").await.expect("append"), vec![0]);
    assert!(b.is_live(session));
    assert!(b.leave_cluster().await);
    for _ in 0..200 {
        if !b.is_live(session) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!b.is_live(session), "the leaving member let the session go");
    wait_for_view(a, 1).await;
    let before = direct.hops().len();
    assert_eq!(append(a, session, "two").await.expect("append"), vec![1]);
    assert_eq!(direct.hops().len(), before, "no forward once a saw b leave");
    assert_eq!(
        stored_owner(&db.url, session).await.expect("owner"),
        Some(a.instance_id())
    );
    assert_contiguous(&stored_rows(&db.url, session).await.expect("rows"));
    shutdown(&engines).await;
}

on_shared_backends!(
    commands_run_at_the_owner_wherever_they_arrive,
    a_loop_between_two_views_stops_at_the_hop_limit,
    a_moved_owner_fences_the_old_one_and_appends_land_once_in_order,
    an_unreachable_owner_is_suspected_and_its_sessions_placed_elsewhere,
    a_member_that_leaves_hands_its_sessions_over,
);
