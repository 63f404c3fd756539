"""Thin wrappers over ``cryptography``: the only module that touches primitives.

Every wrapper turns the library's exceptions into our hierarchy
(:mod:`shtalk.crypto.errors`) and checks lengths and key validity first, so
callers never see a bare ``ValueError`` or ``InvalidTag``.

Choices (see docs/SECURITY.md, "End-to-end encryption"):

* X25519 public keys: 32 bytes (RFC 7748 little-endian u-coordinate).  Refused:
  wrong length, a non-canonical encoding (top bit set or u >= p) and the
  low-order points (u in {0, 1, p-1} and the two points of order 8), whose DH
  output is predictable.  An all-zero DH output is refused as well.
* ECDSA P-256 with SHA-256, RFC 6979 deterministic nonces, signatures encoded
  as 64 bytes ``r || s`` (big-endian, IEEE P1363) and normalised to low-S; a
  high-S or out-of-range signature is refused, so a signature has exactly one
  valid encoding.  Public keys are 33-byte compressed SEC1 points.
* ML-KEM-768 (FIPS 203): 1184-byte public keys, 1088-byte ciphertexts,
  private keys stored as their 64-byte seed.
* AES-256-GCM with 12-byte nonces and 16-byte tags; HKDF-SHA256, HMAC-SHA256.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import BadKey, BadSignature, DecryptError

__all__ = [
    "KEM_CT_LEN",
    "KEM_PUB_LEN",
    "KEM_SEED_LEN",
    "KEY_LEN",
    "NONCE_LEN",
    "SIGNING_PUB_LEN",
    "SIG_LEN",
    "TAG_LEN",
    "X25519_LEN",
    "Aead",
    "aead_decrypt",
    "aead_encrypt",
    "check_x25519_public",
    "dh",
    "hkdf",
    "hmac_sha256",
    "hmac_sha256_pair",
    "kem_decapsulate",
    "kem_encapsulate",
    "kem_generate",
    "kem_private_from_seed",
    "kem_public_bytes",
    "kem_public_from_bytes",
    "kem_seed",
    "load_signing_public",
    "random_bytes",
    "sign",
    "signing_generate",
    "signing_private_bytes",
    "signing_private_from_bytes",
    "signing_public_bytes",
    "verify",
    "x25519_generate",
    "x25519_private_bytes",
    "x25519_private_from_bytes",
    "x25519_public_bytes",
    "x25519_public_from_bytes",
]

X25519_LEN = 32
SIGNING_PUB_LEN = 33
SIG_LEN = 64
KEM_PUB_LEN = 1184
KEM_CT_LEN = 1088
KEM_SEED_LEN = 64
KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16

_P25519 = 2**255 - 19
# u-coordinates of the points of small order on Curve25519 (and its twist's
# order-8 points), reduced mod p.  DH with them yields a predictable output.
_LOW_ORDER_U = frozenset(
    {
        0,
        1,
        _P25519 - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HALF_N = _P256_N // 2
_ZERO_32 = bytes(32)
_P256_N_BYTES = _P256_N.to_bytes(32, "big")
_HALF_N_BYTES = _HALF_N.to_bytes(32, "big")
_CURVE = ec.SECP256R1()
_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
# The same signatures over a SHA-256 computed by hashlib (RFC 6979 nonces depend
# only on the digest): one OpenSSL digest context fewer per call.
_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True)
_ECDSA_VERIFY_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_SHA256 = hashes.SHA256()
_ZERO_SALT = bytes(32)


# --------------------------------------------------------------------- KDFs


def random_bytes(size: int) -> bytes:
    """Fresh secret bytes from the OS CSPRNG."""
    return os.urandom(size)


def hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869); ``salt=None`` means 32 zero bytes."""
    if salt is None and 0 < length <= 64:
        return _hkdf_short(ikm, info, length)
    return HKDF(_SHA256, length, _ZERO_SALT if salt is None else salt, info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    mac = _hmac.HMAC(key, _SHA256)
    mac.update(data)
    return mac.finalize()


# HMAC-SHA256 (RFC 2104) over hashlib with the padded-key states computed once per
# key: the hot paths (the chain steps and the per-message HKDF) need two MACs under
# one key, which this does with two compressions fewer and no per-call set-up of
# an OpenSSL MAC context.  Checked against ``cryptography`` in the tests.
_SHA256_NEW = hashlib.sha256
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64
_HALF_BLOCK = bytes(32)


def _pads(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    if len(key) > _BLOCK:
        key = _SHA256_NEW(key).digest()
    key += bytes(_BLOCK - len(key))
    return _SHA256_NEW(key.translate(_IPAD)), _SHA256_NEW(key.translate(_OPAD))


_ZERO_SALT_PADS = _pads(_ZERO_SALT)  # public constants: HKDF's default salt


def hmac_sha256_pair(key: bytes, data1: bytes, data2: bytes) -> tuple[bytes, bytes]:
    """``(HMAC-SHA256(key, data1), HMAC-SHA256(key, data2))``."""
    if len(key) > _BLOCK:
        key = _SHA256_NEW(key).digest()
    key += bytes(_BLOCK - len(key))
    inner, outer = _SHA256_NEW(key.translate(_IPAD)), _SHA256_NEW(key.translate(_OPAD))
    i = inner.copy()
    i.update(data1)
    o = outer.copy()
    o.update(i.digest())
    inner.update(data2)
    outer.update(inner.digest())
    return o.digest(), outer.digest()


def _hkdf_short(ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 with the default salt and at most two output blocks."""
    inner, outer = _ZERO_SALT_PADS
    i = inner.copy()
    i.update(ikm)
    o = outer.copy()
    o.update(i.digest())
    prk = o.digest() + _HALF_BLOCK  # padded to the block; dies with this call
    inner, outer = _SHA256_NEW(prk.translate(_IPAD)), _SHA256_NEW(prk.translate(_OPAD))
    if length <= 32:
        inner.update(info + b"\x01")
        outer.update(inner.digest())
        return outer.digest()[:length]
    i = inner.copy()
    i.update(info + b"\x01")
    o = outer.copy()
    o.update(i.digest())
    t1 = o.digest()
    inner.update(t1 + info + b"\x02")
    outer.update(inner.digest())
    return t1 + outer.digest()[: length - 32]


# --------------------------------------------------------------------- AEAD


class Aead:
    """AES-256-GCM under one key; keep it when the key is used more than once."""

    __slots__ = ("_gcm",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise BadKey("AEAD key must be 32 bytes")
        self._gcm = AESGCM(key)

    def encrypt(self, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        return self._gcm.encrypt(nonce, plaintext, ad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        if len(nonce) != NONCE_LEN or len(ciphertext) < TAG_LEN:
            raise DecryptError("ciphertext too short")
        try:
            return self._gcm.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise DecryptError("authentication failed") from None

    def open(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
        """:meth:`decrypt` that returns ``None`` when the tag does not verify."""
        if len(nonce) != NONCE_LEN or len(ciphertext) < TAG_LEN:
            return None
        try:
            return self._gcm.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            return None


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, ad)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    if len(nonce) != NONCE_LEN or len(ciphertext) < TAG_LEN:
        raise DecryptError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise DecryptError("authentication failed") from None


# ------------------------------------------------------------------- X25519


def check_x25519_public(data: bytes) -> None:
    """Refuse wrong length, non-canonical encodings and low-order points."""
    if not isinstance(data, bytes) or len(data) != X25519_LEN:
        raise BadKey("X25519 public key must be 32 bytes")
    u = int.from_bytes(data, "little")
    if u >= _P25519:  # includes every value with the top bit set
        raise BadKey("X25519 public key is not canonically encoded")
    if u in _LOW_ORDER_U:
        raise BadKey("X25519 public key has low order")


def x25519_public_from_bytes(data: bytes) -> x25519.X25519PublicKey:
    check_x25519_public(data)
    return x25519.X25519PublicKey.from_public_bytes(data)


def x25519_generate() -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.generate()


def x25519_private_from_bytes(data: bytes) -> x25519.X25519PrivateKey:
    if len(data) != X25519_LEN:
        raise BadKey("X25519 private key must be 32 bytes")
    return x25519.X25519PrivateKey.from_private_bytes(data)


def x25519_private_bytes(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def x25519_public_bytes(key: x25519.X25519PrivateKey | x25519.X25519PublicKey) -> bytes:
    if isinstance(key, x25519.X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes_raw()


def dh(private: x25519.X25519PrivateKey, public: x25519.X25519PublicKey | bytes) -> bytes:
    """X25519; ``public`` may be raw bytes (then it is checked first)."""
    if isinstance(public, bytes):
        public = x25519_public_from_bytes(public)
    try:
        return private.exchange(public)
    except ValueError:  # all-zero shared secret
        raise BadKey("X25519 shared secret is all zero") from None


# -------------------------------------------------------------- ECDSA P-256


def signing_generate() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(_CURVE)


def signing_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def signing_private_from_bytes(data: bytes) -> ec.EllipticCurvePrivateKey:
    if len(data) != 32:
        raise BadKey("P-256 private key must be 32 bytes")
    value = int.from_bytes(data, "big")
    if not 0 < value < _P256_N:
        raise BadKey("P-256 private key out of range")
    return ec.derive_private_key(value, _CURVE)


def signing_public_bytes(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def load_signing_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """A 33-byte compressed P-256 point, checked to be on the curve."""
    if not isinstance(data, bytes) or len(data) != SIGNING_PUB_LEN or data[0] not in (2, 3):
        raise BadKey("P-256 public key must be a 33-byte compressed point")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, data)
    except ValueError:
        raise BadKey("P-256 public key is not a point on the curve") from None


def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """Deterministic ECDSA P-256/SHA-256 as 64 bytes ``r || s`` with low S."""
    der = key.sign(hashlib.sha256(data).digest(), _ECDSA_PREHASHED)
    # SEQUENCE { INTEGER r, INTEGER s }, read from the bytes (checked, never trusted).
    r_len = der[3]
    s_len = der[5 + r_len] if len(der) > 5 + r_len else 0
    if (
        der[0] == 0x30 and der[1] == len(der) - 2 and der[2] == 0x02 and 0 < r_len <= 33
        and 0 < s_len <= 33 and der[4 + r_len] == 0x02 and 6 + r_len + s_len == len(der)
    ):
        r = der[4 : 4 + r_len].lstrip(b"\x00").rjust(32, b"\x00")
        s = der[6 + r_len :].lstrip(b"\x00").rjust(32, b"\x00")
        if len(r) == 32 and len(s) == 32:
            if s > _HALF_N_BYTES:
                s = (_P256_N - int.from_bytes(s, "big")).to_bytes(32, "big")
            return r + s
    r_int, s_int = decode_dss_signature(der)
    if s_int > _HALF_N:
        s_int = _P256_N - s_int
    return r_int.to_bytes(32, "big") + s_int.to_bytes(32, "big")


def verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    """Raise :class:`BadSignature` unless ``signature`` is canonical and valid."""
    if type(signature) is not bytes or len(signature) != SIG_LEN:
        if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
            raise BadSignature("signature must be 64 bytes")
        signature = bytes(signature)
    r, s = signature[:32], signature[32:]
    # Equal-length big-endian strings compare like the numbers they encode.
    if not (_ZERO_32 < r < _P256_N_BYTES and _ZERO_32 < s <= _HALF_N_BYTES):
        raise BadSignature("signature is out of range or not low-S")
    try:
        key.verify(_der_signature(r, s), hashlib.sha256(data).digest(), _ECDSA_VERIFY_PREHASHED)
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None


def _der_integer(value: bytes) -> bytes:
    value = value.lstrip(b"\x00")  # non-empty: the caller refused zero
    if value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + bytes((len(value),)) + value


def _der_signature(r: bytes, s: bytes) -> bytes:
    """DER ``SEQUENCE { INTEGER r, INTEGER s }`` of two non-zero 32-byte integers."""
    body = _der_integer(r) + _der_integer(s)
    return b"\x30" + bytes((len(body),)) + body


# --------------------------------------------------------------- ML-KEM-768


def kem_generate() -> mlkem.MLKEM768PrivateKey:
    return mlkem.MLKEM768PrivateKey.generate()


def kem_private_from_seed(seed: bytes) -> mlkem.MLKEM768PrivateKey:
    if len(seed) != KEM_SEED_LEN:
        raise BadKey("ML-KEM-768 seed must be 64 bytes")
    return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)


def kem_seed(key: mlkem.MLKEM768PrivateKey) -> bytes:
    return key.private_bytes_raw()


def kem_public_bytes(key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM768PublicKey) -> bytes:
    if isinstance(key, mlkem.MLKEM768PrivateKey):
        key = key.public_key()
    return key.public_bytes_raw()


def kem_public_from_bytes(data: bytes) -> mlkem.MLKEM768PublicKey:
    if not isinstance(data, bytes) or len(data) != KEM_PUB_LEN:
        raise BadKey("ML-KEM-768 public key must be 1184 bytes")
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(data)
    except ValueError:
        raise BadKey("ML-KEM-768 public key is malformed") from None


def kem_encapsulate(key: mlkem.MLKEM768PublicKey) -> tuple[bytes, bytes]:
    """Return ``(ciphertext, shared_secret)``."""
    shared, ciphertext = key.encapsulate()
    return ciphertext, shared


def kem_decapsulate(key: mlkem.MLKEM768PrivateKey, ciphertext: bytes) -> bytes:
    if len(ciphertext) != KEM_CT_LEN:
        raise DecryptError("ML-KEM-768 ciphertext must be 1088 bytes")
    try:
        return key.decapsulate(ciphertext)
    except ValueError:
        raise DecryptError("ML-KEM-768 ciphertext refused") from None
