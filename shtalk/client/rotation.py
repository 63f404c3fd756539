"""When this device replaces its keys, and the timer that does it while the client runs.

Two schedules (docs/SECURITY.md, "Key rotation"):

* **Pre-keys.** The signed pre-key and the last-resort ML-KEM pre-key are replaced every
  ``prekey_rotation`` (X3DH and PQXDH, "Publishing keys": at some interval, e.g. weekly),
  at login and by :class:`KeyTimer` while running.  The replaced pair is kept for
  ``prekey_grace`` after the new bundle was *published* (an initial message made from the
  old bundle may still be on its way), then deleted from the local store.  A rotation
  waits until the previous pair is gone, so there is at most one previous pair.
* **Room sender keys.** Our own sender key in a room gets a new epoch after
  ``room_key_messages`` messages or ``room_key_age`` seconds, whichever comes first
  (checked before each send), and is handed out over the pairwise sessions as on a
  membership change: a stolen sender key reads at most that much of what we send.

Everything here is plain arithmetic on the keys' own times (Unix seconds, the E2EE
manager's clock); :class:`KeyTimer` only decides when to call back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from shtalk.crypto import DeviceIdentity, RoomSession

log = Logger()

DAY = 86400.0
#: The timer never sleeps longer than this: a changed wall clock or a suspended machine
#: delays a due rotation or deletion by at most that much.
MAX_SLEEP = 3600.0
#: After a failed rotation (e.g. offline: the new bundle could not be published); doubled
#: after each further failure, up to MAX_SLEEP.
RETRY = 60.0


@dataclass(frozen=True)
class RotationPolicy:
    """The schedules; the defaults are the client configuration's (``[encryption]``)."""

    prekey_rotation: float = 7 * DAY
    prekey_grace: float = 3 * DAY
    room_key_messages: int = 100
    room_key_age: float = DAY

    def check(self) -> None:
        """Refuse settings that would lose messages or make no sense (ValueError)."""
        if not 3600 <= self.prekey_rotation <= 365 * DAY:
            raise ValueError("prekey_rotation: between 1h and 365d")
        if not 60 <= self.prekey_grace < self.prekey_rotation:
            raise ValueError(
                "prekey_grace: at least 1m and shorter than prekey_rotation (only one "
                "previous pre-key is kept)"
            )
        if not 1 <= self.room_key_messages <= 1_000_000:
            raise ValueError("room_key_messages: between 1 and 1000000")
        if not 60 <= self.room_key_age <= 365 * DAY:
            raise ValueError("room_key_age: between 1m and 365d")

    # ------------------------------------------------------------------ pre-keys
    def prekeys_due(self, ident: DeviceIdentity, now: float) -> bool:
        """Time for a new signed/last-resort pair (never while a previous pair is held).

        A creation time further in the future than one interval means the clock was
        wrong when the keys were made: rotate rather than keep them for years."""
        if ident.has_previous:
            return False
        age = now - ident.prekeys_created
        return age >= self.prekey_rotation or -age > self.prekey_rotation

    def next_prekey_event(self, ident: DeviceIdentity) -> float:
        """When the next rotation, deletion or pending publication is due (clock time)."""
        if ident.has_previous:
            if not ident.previous_retired:
                return 0.0  # the new bundle still has to reach the server
            return ident.previous_retired + self.prekey_grace
        return ident.prekeys_created + self.prekey_rotation

    # -------------------------------------------------------------------- rooms
    def room_key_due(self, rs: RoomSession, now: float) -> bool:
        """Our sender key in ``rs`` has sent enough, or is old enough, to be replaced."""
        if rs.epoch is None:
            return False
        age = now - rs.epoch_started
        return rs.index >= self.room_key_messages or abs(age) >= self.room_key_age


class KeyMaintainer(Protocol):
    """What :class:`KeyTimer` drives (:class:`shtalk.client.e2ee.E2EE`)."""

    @property
    def clock(self) -> Callable[[], float]: ...

    def next_key_event(self) -> float: ...

    async def maintain_keys(self) -> None: ...


class KeyTimer:
    """Calls ``maintain_keys`` when the next pre-key event is due, on the reactor's clock.

    ``running`` is the Deferred of a call in progress (tests wait for it)."""

    def __init__(self, reactor: IReactorTime, e2ee: KeyMaintainer) -> None:
        self.reactor = reactor
        self.e2ee = e2ee
        self.call: IDelayedCall | None = None
        self.running: Deferred[None] | None = None
        self.stopped = True
        self.failures = 0

    def start(self) -> None:
        self.stopped = False
        if self.call is None and self.running is None:
            self._schedule(self._delay())

    def stop(self) -> None:
        self.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _delay(self) -> float:
        due = self.e2ee.next_key_event() - float(self.e2ee.clock())
        return min(max(due, 1.0), MAX_SLEEP)

    def _schedule(self, delay: float) -> None:
        if not self.stopped:
            self.call = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self.call = None
        d = self.running = Deferred.fromCoroutine(self._run())

        def done(_: object) -> None:
            self.running = None

        d.addBoth(done)

    async def _run(self) -> None:
        try:
            await self.e2ee.maintain_keys()
        except Exception as e:
            retry = min(RETRY * 2**self.failures, MAX_SLEEP)
            self.failures += 1
            log.warn("rotating this device's pre-keys failed ({e}); trying again in "
                     "{retry:.0f} s", e=e, retry=retry)
            self._schedule(retry)
            return
        self.failures = 0
        self._schedule(self._delay())
