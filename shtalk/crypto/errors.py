"""The one exception hierarchy of :mod:`shtalk.crypto`.

Everything this package raises on bad input is a :class:`CryptoError`::

    CryptoError
    ├── DecodeError          truncated, oversized, trailing or wrongly typed bytes
    │   └── UnsupportedVersion   a version byte (or kind byte) this code does not know
    ├── BadKey               a public key of the wrong length, off the curve, low order
    ├── BadSignature         an ECDSA signature that does not verify (or is not canonical)
    ├── BadBundle            a pre-key bundle that is refused; always also one of:
    │   ├── BadBundleSignature   (also a BadSignature)
    │   ├── BadBundleKey         (also a BadKey)
    │   ├── BadBundleVersion     (also an UnsupportedVersion)
    │   └── MalformedBundle      (also a DecodeError)
    ├── UnknownPreKey        an initial message names a pre-key we do not have (or used)
    ├── DecryptError         an AEAD tag or a header that does not authenticate
    ├── ReplayError          a message (or room message index) that was already decrypted
    ├── TooFarAhead          a counter jump beyond the per-chain limit (MAX_SKIP)
    └── StateError           an operation the state does not allow (e.g. no sending key)

Messages never contain secret material: they name the field or the check that
failed, never a key, a plaintext or a derived value.  A caller that only wants
"refuse it" catches :class:`CryptoError`; the subclasses let the client tell
the user *why* (e.g. a changed identity versus a corrupted message).
"""

from __future__ import annotations

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
    "MalformedBundle",
    "ReplayError",
    "StateError",
    "TooFarAhead",
    "UnknownPreKey",
    "UnsupportedVersion",
]


class CryptoError(Exception):
    """Base class: input refused or operation impossible; no state was changed."""


class DecodeError(CryptoError):
    """Bytes that do not parse: truncated, oversized, trailing data, wrong type."""


class UnsupportedVersion(DecodeError):
    """A version (or type/kind) byte that this implementation does not support."""


class BadKey(CryptoError):
    """A public key that is malformed, of the wrong length, or of low order."""


class BadSignature(CryptoError):
    """An ECDSA P-256 signature that does not verify or is not in canonical form."""


class BadBundle(CryptoError):
    """A published pre-key bundle that must not be used."""


class BadBundleSignature(BadBundle, BadSignature):
    """A bundle whose identity or pre-key signature does not verify."""


class BadBundleKey(BadBundle, BadKey):
    """A bundle with a key of the wrong length, low order or off the curve."""


class BadBundleVersion(BadBundle, UnsupportedVersion):
    """A bundle (or one of its parts) with a version we do not know."""


class MalformedBundle(BadBundle, DecodeError):
    """A bundle that does not parse (truncated, trailing bytes, bad counts)."""


class UnknownPreKey(CryptoError):
    """An initial message names a pre-key that does not exist or was consumed."""


class DecryptError(CryptoError):
    """Authentication failed: wrong key, flipped bit, wrong associated data."""


class ReplayError(CryptoError):
    """The message was already decrypted once (its key has been deleted)."""


class TooFarAhead(CryptoError):
    """The message counter jumps further ahead than the limit allows."""


class StateError(CryptoError):
    """The session or room state cannot do this (e.g. no current sender key)."""
