"""Symmetric-key chains: the part the Double Ratchet and Sender Keys share.

Both derive one message key per message from a chain key that then moves on and
is forgotten, so a stolen state cannot read what was sent before it.  The step,
the skipping of keys for messages still to come, and the sending chain that may
be saved ahead are written once here; what differs (header encryption, signing,
how the message key is expanded) stays in :mod:`.ratchet` and :mod:`.senderkeys`.

Signal's Double Ratchet specification, https://signal.org/docs/specifications/doubleratchet/
"""

from __future__ import annotations

import hmac

from . import primitives as P

__all__ = ["LAST_INDEX", "SendingChain", "kdf_ck", "skip_keys"]

#: message numbers are u32 on the wire: a chain ends before it would wrap
LAST_INDEX = 0xFFFFFFFF
_ONE, _TWO = b"\x01", b"\x02"


def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
    """``(next chain key, message key)``: HMAC-SHA256 with the constants 0x02 and 0x01.

    The KDF chain of section 2.2 with the ``KDF_CK`` of section 5.2 (recommended
    cryptographic algorithms)."""
    return P.hmac_sha256_pair(ck, _TWO, _ONE)


def skip_keys(ck: bytes, start: int, until: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The message keys ``start .. until - 1`` and the chain key at ``until``.

    Section 2.6 (out-of-order messages) and ``SkipMessageKeys`` of section 3.2;
    returned, not stored, so a message that then fails to decrypt changes nothing.
    The caller bounds ``until - start`` before calling."""
    keys = []
    for n in range(start, until):
        ck, mk = kdf_ck(ck)
        keys.append((n, mk))
    return ck, keys


class SendingChain:
    """The sending chain of a symmetric-key ratchet (section 2.3), saved ahead.

    ``key`` and ``index`` are the specification's ``CKs`` and ``Ns``; ``ident``
    names the chain (the sender's ratchet public key, or a room sender key's
    signing key) so a mark taken on one chain never covers another.

    Saving ahead: the state a caller writes may run up to ``reserve`` numbers
    past the one in use (:meth:`reserve`, :meth:`saved`), so a client can send
    the next messages before a commit and a crash still never reuses a message
    key: a restored state starts past every number that was sent, and the peer
    sees a gap (a few skipped keys).  The keys in between are never written, so a
    restored copy cannot derive those of the messages sent from this object.
    :meth:`mark` and :meth:`covered_by` let the caller check, before encrypting,
    that a durable save covers the next number.
    """

    __slots__ = ("_ahead", "ident", "index", "key")

    def __init__(self, ident: bytes, key: bytes, index: int = 0) -> None:
        self.ident = ident
        self.key = key
        self.index = index
        #: (index, chain key at it), index >= self.index: what saved() returns
        #: (None: the current position)
        self._ahead: tuple[int, bytes] | None = None

    def step(self) -> tuple[int, bytes]:
        """``(number, message key)`` of the next message; the chain moves on.

        The caller checks :attr:`exhausted` first (each protocol says what to do)."""
        n = self.index
        self.key, mk = kdf_ck(self.key)
        self.index = n + 1
        return n, mk

    @property
    def exhausted(self) -> bool:
        """No number left for another message."""
        return self.index >= LAST_INDEX

    def saved(self) -> tuple[int, bytes]:
        """``(index, chain key)`` that a state written now holds."""
        ahead = self._ahead
        if ahead is not None and ahead[0] >= self.index:
            return ahead
        return self.index, self.key

    def reserve(self, reserve: int) -> None:
        """Let :meth:`saved` run up to ``reserve`` numbers ahead, refreshed once less
        than half is left: about one HMAC per message sent."""
        if reserve <= 0:
            return
        at, ck = self.saved()
        target = min(self.index + reserve, LAST_INDEX)
        if at >= self.index + reserve // 2 or at >= target:
            return
        while at < target:
            ck, _ = kdf_ck(ck)
            at += 1
        self._ahead = at, ck

    def mark(self) -> tuple[bytes, int]:
        """``(ident, index)`` as :meth:`saved` writes it now; once that state is
        durable, messages below the index may be sent without saving again."""
        return self.ident, self.saved()[0]

    def covered_by(self, mark: tuple[bytes, int] | None) -> bool:
        """True if a durable state with ``mark`` is past the next message's number in
        this same chain (so a crash after sending it cannot reuse its key)."""
        return (
            mark is not None
            and self.index < mark[1]
            and hmac.compare_digest(mark[0], self.ident)
        )
