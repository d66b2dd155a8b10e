-- Drafts: an assistant reply streamed as it is generated. Its message row takes its sequence
-- when the draft starts (`status` 'in_progress'); the text each flush appends to it is a chunk
-- row (one per draft per flush, at the byte offset it starts at), so that no flush rewrites the
-- growing message. Finishing the draft writes the whole text into the message row and deletes
-- its chunks, in one transaction.
ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'completed';

CREATE TABLE message_chunks (
    session_id  BLOB    NOT NULL,
    seq         INTEGER NOT NULL,
    byte_offset INTEGER NOT NULL,
    content     BLOB    NOT NULL,
    PRIMARY KEY (session_id, seq, byte_offset)
);
