"""Housekeeping: the chores each instance runs in the background, every few seconds.

It renews the instance's lease, records members' leaves (one the repository
cannot take at once is tried again each round), reaps the members of instances
whose lease ran out, deletes rooms that stayed empty too long, and audits the
live rooms for messages stored but never published. A chore that fails is tried
again soon; the loop lives as long as the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from uuid import UUID

from sharechat.config import Config
from sharechat.domain import BackendUnavailable, Member
from sharechat.ports import Repository
from sharechat.rooms import LiveRooms

log = logging.getLogger(__name__)

RETRY = 0.25  # seconds between rounds while a chore fails

class Housekeeping:
    def __init__(
        self,
        repository: Repository,
        rooms: LiveRooms,
        config: Config,
        instance_id: UUID,
    ) -> None:
        self._repository = repository
        self._rooms = rooms
        self._config = config
        self._instance_id = instance_id
        self._unrecorded_leaves: list[tuple[UUID, Member]] = []
        self._audited: dict[UUID, int] = {}  # live room -> its newest message at the last audit
        self._postponed = False  # the last round failed
        self._stopping = asyncio.Event()

    async def record_leave(self, room_id: UUID, member: Member) -> None:
        """Remove the member and tell its room; if the repository does not take it
        now, at the next round, and the next, until it does."""
        try:
            await self._remove_and_announce(room_id, member)
        except BackendUnavailable as error:
            log.warning("leave of %s not recorded yet: %s", member.id, error)
            self._unrecorded_leaves.append((room_id, member))

    async def _remove_and_announce(self, room_id: UUID, member: Member) -> None:
        """Raises BackendUnavailable when the removal is not recorded."""
        left = await self._repository.remove_member(room_id, member)
        log.debug("member left %s room %s", member.id, room_id)
        if left is not None:
            await self._rooms.publish(left)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Chores run while inside; on the way out the lease is released."""
        # The lease first: a member of an instance without one counts as dead.
        await self._renew_lease()
        loop = asyncio.create_task(self._loop(), name="housekeeping")
        try:
            yield
        finally:
            # It finishes its chore rather than being cut mid-transaction.
            self._stopping.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.backend_timeout):
                    await asyncio.wait([loop])
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            with contextlib.suppress(BackendUnavailable):
                await self._repository.release_lease(self._instance_id)

    async def _loop(self) -> None:
        config = self._config
        interval = max(0.05, min(config.instance_lease / 3, config.room_idle_ttl / 4, 5.0))
        chores = (
            self._renew_lease,
            self._record_leaves,
            self._reap,
            self._expire_rooms,
            self._audit_rooms,
        )
        while not self._stopping.is_set():
            done = True
            for chore in chores:
                done = await self._attempt(chore()) and done
                _raise_if_cancelled()
            if done and self._postponed:
                log.info("housekeeping back to normal")
            self._postponed = not done
            # After a failure, soon again: the lease must be renewed as soon as the
            # repository answers, before another instance may judge this one dead.
            wait = interval if done else min(interval, RETRY)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()

    async def _attempt(self, chore: Awaitable[None]) -> bool:
        """Run one chore; False if it failed (logged once until housekeeping recovers)."""
        try:
            await chore
        except BackendUnavailable as error:
            if not self._postponed:
                log.warning("housekeeping postponed: %s", error)
            return False
        except Exception:
            # Housekeeping runs for the life of the process: one bad turn must not end it.
            if not self._postponed:
                log.exception("housekeeping chore failed; trying again soon")
            return False
        return True

    async def _renew_lease(self) -> None:
        await self._repository.renew_lease(self._instance_id, self._config.instance_lease)

    async def _record_leaves(self) -> None:
        while self._unrecorded_leaves:
            await self._remove_and_announce(*self._unrecorded_leaves[0])
            self._unrecorded_leaves.pop(0)

    async def _reap(self) -> None:
        for left in await self._repository.reap_expired_instances():
            log.info("member reaped %s room %s", left.member_id, left.room_id)
            await self._rooms.publish(left)

    async def _expire_rooms(self) -> None:
        for room_id in await self._repository.delete_idle_rooms(self._config.room_idle_ttl):
            log.info("room expired %s", room_id)
            room = self._rooms.get(room_id)
            if room is not None:
                room.close("room expired")

    async def _audit_rooms(self) -> None:
        """Catch up each live room whose newest message at the last audit has not been
        delivered here since: stored but never published (its instance died between
        the two, or lost its queue connection), and no later message showed the gap.
        """
        audited, self._audited = self._audited, {}
        live = [room_id for room_id, room in self._rooms.items() if room.order.delivered]
        if not live:
            return
        newest = await self._repository.newest_numbers(live)
        for room_id, number in newest.items():
            room = self._rooms.get(room_id)
            if room is None or room.order.delivered is None:
                continue
            if room.order.delivered < audited.get(room_id, 0):
                log.warning("room %s: catching up on messages never delivered here", room_id)
                room.order.catch_up()
            self._audited[room_id] = number


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that an adapter swallowed.

    On Python 3.11, asyncio.wait_for with a timeout returns the result when the
    awaited work completes in the same loop iteration as a cancel, dropping the
    CancelledError. The adapters use asyncio.timeout instead, but a loop that
    runs for the process's life must not depend on every driver doing so.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
