# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""System tests: the real ``twistd -n shtalk`` from this checkout, as an operator runs it.

Start-up problems must end the process with status 1 and exactly one line on stderr
naming the file and what to do, no traceback.  A good start must print the address
and the certificate fingerprint, and serve TLS that an independent client (the
standard library's ``ssl``) can pin.

twistd runs as ``python -c "from twisted.scripts.twistd import run; run()"`` with
``PYTHONPATH`` set to the repository root and a temporary working directory, so it
loads this checkout's plugin, not an installed copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial import unittest

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    e.pop("XDG_DATA_HOME", None)
    return e


class StartupErrorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).absolute()
        self.cwd.mkdir()
        self.data = self.cwd / "data"

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TWISTD, "-n", "shtalk", "--data-dir", str(self.data), *args],
            cwd=self.cwd, env=env(), capture_output=True, text=True, timeout=60,
            check=False,
        )

    def assertOneLineError(self, result: subprocess.CompletedProcess[str], *parts: str) -> None:
        self.assertNotEqual(result.returncode, 0, result)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertTrue(lines[0].startswith("shtalk: error: "), lines[0])
        for part in parts:
            self.assertIn(part, lines[0])

    def test_bad_config(self) -> None:
        (self.cwd / "bad.ini").write_text("[server]\nport = 6697\nprot = 1\n")
        result = self.twistd("--config", "bad.ini")
        self.assertOneLineError(result, "bad.ini", "prot", "[server]")
        self.assertFalse(self.data.exists())  # nothing is created before the config is good

    def test_missing_config(self) -> None:
        result = self.twistd("--config", "missing.ini")
        self.assertOneLineError(result, "missing.ini", "not found")

    def test_corrupt_certificate(self) -> None:
        self.data.mkdir(mode=0o700)
        cert = self.data / "tls-cert.pem"
        key = self.data / "tls-key.pem"
        for path in (cert, key):
            path.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
            path.chmod(0o600)
        result = self.twistd("--port", "0")
        self.assertOneLineError(result, str(cert), "delete it")

    def test_loose_data_dir(self) -> None:
        self.data.mkdir()
        self.data.chmod(0o777)  # group- and world-writable: the point of the test
        result = self.twistd("--port", "0")
        self.assertOneLineError(result, str(self.data), "chmod 700")

    def test_bad_listen_string(self) -> None:
        result = self.twistd("--listen", "bogus:1")
        self.assertOneLineError(result, "bogus:1")


def _service_importable() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import shtalk.server.compose"],
        env=env(), capture_output=True, timeout=60, check=False,
    )
    return probe.returncode == 0


class StartTests(unittest.TestCase):
    """A real start on a free port, a real TLS client, a clean stop."""

    def setUp(self) -> None:
        if not _service_importable():
            raise unittest.SkipTest("shtalk.server.compose (the chat service) is not importable")
        self.cwd = Path(self.mktemp()).absolute()
        self.cwd.mkdir()
        self.data = self.cwd / "data"

    def start(self, cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
        proc = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "shtalk", "--data-dir", str(self.data),
             "--port", "0"],
            cwd=cwd or self.cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.addCleanup(self._stop, proc)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        out = b""
        deadline = time.monotonic() + 60
        # Raw reads: a buffered readline() could hold lines select() no longer sees.
        while b"openssl s_client" not in out and time.monotonic() < deadline:
            if sel.select(timeout=1):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        sel.close()
        text = self.announced = out.decode("utf-8", "replace")
        port = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", text)
        fp = re.search(r"fingerprint: ([0-9A-F:]{95})", text)
        if port is None or fp is None:
            stderr = self._stop(proc)
            self.fail(f"no start-up announcement:\n{text}\n{stderr}")
        assert port is not None and fp is not None
        return proc, int(port.group(1)), fp.group(1)

    def _stop(self, proc: subprocess.Popen[bytes]) -> str:
        """Stop with SIGTERM (as systemd does); return what it wrote to stderr."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        except ValueError:  # already collected
            err = b""
        return (err or b"").decode("utf-8", "replace")

    def handshake(self, port: int) -> tuple[str, bytes]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin below is the check, as in TOFU clients
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
            assert der is not None
            return str(tls_sock.version()), hashlib.sha256(der).digest()

    def test_first_and_second_start(self) -> None:
        proc, port, fp = self.start()
        self.assertEqual(os.stat(self.data).st_mode & 0o777, 0o700)
        for name in ("storage.key", "jwt-signing-key.pem", "tls-cert.pem", "tls-key.pem"):
            self.assertEqual(os.stat(self.data / name).st_mode & 0o777, 0o600, name)
        version, digest = self.handshake(port)
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(digest.hex().upper(), fp.replace(":", ""))
        openssl = shutil.which("openssl")
        if openssl is not None:  # the printed form is exactly openssl's
            shown = subprocess.run(
                [openssl, "x509", "-noout", "-fingerprint", "-sha256",
                 "-in", str(self.data / "tls-cert.pem")],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            self.assertEqual(shown.strip().split("=", 1)[1], fp)
        stderr = self._stop(proc)
        self.assertNotIn("Traceback", stderr)
        # twistd re-raises the signal that stopped it, so SIGTERM is the clean exit.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM))

        _, _, fp_again = self.start()
        self.assertEqual(fp_again, fp)

    def test_start_up_lines_once_and_the_exact_client_command(self) -> None:
        """What `make run` prints: each start-up line once, and a client command that
        works from the checkout as printed (``.venv/bin/shtalk-urwid HOST:PORT`` when the
        server runs from the checkout's venv and the shell would not find the script)."""
        proc, port, _ = self.start(cwd=REPO)
        self._stop(proc)
        lines = [ln for ln in self.announced.splitlines() if ln.strip()]
        for wanted in ("listening on", "fingerprint:", "connect with:", "or try:", "outbox"):
            self.assertEqual(sum(wanted in ln for ln in lines), 1, self.announced)
        m = re.search(r"connect with: (.+) 127\.0\.0\.1:(\d+)$", self.announced, re.M)
        assert m is not None, self.announced
        self.assertEqual(int(m.group(2)), port)
        command = m.group(1).split()
        script = Path(sys.executable).parent / "shtalk-urwid"
        if script.exists() and shutil.which("shtalk-urwid") is None:
            self.assertEqual(command, [str(script.relative_to(REPO))
                                       if script.is_relative_to(REPO) else str(script)])
        result = subprocess.run([*command, "--help"], cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("shtalk-urwid", result.stdout)

    def test_port_in_use(self) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "shtalk", "--data-dir", str(self.data),
                 "--port", str(port)],
                cwd=self.cwd, env=env(), capture_output=True, text=True, timeout=60,
                check=False,
            )
        self.assertEqual(result.returncode, 1, result)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", lines[0])
        self.assertNotIn("Traceback", result.stdout)

    def test_corrupt_database(self) -> None:
        self.data.mkdir(mode=0o700)
        db = self.data / "shtalk.sqlite3"
        db.write_bytes(b"this is not a database" * 100)
        db.chmod(0o600)
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "shtalk", "--data-dir", str(self.data),
             "--port", "0"],
            cwd=self.cwd, env=env(), capture_output=True, text=True, timeout=60, check=False,
        )
        self.assertEqual(result.returncode, 1, result)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn(str(db), lines[0])
        self.assertNotIn("Traceback", result.stdout)
