"""Pairwise sessions: PQXDH + Double Ratchet, and sealing/opening envelopes.

Typical use by the client::

    # Alice, with Bob's bundle fetched from the directory
    session = Session.initiate(alice, PreKeyBundle.from_bytes(bundle_bytes))
    env = seal(alice, session, b"hi", sender_user="alice", sender_device="laptop",
               recipient=Recipient.user("bob", "phone"), timestamp=now_ms)
    wire = env.to_bytes()                     # base64 into the server's envelope field

    # Bob
    env = Envelope.from_bytes(wire)
    if env.type is MessageType.PREKEY:
        claimed = prekey_identity(env)        # compare with the pinned key (TOFU)
    session, plaintext = open_envelope(bob, env, existing_session_or_None)
    # persist bob (one-time pre-key consumed) and session.to_bytes() atomically

Until the initiator has decrypted a reply, every message it sends is a
:attr:`MessageType.PREKEY` message carrying the PQXDH initial data, so losing the
first message does not lose the session.  The responder decrypts later pre-key
messages of the same session with that session (:meth:`Session.matches`); a
pre-key message with a new ephemeral key starts a new session through
:func:`accept`, which refuses a consumed one-time pre-key.

Pre-key message header: ``u8 version (1) | u16 len | initial message | ratchet
header (68 bytes)``; a normal message's header is the 68-byte ratchet header.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.asymmetric import x25519

from . import pqxdh
from .bundle import IdentityKey, PreKeyBundle
from .encoding import Reader, Writer
from .envelope import Envelope, MessageType, Recipient
from .errors import CryptoError, StateError
from .identity import DeviceIdentity
from .ratchet import ENC_HEADER_LEN, RatchetState

__all__ = [
    "Session",
    "accept",
    "open_envelope",
    "parse_prekey_header",
    "prekey_identity",
    "seal",
]

VERSION = 1
_PREKEY_HEADER_VERSION = 1


def parse_prekey_header(header: bytes) -> tuple[pqxdh.InitialMessage, bytes]:
    """Split a pre-key message header into the initial message and the ratchet header."""
    r = Reader(header, "pre-key header")
    r.version(_PREKEY_HEADER_VERSION)
    initial = pqxdh.InitialMessage.from_bytes(r.short(4096))
    ratchet_header = r.fixed(ENC_HEADER_LEN)
    r.done()
    return initial, ratchet_header


class Session:
    """One pairwise session with one remote device."""

    __slots__ = ("initial", "initial_digest", "ratchet", "remote_identity")

    def __init__(
        self,
        ratchet: RatchetState,
        remote_identity: IdentityKey,
        initial_digest: bytes,
        initial: pqxdh.InitialMessage | None = None,
    ) -> None:
        self.ratchet = ratchet
        self.remote_identity = remote_identity
        #: SHA-256 of the PQXDH initial message that started this session
        self.initial_digest = initial_digest
        self.initial = initial  #: set on the initiator until a reply decrypts

    @classmethod
    def initiate(
        cls,
        identity: DeviceIdentity,
        bundle: PreKeyBundle,
        *,
        ephemeral: x25519.X25519PrivateKey | None = None,
        kem_result: tuple[bytes, bytes] | None = None,
        ratchet_key: x25519.X25519PrivateKey | None = None,
    ) -> Session:
        """Start a session from a fetched bundle (keyword arguments: test vectors only)."""
        keys, initial = pqxdh.initiate(identity, bundle, ephemeral=ephemeral, kem_result=kem_result)
        ratchet = RatchetState.init_initiator(
            keys.root_key, keys.ad, bundle.signed_prekey.public, keys.hka, keys.nhkb,
            ratchet_key=ratchet_key,
        )
        return cls(ratchet, bundle.identity, initial.digest(), initial)

    def matches(self, header: bytes) -> bool:
        """True if a pre-key message ``header`` belongs to this session."""
        try:
            initial, _ = parse_prekey_header(header)
        except CryptoError:
            return False
        return hmac.compare_digest(initial.digest(), self.initial_digest)

    def encrypt(self, plaintext: bytes) -> tuple[MessageType, bytes, bytes]:
        """Return ``(type, header, ciphertext)`` for an envelope."""
        header, ciphertext = self.ratchet.encrypt(plaintext)
        if self.initial is None:
            return MessageType.MESSAGE, header, ciphertext
        w = Writer().u8(_PREKEY_HEADER_VERSION).short(self.initial.to_bytes()).raw(header)
        return MessageType.PREKEY, w.getvalue(), ciphertext

    def decrypt(self, type: MessageType, header: bytes, ciphertext: bytes) -> bytes:
        """Decrypt a message of this session; the state is unchanged on failure."""
        if type == MessageType.PREKEY:
            initial, header = parse_prekey_header(header)
            if not hmac.compare_digest(initial.digest(), self.initial_digest):
                raise StateError("pre-key message of another session: use accept()")
        elif type != MessageType.MESSAGE:
            raise StateError("not a pairwise message")
        plaintext = self.ratchet.decrypt(header, ciphertext)
        self.initial = None  # the peer has answered (or resent): stop sending pre-key data
        return plaintext

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).short(self.remote_identity.to_bytes())
        w.fixed(self.initial_digest, 32)
        w.u8(self.initial is not None)
        if self.initial is not None:
            w.short(self.initial.to_bytes())
        return w.raw(self.ratchet.to_bytes()).getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        r = Reader(data, "session")
        r.version(VERSION)
        remote = IdentityKey.from_bytes(r.short(256))
        digest = r.fixed(32)
        initial = pqxdh.InitialMessage.from_bytes(r.short(4096)) if r.flag() else None
        ratchet = RatchetState.read(r)
        r.done()
        return cls(ratchet, remote, digest, initial)


def accept(identity: DeviceIdentity, header: bytes, ciphertext: bytes) -> tuple[Session, bytes]:
    """Bob: run PQXDH on a pre-key message and decrypt it.

    On success the one-time pre-keys it used are removed from ``identity`` (persist
    both).  On any failure ``identity`` is unchanged and nothing is returned.
    """
    initial, ratchet_header = parse_prekey_header(header)
    keys, spk = pqxdh.respond(identity, initial)
    ratchet = RatchetState.init_responder(keys.root_key, keys.ad, spk, keys.hka, keys.nhkb)
    plaintext = ratchet.decrypt(ratchet_header, ciphertext)
    pqxdh.consume(identity, initial)
    return Session(ratchet, initial.identity, initial.digest()), plaintext


def prekey_identity(envelope: Envelope) -> IdentityKey:
    """The identity a pre-key envelope claims (check it against the pinned key)."""
    if envelope.type is not MessageType.PREKEY:
        raise StateError("not a pre-key message")
    return parse_prekey_header(envelope.header)[0].identity


def seal(
    identity: DeviceIdentity,
    session: Session,
    plaintext: bytes,
    *,
    sender_user: str,
    sender_device: str,
    recipient: Recipient,
    timestamp: int,
) -> Envelope:
    """Encrypt with ``session`` and sign with ``identity``: a ready envelope."""
    kind, header, ciphertext = session.encrypt(plaintext)
    return Envelope.seal(
        identity, type=kind, sender_user=sender_user, sender_device=sender_device,
        recipient=recipient, header=header, ciphertext=ciphertext, timestamp=timestamp,
    )


def open_envelope(
    identity: DeviceIdentity, envelope: Envelope, session: Session | None = None
) -> tuple[Session, bytes]:
    """Verify the signature, then decrypt; returns the (possibly new) session.

    ``session`` is the client's current session with the envelope's sender
    device, if any.  A pre-key message that does not belong to it starts a new
    session with :func:`accept` (the caller decides whether to replace the old one
    and must have checked :func:`prekey_identity` against its pinned key).
    """
    if envelope.type is MessageType.PREKEY:
        claimed = prekey_identity(envelope)
        envelope.verify(claimed)
        if session is not None and session.matches(envelope.header):
            return session, session.decrypt(envelope.type, envelope.header, envelope.ciphertext)
        return accept(identity, envelope.header, envelope.ciphertext)
    if envelope.type is not MessageType.MESSAGE:
        raise StateError("not a pairwise message")
    if session is None:
        raise StateError("no session with this device")
    envelope.verify(session.remote_identity)
    return session, session.decrypt(envelope.type, envelope.header, envelope.ciphertext)

