-- Ownership: the process that writes a session holds it under an epoch. A process takes a
-- session over by bumping `epoch` in its first write; every later write of that process checks,
-- in the same statement, that the epoch is still the one it took, so a process that was taken
-- over from (paused, partitioned, or simply slower) can never write again with its old copy.
-- `lease_until` (microseconds, the database's clock) is renewed by each of the owner's writes:
-- a claim made while it had not yet passed took the session from a process that was writing it.
ALTER TABLE sessions ADD COLUMN owner UUID;
ALTER TABLE sessions ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN lease_until BIGINT;
