"""shtalk's end-to-end encryption core: sans-IO, bytes and state objects in and out.

Nothing here does I/O, imports Twisted or keeps global mutable state; randomness
comes from ``os.urandom`` and ``cryptography``'s key generation.  Every state
object serialises to versioned bytes (``to_bytes``/``from_bytes``) that the
client seals before storing.  All errors are :class:`CryptoError` subclasses.

Modules: :mod:`.identity` (device keys, pre-keys), :mod:`.bundle` (the public
keys a device publishes), :mod:`.pqxdh`,
:mod:`.ratchet` (Double Ratchet with header encryption), :mod:`.chain` (the
symmetric-key chain it shares with Sender Keys), :mod:`.session`
(pairwise sessions, sealing/opening envelopes), :mod:`.envelope` (the signed
wire envelope), :mod:`.senderkeys` (rooms), :mod:`.safety` (safety numbers),
:mod:`.errors`, :mod:`.encoding`, :mod:`.primitives`.

The design and the byte layouts: docs/SECURITY.md and docs/PROTOCOL-E2EE.md.
"""

from .bundle import IdentityKey, KemPreKey, OneTimePreKey, PreKeyBundle, SignedPreKey
from .envelope import Envelope, MessageType, Recipient
from .errors import (
    BadBundle,
    BadBundleKey,
    BadBundleSignature,
    BadBundleVersion,
    BadKey,
    BadSignature,
    CryptoError,
    DecodeError,
    DecryptError,
    MalformedBundle,
    ReplayError,
    StateError,
    TooFarAhead,
    UnknownPreKey,
    UnsupportedVersion,
)
from .identity import DeviceIdentity
from .pqxdh import InitialMessage
from .safety import safety_number, safety_number_digits
from .senderkeys import RoomSession, SenderKeyDistribution
from .session import Session, accept, open_envelope, parse_prekey_header, prekey_identity, seal

__all__ = [
    "BadBundle",
    "BadBundleKey",
    "BadBundleSignature",
    "BadBundleVersion",
    "BadKey",
    "BadSignature",
    "CryptoError",
    "DecodeError",
    "DecryptError",
    "DeviceIdentity",
    "Envelope",
    "IdentityKey",
    "InitialMessage",
    "KemPreKey",
    "MalformedBundle",
    "MessageType",
    "OneTimePreKey",
    "PreKeyBundle",
    "Recipient",
    "ReplayError",
    "RoomSession",
    "SenderKeyDistribution",
    "Session",
    "SignedPreKey",
    "StateError",
    "TooFarAhead",
    "UnknownPreKey",
    "UnsupportedVersion",
    "accept",
    "open_envelope",
    "parse_prekey_header",
    "prekey_identity",
    "safety_number",
    "safety_number_digits",
    "seal",
]
