"""The operations service: sealed log, limiter sweeps, monitor sweeps, metrics, admin socket.

`Operations` answers the metrics page and the admin socket; `OperationsService` starts
and stops what they need with the tree (nothing is opened or bound before
``startService``).  Both are built by shtalk.server.compose.

The admin socket (``[admin] socket``, by default ``<data_dir>/admin.sock``, mode 0600
in the 0700 data directory, so only the server's own user can connect) speaks one JSON
object per line: ``{"cmd": "stats"}``, ``{"cmd": "flags", "all": false}``,
``{"cmd": "clear", "flag": 3}``, ``{"cmd": "suspend"|"unsuspend"|"delete", "user":
"name"}``; replies are ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
``shtalk-admin monitor`` and ``review`` are its clients.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver

from shtalk.collaborators import collaborators
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.users import Users
from shtalk.server.config import AdminSection, LogsSection, MetricsSection, ServerConfig
from shtalk.server.datadir import DataDir
from shtalk.server.net.connection import ShtalkServerFactory
from shtalk.server.ops.metrics import MetricsResource, Sample
from shtalk.server.ops.moderation import Moderation
from shtalk.server.ops.monitor import SIGNALS, Monitor
from shtalk.server.ops.ratelimit import RateLimiter
from shtalk.server.repeating import Repeating

if TYPE_CHECKING:
    from shtalk.server.ops.seclog import SealedLogObserver

log = Logger()


@collaborators
class Operations:
    """What the metrics page and the admin socket read and do."""

    factory: ShtalkServerFactory
    presence: Presence
    users: Users
    limiter: RateLimiter
    monitor: Monitor
    moderation: Moderation
    config: ServerConfig
    observer: SealedLogObserver | None = field(default=None, init=False)

    # --- metrics ----------------------------------------------------------------------
    @inlineCallbacks
    def samples(self) -> Any:
        try:
            queued = yield self.moderation.queued()
        except Exception:
            queued = -1
        f, lim, mon = self.factory, self.limiter, self.monitor
        open_flags: dict[str, int] = dict.fromkeys(SIGNALS, 0)
        for flag in mon.open_flags():
            open_flags[flag.signal] = open_flags.get(flag.signal, 0) + 1
        online = sum(len(d) for d in self.presence.online.values())
        out: list[Sample] = [
            ("shtalk_connections", "gauge", "client connections past the TLS handshake",
             [({}, float(sum(f.counts.local.values())))]),
            ("shtalk_online_users", "gauge", "accounts with at least one device online",
             [({}, float(online))]),
            ("shtalk_requests_total", "counter", "requests received", [({}, float(f.requests))]),
            ("shtalk_messages_routed_total", "counter", "messages stored and routed",
             [({}, float(mon.routed))]),
            ("shtalk_queue_depth", "gauge", "messages stored and not yet acknowledged by all",
             [({}, float(queued))]),
            ("shtalk_ratelimit_checks_total", "counter", "rate-limit checks",
             [({}, float(lim.checks))]),
            ("shtalk_ratelimit_hits_total", "counter", "requests refused by rate limiting",
             [({"action": a}, float(n)) for a, n in sorted(lim.hits.items())] or [({}, 0.0)]),
            ("shtalk_ratelimit_degraded", "gauge", "1 while Redis is down and memory is used",
             [({}, 1.0 if getattr(lim.backend, "degraded", False) else 0.0)]),
            ("shtalk_flags_open", "gauge", "open monitoring flags",
             [({"signal": s}, float(n)) for s, n in sorted(open_flags.items())]),
            ("shtalk_flags_raised_total", "counter", "monitoring flags raised since start",
             [({"signal": s}, float(mon.raised.get(s, 0))) for s in SIGNALS]),
        ]
        admission = f.admission
        if admission is not None:
            out.append(("shtalk_handshakes_pending", "gauge",
                        "sockets not yet past the TLS handshake",
                        [({}, float(len(admission.pending)))]))
            out.append(("shtalk_handshakes_dropped_total", "counter",
                        "sockets aborted before the end of their TLS handshake",
                        [({"reason": r}, float(n)) for r, n in admission.dropped.items()]))
        if self.observer is not None:
            out.append(("shtalk_sealed_log_records_total", "counter", "sealed log records",
                        [({}, float(self.observer.records))]))
        return out

    # --- the admin socket's commands --------------------------------------------------------
    @inlineCallbacks
    def admin(self, request: dict[str, Any]) -> Any:
        cmd = request.get("cmd")
        if cmd == "stats":
            samples = yield self.samples()
            top = sorted(self.monitor.sends.events.items(), key=lambda kv: -len(kv[1]))[:10]
            return {
                "metrics": {name: values for name, _, _, values in samples},
                "top_senders": [
                    {"user": self.users.name(uid), "sends": len(q)} for uid, q in top if q
                ],
                "window": self.monitor.config.window,
                "ratelimit_backend": getattr(self.limiter.backend, "name", "?"),
            }
        if cmd in ("flags", "clear"):
            yield self.monitor.refresh()  # every process's, where the store is shared
        if cmd == "flags":
            flags = self.monitor.flags.values() if request.get("all") else (
                self.monitor.open_flags())
            return {"flags": [asdict(f) for f in sorted(flags, key=lambda f: f.id)]}
        if cmd == "clear":
            flag = self.monitor.clear(int(request.get("flag", 0)))
            if flag is None:
                raise ValueError("no such flag")
            log.info("flag {flag_id} cleared by the operator", event="moderation.clear",
                     flag_id=flag.id)
            return {"flag": asdict(flag)}
        if cmd in ("suspend", "unsuspend", "delete"):
            found = yield self.moderation.lookup(str(request.get("user", "")))
            if found is None:
                raise ValueError("no such account")
            uid = found[0]
            if cmd == "delete":
                done = yield self.moderation.delete(uid)
            else:
                status = "suspended" if cmd == "suspend" else "active"
                done = yield self.moderation.set_status(uid, status)
            return {"user": found[1], "changed": bool(done)}
        raise ValueError(f"unknown command {str(cmd)[:40]!r}")


class AdminProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 65536
    factory: AdminFactory

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("send one JSON object per line")
        except ValueError as e:
            self._answer({"ok": False, "error": str(e)[:200]})
            return
        d = maybeDeferred(self.factory.ops.admin, request)
        d.addCallbacks(lambda r: self._answer({"ok": True, **r}),
                       lambda f: self._answer({"ok": False, "error": f.getErrorMessage()[:200]}))

    def _answer(self, reply: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(reply).encode() + b"\n")


class AdminFactory(Factory):
    protocol = AdminProtocol  # type: ignore[assignment]

    def __init__(self, ops: Operations) -> None:
        self.ops = ops


class OperationsService(Service):
    name = "operations"

    def __init__(self, ops: Operations, datadir: DataDir, clock: IReactorTime) -> None:
        self.ops = ops
        self.datadir = datadir
        self.clock = clock
        self._ports: list[Any] = []
        self._sweep: Repeating | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._start_log()
        self.ops.monitor.load_stored()  # from a database: every process's flags
        self.ops.limiter.start()
        self._sweep = Repeating(self.clock, 60.0, self.ops.monitor.sweep, "monitor sweep failed")
        self._sweep.start()
        from twisted.internet import reactor

        config = self.ops.config
        admin = config.section(AdminSection)
        if admin.socket != "off":
            self._listen_admin(reactor, Path(admin.socket or self.datadir.path / "admin.sock"))
        metrics = config.section(MetricsSection)
        if metrics.enabled:
            from twisted.web.server import Site

            site: Any = Site(MetricsResource(self.ops.samples))  # type: ignore[no-untyped-call]
            site.displayTracebacks = False
            port = reactor.listenTCP(  # type: ignore[attr-defined]
                metrics.port, site, interface=metrics.interface)
            self._ports.append(port)
            self.metrics_port = int(port.getHost().port)  # type: ignore[attr-defined]
            log.info("metrics on http://{line}/metrics", event="metrics.listening",
                     line=f"{metrics.interface}:{self.metrics_port}")

    def _listen_admin(self, reactor: Any, path: Path) -> None:
        """The admin socket; a problem with it is logged and never stops the chat server."""
        if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to 107 bytes
            log.error("admin socket {path} not opened: the path is too long for a UNIX "
                      "socket; set [admin] socket to a shorter one", path=str(path)[-80:],
                      event="admin.off")
            return
        if path.exists() or path.is_symlink():
            path.unlink()
        old = os.umask(0o177)
        try:
            port = reactor.listenUNIX(str(path), AdminFactory(self.ops), mode=0o600)
        except Exception as e:
            log.error("admin socket not opened: {what}", what=str(e)[:200], event="admin.off")
            return
        finally:
            os.umask(old)
        self._ports.append(port)

    def _start_log(self) -> None:
        cfg = self.ops.config.section(LogsSection)
        if not cfg.public_key_file:
            log.warn("no [logs] public_key_file: sealed operator logs are off "
                     "(make a key pair with `shtalk-admin logs keygen`)", event="seclog.off")
            return
        from shtalk.server.ops import seclog
        public = seclog.load_public_key(Path(cfg.public_key_file).read_text(encoding="ascii"))
        path = Path(cfg.path) if cfg.path else self.datadir.path / "logs" / "shtalk.log.sealed"
        observer = seclog.SealedLogObserver(
            path, public, seclog.pseudonym_key(self.datadir.path), cfg.max_bytes,
            cfg.backup_count, cfg.level,
        )
        self.ops.observer = observer
        globalLogPublisher.addObserver(observer)
        log.info("sealed log started", event="seclog.start")

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._sweep is not None:
            self._sweep.stop()
        self._sweep = None
        self.ops.limiter.stop()
        ports, self._ports = self._ports, []
        ds = [maybeDeferred(p.stopListening) for p in ports]
        observer, self.ops.observer = self.ops.observer, None
        if observer is not None:
            log.info("sealed log stopped", event="seclog.stop")
            globalLogPublisher.removeObserver(observer)
            observer.close()
        if ds:
            from twisted.internet.defer import gatherResults

            return gatherResults(ds).addCallback(lambda _: None)
        return succeed(None)
