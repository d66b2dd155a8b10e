-- Sessions: one row per conversation. `version` is bumped by every committed write so that any
-- process can tell whether its copy is current; counters only move by deltas.
CREATE TABLE sessions (
    id                BLOB    NOT NULL PRIMARY KEY,
    user_id           TEXT    NOT NULL,
    title             TEXT,
    metadata          TEXT    NOT NULL DEFAULT '{}',
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    message_count     INTEGER NOT NULL DEFAULT 0,
    version           INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    deleted_at        INTEGER
);

CREATE INDEX sessions_by_user ON sessions (user_id, created_at DESC, id DESC)
    WHERE deleted_at IS NULL;

-- Messages: the two unique constraints are what guard ordering and idempotency across
-- processes; the engine resolves a violation by reloading, never by surfacing it.
CREATE TABLE messages (
    session_id    BLOB    NOT NULL REFERENCES sessions (id),
    seq           INTEGER NOT NULL,
    message_id    BLOB    NOT NULL,
    role          TEXT    NOT NULL,
    content       BLOB,
    name          TEXT,
    tool_calls    TEXT,
    tool_call_id  TEXT,
    function_call TEXT,
    refusal       TEXT,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq),
    UNIQUE (session_id, message_id)
);
