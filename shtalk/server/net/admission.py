"""Admission before the TLS handshake: a deadline from accept, bounded numbers, fair CPU.

Why this exists: a TCP connection costs an attacker one SYN, and a socket that never
sends a ClientHello cost the server a file descriptor, an OpenSSL object and a protocol
(~45 KB) for as long as it stayed.  Twisted's TLS layer does not close such a socket by
itself (its ``loseConnection`` waits for a handshake that never comes once a line is
queued), and an admission that lets a fixed number of handshakes *in* and waits for them
to finish is held shut by sockets that say nothing.  So, for every socket the TLS
listener accepts:

* **A deadline from accept** (``handshake_timeout``): a socket still not past the
  handshake then is aborted (there is no TLS channel to send an error line on).
* **Bounded numbers**: at most ``max_pending_handshakes`` such sockets in all and
  ``max_pending_handshakes_per_address`` per client address (IPv6 by its /64, as the
  rate limits count); when a new one would exceed a bound, the *oldest* is aborted.  An
  honest handshake is over within a few round trips, so the oldest sockets are the ones
  least likely to be a person; the newest, a person's reconnect, gets in.  In a cluster
  the per-address bound is also counted across processes (``shared``, an
  ``IAddressCounts`` in Redis): over it, the oldest of the address *here* gives its
  place to the new socket, or, with none here, the new one goes.
* **CPU for progress, not for waiting**: a handshake step (the server's work on bytes
  the peer sent) takes one of `STEPS_PER_TURN` slots of the current reactor turn; a
  burst of ClientHellos beyond that waits, unread, for the next turns, so a login storm
  is spread out instead of stalling delivery.  A socket waiting for its peer (silent, or
  between two flights) holds no slot, so silence cannot keep anyone else out.
* **Memory**: the OpenSSL connection is made on the first bytes (`AdmittedTLSProtocol`),
  so a silent socket is a few KB of Python objects; an aborted socket leaves no
  reference here; after a wave of departures the C heap is trimmed (glibc's
  ``malloc_trim``), because OpenSSL's freed state otherwise stays resident.

Connections past the handshake are the protocol's business (per-address cap, pre-auth
and idle deadlines: shtalk.server.net.connection).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections import deque
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from shtalk.collaborators import collaborators
from shtalk.server.config import ServerSection
from shtalk.server.ops.ratelimit import address_key

log = Logger()

#: Handshake steps (the server's work on the bytes a peer sent) per reactor turn.
STEPS_PER_TURN = 2
#: Drops are summed up in the log at most this often (one line per socket would let a
#: flood fill the log).
REPORT_EVERY = 60.0
#: After this many pending sockets have gone, the C heap is trimmed (a second later, so
#: one trim covers a whole wave of aborts).
TRIM_AFTER = 256


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


@collaborators
class PendingHandshakes:
    """The sockets not yet past the TLS handshake, oldest first; see the module doc."""

    clock: IReactorTime
    timeout: float = 10.0
    max_pending: int = 1000
    max_per_address: int = 20
    steps_per_turn: int = STEPS_PER_TURN
    trim_after: int = TRIM_AFTER
    #: The per-address count of every process (IAddressCounts), in a cluster.
    shared: Any = None

    def __post_init__(self) -> None:
        # Insertion order is accept order: the first entry is the oldest.
        self.pending: dict[AdmittedTLSProtocol, float] = {}
        self.by_address: dict[str, dict[AdmittedTLSProtocol, None]] = {}
        self.waiting: deque[AdmittedTLSProtocol] = deque()
        self.steps = 0  # slots taken in this reactor turn
        self.dropped: dict[str, int] = {"timeout": 0, "address": 0, "total": 0}
        self._turn: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self._gone = 0  # pending sockets gone since the last trim
        self._trimming: IDelayedCall | None = None
        self._report: IDelayedCall | None = None
        self._reported = dict(self.dropped)
        #: ``malloc_trim`` (glibc), or None where there is none.
        self.heap_trim = _malloc_trim()

    @classmethod
    def from_config(
        cls, server: ServerSection, clock: IReactorTime, shared: Any = None
    ) -> PendingHandshakes:
        return cls(
            clock,
            timeout=float(server.handshake_timeout),
            max_pending=server.max_pending_handshakes,
            max_per_address=server.max_pending_handshakes_per_address,
            shared=shared,
        )

    # the life of a pending socket ------------------------------------------------------
    def accepted(self, conn: AdmittedTLSProtocol) -> None:
        """A new socket: make room for it (oldest out), then start its clock."""
        group = self.by_address.setdefault(conn.address, {})
        if len(group) >= self.max_per_address:
            self._drop(next(iter(group)), "address")
        if len(self.pending) >= self.max_pending:
            self._drop(next(iter(self.pending)), "total")
        self.pending[conn] = self.clock.seconds()
        self.by_address.setdefault(conn.address, {})[conn] = None
        if self._expiry is None:
            self._expiry = self.clock.callLater(self.timeout, self._expire)
        if self.shared is not None:
            maybeDeferred(self.shared.admit, conn.address).addCallback(self._shared, conn)

    def _shared(self, admitted: bool, conn: AdmittedTLSProtocol) -> None:
        """The cluster's answer for a new socket (it may have gone meanwhile)."""
        if conn not in self.pending:
            if admitted:
                self.shared.release(conn.address)
            return
        if admitted:
            conn.shared_counted = True
            return
        oldest = next(iter(self.by_address[conn.address]))
        if oldest is not conn and oldest.shared_counted:
            oldest.shared_counted, conn.shared_counted = False, True  # its place, counted
        self._drop(oldest, "address")

    def finished(self, conn: AdmittedTLSProtocol) -> None:
        """Past the handshake, failed, or gone: forget it (idempotent)."""
        if self.pending.pop(conn, None) is None:
            return
        if conn.shared_counted:
            conn.shared_counted = False
            self.shared.release(conn.address)
        group = self.by_address.get(conn.address)
        if group is not None:
            group.pop(conn, None)
            if not group:
                del self.by_address[conn.address]
        if conn.held:
            with contextlib.suppress(ValueError):
                self.waiting.remove(conn)
        self._gone += 1
        if self._gone >= self.trim_after and self._trimming is None and self.heap_trim:
            self._trimming = self.clock.callLater(1.0, self.trim)

    def _drop(self, conn: AdmittedTLSProtocol, reason: str) -> None:
        self.finished(conn)
        self.dropped[reason] += 1
        if self._report is None:
            self._report = self.clock.callLater(REPORT_EVERY, self._log_drops)
        conn.abortConnection()  # type: ignore[no-untyped-call]

    def _expire(self) -> None:
        """Abort every socket past its deadline; the next check is at the oldest's."""
        self._expiry = None
        now = self.clock.seconds()
        while self.pending:
            conn, since = next(iter(self.pending.items()))
            if now - since < self.timeout:
                self._expiry = self.clock.callLater(since + self.timeout - now, self._expire)
                return
            self._drop(conn, "timeout")

    def _log_drops(self) -> None:
        self._report = None
        new = {k: n - self._reported[k] for k, n in self.dropped.items()}
        self._reported = dict(self.dropped)
        log.warn(
            "aborted {count} sockets not past the TLS handshake in {seconds:.0f} s: "
            "{timeout} out of time, {address} over the per-address and {total} over the "
            "total max_pending_handshakes (a flood?); {pending} pending now",
            event="admission.dropped", count=sum(new.values()), seconds=REPORT_EVERY,
            pending=len(self.pending), **new,
        )

    # CPU: slots per reactor turn -------------------------------------------------------
    def may_step(self, conn: AdmittedTLSProtocol) -> bool:
        """May ``conn`` work on its peer's bytes now?  False: it waits in line, unread."""
        if conn.held or self.waiting or self.steps >= self.steps_per_turn:
            if not conn.held:
                self.waiting.append(conn)
            return False
        self._take_step()
        return True

    def _take_step(self) -> None:
        self.steps += 1
        if self._turn is None:
            self._turn = self.clock.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn = None
        self.steps = 0
        while self.waiting and self.steps < self.steps_per_turn:
            conn = self.waiting.popleft()
            self._take_step()
            conn.release()

    def trim(self) -> None:
        """Give the C heap's free pages back to the system (after a flood).

        OpenSSL's per-connection state is C memory: freed, it stays in the process's
        resident set unless the heap is trimmed (glibc only trims its very top).
        """
        self._trimming = None
        self._gone = 0
        if self.heap_trim is not None:
            self.heap_trim(0)

    def stop(self) -> None:
        for call in (self._turn, self._expiry, self._trimming, self._report):
            if call is not None and call.active():
                call.cancel()
        self._turn = self._expiry = self._trimming = self._report = None


class AdmittedTLSProtocol(BufferingTLSTransport):
    """Twisted's server-side TLS, with the handshake under a `PendingHandshakes`.

    The OpenSSL connection is made when the peer's first bytes arrive, not at accept:
    a server has nothing to say before the ClientHello, and the object with the
    buffers of the first handshake call is ~45 KB of C heap, which a silent socket
    then never costs (and which, freed, would stay resident until a heap trim).
    Until then ``_tlsConnection`` is None and the few paths that can run without
    it (a write, the abort, the loss) are covered below.
    """

    factory: AdmittedTLSFactory
    address = ""
    held: list[bytes] | None = None  # the peer's bytes while waiting for a slot
    shared_counted = False  # counted in PendingHandshakes.shared

    def _checkHandshakeStatus(self) -> None:
        if self._tlsConnection is not None:
            super()._checkHandshakeStatus()  # type: ignore[no-untyped-call]

    def _write(self, data: bytes) -> None:
        if self._tlsConnection is None:
            self._appSendBuffer.append(data)  # as OpenSSL refuses before the handshake
            return
        super()._write(data)  # type: ignore[no-untyped-call]

    def _shutdownTLS(self) -> None:
        if self._tlsConnection is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        super()._shutdownTLS()  # type: ignore[no-untyped-call]

    def makeConnection(self, transport: Any) -> None:
        # Behind a proxy, ``transport`` is the PROXY header layer, connecting us once the
        # header named the client: the bounds per address count clients, not the proxy.
        peer = transport.getPeer()
        self.address = address_key(str(getattr(peer, "host", peer)))
        super().makeConnection(transport)  # type: ignore[no-untyped-call]
        if not self._handshakeDone and not self.disconnecting:
            self.factory.admission.accepted(self)

    def dataReceived(self, data: bytes) -> None:
        if self._handshakeDone:
            super().dataReceived(data)  # type: ignore[no-untyped-call]
            return
        admission = self.factory.admission
        if self.held is not None:
            self.held.append(data)
            return
        if not admission.may_step(self):
            self.held = [data]
            self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        self._step(data)

    def release(self) -> None:
        """Our slot came: work on what the peer sent meanwhile, and read again."""
        held, self.held = self.held, None
        if held is None or self.disconnecting or not self.connected:
            return
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self._step(b"".join(held))

    def _step(self, data: bytes) -> None:
        if self._tlsConnection is None:
            self._tlsConnection = self.factory.create_tls(self)
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self._handshakeDone or self.disconnecting:
            self.factory.admission.finished(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.admission.finished(self)
        self.held = None
        if self._tlsConnection is None:
            self._lostTLSConnection = True  # nothing for OpenSSL to finish reading
        super().connectionLost(reason)


def _made_later(protocol: Any) -> Any:
    return None


class AdmittedTLSFactory(TLSMemoryBIOFactory):
    """Server-side TLS (as ``listenSSL`` makes it) whose handshakes are admitted."""

    protocol = AdmittedTLSProtocol

    def __init__(
        self,
        contextFactory: Any,
        wrappedFactory: Any,
        admission: PendingHandshakes,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.options = contextFactory
        self.admission = admission
        # makeConnection asks for the OpenSSL connection at accept; it is made on the
        # first bytes instead (AdmittedTLSProtocol).
        self.create_tls = self._creatorCallable
        self._creatorCallable = _made_later

    def doStop(self) -> None:
        self.admission.stop()
        super().doStop()  # type: ignore[no-untyped-call]
