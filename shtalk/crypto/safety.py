"""Safety numbers: what two people compare to verify each other's identity.

Signal's numeric fingerprint (version 0), with our identity encoding:

    digest_0 = SHA-512(0x00 0x00 || Encode(IK) || stable id)
    digest_i = SHA-512(digest_{i-1} || Encode(IK))      for i = 1 .. 5200
    half     = first 30 bytes of digest_5200, cut into six 5-byte big-endian
               integers, each shown as (value mod 100000) with five digits

``Encode(IK)`` is :meth:`IdentityKey.encode` (signing key and DH key), the stable
id is the UTF-8 of ``"user/device"`` (each device has its own identity).  The
number shown is the two 30-digit halves, the smaller one first, so both sides
display the same 60 digits, in twelve groups of five.  Any change of either
identity key or id changes the number.
"""

from __future__ import annotations

import hashlib

from .bundle import IdentityKey

__all__ = ["ITERATIONS", "safety_number", "safety_number_digits"]

ITERATIONS = 5200
_VERSION = b"\x00\x00"


def _half(identity: IdentityKey, stable_id: str) -> str:
    key = identity.encode()
    digest = hashlib.sha512(_VERSION + key + stable_id.encode("utf-8")).digest()
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + key).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )


def safety_number_digits(
    local_id: str, local: IdentityKey, remote_id: str, remote: IdentityKey
) -> str:
    """The 60 digits without spaces (the same on both sides)."""
    a, b = _half(local, local_id), _half(remote, remote_id)
    return a + b if a <= b else b + a


def safety_number(local_id: str, local: IdentityKey, remote_id: str, remote: IdentityKey) -> str:
    """60 digits in twelve groups of five, e.g. ``"12345 67890 ..."``."""
    digits = safety_number_digits(local_id, local, remote_id, remote)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))
