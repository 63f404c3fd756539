"""The attacker of bench/flood: silent TCP sockets that never send a ClientHello.

    .venv/bin/python -m bench.floodattack --port P [--sockets 2000] [--addresses 100]
                                          [--rate 8] [--reopen-delay S]

Opens ``--sockets`` connections to 127.0.0.1:P, spread evenly over the source addresses
127.0.0.2 ... 127.0.0.(``--addresses`` + 1), as fast as the kernel lets it, then
``--rate`` more per second (same addresses, in turn) and holds every one of them open
without sending a byte.  With ``--reopen-delay S`` a socket the server closed is opened
again (from the same address) S seconds later, so the attacker keeps its population up
instead of letting the server's deadline win.

Signals: SIGUSR1 stops opening anything (new or reopened) and keeps holding what is
open; SIGTERM closes everything and exits.  Status goes to stdout as JSON lines:
``{"event": "ready", ...}`` once the initial sockets are connected, then
``{"event": "status", ...}`` every second (open, opened, closed by the server, failed
connects).
"""

from __future__ import annotations

import argparse
import heapq
import json
import selectors
import signal
import socket
import sys
import time
from typing import Any

from tests.harness import silent_socket


class Attacker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.target = ("127.0.0.1", args.port)
        self.sources = [f"127.0.0.{2 + i}" for i in range(args.addresses)]
        self.want = args.sockets
        self.rate = args.rate
        self.reopen_delay = args.reopen_delay
        self.sel = selectors.DefaultSelector()
        self.connecting: dict[socket.socket, str] = {}
        self.open: dict[socket.socket, str] = {}
        self.reopen: list[tuple[float, str]] = []  # (when, source address) heap
        self.next_source = 0
        self.opened = self.closed_by_server = self.failed = 0
        self.opening = True
        self.stop = False

    def source(self) -> str:
        address = self.sources[self.next_source % len(self.sources)]
        self.next_source += 1
        return address

    def connect(self, address: str) -> None:
        s = silent_socket(address, self.target)
        if s is None:
            self.failed += 1
            return
        self.connecting[s] = address
        self.sel.register(s, selectors.EVENT_WRITE)

    def _event(self, s: socket.socket, mask: int) -> None:
        now = time.monotonic()
        if s in self.connecting:
            address = self.connecting.pop(s)
            self.sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                s.close()
                self.failed += 1
                self._later(now, address)
                return
            self.open[s] = address
            self.opened += 1
            self.sel.register(s, selectors.EVENT_READ)  # readable = data or the close
            return
        address = self.open.pop(s)
        self.sel.unregister(s)
        s.close()
        self.closed_by_server += 1
        self._later(now, address)

    def _later(self, now: float, address: str) -> None:
        if self.reopen_delay is not None:
            heapq.heappush(self.reopen, (now + self.reopen_delay, address))

    def status(self, event: str) -> None:
        line = {
            "event": event, "t": time.monotonic(), "open": len(self.open),
            "connecting": len(self.connecting), "opened": self.opened,
            "closed_by_server": self.closed_by_server, "failed": self.failed,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        for _ in range(self.want):
            self.connect(self.source())
        ready_sent = False
        started = time.monotonic()
        next_new = started + 1.0 / self.rate if self.rate else float("inf")
        next_status = started + 1.0
        while not self.stop:
            now = time.monotonic()
            timeout = max(0.0, min(next_new, next_status) - now)
            if self.reopen:
                timeout = min(timeout, max(0.0, self.reopen[0][0] - now))
            for key, mask in self.sel.select(timeout):
                self._event(key.fileobj, mask)  # type: ignore[arg-type]
            now = time.monotonic()
            if not ready_sent and not self.connecting:
                ready_sent = True
                self.status("ready")
                next_new = now + 1.0 / self.rate if self.rate else float("inf")
            if self.opening and ready_sent:
                while now >= next_new:
                    self.connect(self.source())
                    next_new += 1.0 / self.rate
                while self.reopen and self.reopen[0][0] <= now:
                    self.connect(heapq.heappop(self.reopen)[1])
            if now >= next_status:
                next_status += 1.0
                self.status("status")
        for s in [*self.open, *self.connecting]:
            s.close()
        self.status("closed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--addresses", type=int, default=100)
    parser.add_argument("--rate", type=float, default=8.0, help="new sockets per second")
    parser.add_argument("--reopen-delay", type=float, default=None)
    args = parser.parse_args(argv)
    attacker = Attacker(args)

    def stop_opening(*_: Any) -> None:
        attacker.opening = False
        attacker.reopen.clear()

    def stop(*_: Any) -> None:
        attacker.stop = True

    signal.signal(signal.SIGUSR1, stop_opening)
    signal.signal(signal.SIGTERM, stop)
    attacker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
