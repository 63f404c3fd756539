# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""System test: a plain ``pip install`` of this checkout gives a working ``twistd shtalk``.

Why: the plugin lives in ``twisted/plugins`` (a namespace that ``find_packages`` misses)
and the server is only reachable through it, so a packaging slip would ship a server
that cannot be started, while every test run from the source tree still passes.  This
builds a fresh virtualenv, installs the repository (non-editable, exactly as a user
would), and asks *that* ``twistd`` for the plugin and its help, from a directory outside
the checkout so nothing leaks in from the source tree.  It takes about a minute.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

REPO = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 900


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(var, None)
    return env


_installed: dict[str, Path] = {}


def installed_venv() -> Path:
    """A virtualenv with this checkout pip-installed; made once per test run.

    (trial has no setUpClass; the directory is removed when the process exits.)
    """
    if "venv" in _installed:
        return _installed["venv"]
    workdir = tempfile.TemporaryDirectory(prefix="shtalk-packaging-")
    atexit.register(workdir.cleanup)
    venv = Path(workdir.name) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300,
                   env=_clean_env())
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(REPO)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT, env=_clean_env(),
        cwd=workdir.name, check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"pip install {REPO} failed:\n{result.stdout}\n{result.stderr}")
    _installed["venv"] = venv
    return venv


class InstalledPackageTests(unittest.TestCase):
    def setUp(self) -> None:
        self.venv = installed_venv()
        self.cwd = Path(self.mktemp()).absolute()
        self.cwd.mkdir()

    def run_installed(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            capture_output=True, text=True, timeout=120, env=_clean_env(),
            cwd=self.cwd, check=False,
        )

    def test_twistd_lists_shtalk(self) -> None:
        result = self.run_installed("twistd", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        commands = [line.split()[0] for line in result.stdout.splitlines()
                    if line.startswith("    ") and line.split()]
        self.assertIn("shtalk", commands, result.stdout)

    def test_shtalk_help_shows_options(self) -> None:
        result = self.run_installed("twistd", "shtalk", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--port", "--interface", "--data-dir", "--cert", "--key", "--config",
                       "--listen", "--max-connections-per-address"):
            self.assertIn(option, result.stdout)
        self.assertIn("fingerprint", result.stdout)

    def test_imports_the_installed_copy(self) -> None:
        result = self.run_installed(
            "python", "-c", "import shtalk.server.tap as t; print(t.__file__)"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        installed = Path(result.stdout.strip()).resolve()
        self.assertTrue(installed.is_relative_to(self.venv.resolve()), installed)
