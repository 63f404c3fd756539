"""``shtalk-admin node-init``: a cluster's data directories share their keys exactly."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from twisted.trial import unittest

from shtalk.admin.main import main
from shtalk.admin.nodeinit import SHARED
from shtalk.server.datadir import DataDir


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


class NodeInitTests(unittest.TestCase):
    def run_admin(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["node-init", *argv], out, err)
        return code, out.getvalue(), err.getvalue()

    def test_first_then_copies(self) -> None:
        first, second = self.mktemp(), self.mktemp()
        code, out, _ = self.run_admin(first)
        self.assertEqual(code, 0)
        self.assertIn("node-init --from", out)
        code, _, _ = self.run_admin("--from", first, second)
        self.assertEqual(code, 0)
        self.assertEqual(mode(Path(second)), 0o700)
        for name in SHARED:
            a, b = Path(first) / name, Path(second) / name
            self.assertEqual(a.read_bytes(), b.read_bytes(), name)
            self.assertEqual(mode(b), 0o600, name)
        # What a cluster process checks at start passes, and makes nothing new.
        DataDir(second).ensure(mint_keys=False)
        self.assertEqual(DataDir(second).storage_key(), DataDir(first).storage_key())
        # Again: nothing changes.
        self.assertEqual(self.run_admin("--from", first, second)[0], 0)

    def test_a_different_key_is_never_overwritten(self) -> None:
        first, other, target = self.mktemp(), self.mktemp(), self.mktemp()
        self.run_admin(first)
        self.run_admin(other)
        self.run_admin("--from", other, target)
        before = (Path(target) / "storage.key").read_bytes()
        code, _, err = self.run_admin("--from", first, target)
        self.assertEqual(code, 1)
        self.assertIn("differs", err)
        self.assertEqual((Path(target) / "storage.key").read_bytes(), before)

    def test_a_source_without_keys_is_refused(self) -> None:
        empty, target = self.mktemp(), self.mktemp()
        os.mkdir(empty, 0o700)
        code, _, err = self.run_admin("--from", empty, target)
        self.assertEqual(code, 1)
        self.assertIn("storage.key", err)
        self.assertNotIn("Traceback", err)
        self.assertFalse((Path(target) / "storage.key").exists())
