-- Retention and erasure. `ttl_seconds`: a session expires that long after its last write
-- (NULL: never); `expires_at` (microseconds) is kept by every write, so that the purge finds
-- what is due by index. `erased_at`: when the session's content (title, metadata, usage,
-- idempotency records; messages go with any delete) was erased; the row stays as a tombstone
-- holding its id, owner and times, so the id is never reused.
ALTER TABLE sessions ADD COLUMN ttl_seconds BIGINT;
ALTER TABLE sessions ADD COLUMN expires_at BIGINT;
ALTER TABLE sessions ADD COLUMN erased_at BIGINT;
CREATE INDEX sessions_expiry ON sessions (expires_at, id) WHERE expires_at IS NOT NULL;
CREATE INDEX sessions_unerased_by_user ON sessions (user_id, id) WHERE erased_at IS NULL;
