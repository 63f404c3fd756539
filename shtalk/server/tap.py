"""``twistd shtalk``: command-line options and the service tree they describe.

Why it looks like this: ``makeService`` only reads and checks (configuration, data
directory, certificate) and wires services together; it starts nothing, so every
listening socket, database connection and timer begins in ``startService``.  Everything
that can be wrong with an operator's set-up is found here, before the reactor runs, and
reported as one line on stderr naming the file and the fix (no traceback), with exit
status 1.  Precedence: built-in defaults < ``--config`` file < command line.
"""

from __future__ import annotations

import importlib
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from shtalk.server import tls
from shtalk.server.config import (
    ClusterSection,
    ConfigError,
    ServerConfig,
    StartupError,
    StoreSection,
    resolve_data_dir,
)
from shtalk.server.config.core import networks
from shtalk.server.datadir import DEFAULT_TLS_NAMES, DataDir
from shtalk.server.net import reuseport
from shtalk.server.net.admission import AdmittedTLSFactory, PendingHandshakes
from shtalk.server.net.proxied import ProxyHeaderFactory

log = Logger()

#: Listen backlog: a burst of connections waits in the kernel instead of being refused
#: (the kernel caps it at net.core.somaxconn; Twisted's default is 50).
BACKLOG = 1024

MakeChatService = Callable[[ServerConfig, DataDir], IServiceCollection]


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("a port is 0..65535")
    return port


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


class Options(usage.Options):
    """Options of ``twistd shtalk``; unset ones fall back to the config file, then defaults."""

    synopsis = "[options]"
    longdesc = (
        "Run the shtalk chat server: newline-delimited JSON over TLS. "
        "On first start it creates its data directory (mode 0700) with a storage key, "
        "a token-signing key and a self-signed TLS certificate (files 0600), and prints "
        "the certificate's SHA-256 fingerprint for clients to pin. Settings come from "
        "built-in defaults, then --config, then these options (the command line wins)."
    )

    optParameters: list[list[Any]] = [
        [
            "config",
            "c",
            None,
            "INI configuration file (see conf/shtalk.ini for every key, documented). "
            "Unknown sections or keys are errors.",
        ],
        [
            "data-dir",
            "d",
            None,
            "Directory for the database, keys and certificate "
            "[default: $XDG_DATA_HOME/shtalk, i.e. ~/.local/share/shtalk].",
        ],
        [
            "interface",
            "i",
            None,
            "Address to listen on; 0.0.0.0 or :: for every interface [default: 127.0.0.1].",
        ],
        ["port", "p", None, "TLS port to listen on; 0 picks a free one [default: 6697].", _port],
        [
            "listen",
            "l",
            None,
            "Twisted server endpoint string to listen on instead of --interface/--port, e.g. "
            "'tcp:6697:interface=127.0.0.1' behind a TLS-terminating proxy (no TLS here!) or "
            "'unix:/run/shtalk.sock'. 'ssl:...' strings use Twisted's TLS settings, not "
            "shtalk's; the default listener applies shtalk's policy (TLS >= 1.2, ECDHE+AEAD).",
        ],
        [
            "cert",
            None,
            None,
            "TLS certificate chain file (PEM, server certificate first); needs --key "
            "[default: self-signed ECDSA P-256 certificate made in the data directory].",
        ],
        ["key", None, None, "Unencrypted PEM private key for --cert."],
        [
            "max-connections-per-address",
            None,
            None,
            "Simultaneous connections allowed from one IP address once past the TLS "
            "handshake; to benchmark from one host raise it and [server] "
            "max_pending_handshakes_per_address [default: 20].",
            _positive,
        ],
    ]

    optFlags: list[list[Any]] = [
        [
            "reuse-port",
            None,
            "Set SO_REUSEPORT on --interface/--port so several shtalk processes on this "
            "host share the port (the kernel spreads connections over them).",
        ],
        [
            "proxy-protocol",
            None,
            "Behind HAProxy (TCP mode, TLS passed through, send-proxy-v2): read the PROXY "
            "header before TLS and use the client address it names; connections without "
            "one, or not from [server] trusted_proxies, are closed.",
        ],
    ]

    _FLAGS = {"reuse-port": "reuse_port", "proxy-protocol": "proxy_protocol"}

    _OVERRIDES = {
        "data-dir": "data_dir",
        "interface": "interface",
        "port": "port",
        "listen": "listen",
        "cert": "cert",
        "key": "key",
        "max-connections-per-address": "max_connections_per_address",
    }

    def server_overrides(self) -> dict[str, object]:
        """The ``[server]`` values given on the command line (typed)."""
        values = {key: self[opt] for opt, key in self._OVERRIDES.items() if self[opt] is not None}
        values.update({key: True for opt, key in self._FLAGS.items() if self[opt]})
        return values

    def postOptions(self) -> None:
        for opt in ("config", "data-dir", "cert", "key", "listen", "interface"):
            if self[opt] is not None and not str(self[opt]).strip():
                raise usage.UsageError(f"--{opt} needs a non-empty value")


def load_config(options: Options) -> ServerConfig:
    """Defaults < file < command line, with the data directory resolved to a path."""
    config = ServerConfig.from_file(options["config"]) if options["config"] else ServerConfig()
    config = config.with_overrides({"server": options.server_overrides()})
    server = config.server
    if bool(server.cert) != bool(server.key):
        raise ConfigError(
            f"{config.source}: [server] cert and key (or --cert and --key) go together: give "
            "both, or neither to use the self-signed certificate in the data directory"
        )
    data_dir = str(resolve_data_dir(config).absolute())
    return config.with_overrides({"server": {"data_dir": data_dir}}, source="data dir")


@implementer(IStreamServerEndpoint)
class AnnouncingEndpoint:
    """Wraps an endpoint to tell the operator where it listens, once it does."""

    def __init__(self, endpoint: IStreamServerEndpoint, announce: Callable[[Any], None]) -> None:
        self._endpoint = endpoint
        self._announce = announce

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self._endpoint.listen(protocolFactory)

        def announce(port: IListeningPort) -> IListeningPort:
            self._announce(port.getHost())
            return port

        return d.addCallback(announce)


def _host_for_humans(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104
        host = socket.gethostname()
    return f"[{host}]" if ":" in host else host


def announcement(
    address: Any, fingerprint: str | None, listen: str, *,
    reuse_port: bool = False, proxied: bool = False,
) -> list[str]:
    """The lines telling an operator where the server is and how to connect."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    inet = isinstance(host, str) and isinstance(port, int)
    bound = f"[{host}]:{port}" if inet and ":" in str(host) else f"{host}:{port}"
    kind = "TLS" if not listen else f"endpoint {listen}"
    kind += ", SO_REUSEPORT" if reuse_port else ""
    kind += ", PROXY header first" if proxied else ""
    lines = [f"shtalk listening on {bound if inet else address} ({kind})"]
    if fingerprint is not None:
        lines.append(f"TLS certificate SHA-256 fingerprint: {fingerprint}")
    if listen and not listen.startswith("ssl:"):
        lines.append(
            f"note: --listen {listen} carries no TLS of its own; terminate TLS in front of it"
        )
    if proxied:
        lines.append("note: clients connect through the proxy (e.g. HAProxy with "
                     "send-proxy-v2); a connection without its PROXY header is closed")
    elif inet:
        where = f"{_host_for_humans(str(host))}:{port}"
        lines.append(f"connect with: {client_command()} {where}")
        lines.append(f"      or try: openssl s_client -connect {where}")
    return lines


def client_command() -> str:
    """The command that starts the terminal client from here, exactly: ``shtalk-urwid``
    when that is what the shell finds, else the script next to this Python (e.g.
    ``.venv/bin/shtalk-urwid`` for ``make run`` in a checkout)."""
    script = Path(sys.executable).parent / "shtalk-urwid"
    found = shutil.which("shtalk-urwid")
    if found and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "shtalk-urwid"
    if script.exists():
        try:
            return str(script.absolute().relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{sys.executable} -m shtalk.clientui.main"


def log_reaches(stream: Any) -> bool:
    """Whether a log observer already writes to ``stream`` (``twistd -n`` logs to
    stdout): then the start-up lines go there once, plain, instead of twice."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    from twisted.logger import globalLogPublisher

    for observer in getattr(globalLogPublisher, "_observers", ()):
        out = getattr(observer, "_outFile", None)
        try:
            if out is not None and out.fileno() == fd:
                return True
        except (AttributeError, OSError, ValueError):
            continue
    return False


class ShtalkService(MultiService):
    """Top of the tree; turns a failure to listen into one line and exit status 1.

    twistd binds in ``privilegedStartService`` (and a plain ``startService`` binds if
    that was skipped), both before the reactor runs, and a TCP/TLS listen fails
    synchronously (port in use, address not available), so the start stops there.
    twistd has already redirected ``sys.stderr`` into the log by then, so the line goes
    to the log and to the real stderr (``stderr``, overridable for tests).
    """

    stderr: Any = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            self._cannot_listen(e)

    def startService(self) -> None:
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            self._cannot_listen(e)

    def _cannot_listen(self, e: CannotListenError) -> NoReturn:
        message = (
            f"cannot listen on {e.interface or '*'}:{e.port}: {_reason(e.socketError)}; "
            "choose another with --port/--interface/--listen"
        )
        log.critical("{message}", message=message)
        fail(message, self.stderr if self.stderr is not None else sys.__stderr__)


def _reason(error: object) -> str:
    strerror = getattr(error, "strerror", None)
    return str(strerror) if strerror else str(error)


def build_service(
    options: Options,
    reactor: Any,
    make_chat_service: MakeChatService | None = None,
    out: Any = None,
) -> ShtalkService:
    """The work of `makeService`, raising `StartupError` instead of exiting (testable)."""
    from twisted.internet import endpoints

    config = load_config(options)
    server = config.server
    datadir = DataDir(server.data_dir)
    own_cert = not server.cert
    tls_names = (*DEFAULT_TLS_NAMES, server.interface) if own_cert else None
    cluster = config.section(ClusterSection)
    if cluster.enabled and not config.section(StoreSection).postgres:
        raise ConfigError(
            "[cluster] redis_url is set but [store] url is not a postgresql:// URL: the "
            "processes of a cluster share one PostgreSQL database (see README, \"Running "
            "several processes\")"
        )
    datadir.ensure(tls_names=tls_names, mint_keys=not cluster.enabled)
    if own_cert:
        cert_path = datadir.cert_path
        tls_options = datadir.tls_server_options()
    else:
        cert_path = Path(server.cert)
        tls_options = tls.load_server_options(
            cert_path,
            Path(server.key),
            remedy="check --cert/--key (or [server] cert/key in the config file)",
        )
    fingerprint = tls.cert_fingerprint(cert_path.read_bytes())

    if server.listen and (server.reuse_port or server.proxy_protocol):
        raise ConfigError(
            "--reuse-port and --proxy-protocol (and [server] reuse_port, proxy_protocol) "
            "apply to shtalk's own TLS listener on --interface/--port, not to --listen; "
            "with --listen use Twisted's haproxy: prefix for a PROXY header before plain TCP"
        )
    if server.reuse_port and not reuseport.AVAILABLE:
        raise ConfigError("--reuse-port: this system has no SO_REUSEPORT")
    if server.listen:
        try:
            endpoint = endpoints.serverFromString(  # type: ignore[no-untyped-call]
                reactor, server.listen
            )
        except Exception as e:  # the endpoint parsers raise many kinds of error
            raise ConfigError(
                f"--listen / [server] listen {server.listen!r}: invalid endpoint string "
                f"({' '.join(str(e).split()) or type(e).__name__}); "
                "see https://docs.twisted.org/en/stable/core/howto/endpoints.html"
            ) from None
    elif server.reuse_port:
        endpoint = reuseport.ReusePortEndpoint(
            reactor, server.port, backlog=BACKLOG, interface=server.interface
        )
    else:
        # listenSSL's set-up (TCP under Twisted's TLS), with the handshake admitted.
        endpoint = endpoints.TCP4ServerEndpoint(  # type: ignore[no-untyped-call]
            reactor, server.port, backlog=BACKLOG, interface=server.interface
        )

    if make_chat_service is None:
        # Imported late: the chat service (the lead's module) pulls in the store etc.
        service_module = importlib.import_module("shtalk.server.compose")
        make_chat_service = cast(MakeChatService, service_module.make_chat_service)

    chat = make_chat_service(config, datadir)
    stdout = sys.__stdout__ if out is None else out

    def announce(address: Any) -> None:
        lines = announcement(address, fingerprint, server.listen,
                             reuse_port=server.reuse_port, proxied=server.proxy_protocol)
        lines += getattr(chat, "startup_notes", [])  # e.g. where mail goes
        if stdout is None or not log_reaches(stdout):
            for line in lines:
                log.info("{line}", line=line)
        if stdout is not None:
            stdout.write("\n".join(lines) + "\n")
            stdout.flush()

    factory: IProtocolFactory = chat.factory  # type: ignore[attr-defined,union-attr]
    if not server.listen:
        admission = getattr(factory, "admission", None) or PendingHandshakes.from_config(
            server, reactor
        )
        factory = AdmittedTLSFactory(tls_options, factory, admission, reactor)
        if server.proxy_protocol:
            # Below TLS: the header comes before the ClientHello (shtalk.server.net.proxied).
            factory = ProxyHeaderFactory(
                factory, networks(server.trusted_proxies), reactor,
                timeout=float(server.handshake_timeout),
            )
    listener = StreamServerEndpointService(  # type: ignore[no-untyped-call]
        AnnouncingEndpoint(endpoint, announce), factory
    )
    listener._raiseSynchronously = True  # as strports.service does: fail start-up loudly
    listener.setName("listener")  # type: ignore[no-untyped-call]
    listener.setServiceParent(chat)  # type: ignore[no-untyped-call]
    top = ShtalkService()  # type: ignore[no-untyped-call]
    IService(chat).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top


def fail(message: str, stream: Any = None) -> NoReturn:
    """One line on stderr, exit status 1: what twistd users see for a start-up problem."""
    stream = sys.stderr if stream is None else stream
    if stream is not None:
        stream.write(f"shtalk: error: {' '.join(message.split())}\n")
        stream.flush()
    raise SystemExit(1)


def makeService(options: Options) -> MultiService:
    """twistd's entry point (via ``twisted/plugins/shtalk_plugin.py``)."""
    from twisted.internet import reactor

    try:
        return build_service(options, reactor)
    except StartupError as e:
        fail(str(e))
