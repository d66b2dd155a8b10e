-- Sessions: one row per conversation. `version` is bumped by every committed write so that any
-- process can tell whether its copy is current; counters only move by deltas.
-- Times are microseconds since the Unix epoch, as in the SQLite schema.
CREATE TABLE sessions (
    id                UUID   NOT NULL PRIMARY KEY,
    user_id           TEXT   NOT NULL,
    title             TEXT,
    metadata          TEXT   NOT NULL DEFAULT '{}',
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    message_count     BIGINT NOT NULL DEFAULT 0,
    version           BIGINT NOT NULL DEFAULT 0,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    deleted_at        BIGINT
);

CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;

-- Messages: the two unique constraints are what guard ordering and idempotency across
-- processes; the engine resolves a violation by reloading, never by surfacing it.
-- Content is BYTEA so that any UTF-8 text, NUL included, round-trips byte for byte; JSON fields
-- are stored as the exact text the engine serialized.
CREATE TABLE messages (
    session_id    UUID   NOT NULL REFERENCES sessions (id),
    seq           BIGINT NOT NULL,
    message_id    UUID   NOT NULL,
    role          TEXT   NOT NULL,
    content       BYTEA,
    name          TEXT,
    tool_calls    TEXT,
    tool_call_id  TEXT,
    function_call TEXT,
    refusal       TEXT,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, message_id)
);
