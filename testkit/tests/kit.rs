//! The kit itself: each backend's fresh database works and starts empty, and what the kit
//! provisions is gone afterwards (schemas, directories), so that the tests built on it leave
//! nothing behind.

use soloist::NewMessage;
use soloist::SessionId;
use soloist_testkit::{
    Backend, Error, PgSchema, TempDir, TestDb, assert_contiguous, on_every_backend,
    postgres_answers, postgres_available, postgres_base_url, search_path_url, stored_rows,
};
use sqlx::{Connection, PgConnection};

/// Whether a schema of that name exists, asked on the base database.
async fn schema_exists(name: &str) -> bool {
    let mut connection = PgConnection::connect(&postgres_base_url())
        .await
        .expect("connect");
    let found: Option<(String,)> =
        sqlx::query_as("SELECT nspname::text FROM pg_namespace WHERE nspname = $1")
            .bind(name)
            .fetch_optional(&mut connection)
            .await
            .expect("pg_namespace");
    found.is_some()
}

/// An engine starts on the fresh database, which holds nothing yet; what it stores is read back
/// straight from the tables (where another connection can open them).
async fn a_fresh_database_is_empty_and_usable(db: TestDb) {
    let engine = db.engine().await.expect("engine");
    let session = engine.session("kit", SessionId::new());
    session.create(None, None).await.expect("create");
    if db.shareable() {
        assert!(
            stored_rows(&db.url, session.id())
                .await
                .expect("rows")
                .is_empty()
        );
    }
    let messages = (0..3).map(|n| NewMessage::user(format!("m{n}"))).collect();
    assert_eq!(session.append(messages).await.expect("append"), [0, 1, 2]);
    if db.shareable() {
        let rows = stored_rows(&db.url, session.id()).await.expect("rows");
        assert_contiguous(&rows);
        assert_eq!(rows.len(), 3);
    }
    engine.shutdown().await;
    assert_eq!(db.schema().is_some(), db.backend == Backend::Postgres);
    assert_eq!(db.dir().is_some(), db.backend == Backend::SqliteFile);
}

on_every_backend!(a_fresh_database_is_empty_and_usable);

#[tokio::test]
async fn a_test_database_is_removed_when_dropped() {
    let file = TestDb::sqlite_file().expect("database");
    let dir = file.dir().expect("a directory").to_owned();
    assert!(dir.is_dir());
    drop(file);
    assert!(!dir.exists(), "{} is left behind", dir.display());

    let Some(db) = TestDb::new(Backend::Postgres).await.expect("database") else {
        return;
    };
    let schema = db.schema().expect("a schema").to_owned();
    assert!(schema_exists(&schema).await);
    drop(db);
    assert!(
        !schema_exists(&schema).await,
        "schema {schema} is left behind"
    );
}

#[tokio::test]
async fn a_schema_removed_by_hand_is_gone_and_odd_prefixes_are_refused() {
    if !postgres_available().await.expect("PostgreSQL") {
        eprintln!(
            "SKIPPED: PostgreSQL is not answering at {}",
            postgres_base_url()
        );
        return;
    }
    let base = postgres_base_url();
    let schema = PgSchema::create(&base, "kit_test").await.expect("schema");
    let name = schema.name().to_owned();
    assert!(name.starts_with("kit_test_"), "{name}");
    assert_eq!(schema.url(), search_path_url(&base, &name));
    assert!(schema_exists(&name).await);
    schema.remove().await.expect("remove");
    assert!(!schema_exists(&name).await);
    for prefix in ["", "Kit", "kit-test", "1kit", "kit;drop"] {
        let refused = PgSchema::create(&base, prefix).await;
        assert!(
            matches!(refused, Err(Error::SchemaPrefix(_))),
            "{prefix:?}: {refused:?}"
        );
    }
}

#[test]
fn a_temp_dir_is_removed_with_its_files() {
    let dropped = TempDir::new("soloist-kit").expect("temp dir");
    let path = dropped.path().to_owned();
    std::fs::write(path.join("file"), b"x").expect("write");
    drop(dropped);
    assert!(!path.exists());

    let removed = TempDir::new("soloist-kit").expect("temp dir");
    let path = removed.path().to_owned();
    std::fs::write(path.join("file"), b"x").expect("write");
    removed.remove().expect("remove");
    assert!(!path.exists());
}

#[test]
fn the_search_path_joins_the_url_query() {
    assert_eq!(
        search_path_url("postgres://h/db", "s"),
        "postgres://h/db?options=-c%20search_path%3Ds"
    );
    assert_eq!(
        search_path_url("postgres://h/db?sslmode=disable", "s"),
        "postgres://h/db?sslmode=disable&options=-c%20search_path%3Ds"
    );
}

#[tokio::test]
async fn a_closed_port_does_not_answer() {
    assert!(!postgres_answers("postgres://postgres@127.0.0.1:1/test").await);
}
