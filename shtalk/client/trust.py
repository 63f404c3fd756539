"""Trust on first use for contacts' devices, with changes that must be acknowledged.

A contact device's identity key is pinned the first time we see it.  A later,
different key does not replace the pin: it waits in ``pending`` and the device
is "changed" until the user accepts it (``accept``), so nobody -- the server
included -- can swap a key silently.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, replace
from functools import lru_cache

from shtalk.crypto import IdentityKey


@lru_cache(maxsize=4096)
def _parse_identity(raw: bytes) -> IdentityKey:
    """Parsing checks the DH key's ECDSA signature and loads the verifier: both cost as
    much as a message's own verification, so a pinned key is parsed once, not per message
    (IdentityKey is immutable; the bytes are the cache key)."""
    return IdentityKey.from_bytes(raw)


TOFU = "tofu"
VERIFIED = "verified"
CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class ContactDevice:
    user: str
    device: str
    identity: bytes  # IdentityKey.to_bytes() of the pinned key
    state: str = TOFU
    pending: bytes | None = None  # a different key the device now presents
    first_seen: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.user}/{self.device}"

    def identity_key(self) -> IdentityKey:
        return _parse_identity(self.identity)

    def presents(self, identity: IdentityKey) -> ContactDevice:
        """The record after seeing ``identity``: unchanged, or flagged as changed."""
        raw = identity.to_bytes()
        if raw == self.identity:
            return self
        return replace(self, state=CHANGED, pending=raw)

    def accepted(self) -> ContactDevice:
        if self.pending is None:
            return replace(self, state=TOFU) if self.state == CHANGED else self
        return replace(self, identity=self.pending, pending=None, state=TOFU)

    def verified(self) -> ContactDevice:
        return replace(self, state=VERIFIED)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "user": self.user,
                "device": self.device,
                "identity": base64.b64encode(self.identity).decode(),
                "state": self.state,
                "pending": base64.b64encode(self.pending).decode() if self.pending else None,
                "first_seen": self.first_seen,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ContactDevice:
        obj = json.loads(data)
        return cls(
            obj["user"],
            obj["device"],
            base64.b64decode(obj["identity"]),
            obj["state"],
            base64.b64decode(obj["pending"]) if obj.get("pending") else None,
            float(obj.get("first_seen", 0.0)),
        )

    @classmethod
    def first(cls, user: str, device: str, identity: IdentityKey) -> ContactDevice:
        return cls(user, device, identity.to_bytes(), TOFU, None, time.time())
