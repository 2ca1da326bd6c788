-- Rooms, their members and messages, and the leases of the server instances.
-- Everything about a room goes with it: members and messages cascade.
-- sharechat/statements.py declares the same tables for SQLAlchemy Core; keep both in step.

CREATE TYPE message_type AS ENUM ('chat', 'joined', 'left');

CREATE TABLE rooms (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    created timestamptz NOT NULL,
    -- When the room last became empty; NULL while it has members.
    emptied_at timestamptz
);
-- The idle-room sweep only ever looks at empty rooms.
CREATE INDEX rooms_emptied_at_idx ON rooms (emptied_at) WHERE emptied_at IS NOT NULL;

CREATE TABLE members (
    id uuid PRIMARY KEY,
    room_id uuid NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    name text NOT NULL,
    -- No foreign key: the members of an instance that died are reaped (with a
    -- `left` message each), not silently cascaded away.
    instance_id uuid NOT NULL,
    joined timestamptz NOT NULL
);
CREATE INDEX members_room_id_idx ON members (room_id);
CREATE INDEX members_instance_id_idx ON members (instance_id);

CREATE TABLE messages (
    id uuid PRIMARY KEY,
    -- The total order of the history; `sent` alone can tie.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    room_id uuid NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    -- No foreign key: a member row goes when the member leaves, its messages stay.
    member_id uuid NOT NULL,
    member_name text NOT NULL,
    type message_type NOT NULL,
    message text NOT NULL,
    sent timestamptz NOT NULL
);
-- A room's history in order, paged in both directions.
CREATE INDEX messages_room_id_seq_idx ON messages (room_id, seq);

CREATE TABLE instances (
    id uuid PRIMARY KEY,
    lease_expires timestamptz NOT NULL
);
