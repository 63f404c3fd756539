# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's endpoints are untyped; strict otherwise.)
"""Tests for shtalk.server.datadir: first start, reuse, permissions, corrupt secrets."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DNSName, IPAddress, SubjectAlternativeName, load_pem_x509_certificate
from twisted.trial import unittest

from shtalk.server.datadir import DataDir, DataDirError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class FirstStartTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dd = DataDir(Path(self.mktemp()) / "nested" / "shtalk")

    def test_constructor_does_no_io(self) -> None:
        self.assertFalse(self.dd.path.exists())

    def test_paths(self) -> None:
        self.assertEqual(self.dd.db_path, self.dd.path / "shtalk.sqlite3")
        self.assertEqual(self.dd.outbox_dir, self.dd.path / "outbox")
        self.assertEqual(self.dd.cert_path.parent, self.dd.path)
        self.assertEqual(self.dd.key_path.parent, self.dd.path)

    def test_creates_private_dir_and_secrets(self) -> None:
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.dd.ensure()
        self.assertEqual(mode(self.dd.path), 0o700)
        self.assertEqual(mode(self.dd.outbox_dir), 0o700)
        for p in (self.dd.storage_key_path, self.dd.jwt_key_path, self.dd.cert_path,
                  self.dd.key_path):
            self.assertEqual(mode(p), 0o600, p)
        self.assertEqual([p.name for p in self.dd.path.iterdir() if p.name.startswith(".")], [])

    def test_secrets_have_the_right_shape(self) -> None:
        self.dd.ensure()
        self.assertEqual(len(self.dd.storage_key()), 32)
        key = serialization.load_pem_private_key(self.dd.jwt_private_key_pem(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        cert = load_pem_x509_certificate(self.dd.cert_path.read_bytes())
        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        self.assertIsInstance(pub.curve, ec.SECP256R1)
        san = cert.extensions.get_extension_for_class(SubjectAlternativeName).value
        self.assertIn("localhost", san.get_values_for_type(DNSName))
        self.assertIn("127.0.0.1", [str(a) for a in san.get_values_for_type(IPAddress)])
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        self.assertGreaterEqual(days, 3650)

    def test_extra_tls_names(self) -> None:
        self.dd.ensure(tls_names=("localhost", "127.0.0.1", "192.0.2.7", "chat.example"))
        cert = load_pem_x509_certificate(self.dd.cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(SubjectAlternativeName).value
        self.assertIn("chat.example", san.get_values_for_type(DNSName))
        self.assertIn("192.0.2.7", [str(a) for a in san.get_values_for_type(IPAddress)])

    def test_no_tls_files_when_operator_brings_a_cert(self) -> None:
        self.dd.ensure(tls_names=None)
        self.assertFalse(self.dd.cert_path.exists())
        self.assertFalse(self.dd.key_path.exists())

    def test_second_start_reuses(self) -> None:
        self.dd.ensure()
        before = {p.name: p.read_bytes() for p in self.dd.path.iterdir() if p.is_file()}
        again = DataDir(self.dd.path)
        again.ensure()
        after = {p.name: p.read_bytes() for p in again.path.iterdir() if p.is_file()}
        self.assertEqual(before, after)

    def test_tls_options_load(self) -> None:
        self.dd.ensure()
        self.assertIsNotNone(self.dd.tls_server_options().getContext())


class RefusalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dd = DataDir(self.mktemp())
        self.dd.ensure()

    def assertRefused(self, *parts: str, action: Callable[[], object] | None = None) -> None:
        """``action`` (the data directory's ``ensure`` unless given) fails with a one-line
        `DataDirError` that says each of ``parts``."""
        with self.assertRaises(DataDirError) as e:
            (action or self.dd.ensure)()
        msg = str(e.exception)
        self.assertNotIn("\n", msg)
        for part in parts:
            self.assertIn(part, msg)

    def test_group_writable_dir(self) -> None:
        os.chmod(self.dd.path, 0o770)  # noqa: S103 - the point of the test
        self.assertRefused(str(self.dd.path), "chmod 700")

    def test_world_readable_secret(self) -> None:
        os.chmod(self.dd.storage_key_path, 0o644)
        self.assertRefused(str(self.dd.storage_key_path), "chmod 600")

    def test_loose_cert(self) -> None:
        os.chmod(self.dd.cert_path, 0o640)
        self.assertRefused(str(self.dd.cert_path))

    def test_symlinked_secret_refused(self) -> None:
        target = Path(self.mktemp())
        target.write_bytes(os.urandom(32))
        os.chmod(target, 0o600)
        self.dd.storage_key_path.unlink()
        self.dd.storage_key_path.symlink_to(target)
        self.assertRefused(str(self.dd.storage_key_path))

    def test_corrupt_cert(self) -> None:
        self.dd.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
        self.assertRefused(str(self.dd.cert_path), "delete it", action=self.dd.tls_server_options)

    def test_corrupt_tls_key(self) -> None:
        self.dd.key_path.write_bytes(b"garbage")
        self.assertRefused(str(self.dd.key_path), "delete it", action=self.dd.tls_server_options)

    def test_mismatched_pair(self) -> None:
        other = DataDir(self.mktemp())
        other.ensure()
        self.dd.key_path.write_bytes(other.key_path.read_bytes())
        self.assertRefused("does not belong", action=self.dd.tls_server_options)

    def test_a_cluster_process_makes_no_keys(self) -> None:
        """A missing key is refused in a cluster, named, and nothing is made in its place;
        keys copied from another process are used as they are."""
        fresh = DataDir(self.mktemp())
        with self.assertRaises(DataDirError) as e:
            fresh.ensure(mint_keys=False)
        self.assertIn("storage.key", str(e.exception))
        self.assertIn("copy", str(e.exception))
        self.assertNotIn("\n", str(e.exception))
        self.assertFalse(fresh.storage_key_path.exists())
        self.assertFalse(fresh.jwt_key_path.exists())
        self.dd.ensure()
        for p in (self.dd.storage_key_path, self.dd.jwt_key_path):
            (fresh.path / p.name).write_bytes(p.read_bytes())
            os.chmod(fresh.path / p.name, 0o600)
        fresh.ensure(mint_keys=False)
        self.assertEqual(fresh.storage_key(), self.dd.storage_key())
        self.dd.jwt_key_path.unlink()
        self.assertRefused("jwt-signing-key.pem", "missing",
                           action=lambda: self.dd.ensure(mint_keys=False))

    def test_half_a_pair(self) -> None:
        self.dd.key_path.unlink()
        self.assertRefused(str(self.dd.key_path), "missing")

    def test_corrupt_jwt_key(self) -> None:
        self.dd.jwt_key_path.write_bytes(b"not pem")
        self.assertRefused(str(self.dd.jwt_key_path), "delete it")

    def test_wrong_curve_jwt_key(self) -> None:
        self.dd.jwt_key_path.write_bytes(
            ec.generate_private_key(ec.SECP384R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.assertRefused("P-256")

    def test_truncated_storage_key(self) -> None:
        self.dd.storage_key_path.write_bytes(b"short")
        self.assertRefused(str(self.dd.storage_key_path), "backup")

    def test_not_a_directory(self) -> None:
        path = Path(self.mktemp())
        path.write_text("x")
        self.assertRefused(str(path), "--data-dir", action=DataDir(path).ensure)

    def test_unreadable_secret(self) -> None:
        if os.geteuid() == 0:
            raise unittest.SkipTest("root reads mode-000 files")
        os.chmod(self.dd.jwt_key_path, 0o000)
        self.assertRefused(str(self.dd.jwt_key_path))
