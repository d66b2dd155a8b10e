-- A message's content as typed parts (the JSON array as sent; `content` holds a text), and the
-- client's own metadata about the message (a JSON object as sent).
ALTER TABLE messages ADD COLUMN content_parts TEXT, ADD COLUMN metadata TEXT;
