"""Access JWTs (RFC 8725) and passwords: every forgery we know of is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import (
    AUDIENCE,
    TokenError,
    TokenIssuer,
    low_s,
    new_refresh_token,
    refresh_hash,
)
from shtalk.testing import b64url
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.passwords import check_password_policy

P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def new_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class AccessTokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pem = new_key_pem()
        self.issuer = TokenIssuer(self.pem, issuer="shtalk-test", access_ttl=900)
        self.now = 1_800_000_000.0

    def refused(self, token: str, code: str = "invalid_token") -> None:
        with self.assertRaises(TokenError) as cm:
            self.issuer.verify_access(token, self.now)
        self.assertEqual(cm.exception.code, code)

    def claims(self, **over: object) -> dict[str, object]:
        c: dict[str, object] = {
            "iss": "shtalk-test",
            "aud": AUDIENCE,
            "sub": "7",
            "dev": "laptop",
            "sid": "f" * 32,
            "iat": int(self.now),
            "exp": int(self.now) + 900,
            "jti": "j1",
        }
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def sign(self, claims: dict[str, object], **headers: object) -> str:
        h: dict[str, object] = {"typ": "at+jwt", "kid": self.issuer.kid}
        h.update(headers)
        return low_s(jwt.encode(claims, self.pem, algorithm="ES256", headers=h))

    def test_round_trip(self) -> None:
        token = self.issuer.issue_access(7, "laptop", "fam", self.now)
        c = self.issuer.verify_access(token, self.now + 10)
        self.assertEqual((c.user_id, c.device_id, c.family), (7, "laptop", "fam"))

    def test_expired(self) -> None:
        token = self.issuer.issue_access(7, "laptop", "fam", self.now - 901)
        self.refused(token, "token_expired")

    def test_alg_none(self) -> None:
        header = b64url(
            json.dumps({"alg": "none", "typ": "at+jwt", "kid": self.issuer.kid}).encode()
        )
        body = b64url(json.dumps(self.claims()).encode())
        self.refused(f"{header}.{body}.")

    def test_hs256_with_the_public_key_as_secret(self) -> None:
        # CVE-2022-29217 shape: an HMAC token keyed with our public key.
        public = self.issuer.public_key_pem()
        header = b64url(
            json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": self.issuer.kid}).encode()
        )
        body = b64url(json.dumps(self.claims()).encode())
        mac = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
        self.refused(f"{header}.{body}.{b64url(mac)}")

    def test_missing_claims(self) -> None:
        for name in ("exp", "iat", "aud", "iss", "sub", "jti"):
            self.refused(self.sign(self.claims(**{name: None})))

    def test_wrong_audience_issuer_type_and_key(self) -> None:
        self.refused(self.sign(self.claims(aud="someone-else")))
        self.refused(self.sign(self.claims(iss="evil")))
        self.refused(self.sign(self.claims(), typ="JWT"))
        self.refused(self.sign(self.claims(), kid="other"))
        other = TokenIssuer(new_key_pem(), issuer="shtalk-test")
        forged = other.issue_access(7, "laptop", "fam", self.now)
        self.refused(forged)

    def test_tampered_payload(self) -> None:
        token = self.issuer.issue_access(7, "laptop", "fam", self.now)
        h, _, s = token.split(".")
        body = b64url(json.dumps(self.claims(sub="1")).encode())
        self.refused(f"{h}.{body}.{s}")

    def test_garbage(self) -> None:
        for junk in ("", "a.b.c", "x" * 40, "eyJ.eyJ.eyJ"):
            self.refused(junk)

    def test_only_the_low_s_form_of_a_signature_is_accepted(self) -> None:
        """ECDSA's (r, n - s) twin verifies mathematically; one of the two is refused, and
        every token we issue is the other (OpenSSL picks either half at random)."""
        for i in range(40):
            token = self.issuer.issue_access(7, "laptop", f"fam{i}", self.now)
            self.issuer.verify_access(token, self.now)
            head, _, sig = token.rpartition(".")
            raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
            r, s = raw[:32], int.from_bytes(raw[32:], "big")
            self.assertLessEqual(s, P256_N // 2)
            twin = f"{head}.{b64url(r + (P256_N - s).to_bytes(32, 'big'))}"
            # The twin is a valid ES256 signature (PyJWT alone accepts it) ...
            jwt.decode(twin, self.issuer._public, algorithms=["ES256"], audience=AUDIENCE,
                       options={"verify_exp": False, "verify_iat": False})
            self.refused(twin)  # ... and shtalk does not.

    def test_a_second_spelling_of_the_signature_is_refused(self) -> None:
        token = self.issuer.issue_access(7, "laptop", "fam", self.now)
        head, _, sig = token.rpartition(".")
        self.refused(f"{head}.{sig}=")
        self.refused(f"{head}.{sig[:-1]}{chr(ord(sig[-1]) ^ 1)}")

    def test_lifetime_is_capped_by_the_configured_one(self) -> None:
        now = int(self.now)
        self.issuer.verify_access(self.sign(self.claims(exp=now + 900)), self.now)
        for exp in (now + 901, now + 86400 * 365, now):
            token = self.sign(self.claims(exp=exp))
            with self.assertRaises(TokenError) as cm:
                self.issuer.verify_access(token, self.now - 1)
            self.assertEqual(cm.exception.code, "invalid_token")
        # A token issued under a longer lifetime dies when the configured one shrinks.
        token = self.issuer.issue_access(7, "laptop", "fam", self.now)
        shorter = TokenIssuer(self.pem, issuer="shtalk-test", access_ttl=300)
        with self.assertRaises(TokenError):
            shorter.verify_access(token, self.now)

    def test_refresh_tokens_are_random_and_hashed(self) -> None:
        a, b = new_refresh_token(), new_refresh_token()
        self.assertNotEqual(a, b)
        self.assertGreaterEqual(len(a), 40)
        self.assertEqual(len(refresh_hash(a)), 32)
        self.assertNotIn(a.encode(), refresh_hash(a))

    def test_rejects_non_p256_key(self) -> None:
        pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertRaises(ValueError, TokenIssuer, pem)


class PasswordPolicyTests(SynchronousTestCase):
    def code(self, password: str, username: str = "alice") -> ErrorCode | None:
        try:
            check_password_policy(password, username, 12)
        except ProtocolError as e:
            self.assertNotIn(password, e.message)
            return e.code
        return None

    def test_policy(self) -> None:
        self.assertIsNone(self.code("tangerine-quokka-43"))
        self.assertEqual(self.code("short"), ErrorCode.WEAK_PASSWORD)
        self.assertEqual(self.code("passwordpassword"), ErrorCode.WEAK_PASSWORD)
        self.assertEqual(self.code("password123456"), ErrorCode.WEAK_PASSWORD)
        self.assertEqual(self.code("aaaaaaaaaaaaaaaa"), ErrorCode.WEAK_PASSWORD)
        self.assertEqual(self.code("alice2026alice", "alice"), ErrorCode.WEAK_PASSWORD)
        self.assertIsNone(self.code("tangerine-quokka-43", "erin"))
        # 72 bytes is bcrypt's limit: exactly 72 passes, 73 is refused, never truncated.
        at_limit = (
            "cr\u00e8me br\u00fbl\u00e9e \u00e0 la fran\u00e7aise,"
            " tr\u00e8s d\u00e9licieuse et l\u00e9g\u00e8re"
        )
        at_limit += "x" * (72 - len(at_limit.encode()))
        self.assertIsNone(self.code(at_limit))
        self.assertEqual(self.code(at_limit + "y"), ErrorCode.PASSWORD_TOO_LONG)


class HasherTests(TestCase):
    """bcrypt in its own pool; cost 4 keeps the test fast (the server refuses < 10)."""

    def setUp(self) -> None:
        self.hasher = PasswordHasher(reactor, cost=4, threads=1)  # type: ignore[arg-type]
        self.hasher.start()
        self.addCleanup(self.hasher.stop)

    async def test_hash_and_check(self) -> None:
        h = await self.hasher.hash("tangerine-quokka-43")
        self.assertTrue(h.startswith(b"$2b$04$"))
        self.assertTrue(await self.hasher.check("tangerine-quokka-43", h))
        self.assertFalse(await self.hasher.check("tangerine-quokka-44", h))

    async def test_73_byte_password_is_an_ordinary_failure(self) -> None:
        pw = "x" * 72
        h = await self.hasher.hash(pw)
        # bcrypt 5 raises ValueError past 72 bytes; we must answer False, not crash.
        self.assertFalse(await self.hasher.check(pw + "y", h))

    async def test_unknown_user_costs_a_hash(self) -> None:
        t = time.perf_counter()
        self.assertFalse(await self.hasher.check("whatever-password", None))
        self.assertGreater(time.perf_counter() - t, 0)

    async def test_hashing_threads_run_at_lower_priority(self) -> None:
        """A login storm must not take the reactor's CPU share: the pool is niced."""
        if not hasattr(os, "setpriority") or sys.platform != "linux":
            raise SkipTest("per-thread priority is a Linux feature")
        niced = PasswordHasher(reactor, cost=4, threads=1, nice=7)  # type: ignore[arg-type]
        niced.start()
        self.addCleanup(niced.stop)

        def priority() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        got = await niced._run(priority)
        assert isinstance(got, int)
        self.assertGreaterEqual(got, max(7, mine))
        # ... and hashing still works there; the reactor thread is untouched.
        self.assertTrue(await niced.check("pw-123456789", await niced.hash("pw-123456789")))
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), mine)
