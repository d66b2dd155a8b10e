-- The engine itself only inserts messages for a session row it has locked in the same
-- statement, and deletes are tombstones that keep the row, so the foreign key checked nothing
-- the engine does not already guarantee. It cost a trigger query per inserted row, and that
-- query's cached plan could degrade into a scan of `sessions` as the table grows.
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_session_id_fkey;
