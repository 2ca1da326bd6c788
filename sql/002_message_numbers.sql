-- Each message gets its number in its room: 1, 2, 3, ... in the order of the
-- room's history. It orders and pages a room's history, and tells which of its
-- messages are beyond the room's bound (`--room-max-messages`): those numbered
-- at or below the newest minus the bound, deleted as each batch is stored.
-- sharechat/statements.py declares the same tables for SQLAlchemy Core; keep both in step.

ALTER TABLE messages ADD COLUMN number bigint;

UPDATE messages
SET number = numbered.number
FROM (
    SELECT id, row_number() OVER (PARTITION BY room_id ORDER BY seq) AS number
    FROM messages
) AS numbered
WHERE messages.id = numbered.id;

ALTER TABLE messages ALTER COLUMN number SET NOT NULL;

-- A room's history in order, paged in both directions, its newest found at
-- once and its oldest deleted by one range; unique, as the room lock makes it.
CREATE UNIQUE INDEX messages_room_id_number_idx ON messages (room_id, number);
-- The same order as (room_id, number): one index to maintain per message, not two.
DROP INDEX messages_room_id_seq_idx;
