"""The nouns of sharechat: rooms, members, messages, and the errors about them."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "roomId": str(self.room_id),
            "memberId": str(self.member_id),
            "memberName": self.member_name,
            "type": self.type.value,
            "message": self.message,
            "sent": format_timestamp(self.sent),
        }

    def to_json(self) -> str:
        """The one wire form of a message: history and websocket frames share it."""
        return _ENCODER.encode(self.to_dict())


# One encoder for every message: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def failed_message(room_id: UUID, member: Member, reason: str) -> Message:
    """A message for the sender alone; never stored, never published."""
    return Message(
        id=uuid4(),
        room_id=room_id,
        member_id=member.id,
        member_name=member.name,
        type=MessageType.FAILED,
        message=reason,
        sent=utcnow(),
    )


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
    """The repository or the queue did not answer; the operation did not happen."""
