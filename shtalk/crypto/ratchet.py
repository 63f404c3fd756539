"""The Double Ratchet with header encryption (Signal's specification, section 4).

* ``KDF_RK``: HKDF-SHA256, salt = root key, IKM = DH output, info
  ``"shtalk/v1 ratchet"``, 96 bytes -> new root key, chain key, next header key.
* ``KDF_CK``: message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02).
* Message encryption: HKDF-SHA256(IKM = message key, salt = 32 zero bytes, info
  ``"shtalk/v1 message"``) -> 32-byte AES-256-GCM key, 12-byte nonce, 12-byte header
  nonce.  Associated data = session AD || encrypted header.
* Header: ``dh (32) || pn (u32) || n (u32)``, encrypted with AES-256-GCM under the
  chain's header key; the wire header is ``header nonce (12) || ciphertext+tag (56)``
  = 68 bytes.  The header nonce is derived from the message key (so it is unique
  per message and the output is deterministic for a given state), and checked.

Skipped message keys are bounded twice: a single message may not jump more than
``max_skip`` keys in one chain (checked before any work), and at most
``max_skipped`` keys (in at most ``MAX_SKIPPED_CHAINS`` chains) are stored, the
oldest evicted first.

Decryption is transactional: everything is computed into locals and written to
the state only after the AEAD tag verified.  A failed message (bad tag, bad
header, replay, over the limit) leaves :meth:`RatchetState.to_bytes` unchanged.

Saving ahead (:meth:`RatchetState.reserve_sending`): the saved state may put the
sending chain up to ``SEND_RESERVE`` message numbers ahead of the one in use (see
:class:`shtalk.crypto.chain.SendingChain`, which Sender Keys use too).

This module does no PQXDH: :mod:`shtalk.crypto.session` creates the state with
:meth:`RatchetState.init_initiator` / :meth:`RatchetState.init_responder`.
"""

from __future__ import annotations

import hmac
import struct

from cryptography.hazmat.primitives.asymmetric import x25519

from . import primitives as P
from .chain import SendingChain, kdf_ck, skip_keys
from .encoding import Reader, Writer, read_whole
from .errors import DecodeError, DecryptError, ReplayError, StateError, TooFarAhead

__all__ = [
    "ENC_HEADER_LEN",
    "MAX_SKIP",
    "MAX_SKIPPED",
    "MAX_SKIPPED_CHAINS",
    "SEND_RESERVE",
    "RatchetState",
    "kdf_ck",
    "kdf_rk",
    "message_keys",
]

MAX_SKIP = 2000  #: keys one message may skip in one chain
MAX_SKIPPED = 2000  #: stored skipped keys overall
MAX_SKIPPED_CHAINS = 32  #: receiving chains with stored skipped keys
SEND_RESERVE = 32  #: sending numbers a saved state may run ahead (see reserve_sending)
STATE_VERSION = 1
HEADER_LEN = 40
ENC_HEADER_LEN = P.NONCE_LEN + HEADER_LEN + P.TAG_LEN
_INFO_RK = b"shtalk/v1 ratchet"
_INFO_MK = b"shtalk/v1 message"


def kdf_rk(rk: bytes, dh_out: bytes) -> tuple[bytes, bytes, bytes]:
    """``(root key, chain key, next header key)``."""
    out = P.hkdf(dh_out, rk, _INFO_RK, 96)
    return out[:32], out[32:64], out[64:]


def message_keys(mk: bytes) -> tuple[bytes, bytes, bytes]:
    """``(AES key, nonce, header nonce)`` from a message key."""
    out = P.hkdf(mk, None, _INFO_MK, 56)
    return out[:32], out[32:44], out[44:]


_COUNTERS = struct.Struct(">II")


def _header(dh_pub: bytes, pn: int, n: int) -> bytes:
    return dh_pub + _COUNTERS.pack(pn, n)


class RatchetState:
    """One side of a Double Ratchet session (with header encryption)."""

    __slots__ = (
        "_aeads", "ad", "ckr", "dhr", "dhs", "dhs_pub", "hkr", "hks", "max_skip",
        "max_skipped", "n_skipped", "nhkr", "nhks", "nr", "pn", "rk", "sending", "skipped",
    )

    def __init__(self, dhs: x25519.X25519PrivateKey, rk: bytes, ad: bytes) -> None:
        self.dhs = dhs
        self.dhs_pub = P.x25519_public_bytes(dhs)
        self.dhr: bytes | None = None
        self.rk = rk
        #: CKs and Ns (None: no sending chain yet, the responder must receive first)
        self.sending: SendingChain | None = None
        self.ckr: bytes | None = None
        self.hks: bytes | None = None
        self.hkr: bytes | None = None
        self.nhks: bytes | None = None
        self.nhkr: bytes | None = None
        self.nr = self.pn = 0
        self.ad = ad
        self.max_skip = MAX_SKIP
        self.max_skipped = MAX_SKIPPED
        # header key -> {n -> message key}; insertion order is age order.
        self.skipped: dict[bytes, dict[int, bytes]] = {}
        self.n_skipped = 0
        self._aeads: dict[bytes, P.Aead] = {}

    @property
    def cks(self) -> bytes | None:
        """The sending chain key (``CKs``)."""
        return None if self.sending is None else self.sending.key

    @property
    def ns(self) -> int:
        """The next sending message number (``Ns``)."""
        return 0 if self.sending is None else self.sending.index

    # ------------------------------------------------------------------ init

    @classmethod
    def init_initiator(
        cls,
        sk: bytes,
        ad: bytes,
        remote_ratchet: bytes,
        shared_hka: bytes,
        shared_nhkb: bytes,
        ratchet_key: x25519.X25519PrivateKey | None = None,
    ) -> RatchetState:
        """Alice: ``RatchetInitAliceHE``.  ``ratchet_key`` is for test vectors only."""
        state = cls(ratchet_key or P.x25519_generate(), sk, ad)
        state.dhr = remote_ratchet
        state.rk, cks, state.nhks = kdf_rk(sk, P.dh(state.dhs, remote_ratchet))
        state.sending = SendingChain(state.dhs_pub, cks)
        state.hks = shared_hka
        state.nhkr = shared_nhkb
        return state

    @classmethod
    def init_responder(
        cls,
        sk: bytes,
        ad: bytes,
        ratchet_key: x25519.X25519PrivateKey,
        shared_hka: bytes,
        shared_nhkb: bytes,
    ) -> RatchetState:
        """Bob: ``RatchetInitBobHE``; ``ratchet_key`` is his signed pre-key."""
        state = cls(ratchet_key, sk, ad)
        state.nhks = shared_nhkb
        state.nhkr = shared_hka
        return state

    # ------------------------------------------------------------- helpers

    def _aead(self, key: bytes) -> P.Aead:
        """AES-GCM under a header key, kept while the state keeps that key.

        Header keys are reused for a whole chain, so the key schedule is done once.
        The cache never outlives the key: :meth:`_forget` drops a skipped chain's
        entry when the chain goes, and a DH step clears it all.
        """
        aead = self._aeads.get(key)
        if aead is None:
            if len(self._aeads) > MAX_SKIPPED_CHAINS + 4:
                self._aeads.clear()
            aead = self._aeads[key] = P.Aead(key)
        return aead

    def _forget(self, hk: bytes) -> None:
        """A skipped chain was deleted: drop its header key's cipher unless still live."""
        if hk != self.hkr and hk != self.nhkr and hk != self.hks:
            self._aeads.pop(hk, None)

    def _open_header(self, hk: bytes, header: bytes) -> tuple[bytes, int, int] | None:
        plain = self._aead(hk).open(header[:12], header[12:], b"")
        if plain is None:
            return None
        pn, n = _COUNTERS.unpack_from(plain, 32)
        return plain[:32], pn, n

    def _open(self, mk: bytes, header: bytes, ciphertext: bytes) -> bytes:
        key, nonce, hnonce = message_keys(mk)
        if not hmac.compare_digest(hnonce, header[:12]):
            raise DecryptError("header nonce does not match the message key")
        return P.aead_decrypt(key, nonce, ciphertext, self.ad + header)

    def _store(self, hk: bytes, keys: list[tuple[int, bytes]]) -> None:
        if not keys:
            return
        chain = self.skipped.get(hk)
        if chain is None:
            chain = self.skipped[hk] = {}
        for n, mk in keys:
            chain[n] = mk
        self.n_skipped += len(keys)
        while len(self.skipped) > MAX_SKIPPED_CHAINS:
            oldest = next(iter(self.skipped))
            self.n_skipped -= len(self.skipped.pop(oldest))
            self._forget(oldest)
        while self.n_skipped > self.max_skipped:
            oldest = next(iter(self.skipped))
            old_chain = self.skipped[oldest]
            del old_chain[next(iter(old_chain))]
            if not old_chain:
                del self.skipped[oldest]
                self._forget(oldest)
            self.n_skipped -= 1

    # ------------------------------------------------------------- encrypt

    def encrypt(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """Return ``(encrypted header, ciphertext)``."""
        sending, hks = self.sending, self.hks
        if sending is None or hks is None:
            raise StateError("no sending chain yet: the responder must receive first")
        if sending.exhausted:
            raise StateError("sending chain exhausted")
        ns, mk = sending.step()
        key, nonce, hnonce = message_keys(mk)
        header = hnonce + self._aead(hks).encrypt(hnonce, _header(self.dhs_pub, self.pn, ns), b"")
        return header, P.aead_encrypt(key, nonce, plaintext, self.ad + header)

    # ------------------------------------------------------------- decrypt

    def decrypt(self, header: bytes, ciphertext: bytes) -> bytes:
        """Decrypt or raise; on any exception the state is exactly as before."""
        if not isinstance(header, bytes) or len(header) != ENC_HEADER_LEN:
            raise DecryptError("encrypted header has the wrong length")
        if not isinstance(ciphertext, bytes) or len(ciphertext) < P.TAG_LEN:
            raise DecryptError("ciphertext too short")
        hkr = self.hkr
        if hkr is not None:
            hdr = self._open_header(hkr, header)
            if hdr is not None:
                return self._in_current_chain(hdr, header, ciphertext)
        if self.nhkr is not None:
            hdr = self._open_header(self.nhkr, header)
            if hdr is not None:
                return self._in_new_chain(hdr, header, ciphertext)
        for hk, chain in self.skipped.items():
            if hk == self.hkr:
                continue
            hdr = self._open_header(hk, header)
            if hdr is not None:
                if hdr[2] not in chain:
                    raise ReplayError("message key already used or discarded")
                return self._with_skipped(hk, hdr[2], header, ciphertext)
        raise DecryptError("header does not authenticate under any current key")

    def _with_skipped(self, hk: bytes, n: int, header: bytes, ciphertext: bytes) -> bytes:
        plaintext = self._open(self.skipped[hk][n], header, ciphertext)
        chain = self.skipped[hk]
        del chain[n]
        if not chain:
            del self.skipped[hk]
            self._forget(hk)
        self.n_skipped -= 1
        return plaintext

    def _in_current_chain(
        self, hdr: tuple[bytes, int, int], header: bytes, ciphertext: bytes
    ) -> bytes:
        dh_pub, _pn, n = hdr
        hkr, nr, ckr = self.hkr, self.nr, self.ckr
        assert hkr is not None
        if not hmac.compare_digest(dh_pub, self.dhr or b""):
            raise DecryptError("header names a different ratchet key")
        if n == nr and ckr is not None:  # the next message in order: nothing to skip
            ck, mk = kdf_ck(ckr)
            plaintext = self._open(mk, header, ciphertext)
            self.ckr, self.nr = ck, n + 1  # commit
            return plaintext
        if n < nr:
            chain = self.skipped.get(hkr)
            if chain is not None and n in chain:
                return self._with_skipped(hkr, n, header, ciphertext)
            raise ReplayError("message key already used or discarded")
        if n - nr > self.max_skip:
            raise TooFarAhead("message counter too far ahead")
        if ckr is None:
            raise DecryptError("no receiving chain")
        ck, keys = skip_keys(ckr, nr, n)
        ck, mk = kdf_ck(ck)
        plaintext = self._open(mk, header, ciphertext)
        # commit
        self.ckr, self.nr = ck, n + 1
        self._store(hkr, keys)
        return plaintext

    def _in_new_chain(self, hdr: tuple[bytes, int, int], header: bytes, ciphertext: bytes) -> bytes:
        dh_pub, pn, n = hdr
        if n > self.max_skip or (self.ckr is not None and pn - self.nr > self.max_skip):
            raise TooFarAhead("message counter too far ahead")
        P.check_x25519_public(dh_pub)
        old_keys: list[tuple[int, bytes]] = []
        if self.ckr is not None:
            _ck, old_keys = skip_keys(self.ckr, self.nr, pn)
        rk, ckr, nhkr = kdf_rk(self.rk, P.dh(self.dhs, dh_pub))
        dhs = P.x25519_generate()
        rk, cks, nhks = kdf_rk(rk, P.dh(dhs, dh_pub))
        ckr, new_keys = skip_keys(ckr, 0, n)
        ckr, mk = kdf_ck(ckr)
        assert self.nhkr is not None
        plaintext = self._open(mk, header, ciphertext)
        # commit
        if self.hkr is not None:
            self._store(self.hkr, old_keys)
        self.pn, self.nr = self.ns, n + 1
        self.hks, self.hkr = self.nhks, self.nhkr
        self.dhr, self.rk, self.ckr, self.nhkr = dh_pub, rk, ckr, nhkr
        self.dhs, self.dhs_pub, self.nhks = dhs, P.x25519_public_bytes(dhs), nhks
        self.sending = SendingChain(self.dhs_pub, cks)
        self._store(self.hkr, new_keys)
        self._aeads.clear()
        return plaintext

    # ------------------------------------------------------------ persistence

    def reserve_sending(self, reserve: int = SEND_RESERVE) -> None:
        """Let the next :meth:`to_bytes` save the sending chain up to ``reserve`` numbers
        ahead (:meth:`SendingChain.reserve`)."""
        if self.sending is not None:
            self.sending.reserve(reserve)

    def send_mark(self) -> tuple[bytes, int] | None:
        """``(sending chain id, number)`` as :meth:`to_bytes` saves it now; once that
        state is durable, messages below the number may be sent without saving again."""
        return None if self.sending is None else self.sending.mark()

    def covered_by(self, mark: tuple[bytes, int] | None) -> bool:
        """True if a durable state with ``mark`` is past the next message's number in
        this same sending chain (so a crash after sending it cannot reuse its key)."""
        return self.sending is not None and self.sending.covered_by(mark)

    def to_bytes(self) -> bytes:
        """Versioned private state (secret!); the sending chain as reserved."""
        ns, cks = (0, None) if self.sending is None else self.sending.saved()
        w = Writer().u8(STATE_VERSION)
        w.fixed(P.x25519_private_bytes(self.dhs), 32).fixed(self.rk, 32)
        for value in (self.dhr, cks, self.ckr, self.hks, self.hkr, self.nhks, self.nhkr):
            w.u8(value is not None)
            if value is not None:
                w.fixed(value, 32)
        w.u32(ns).u32(self.nr).u32(self.pn).u32(self.max_skip).u32(self.max_skipped)
        w.short(self.ad).u16(len(self.skipped))
        for hk, chain in self.skipped.items():
            w.fixed(hk, 32).u16(len(chain))
            for n, mk in chain.items():
                w.u32(n).fixed(mk, 32)
        return w.getvalue()

    @classmethod
    def read(cls, r: Reader) -> RatchetState:
        r.version(STATE_VERSION)
        dhs = P.x25519_private_from_bytes(r.fixed(32))
        rk = r.fixed(32)
        opts = [r.fixed(32) if r.flag() else None for _ in range(7)]
        ns, nr, pn, max_skip, max_skipped = (r.u32() for _ in range(5))
        state = cls(dhs, rk, r.short())
        state.dhr, cks, state.ckr, state.hks, state.hkr, state.nhks, state.nhkr = opts
        if cks is not None:
            state.sending = SendingChain(state.dhs_pub, cks, ns)
        elif ns:
            raise DecodeError("ratchet state: a sending number without a sending chain")
        state.nr, state.pn = nr, pn
        state.max_skip, state.max_skipped = max_skip, max_skipped
        for _ in range(r.u16()):
            hk = r.fixed(32)
            chain = state.skipped[hk] = {}
            for _ in range(r.u16()):
                n = r.u32()
                chain[n] = r.fixed(32)
            state.n_skipped += len(chain)
        return state

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetState:
        return read_whole(data, "ratchet state", cls.read)
