# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's endpoints are untyped; strict otherwise.)
"""Several real ``twistd shtalk`` processes at one address.

* A real HAProxy (Debian's ``haproxy``) run with the shipped ``conf/haproxy.cfg`` (its
  ports swapped for free ones) in front of two processes started with
  ``--proxy-protocol``: clients at their own loopback addresses log in through it and
  the processes count them by those addresses, not the proxy's; a client going around
  the proxy, or forging a header from an untrusted address, gets nowhere.
* Two processes started with ``--reuse-port`` on one port: the kernel hands
  connections to both.

Each process has a data directory (and SQLite store) of its own; the HAProxy pair shares
one certificate, as a deployment must.  Without ``haproxy`` the HAProxy tests skip,
unless ``SHTALK_REQUIRE_REDIS=1`` (CI, where ``.ci/run`` installs it): then they fail.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from shtalk.server.net.proxyproto import v2_header
from tests.harness import (
    REPO_ROOT,
    ConnectionClosed,
    HarnessError,
    ServerProcess,
    connect_to,
    free_port,
    register_and_login,
    sleep,
    wait_until,
)

HAPROXY_CFG = REPO_ROOT / "conf" / "haproxy.cfg"


def need_haproxy(test: unittest.TestCase) -> str:
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if path is not None:
        return path
    if os.environ.get("SHTALK_REQUIRE_REDIS"):
        test.fail("haproxy is not installed (CI installs Debian's package: .ci/run)")
    raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")


def can_bind(source: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((source, 0))
        except OSError:
            return False
    return True


class HAProxy:
    """``haproxy -db`` with conf/haproxy.cfg, its ports replaced, output to a file."""

    def __init__(self, binary: str, base: Path, backends: list[int]) -> None:
        self.port = free_port()
        text = HAPROXY_CFG.read_text()
        text = text.replace("bind 127.0.0.1:6697", f"bind 127.0.0.1:{self.port}")
        # Health checks every 0.2 s instead of 2 s: a dead process is out in 0.6 s.
        text = text.replace(" inter 2s ", " inter 200ms ")
        for default, port in zip((7001, 7002), backends, strict=True):
            text = text.replace(f"127.0.0.1:{default}\n", f"127.0.0.1:{port}\n")
        self.config = base / "haproxy.cfg"
        self.config.write_text(text)
        self.log_path = base / "haproxy.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise HarnessError(f"haproxy exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise HarnessError("haproxy did not listen") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Front:
    """What `register_and_login` needs of a server, for the proxy's address."""

    host: str
    port: int
    fingerprint: str
    backends: list[ServerProcess]

    def log_text(self, tail: int = 6000) -> str:
        return "\n".join(s.log_text(tail) for s in self.backends)


def share_certificate(source: ServerProcess, target: ServerProcess) -> None:
    """Give ``target`` the certificate and key ``source`` made (clients pin one)."""
    target.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("tls-cert.pem", "tls-key.pem"):
        dest = target.data_dir / name
        shutil.copyfile(source.data_dir / name, dest)
        os.chmod(dest, 0o600)


class HAProxyTests(unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        binary = need_haproxy(self)
        for source in ("127.0.0.2", "127.0.0.5"):
            if not can_bind(source):
                raise unittest.SkipTest(f"cannot bind {source}")
        config = {"server": {"proxy_protocol": True, "max_connections_per_address": 1}}
        self.backends = [ServerProcess(config), ServerProcess(config)]
        for server in self.backends:
            self.addCleanup(server.cleanup)
        self.backends[0].start()
        share_certificate(self.backends[0], self.backends[1])
        self.backends[1].start()
        self.assertEqual(self.backends[0].fingerprint, self.backends[1].fingerprint)
        self.proxy = HAProxy(binary, self.backends[0].base_dir,
                             [s.port for s in self.backends])
        self.addCleanup(self.proxy.stop)
        # Duck-typed as the ServerProcess that register_and_login connects to.
        self.front: Any = Front("127.0.0.1", self.proxy.port, self.backends[0].fingerprint,
                           self.backends)

    @inlineCallbacks
    def test_clients_through_haproxy_are_counted_by_their_own_address(self) -> Any:
        # One connection per address is allowed.  Three clients at three addresses over
        # two processes: were the proxy's address counted, the third would be refused.
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            session = yield register_and_login(self.front, source=source)
            self.addCleanup(session.client.disconnect)
            yield session.client.ok("ping")
        # Three more from one address: two of them share a process, which refuses one
        # for that address (the refusal reaches the client through the proxy).
        codes = []
        for _ in range(3):
            client = yield connect_to(self.front.host, self.front.port,
                                      self.front.fingerprint, source="127.0.0.5")
            self.addCleanup(client.disconnect)
            try:
                yield client.ok("hello", version=1)
                codes.append("ok")
            except ConnectionClosed:
                [orphan] = client.orphans
                codes.append(orphan["error"]["code"])
        self.assertIn("too_many_connections", codes)
        self.assertIn("ok", codes)
        # Both processes served some of them (leastconn), and neither refused a header.
        for server in self.backends:
            self.assertNotIn("closed a connection from", server.log_text())

    @inlineCallbacks
    def test_around_the_proxy_or_from_an_untrusted_address_gets_nowhere(self) -> Any:
        server = self.backends[0]
        # Straight to the process: its TLS ClientHello is no PROXY header.
        client = yield connect_to(server.host, server.port, server.fingerprint)
        with self.assertRaises(ConnectionClosed):
            yield client.ok("hello", version=1)
        yield wait_until(lambda: "did not start with a PROXY protocol header"
                         in server.log_text())
        # A well-formed header naming any address, from 127.0.0.2 (not trusted_proxies).
        forged = v2_header(("203.0.113.9", 4000), ("127.0.0.1", server.port))
        answer = yield threads.deferToThread(send_and_read, "127.0.0.2", server.port, forged)
        self.assertEqual(answer, b"")  # closed without a byte, before any TLS
        # Through the proxy, the same process still serves.
        session = yield register_and_login(self.front, source="127.0.0.2")
        self.addCleanup(session.client.disconnect)


    @inlineCallbacks
    def test_health_checks_keep_live_processes_in_and_take_a_dead_one_out(self) -> Any:
        # The checks (a connect with a PROXY v2 LOCAL header) pass against shtalk.
        yield sleep(1.0)
        self.assertNotIn(" is DOWN", self.proxy.log_path.read_text())
        sessions = []
        for source in ("127.0.0.2", "127.0.0.3"):
            session = yield register_and_login(self.front, source=source)
            self.addCleanup(session.client.disconnect)
            sessions.append(session)
        self.backends[0].kill()
        yield wait_until(lambda: "shtalk1 is DOWN" in self.proxy.log_path.read_text(),
                         timeout=10)
        # Its client was cut off (it reconnects), and new clients all reach the survivor.
        yield wait_until(lambda: any(s.client.is_closed for s in sessions))
        for source in ("127.0.0.4", "127.0.0.5", "127.0.0.6"):
            session = yield register_and_login(self.front, source=source)
            self.addCleanup(session.client.disconnect)


def send_and_read(source: str, port: int, data: bytes) -> bytes:
    """Connect from ``source``, send ``data``, return what comes back until the close
    (a reset counts as a close)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(source, 0)) as s:
            s.sendall(data)
            return s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def served_by(port: int) -> str:
    """The SHA-256 fingerprint of the certificate the process that took the connection
    presented (each process made its own)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(re.findall("..", digest))


class ReusePortTests(unittest.TestCase):
    timeout = 60

    @inlineCallbacks
    def test_two_processes_on_one_port_both_get_connections(self) -> Any:
        first = ServerProcess(extra_args=["--reuse-port"])
        self.addCleanup(first.cleanup)
        first.start()
        second = ServerProcess(extra_args=["--reuse-port"])
        self.addCleanup(second.cleanup)
        second.port = first.port
        second.start()
        yield wait_until(lambda: "SO_REUSEPORT" in second.log_text())
        self.assertIn(f"listening on 127.0.0.1:{first.port} (TLS, SO_REUSEPORT)",
                      first.log_text())
        seen = []
        for _ in range(24):
            fingerprint = yield threads.deferToThread(served_by, first.port)
            seen.append(fingerprint)
        counts = {s.fingerprint: seen.count(s.fingerprint) for s in (first, second)}
        self.assertEqual(sum(counts.values()), 24, counts)
        # Spread by a hash of the client's port: all on one side is a 2**-23 chance.
        self.assertTrue(all(counts.values()), counts)
        # A whole login on each, at the one address (a client pinned to one process's
        # certificate refuses the other's: it tries again).
        for server in (first, second):
            for _ in range(40):
                try:
                    s = yield register_and_login(server)
                except ConnectionClosed:
                    continue
                self.addCleanup(s.client.disconnect)
                break
            else:
                self.fail(f"no login on {server.fingerprint} in 40 tries")
