"""TOTP (RFC 6238) with pyotp, plus what pyotp leaves to us: replay protection, sealing
the secret at rest, recovery codes, and the emailed codes' format.

* Secrets: 160 bits from the CSPRNG (``pyotp.random_base32()``: 32 base32 characters),
  HMAC-SHA1, 6 digits, 30-second steps: what every authenticator app understands.
* `match_step` accepts the current step and one step either side (RFC 6238 5.2: at most
  one step of network delay / clock drift) and returns *which* step matched, so the store
  can refuse any step at or below the last accepted one: a code is never accepted twice,
  even inside its own window (pyotp's ``verify`` would say yes twice).
* `SecretBox`: AES-256-GCM under a key derived (HKDF-SHA256, own label) from the
  server's storage key, the account id as associated data (a sealed secret copied to
  another account does not open).
* Recovery codes and emailed codes are random strings from Crockford's base32 alphabet,
  stored only as SHA-256 hashes (they are high-entropy, so a slow hash buys nothing).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

STEP = 30
DIGITS = 6
SKEW = 1
RECOVERY_CODES = 10
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CONFUSABLE = str.maketrans({"O": "0", "I": "1", "L": "1", "U": "V"})


def new_secret() -> str:
    """A base32 TOTP secret of 160 random bits."""
    return pyotp.random_base32(length=32)


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """``otpauth://totp/Issuer:account?secret=...&issuer=...`` for authenticator apps."""
    uri: str = pyotp.TOTP(secret, digits=DIGITS, interval=STEP).provisioning_uri(
        name=account, issuer_name=issuer
    )
    return uri


def step_of(now: float) -> int:
    return int(now // STEP)


def is_totp_code(code: str) -> bool:
    c = "".join(code.split())
    return len(c) == DIGITS and c.isdigit()


def match_step(secret: str, code: str, now: float, last_step: int) -> int | None:
    """The step (now-1, now or now+1) whose code equals ``code`` and which is later than
    ``last_step``; None otherwise.  All three candidates are always computed."""
    code = "".join(code.split())
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    current = step_of(now)
    found: int | None = None
    for step in range(current - SKEW, current + SKEW + 1):
        expected = totp.generate_otp(step)
        if hmac.compare_digest(expected.encode(), code.encode()) and step > last_step:
            found = step
    return found


def random_code(symbols: int) -> str:
    return "".join(secrets.choice(CROCKFORD) for _ in range(symbols))


def group(code: str, size: int = 4) -> str:
    return "-".join(code[i : i + size] for i in range(0, len(code), size))


def normalise_code(code: str) -> str:
    """Case, spaces and dashes ignored; O/I/L read as 0/1/1 (Crockford)."""
    return "".join(code.split()).replace("-", "").upper().translate(_CONFUSABLE)


def code_hash(code: str) -> bytes:
    return hashlib.sha256(normalise_code(code).encode()).digest()


def new_email_code() -> str:
    """28 symbols of 5 bits = 140 bits (ASVS 11.5.1 asks >= 128), grouped by four."""
    return group(random_code(28))


def new_recovery_codes(n: int = RECOVERY_CODES) -> list[str]:
    """Ten codes of 16 symbols (80 bits) each, grouped by four."""
    return [group(random_code(16)) for _ in range(n)]


class SecretBox:
    """Seals TOTP secrets with AES-256-GCM under a key derived from the storage key."""

    LABEL = b"shtalk totp secret v1"

    def __init__(self, storage_key: bytes) -> None:
        key = HKDF(hashes.SHA256(), 32, salt=None, info=self.LABEL).derive(storage_key)
        self._aead = AESGCM(key)

    def _ad(self, user_id: int) -> bytes:
        return self.LABEL + struct.pack(">q", user_id)

    def seal(self, user_id: int, secret: str) -> bytes:
        nonce = os.urandom(12)
        return b"\x01" + nonce + self._aead.encrypt(nonce, secret.encode(), self._ad(user_id))

    def open(self, user_id: int, sealed: bytes) -> str | None:
        if len(sealed) < 13 or sealed[0] != 1:
            return None
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], self._ad(user_id)).decode()
        except (InvalidTag, UnicodeDecodeError):
            return None

