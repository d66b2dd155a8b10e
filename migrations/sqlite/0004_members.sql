-- Members: the processes that share this database, each registered at start under the id it
-- writes into the sessions it owns, with the address its peers reach it at. A member renews
-- `heartbeat_at` (microseconds) while it runs and removes its row when it drains; a row whose
-- heartbeat is older than the member lease belongs to a process that is gone.
CREATE TABLE members (
    id           BLOB    NOT NULL PRIMARY KEY,
    address      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);
