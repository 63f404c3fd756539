"""The seams where one process's state becomes a cluster's (next to ``iserver``).

Presence tells its peers through a relay (`IPresenceRelay`) and caches are kept true by
a control channel (`IClusterControl`); the state that protects accounts and the service
must be shared (in Redis) or an attacker spreads over the processes: the failure
throttle (`IAuthThrottle`), the monitoring's CAPTCHA demands (`ICaptchaDemands`), the
per-address connection counts (`IAddressCounts`), and the monitoring's flags
(`IFlagStore`, in the database).  Each has a one-process implementation that is the
default, so the embedded server needs no service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer


class IPresenceRelay(Interface):
    """What `IPresence` tells, and asks, the other server processes of a cluster.

    Presence keeps the one registry of this process's connections and applies every
    revocation and line here at once; the relay carries them to the peers (which apply
    them to their own connections) and keeps the cluster-wide view of who is online, so
    that "first device online" and "last device offline" hold across processes.  One
    process alone uses `shtalk.server.chat.presence.LocalRelay`, which answers from
    what this process knows and tells nobody."""

    def device_up(user_id: int, device_id: str, first_here: bool) -> Deferred[bool]:
        """This process now serves the device; fires True if the user had no device
        online anywhere before (``first_here``: none in this process)."""

    def device_down(user_id: int, device_id: str, last_here: bool) -> Deferred[bool]:
        """This process no longer serves the device; fires True if the user now has no
        device online anywhere (``last_here``: none left in this process)."""

    def online_elsewhere(user_ids: Iterable[int]) -> Deferred[set[int]]:
        """Those of ``user_ids`` with a device online in another process."""

    def devices_elsewhere(user_id: int) -> Deferred[set[str]]:
        """The user's devices online in other processes."""

    def send_to_users(user_ids: Iterable[int], line: bytes) -> None:
        """Have the peers write the line to these users' connections."""

    def revoke_families(families: Iterable[str], reason: str) -> None: ...

    def revoke_device(user_id: int, device_id: str, reason: str) -> None: ...

    def revoke_user(user_id: int, reason: str) -> None: ...


class IClusterControl(Interface):
    """The control channel between server processes: small events every process applies
    to its own state (cache invalidations, revocations, lines for connections).  One
    process alone uses `NoControl`."""

    def publish(kind: str, payload: dict[str, Any]) -> None:
        """Tell every other process; the caller has already applied it here."""


@implementer(IClusterControl)
class NoControl:
    """One process: there is nobody to tell."""

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        return None


NO_CONTROL = NoControl()


class IAuthThrottle(Interface):
    """Failures of secrets per name tried and per address, and the delays and CAPTCHAs
    they lead to (the rules: ``shtalk.server.accounts.throttle``)."""

    def check(account: str | None, address: str) -> Deferred[Any]:
        """Before an attempt: a ``Verdict`` (wait ``retry_after``, solve a CAPTCHA)."""

    def failed(account: str | None, address: str) -> Deferred[None]:
        """An attempt failed: count it for the name and the address."""

    def succeeded(account: str | None) -> Deferred[None]:
        """The name's secret was right: forget its failures (not the address's)."""

    def require_captcha(
        *, account: str | None = None, address: str | None = None, seconds: float = 3600.0
    ) -> Deferred[None]:
        """Demand a CAPTCHA of every attempt on ``account`` or from ``address`` for a while."""

    def failures(account: str | None = None, address: str | None = None) -> Deferred[int]:
        """Failures in the window (tests, monitoring)."""

    def prune() -> None:
        """Drop what has expired (a no-op where the backend expires keys itself)."""


class ICaptchaDemands(Interface):
    """Accounts and addresses the monitoring flagged: each solves a CAPTCHA at its next key
    interaction; a demand goes once solved, or after its time to live.

    ``accounts`` and ``addresses`` are the demands as this process knows them now (sync,
    for the ``send`` path); ``current()`` brings them up to date first."""

    accounts = Attribute("Mapping: demanded account id -> until (``now()``'s seconds).")
    addresses = Attribute("Mapping: demanded client address -> until.")

    def now() -> float:
        """The clock the ``until`` values are on."""

    def require(account_id: int | None = None, address: str | None = None) -> Deferred[None]:
        """Demand a CAPTCHA of these subjects (known here at once; the Deferred fires once
        every process can know it, and never fails)."""

    def satisfied(account_id: int | None = None, address: str | None = None) -> Deferred[None]:
        """A CAPTCHA was solved: the demand on these subjects goes (as ``require``)."""

    def current() -> Deferred[None]:
        """Fires once ``accounts``/``addresses`` hold the demands of every process."""

    def __bool__() -> bool:
        """Any demand at all (the cheap test on the ``send`` path)."""


class IAddressCounts(Interface):
    """Connections per client address (past the TLS handshake), against a cap."""

    local = Attribute("address -> connections this process holds (metrics).")

    def admit(address: str) -> bool | Deferred[bool]:
        """Count one more; False: the address is at its cap (nothing counted)."""

    def release(address: str) -> None:
        """One admitted connection of ``address`` is gone."""


class IFlagStore(Interface):
    """Where the monitoring's flags (``shtalk.server.ops.monitor.Flag``) are kept."""

    def load_flags() -> Deferred[list[Any]]:
        """Every flag kept, in id order."""

    def save_flag(flag: Any) -> Deferred[int]:
        """Insert (``flag.id == 0``: the store assigns the id) or update one flag;
        fires with its id."""

    def delete_flag(flag_id: int) -> Deferred[None]: ...
