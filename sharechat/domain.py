"""The nouns of sharechat: rooms, members, messages, and the errors about them.

It holds every rule about a message that does not depend on a backend: how each
kind is made (joined, left, chat, failed) and worded, its one JSON form, and
which texts a history can hold.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import orjson


class MessageType(enum.StrEnum):
    CHAT = "chat"
    JOINED = "joined"
    LEFT = "left"
    FAILED = "failed"


STORED_TYPES = (MessageType.CHAT, MessageType.JOINED, MessageType.LEFT)


@dataclass(frozen=True, slots=True)
class Room:
    id: UUID
    name: str


@dataclass(frozen=True, slots=True)
class Member:
    id: UUID
    name: str

    def to_dict(self) -> dict[str, str]:
        return {"id": str(self.id), "name": self.name}


@dataclass(frozen=True, slots=True)
class Message:
    id: UUID
    room_id: UUID
    member_id: UUID
    member_name: str
    type: MessageType
    message: str
    sent: datetime
    # Its place in the room's history: 1, 2, 3, ... in order, never reused; not part of
    # the JSON (0 for a `failed`, which is never stored).
    number: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; orjson writes the uuids in their canonical form."""
        return {
            "id": self.id,
            "roomId": self.room_id,
            "memberId": self.member_id,
            "memberName": self.member_name,
            "type": self.type.value,
            "message": self.message,
            "sent": format_timestamp(self.sent),
        }

    def to_json(self) -> bytes:
        """The one wire form of a message, UTF-8: history and websocket frames share it.

        orjson, because encoding is a large share of what a message costs the server,
        and orjson's is a small fraction of the standard library encoder's.
        """
        return orjson.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class Draft:
    """A message about to be stored: the repository adds `sent` and its number."""

    id: UUID
    room_id: UUID
    member: Member
    type: MessageType
    text: str

    def stored(self, sent: datetime, number: int) -> Message:
        return Message(
            id=self.id,
            room_id=self.room_id,
            member_id=self.member.id,
            member_name=self.member.name,
            type=self.type,
            message=self.text,
            sent=sent.astimezone(UTC),
            number=number,
        )


def joined(room_id: UUID, member: Member) -> Draft:
    return Draft(uuid4(), room_id, member, MessageType.JOINED, f"{member.name} joined")


def left(room_id: UUID, member: Member) -> Draft:
    return Draft(uuid4(), room_id, member, MessageType.LEFT, f"{member.name} left")


def chat(room_id: UUID, member: Member, text: str) -> Draft:
    """A chat message; its text passed chat_text() and unstorable() already."""
    return Draft(uuid4(), room_id, member, MessageType.CHAT, text)


def failed(room_id: UUID, member: Member, reason: str) -> Message:
    """A message for the sender alone, saying what went wrong; never stored or published."""
    return Message(
        id=uuid4(),
        room_id=room_id,
        member_id=member.id,
        member_name=member.name,
        type=MessageType.FAILED,
        message=reason,
        sent=utcnow(),
    )


# to_json() writes the id first, as `{"id":"<36 characters>",`: a member can tell its
# own message in the room's shared bytes without parsing them.
_ID_START = len(b'{"id":"')
_ID_END = _ID_START + 36


def wire_id(payload: bytes) -> bytes:
    """The id of a message in its wire form (to_json()), as UTF-8 bytes."""
    return payload[_ID_START:_ID_END]


def with_ref(payload: bytes, ref: str) -> bytes:
    """A message's wire form with the client's `"ref"` as one more key, the last."""
    return payload[:-1] + b',"ref":' + orjson.dumps(ref) + b"}"


def chat_text(frame: str) -> str:
    r"""The message a client's text carries, or "" when there is none to store.

    One trailing line break (`\n` or `\r\n`, which websocat's line mode sends) is
    not part of the message; only one, so that a message may end with a blank
    line. A text that is only whitespace carries no message.
    """
    if frame.endswith("\n"):
        frame = frame[:-2] if frame.endswith("\r\n") else frame[:-1]
    return frame if frame and not frame.isspace() else ""


def unstorable(text: str) -> str | None:
    """Why a history cannot hold this text, or None: the rule of every repository.

    PostgreSQL's text type holds neither NUL nor a lone surrogate (which has no
    UTF-8 form). Checked before any repository is asked, on every backend, so
    that the backend never changes what a member may say.
    """
    if "\x00" in text:
        return "message contains a NUL character"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "message contains a lone surrogate, which is not text"
    return None


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds: 2026-11-28T02:48:02.123456Z."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class SharechatError(Exception):
    """Base of the domain errors; the web layer turns them into HTTP answers."""


class RoomNotFound(SharechatError):
    pass


class MessageNotFound(SharechatError):
    """A history cursor that is not a message of the room."""


class BackendUnavailable(SharechatError):
    """The repository or the queue did not answer in time (see each port for what that
    says about the operation)."""


class InDoubt(BackendUnavailable):
    """The backend went away while the operation was under way, and could not be asked
    since whether it happened: it may have."""
