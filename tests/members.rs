//! Membership: engines that share a database find each other through it, renew their heartbeat
//! while they run, leave when they shut down, and drop out once their heartbeat lapses.

use std::collections::BTreeMap;
use std::time::Duration;

use soloist::uuid::Uuid;
use soloist::{Engine, EngineConfig};
use soloist_testkit::{TestDb, on_shared_backends};
use sqlx::Connection;

async fn engine(db: &TestDb, advertise: Option<&str>, lease: Duration) -> Engine {
    db.engine_with(EngineConfig {
        advertise_url: advertise.map(str::to_owned),
        member_lease: lease,
        ..db.config()
    })
    .await
    .expect("engine")
}

/// The live members as `id → address`.
async fn members(engine: &Engine) -> BTreeMap<Uuid, String> {
    let members = engine.members().await.expect("members");
    members
        .into_iter()
        .map(|member| (member.id, member.address))
        .collect()
}

/// Registers a member straight in the database whose heartbeat is `age` old (on the clock the
/// backend measures leases with), as a process that stopped renewing would leave it.
async fn plant_member(db: &TestDb, id: Uuid, age: Duration) {
    let age = i64::try_from(age.as_micros()).expect("age");
    if db.url.starts_with("postgres") {
        let mut connection = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::query(
            "INSERT INTO members (id, address, started_at, heartbeat_at) \
             SELECT $1, 'http://gone', t - $2, t - $2 \
             FROM (SELECT (extract(epoch FROM now()) * 1000000)::int8 AS t) now",
        )
        .bind(id)
        .bind(age)
        .execute(&mut connection)
        .await
        .expect("plant");
    } else {
        let mut connection = sqlx::SqliteConnection::connect(&db.url)
            .await
            .expect("connect");
        let now = chrono::Utc::now().timestamp_micros();
        sqlx::query(
            "INSERT INTO members (id, address, started_at, heartbeat_at) \
             VALUES (?, 'http://gone', ?, ?)",
        )
        .bind(id)
        .bind(now - age)
        .bind(now - age)
        .execute(&mut connection)
        .await
        .expect("plant");
    }
}

async fn members_find_each_other_and_leave_when_they_stop(db: TestDb) {
    let lease = Duration::from_secs(3);
    let a = engine(&db, Some("http://10.0.0.1:8080"), lease).await;
    let b = engine(&db, Some("http://10.0.0.2:8080"), lease).await;
    // An engine without an address is not a member, but sees the others.
    let plain = engine(&db, None, lease).await;
    let expected = BTreeMap::from([
        (a.instance_id(), "http://10.0.0.1:8080".to_owned()),
        (b.instance_id(), "http://10.0.0.2:8080".to_owned()),
    ]);
    assert_eq!(members(&plain).await, expected);
    assert_eq!(members(&a).await, expected);
    b.shutdown().await;
    let after = members(&a).await;
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        vec![a.instance_id()],
        "a stopped engine leaves"
    );
    a.shutdown().await;
    assert!(members(&plain).await.is_empty());
    plain.shutdown().await;
}

async fn heartbeats_keep_members_listed_and_a_silent_one_drops_out(db: TestDb) {
    let lease = Duration::from_secs(1);
    let a = engine(&db, Some("http://a"), lease).await;
    let first = a.members().await.expect("members");
    // A process that stopped renewing a moment ago is still listed; one silent for longer than
    // the lease is not.
    let (recent, gone) = (Uuid::new_v4(), Uuid::new_v4());
    plant_member(&db, recent, Duration::ZERO).await;
    plant_member(&db, gone, lease * 2).await;
    let listed = members(&a).await;
    assert!(listed.contains_key(&a.instance_id()));
    assert!(listed.contains_key(&recent));
    assert!(
        !listed.contains_key(&gone),
        "a lapsed heartbeat is not a member"
    );
    // Three leases later this engine is still listed (it renewed) and the planted one, which
    // never renews, has lapsed.
    tokio::time::sleep(lease * 3).await;
    let later = a.members().await.expect("members");
    let ids: Vec<Uuid> = later.iter().map(|member| member.id).collect();
    assert_eq!(ids, vec![a.instance_id()]);
    assert!(
        later[0].heartbeat_at > first[0].heartbeat_at,
        "the heartbeat was renewed"
    );
    assert_eq!(later[0].started_at, first[0].started_at);
    a.shutdown().await;
}

on_shared_backends!(
    members_find_each_other_and_leave_when_they_stop,
    heartbeats_keep_members_listed_and_a_silent_one_drops_out,
);
