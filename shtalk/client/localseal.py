"""Keys and sealing of the local store: the passphrase's key (Argon2id), the data key
it wraps, and the subkeys that seal values (AES-256-GCM) and hash names (HMAC-SHA256).

Apart from the tables (``localschema``) because this is the part a reviewer checks
against docs/SECURITY.md, "Client local store": what is derived from what, and what
every sealed value is bound to (its associated data), so a value copied to another
row, or a clear column edited, fails to open (`CorruptEntry`).  ``derive_kek`` is slow
on purpose and runs in the reactor's thread pool; the rest runs in the store's thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shtalk.client.errors import CorruptEntry, LocalStoreError, WrongPassphrase


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the file so ``open`` needs none.

    Defaults: 64 MiB, 3 passes, 4 lanes, about 0.3 s on the reference machine
    (docs/SECURITY.md).  Above OWASP's minimum (19 MiB, t=2, p=1) and RFC 9106's
    second recommended option (64 MiB, t=3, p=4): an unlock happens once per
    start, so a third of a second is affordable while each offline guess costs
    64 MiB of memory bandwidth.
    """

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        """Refuse nonsense and (from a tampered file) denial-of-service sized values."""
        if not 1 <= self.lanes <= 64:
            raise LocalStoreError(f"argon2id lanes {self.lanes} out of range 1..64")
        if not 8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024:
            raise LocalStoreError(f"argon2id memory {self.memory_kib} KiB out of range")
        if not 1 <= self.iterations <= 64:
            raise LocalStoreError(f"argon2id iterations {self.iterations} out of range 1..64")

    def encode(self) -> bytes:
        return f"argon2id;m={self.memory_kib};t={self.iterations};p={self.lanes}".encode()

    @classmethod
    def decode(cls, blob: bytes) -> KdfParams:
        try:
            name, *fields = blob.decode("ascii").split(";")
            values = dict(f.split("=", 1) for f in fields)
            if name != "argon2id" or set(values) != {"m", "t", "p"}:
                raise ValueError(name)
            params = cls(int(values["m"]), int(values["t"]), int(values["p"]))
        except ValueError as e:
            raise LocalStoreError(f"unknown key derivation {blob!r}") from e
        params.check()
        return params


DEFAULT_KDF = KdfParams()


_U32 = struct.Struct(">I")
_TS = struct.Struct(">q")
_EXP = struct.Struct(">?d")
_SEALED_V1 = b"\x01"
NONCE_BYTES = 12
SALT_BYTES = 16
_WRAP_AD = b"shtalk-localstore-v1\x00data-key\x00"


def lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples give the same bytes."""
    return b"".join(_U32.pack(len(p)) + p for p in parts)


def unlp(blob: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(blob):
            raise ValueError("truncated")
        (n,) = _U32.unpack_from(blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise ValueError("truncated")
        out.append(blob[pos : pos + n])
        pos += n
    if pos != len(blob):
        raise ValueError("trailing bytes")
    return out


def _passphrase_bytes(passphrase: str) -> bytes:
    """NFKC (NIST SP 800-63B 5.1.1.2): the same passphrase typed on another keyboard works."""
    return unicodedata.normalize("NFKC", passphrase).encode("utf-8")


def derive_kek(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    """Argon2id of the passphrase: the key-encryption key.  Slow on purpose: call in a thread."""
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(_passphrase_bytes(passphrase))


def _wrap_ad(params: KdfParams, salt: bytes) -> bytes:
    # The parameters and salt are authenticated too: editing them is "wrong passphrase".
    return _WRAP_AD + lp(params.encode(), salt)


def wrap_key(kek: bytes, data_key: bytes, params: KdfParams, salt: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_ad(params, salt))


def unwrap_key(kek: bytes, wrapped: bytes, params: KdfParams, salt: bytes) -> bytes:
    try:
        key = AESGCM(kek).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_ad(params, salt)
        )
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this store") from None
    if len(key) != 32:
        raise LocalStoreError("the wrapped data key has a wrong length")
    return key


class Keys:
    """Subkeys of the data key: one seals (AES-256-GCM), one hashes names (HMAC-SHA256)."""

    def __init__(self, data_key: bytes) -> None:
        def sub(label: bytes) -> bytes:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label)
            return hkdf.derive(data_key)

        self._aead = AESGCM(sub(b"shtalk-localstore-v1 seal"))
        self._index = sub(b"shtalk-localstore-v1 index")

    def name_hash(self, domain: bytes, *parts: str) -> bytes:
        """Keyed hash of a name: equal names match, but the file does not reveal them."""
        msg = lp(domain, *(p.encode("utf-8") for p in parts))
        return hmac.new(self._index, msg, hashlib.sha256).digest()

    def seal(self, plain: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return _SEALED_V1 + nonce + self._aead.encrypt(nonce, plain, ad)

    def unseal(self, blob: bytes, ad: bytes, what: str) -> bytes:
        if blob[:1] != _SEALED_V1 or len(blob) < 1 + NONCE_BYTES + 16:
            raise CorruptEntry(f"{what}: not a sealed value")
        try:
            return self._aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], ad)
        except InvalidTag:
            raise CorruptEntry(
                f"{what}: fails authentication (moved to another row, edited, or damaged)"
            ) from None


def kv_ad(kind: str, hkey: bytes) -> bytes:
    return lp(b"shtalk-localstore-v1", b"kv", b"value", kind.encode(), hkey)


def body_ad(hid: bytes, hconv: bytes, ts: int, expires_at: float | None) -> bytes:
    exp = _EXP.pack(expires_at is not None, 0.0 if expires_at is None else expires_at)
    return lp(b"shtalk-localstore-v1", b"history", b"body", hid, hconv, _TS.pack(ts), exp)


def state_ad(hid: bytes) -> bytes:
    return lp(b"shtalk-localstore-v1", b"history", b"state", hid)


def parse_header(header: dict[str, bytes], path: str) -> tuple[KdfParams, bytes, bytes]:
    try:
        params = KdfParams.decode(header["kdf"])
        salt, wrapped = header["salt"], header["wrapped_key"]
    except KeyError as e:
        raise LocalStoreError(f"{path}: the key header is incomplete ({e})") from None
    if len(salt) < SALT_BYTES or len(wrapped) != NONCE_BYTES + 32 + 16:
        raise LocalStoreError(f"{path}: the key header is malformed")
    return params, salt, wrapped
