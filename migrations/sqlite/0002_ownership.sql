-- Ownership, as in the PostgreSQL schema: a writer takes a session over by bumping `epoch` in its
-- first write, and each later write checks it in the same transaction. `lease_until`
-- (microseconds) is renewed by each of the owner's writes.
ALTER TABLE sessions ADD COLUMN owner BLOB;
ALTER TABLE sessions ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN lease_until INTEGER;
