"""Sender Keys for rooms: encrypt once, every member decrypts.

Per member, per room, per *epoch*, a sender key is a chain key (HMAC-SHA256
ratchet as in the Double Ratchet's symmetric chains) and a P-256 signing key.
The member hands the chain key and the public signing key to every other
member in a :class:`SenderKeyDistribution`, sent over the pairwise sessions
(so it is end-to-end encrypted and signed by the member's identity key).

Room message (all integers big-endian)::

    header     = u8 version (1) | u32 epoch | u32 index
    ciphertext = AES-256-GCM(key, nonce, plaintext, ad) || signature (64 bytes)
    ad         = "shtalk/v1 room\\0" | u16 room | u16 sender user | u16 sender device | header
    signature  = ECDSA P-256 (sender key's signing key) over ad || AES-GCM output
    message key mk = HMAC(ck, 0x01), next ck = HMAC(ck, 0x02)
    key || nonce   = HKDF-SHA256(IKM = mk, salt = 32 zero bytes, "shtalk/v1 room message", 44)

A receiver verifies the signature first, then ratchets forward at most
``MAX_JUMP`` steps (keeping up to ``MAX_SKIPPED`` skipped keys per sender chain,
oldest evicted first) and refuses a repeated ``(sender, epoch, index)``.
Decryption is transactional like the Double Ratchet's.

Membership change: every remaining member calls :meth:`RoomSession.rotate` (new
epoch, new chain key and signing key) and sends the distribution only to the
members at that moment.  A removed member never receives the new chain keys; a
late joiner only receives keys of the new epoch, whose chains start after every
earlier message.  Sender Keys have no post-compromise security within an epoch:
rotating is the recovery, so the client also rotates its own key after a number of
messages or a time (``epoch_started``, ``index``: see ``shtalk.client.rotation``).

Saving ahead, with the Double Ratchet's :class:`shtalk.crypto.chain.SendingChain`:
:meth:`RoomSession.reserve_sending` lets the saved own state run up to
``SEND_RESERVE`` indexes ahead, so a room message can leave before its commit and a
crash never reuses an index (members skip the gap).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from . import primitives as P
from .chain import SendingChain, kdf_ck, skip_keys
from .encoding import Reader, Writer
from .errors import DecodeError, ReplayError, StateError, TooFarAhead
from .ratchet import SEND_RESERVE

__all__ = ["MAX_JUMP", "MAX_SKIPPED", "RoomSession", "SenderKeyDistribution"]

VERSION = 1
#: RoomSession.to_bytes: 2 adds when the own epoch started (1 is still read)
STATE_VERSION = 2
MAX_JUMP = 2000
MAX_SKIPPED = 2000
KEEP_EPOCHS = 2  #: epochs kept per sender (the current one and the previous)
_LABEL = b"shtalk/v1 room\x00"
_DIST_LABEL_VERSION = 1
_INFO = b"shtalk/v1 room message"

def _keys(mk: bytes) -> tuple[bytes, bytes]:
    out = P.hkdf(mk, None, _INFO, 44)
    return out[:32], out[32:]


@dataclass(frozen=True)
class SenderKeyDistribution:
    """A member's sender key for one room and epoch, starting at ``index``."""

    room: str
    epoch: int
    index: int
    chain_key: bytes
    signing_public: bytes

    def to_bytes(self) -> bytes:
        w = Writer().u8(_DIST_LABEL_VERSION).text(self.room).u32(self.epoch).u32(self.index)
        w.fixed(self.chain_key, 32).fixed(self.signing_public, P.SIGNING_PUB_LEN)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SenderKeyDistribution:
        r = Reader(data, "sender key distribution")
        r.version(_DIST_LABEL_VERSION)
        dist = cls(r.text(256), r.u32(), r.u32(), r.fixed(32), r.fixed(P.SIGNING_PUB_LEN))
        r.done()
        P.load_signing_public(dist.signing_public)
        return dist


class _Chain:
    """A receiving chain: one sender, one epoch."""

    __slots__ = ("chain_key", "index", "signing_public", "skipped", "verifier")

    def __init__(self, chain_key: bytes, index: int, signing_public: bytes) -> None:
        self.chain_key = chain_key
        self.index = index
        self.signing_public = signing_public
        self.verifier = P.load_signing_public(signing_public)
        self.skipped: dict[int, bytes] = {}


def _ad(room: str, user: str, device: str, header: bytes) -> bytes:
    return _LABEL + Writer().text(room).text(user).text(device).raw(header).getvalue()


class RoomSession:
    """This device's Sender Keys state for one room: its own key and everyone else's."""

    __slots__ = (
        "chains", "device", "epoch", "epoch_started", "own", "room", "signing_key", "user",
    )

    def __init__(self, room: str, user: str, device: str) -> None:
        self.room, self.user, self.device = room, user, device
        self.epoch: int | None = None
        #: the own chain of this epoch, named by its signing key (None before rotate)
        self.own: SendingChain | None = None
        #: Unix seconds when the own epoch started (0: unknown)
        self.epoch_started = 0
        self.signing_key: ec.EllipticCurvePrivateKey | None = None
        #: (user, device) -> {epoch -> chain}
        self.chains: dict[tuple[str, str], dict[int, _Chain]] = {}

    @property
    def index(self) -> int:
        """The own chain's next index: also how many messages this epoch has sent
        (a crash skips some)."""
        return 0 if self.own is None else self.own.index

    def _begin(
        self, epoch: int, signing_key: ec.EllipticCurvePrivateKey, ck: bytes, index: int = 0
    ) -> None:
        self.epoch, self.signing_key = epoch, signing_key
        self.own = SendingChain(P.signing_public_bytes(signing_key), ck, index)

    # ------------------------------------------------------------ sending

    def rotate(self, epoch: int | None = None, now: int = 0) -> SenderKeyDistribution:
        """Start a new epoch with a fresh sender key; send the result to every member.
        ``now`` (Unix seconds) is kept as :attr:`epoch_started`."""
        if epoch is None:
            epoch = 0 if self.epoch is None else self.epoch + 1
        if self.epoch is not None and epoch <= self.epoch:
            raise StateError("epochs only move forward")
        if epoch > 0xFFFFFFFF:
            raise StateError("epoch out of range")
        self._begin(epoch, P.signing_generate(), P.random_bytes(32))
        self.epoch_started = now
        return self.distribution()

    def distribution(self) -> SenderKeyDistribution:
        """The current sender key from the current index (earlier messages stay sealed)."""
        own = self.own
        if self.epoch is None or own is None:
            raise StateError("no sender key yet: call rotate()")
        return SenderKeyDistribution(self.room, self.epoch, own.index, own.key, own.ident)

    def encrypt(self, plaintext: bytes) -> tuple[bytes, bytes]:
        """Return ``(header, ciphertext)`` for a room envelope."""
        own = self.own
        if self.epoch is None or own is None or self.signing_key is None:
            raise StateError("no sender key yet: call rotate()")
        if own.exhausted:
            raise StateError("sender chain exhausted: rotate()")
        index, mk = own.step()
        header = Writer().u8(VERSION).u32(self.epoch).u32(index).getvalue()
        key, nonce = _keys(mk)
        ad = _ad(self.room, self.user, self.device, header)
        body = P.aead_encrypt(key, nonce, plaintext, ad)
        return header, body + P.sign(self.signing_key, ad + body)

    def reserve_sending(self, reserve: int = SEND_RESERVE) -> None:
        """Let :meth:`to_bytes` save the own chain up to ``reserve`` indexes ahead
        (:meth:`SendingChain.reserve`); the keys in between are never saved."""
        if self.own is not None:
            self.own.reserve(reserve)

    def send_mark(self) -> tuple[bytes, int] | None:
        """``(own chain id, index)`` as :meth:`to_bytes` saves it now."""
        return None if self.own is None else self.own.mark()

    def covered_by(self, mark: tuple[bytes, int] | None) -> bool:
        """True if a durable state with ``mark`` is past the next index of this chain."""
        return self.own is not None and self.own.covered_by(mark)

    # ---------------------------------------------------------- receiving

    def add_distribution(self, sender_user: str, sender_device: str, data: bytes) -> None:
        """Install a member's sender key (``data`` came over their pairwise session)."""
        dist = SenderKeyDistribution.from_bytes(data)
        if dist.room != self.room:
            raise StateError("sender key is for another room")
        epochs = self.chains.setdefault((sender_user, sender_device), {})
        have = epochs.get(dist.epoch)
        if have is not None:
            if have.signing_public == dist.signing_public:
                return  # a resend: keep our state, never rewind the chain
            raise StateError("conflicting sender key for this epoch")
        if epochs and dist.epoch < max(epochs) - (KEEP_EPOCHS - 1):
            raise StateError("sender key for an outdated epoch")
        epochs[dist.epoch] = _Chain(dist.chain_key, dist.index, dist.signing_public)
        for old in sorted(epochs)[:-KEEP_EPOCHS]:
            del epochs[old]

    def remove_member(self, user: str, device: str | None = None) -> None:
        """Forget a removed member's sender keys (then :meth:`rotate` our own)."""
        for key in [k for k in self.chains if k[0] == user and device in (None, k[1])]:
            del self.chains[key]

    def decrypt(
        self, sender_user: str, sender_device: str, header: bytes, ciphertext: bytes
    ) -> bytes:
        """Verify, then decrypt; the state is unchanged on any failure."""
        r = Reader(header, "room message header")
        r.version(VERSION)
        epoch, index = r.u32(), r.u32()
        r.done()
        chain = self.chains.get((sender_user, sender_device), {}).get(epoch)
        if chain is None:
            raise StateError("no sender key for this sender and epoch")
        if len(ciphertext) < P.TAG_LEN + P.SIG_LEN:
            raise DecodeError("room message too short")
        body, signature = ciphertext[: -P.SIG_LEN], ciphertext[-P.SIG_LEN :]
        ad = _ad(self.room, sender_user, sender_device, header)
        P.verify(chain.verifier, signature, ad + body)
        if index < chain.index:
            mk = chain.skipped.get(index)
            if mk is None:
                raise ReplayError("room message already decrypted (or before our key)")
            key, nonce = _keys(mk)
            plaintext = P.aead_decrypt(key, nonce, body, ad)
            del chain.skipped[index]
            return plaintext
        if index - chain.index > MAX_JUMP:
            raise TooFarAhead("room message index too far ahead")
        ck, skipped = skip_keys(chain.chain_key, chain.index, index)
        ck, mk = kdf_ck(ck)
        key, nonce = _keys(mk)
        plaintext = P.aead_decrypt(key, nonce, body, ad)
        # commit
        chain.chain_key, chain.index = ck, index + 1
        chain.skipped.update(skipped)
        while len(chain.skipped) > MAX_SKIPPED:
            del chain.skipped[next(iter(chain.skipped))]
        return plaintext

    # --------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        w = Writer().u8(STATE_VERSION).text(self.room).text(self.user).text(self.device)
        w.u8(self.epoch is not None)
        if self.epoch is not None and self.own is not None and self.signing_key is not None:
            index, ck = self.own.saved()
            w.u32(self.epoch).u32(index).fixed(ck, 32)
            w.fixed(P.signing_private_bytes(self.signing_key), 32).u64(self.epoch_started)
        w.u32(len(self.chains))
        for (user, device), epochs in self.chains.items():
            w.text(user).text(device).u8(len(epochs))
            for epoch, chain in epochs.items():
                w.u32(epoch).u32(chain.index).fixed(chain.chain_key, 32)
                w.fixed(chain.signing_public, P.SIGNING_PUB_LEN).u16(len(chain.skipped))
                for i, mk in chain.skipped.items():
                    w.u32(i).fixed(mk, 32)
        return w.getvalue()

    # Persistence proportional to the change: our own sending state and each sender chain
    # as separate values, so decrypting one message rewrites one small chain, not the
    # whole room.  Formats (big-endian, like ``to_bytes``)::
    #
    #     own   = to_bytes() of this session with no sender chains (the same layout;
    #             version 2 adds u64 epoch_started after the signing key)
    #     chain = u8 version (1) | u16 room | u16 user | u16 device | u32 epoch
    #             | u32 index | chain key (32) | signing public (33)
    #             | u16 skipped count | (u32 index | message key (32))*

    def chain_ids(self) -> list[tuple[str, str, int]]:
        """Every stored sender chain as ``(user, device, epoch)``."""
        return [(u, d, e) for (u, d), epochs in self.chains.items() for e in epochs]

    @staticmethod
    def header_epoch(header: bytes) -> int:
        """The epoch a room message header names (which chain ``decrypt`` advances)."""
        r = Reader(header, "room message header")
        r.version(VERSION)
        epoch = r.u32()
        r.u32()
        r.done()
        return epoch

    def own_to_bytes(self) -> bytes:
        """Our own sending state (epoch, index, chain key, signing key) without the chains."""
        chains, self.chains = self.chains, {}
        try:
            return self.to_bytes()
        finally:
            self.chains = chains

    def chain_to_bytes(self, user: str, device: str, epoch: int) -> bytes:
        """One sender chain (KeyError if there is none)."""
        chain = self.chains[(user, device)][epoch]
        w = Writer().u8(VERSION).text(self.room).text(user).text(device).u32(epoch)
        w.u32(chain.index).fixed(chain.chain_key, 32)
        w.fixed(chain.signing_public, P.SIGNING_PUB_LEN).u16(len(chain.skipped))
        for i, mk in chain.skipped.items():
            w.u32(i).fixed(mk, 32)
        return w.getvalue()

    def load_chain(self, data: bytes) -> tuple[str, str, int]:
        """Install a chain from :meth:`chain_to_bytes` (replacing one with the same id)."""
        r = Reader(data, "room sender chain")
        r.version(VERSION)
        room, user, device = r.text(256), r.text(256), r.text(256)
        if room != self.room:
            raise StateError("sender chain is for another room")
        epoch, index, ck = r.u32(), r.u32(), r.fixed(32)
        chain = _Chain(ck, index, r.fixed(P.SIGNING_PUB_LEN))
        for _ in range(r.u16()):
            i = r.u32()
            chain.skipped[i] = r.fixed(32)
        r.done()
        self.chains.setdefault((user, device), {})[epoch] = chain
        return user, device, epoch

    @classmethod
    def from_parts(cls, own: bytes, chains: list[bytes]) -> RoomSession:
        """The inverse of :meth:`own_to_bytes` plus :meth:`chain_to_bytes` of each chain."""
        state = cls.from_bytes(own)
        for data in chains:
            state.load_chain(data)
        return state

    @classmethod
    def from_bytes(cls, data: bytes) -> RoomSession:
        r = Reader(data, "room session")
        version = r.version(VERSION, STATE_VERSION)
        state = cls(r.text(256), r.text(256), r.text(256))
        if r.flag():
            epoch, index, ck = r.u32(), r.u32(), r.fixed(32)
            state._begin(epoch, P.signing_private_from_bytes(r.fixed(32)), ck, index)
            state.epoch_started = r.u64() if version == STATE_VERSION else 0
        count = r.u32()
        if count > r.remaining:
            raise DecodeError("room session: bad member count")
        for _ in range(count):
            epochs = state.chains[(r.text(256), r.text(256))] = {}
            for _ in range(r.u8()):
                epoch, index, ck = r.u32(), r.u32(), r.fixed(32)
                chain = epochs[epoch] = _Chain(ck, index, r.fixed(P.SIGNING_PUB_LEN))
                for _ in range(r.u16()):
                    i = r.u32()
                    chain.skipped[i] = r.fixed(32)
        r.done()
        return state
