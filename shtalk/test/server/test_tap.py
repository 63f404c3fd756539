# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's endpoints are untyped; strict otherwise.)
"""Tests for shtalk.server.tap: options, precedence, the service tree, start-up errors.

The chat service itself is faked (`FakeChat`): these tests are about wiring, and must
not depend on the store or the protocol.
"""

from __future__ import annotations

import io
import re
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet import defer, endpoints, protocol
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.python import usage
from twisted.trial import unittest

from shtalk.server import tap, tls
from shtalk.server.config import ConfigError, ServerConfig, StartupError
from shtalk.server.datadir import DataDir, DataDirError
from shtalk.server.net.admission import AdmittedTLSFactory
from shtalk.server.net.proxied import ProxyHeaderFactory
from shtalk.testing import Echo, TLSLineClient


class FakeChat(MultiService):
    """Stands in for ``shtalk.server.compose.make_chat_service``'s result."""

    def __init__(self, config: ServerConfig, datadir: DataDir) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.datadir = datadir
        self.factory = protocol.Factory.forProtocol(Echo)


def counted(factory: Any) -> list[object]:
    """The addresses ``factory`` builds protocols for, as they come."""
    seen: list[object] = []
    build = factory.buildProtocol

    def counting(addr: Any) -> Any:
        seen.append(addr)
        return build(addr)

    factory.buildProtocol = counting
    return seen


class Harness:
    def __init__(self, test: unittest.TestCase) -> None:
        self.test = test
        self.data_dir = Path(test.mktemp())
        self.made: list[FakeChat] = []
        self.out = io.StringIO()

    def make_chat(self, config: ServerConfig, datadir: DataDir) -> IServiceCollection:
        chat = FakeChat(config, datadir)
        self.made.append(chat)
        return chat

    def options(self, *argv: str) -> tap.Options:
        o = tap.Options()
        o.parseOptions(["--data-dir", str(self.data_dir), *argv])
        return o

    def build(self, *argv: str, reactor: Any = None) -> tap.ShtalkService:
        reactor = MemoryReactor() if reactor is None else reactor
        self.reactor = reactor
        return tap.build_service(self.options(*argv), reactor, self.make_chat, out=self.out)


class OptionsTests(unittest.TestCase):
    def test_unset_options_are_none(self) -> None:
        o = tap.Options()
        o.parseOptions([])
        self.assertEqual(o.server_overrides(), {})

    def test_typed(self) -> None:
        o = tap.Options()
        o.parseOptions(["--port", "7000", "--max-connections-per-address", "500",
                        "--interface", "::", "--listen", "tcp:0", "--cert", "c", "--key", "k"])
        self.assertEqual(o.server_overrides(), {
            "port": 7000, "max_connections_per_address": 500, "interface": "::",
            "listen": "tcp:0", "cert": "c", "key": "k",
        })

    def test_flags_only_turn_settings_on(self) -> None:
        o = tap.Options()
        o.parseOptions(["--reuse-port", "--proxy-protocol"])
        self.assertEqual(o.server_overrides(), {"reuse_port": True, "proxy_protocol": True})

    def test_bad_values(self) -> None:
        for argv in (["--port", "x"], ["--port", "70000"], ["--max-connections-per-address", "0"],
                     ["--config", ""], ["--bogus"]):
            with self.assertRaises(usage.UsageError, msg=argv):
                tap.Options().parseOptions(argv)

    def test_help_explains_every_option(self) -> None:
        text = str(tap.Options())
        for name in ("--port", "--interface", "--data-dir", "--cert", "--key", "--config",
                     "--listen", "--max-connections-per-address"):
            self.assertIn(name, text)
        for opt in tap.Options.optParameters:
            self.assertGreater(len(opt[3]), 20, opt[0])
        self.assertIn("6697", text)
        self.assertIn("127.0.0.1", text)
        self.assertIn("20", text)
        self.assertIn("XDG_DATA_HOME", text)


class PrecedenceTests(unittest.TestCase):
    def test_file_then_command_line(self) -> None:
        ini = Path(self.mktemp())
        ini.write_text("[server]\nport = 7000\ninterface = ::1\n[accounts]\nbcrypt_cost = 13\n")
        o = tap.Options()
        o.parseOptions(["--config", str(ini), "--port", "7100", "--data-dir", "/x/y"])
        c = tap.load_config(o)
        self.assertEqual(c.server.port, 7100)
        self.assertEqual(c.server.interface, "::1")
        self.assertEqual(c.accounts.bcrypt_cost, 13)
        self.assertEqual(c.server.data_dir, "/x/y")

    def test_data_dir_resolved(self) -> None:
        o = tap.Options()
        o.parseOptions([])
        self.assertTrue(Path(tap.load_config(o).server.data_dir).is_absolute())

    def test_cert_without_key(self) -> None:
        o = tap.Options()
        o.parseOptions(["--cert", "/some/cert.pem"])
        with self.assertRaises(ConfigError) as e:
            tap.load_config(o)
        self.assertIn("key", str(e.exception))


class BuildServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.h = Harness(self)

    def test_tree_built_but_not_started(self) -> None:
        top = self.h.build()
        self.assertIsInstance(top, MultiService)
        self.assertFalse(top.running)
        self.assertEqual(self.h.reactor.tcpServers, [])  # nothing listens yet
        [chat] = self.h.made
        self.assertIn(chat, list(top))
        self.assertIsNotNone(chat.getServiceNamed("listener"))  # type: ignore[no-untyped-call]
        self.assertEqual(chat.datadir.path, self.h.data_dir.absolute())
        self.assertEqual(chat.config.server.data_dir, str(self.h.data_dir.absolute()))
        self.assertTrue(chat.datadir.cert_path.exists())
        self.assertEqual(self.h.out.getvalue(), "")

    def test_default_listener_uses_our_tls(self) -> None:
        top = self.h.build("--port", "7001", "--interface", "127.0.0.2")
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        # listenSSL's shape (TLS over TCP), with the handshakes admitted.
        [(port, factory, backlog, interface)] = self.h.reactor.tcpServers
        self.assertEqual((port, interface, backlog), (7001, "127.0.0.2", tap.BACKLOG))
        self.assertIsInstance(factory, AdmittedTLSFactory)
        self.assertIs(factory.wrappedFactory, self.h.made[0].factory)
        ctx = factory.options
        self.assertIn("ECDHE-ECDSA-AES128-GCM-SHA256", ctx._cipherString)
        self.assertNotIn(":AES128-GCM-SHA256", ctx._cipherString)

    def test_announces_address_fingerprint_and_how_to_connect(self) -> None:
        top = self.h.build("--port", "7002")
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        out = self.h.out.getvalue()
        fp = tls.cert_fingerprint(DataDir(self.h.data_dir).cert_path.read_bytes())
        self.assertIn(f"TLS certificate SHA-256 fingerprint: {fp}", out)
        self.assertRegex(out, r"shtalk-urwid \S+:7002")
        self.assertRegex(out, r"openssl s_client -connect \S+:7002")

    def test_san_includes_interface(self) -> None:
        self.h.build("--interface", "192.0.2.9")
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(DataDir(self.h.data_dir).cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("192.0.2.9", [str(a) for a in san.get_values_for_type(x509.IPAddress)])

    def test_listen_string(self) -> None:
        top = self.h.build("--listen", "tcp:7003:interface=127.0.0.1")
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        self.assertEqual(self.h.reactor.sslServers, [])
        [(port, _, _, interface)] = self.h.reactor.tcpServers
        self.assertEqual((port, interface), (7003, "127.0.0.1"))
        self.assertIn("no TLS", self.h.out.getvalue())

    def test_a_cluster_needs_postgresql_and_shared_keys(self) -> None:
        """A cluster on SQLite is refused; on PostgreSQL, a data directory without the
        cluster's keys is refused too, and no key is made in it."""
        ini = Path(self.mktemp())
        ini.write_text("[cluster]\nredis_url = redis://127.0.0.1:6379/0\n")
        with self.assertRaises(ConfigError) as e:
            self.h.build("--config", str(ini))
        self.assertIn("[store] url", str(e.exception))
        ini.write_text("[cluster]\nredis_url = redis://127.0.0.1:6379/0\n"
                       "[store]\nurl = postgresql://postgres@127.0.0.1/test\n")
        with self.assertRaises(StartupError) as e2:
            self.h.build("--config", str(ini))
        self.assertIn("storage.key", str(e2.exception))
        self.assertFalse((self.h.data_dir / "storage.key").exists())
        self.assertEqual(self.h.made, [])

    def test_bad_listen_string(self) -> None:
        with self.assertRaises(ConfigError) as e:
            self.h.build("--listen", "nonsense:1")
        self.assertIn("nonsense:1", str(e.exception))

    def test_own_certificate(self) -> None:
        key_pem, cert_pem = tls.make_self_signed(["chat.example"])
        cert, key = Path(self.mktemp()), Path(self.mktemp())
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        top = self.h.build("--cert", str(cert), "--key", str(key))
        self.assertFalse(DataDir(self.h.data_dir).cert_path.exists())
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        self.assertIn(tls.cert_fingerprint(cert_pem), self.h.out.getvalue())

    def test_corrupt_own_certificate(self) -> None:
        key_pem, _ = tls.make_self_signed(["x"])
        cert, key = Path(self.mktemp()), Path(self.mktemp())
        cert.write_text("garbage")
        key.write_bytes(key_pem)
        with self.assertRaises(StartupError) as e:
            self.h.build("--cert", str(cert), "--key", str(key))
        self.assertIn(str(cert), str(e.exception))
        self.assertIn("--cert", str(e.exception))

    def test_corrupt_datadir_certificate(self) -> None:
        self.h.build()
        DataDir(self.h.data_dir).cert_path.write_text("garbage")
        with self.assertRaises(DataDirError) as e:
            self.h.build()
        self.assertIn("tls-cert.pem", str(e.exception))
        self.assertIn("delete it", str(e.exception))

    def test_second_start_same_fingerprint(self) -> None:
        for _ in range(2):
            top = self.h.build()
            top.startService()  # type: ignore[no-untyped-call]
            top.stopService()  # type: ignore[no-untyped-call]
        fps = re.findall(r"fingerprint: (\S+)", self.h.out.getvalue())
        self.assertEqual(len(fps), 2)
        self.assertEqual(fps[0], fps[1])

    def test_cannot_listen_is_one_line(self) -> None:
        reactor = RaisingMemoryReactor(
            listenException=CannotListenError("127.0.0.1", 6697, OSError(98, "Address in use"))
        )
        for start in ("privilegedStartService", "startService"):
            top = self.h.build(reactor=reactor)
            top.stderr = stderr = io.StringIO()
            with self.assertRaises(SystemExit) as e:
                getattr(top, start)()
            self.assertEqual(e.exception.code, 1)
            self.assertEqual(stderr.getvalue().count("\n"), 1)
            self.assertIn("6697", stderr.getvalue())
            self.assertIn("Address in use", stderr.getvalue())
        self.flushLoggedErrors(CannotListenError)


    def test_proxy_protocol_reads_the_header_below_tls(self) -> None:
        ini = Path(self.mktemp())
        ini.write_text("[server]\ntrusted_proxies = 10.0.0.0/8, 2001:db8::1\n")
        top = self.h.build("--proxy-protocol", "--port", "7004", "--config", str(ini))
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        [(port, factory, _, _)] = self.h.reactor.tcpServers
        self.assertEqual(port, 7004)
        self.assertIsInstance(factory, ProxyHeaderFactory)
        self.assertIsInstance(factory.wrappedFactory, AdmittedTLSFactory)
        self.assertIs(factory.wrappedFactory.wrappedFactory, self.h.made[0].factory)
        self.assertEqual([str(n) for n in factory.trusted], ["10.0.0.0/8", "2001:db8::1/128"])
        self.assertEqual(factory.timeout, 10.0)  # [server] handshake_timeout
        out = self.h.out.getvalue()
        self.assertIn("(TLS, PROXY header first)", out)
        self.assertIn("connect through the proxy", out)
        self.assertNotIn("connect with:", out)  # straight to this port would be closed

    def test_reuse_port_and_proxy_protocol_refused_with_listen(self) -> None:
        for flag in ("--reuse-port", "--proxy-protocol"):
            with self.assertRaises(ConfigError) as e:
                self.h.build(flag, "--listen", "tcp:7005")
            self.assertIn("--listen", str(e.exception))
            self.assertIn("haproxy:", str(e.exception))

    def test_bad_trusted_proxies_is_one_line(self) -> None:
        ini = Path(self.mktemp())
        ini.write_text("[server]\ntrusted_proxies = 127.0.0.1, haproxy.local\n")
        with self.assertRaises(ConfigError) as e:
            self.h.build("--config", str(ini))
        self.assertEqual(str(e.exception), f"{ini}: [server] trusted_proxies: 'haproxy.local' "
                         "is not an IP address or network")


class MakeServiceTests(unittest.TestCase):
    def test_startup_error_is_one_line_and_exit_1(self) -> None:
        ini = Path(self.mktemp())
        ini.write_text("[server]\nport = many\n")
        o = tap.Options()
        o.parseOptions(["--config", str(ini), "--data-dir", self.mktemp()])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as e:
            tap.makeService(o)
        self.assertEqual(e.exception.code, 1)
        self.assertEqual(stderr.getvalue(),
                         f"shtalk: error: {ini}: [server] port: 'many' is not a whole number\n")


class RealReactorTests(unittest.TestCase):
    """The built tree on the real reactor: listen on a free port, connect with the pin."""

    @defer.inlineCallbacks
    def test_pinned_client_connects(self) -> Any:
        from twisted.internet import reactor

        h = Harness(self)
        top = h.build("--port", "0", reactor=reactor)
        top.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(top.stopService)
        out = h.out.getvalue()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", out)
        assert match is not None, out
        port = int(match.group(1))
        fingerprint = re.search(r"fingerprint: (\S+)", out).group(1)  # type: ignore[union-attr]
        client = TLSLineClient(b"hello\n")
        ep = endpoints.wrapClientTLS(
            tls.client_options_pinned(fingerprint, "localhost"),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        yield endpoints.connectProtocol(ep, client)
        received = yield client.done
        self.assertEqual(received, b"hello\n")

    @defer.inlineCallbacks
    def test_reuse_port_lets_two_processes_share_a_port(self) -> Any:
        """Two trees (as two processes build them) listen on one port with --reuse-port
        and the kernel hands clients to both; without it a second one cannot listen."""
        from twisted.internet import reactor

        key_pem, cert_pem = tls.make_self_signed(["localhost"])
        cert, key = Path(self.mktemp()), Path(self.mktemp())
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
        probe.close()
        served: list[list[object]] = []
        for h in (Harness(self), Harness(self)):
            top = h.build("--reuse-port", "--port", port, "--cert", str(cert), "--key",
                          str(key), reactor=reactor)
            top.startService()  # type: ignore[no-untyped-call]
            self.addCleanup(top.stopService)
            self.assertIn(f"listening on 127.0.0.1:{port} (TLS, SO_REUSEPORT)", h.out.getvalue())
            served.append(counted(h.made[0].factory))
        plain = Harness(self).build("--port", port, reactor=reactor)
        plain.stderr = io.StringIO()
        with self.assertRaises(SystemExit):
            plain.startService()  # type: ignore[no-untyped-call]
        self.assertIn("Address already in use", plain.stderr.getvalue())
        self.flushLoggedErrors(CannotListenError)
        for i in range(24):
            client = TLSLineClient(b"hello %d\n" % i)
            ep = endpoints.wrapClientTLS(
                tls.client_options_pinned(tls.cert_fingerprint(cert_pem), "localhost"),
                endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", int(port)),
            )
            yield endpoints.connectProtocol(ep, client)
            received = yield client.done
            self.assertEqual(received, b"hello %d\n" % i)
        # Spread by a hash of the client's port: all 24 on one side is a 2**-23 chance.
        self.assertEqual(len(served[0]) + len(served[1]), 24)
        self.assertTrue(served[0] and served[1], [len(x) for x in served])

    def test_reuse_port_cannot_listen_is_one_line(self) -> None:
        from twisted.internet import reactor

        top = Harness(self).build("--reuse-port", "--interface", "192.0.2.1", "--port", "7006",
                                  reactor=reactor)
        top.stderr = stderr = io.StringIO()
        with self.assertRaises(SystemExit):
            top.startService()  # type: ignore[no-untyped-call]
        self.assertEqual(stderr.getvalue().count("\n"), 1)
        self.assertIn("cannot listen on 192.0.2.1:7006: Cannot assign requested address",
                      stderr.getvalue())
        self.flushLoggedErrors(CannotListenError)
