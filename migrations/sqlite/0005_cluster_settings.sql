-- Settings the processes that share this database share, each written once by the first
-- process that needs it: `secret`, with which peers authenticate the commands they send each
-- other.
CREATE TABLE cluster_settings (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
