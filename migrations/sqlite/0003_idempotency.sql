-- Idempotency records: a command sent with an idempotency key stores, in the transaction that
-- applies it, the key, a fingerprint of the command and its answer; a retry with the key finds
-- the record and replays the answer instead of applying the command again. The primary key is
-- what catches two processes racing with one key. `created_at` (microseconds) ages records out.
CREATE TABLE idempotency_keys (
    session_id  BLOB    NOT NULL,
    key         TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    fingerprint BLOB    NOT NULL,
    response    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (session_id, key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
