# mypy: disallow-untyped-calls=False
# (twisted.web's Request and Resource are untyped.)
"""Prometheus text-format metrics, served over HTTP on loopback only (off by default).

``GET /metrics`` answers in the text exposition format (version 0.0.4).  Everything is
a count or a size: no names, addresses or message contents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()

Sample = tuple[str, str, str, list[tuple[dict[str, str], float]]]
"""(name, type, help, [(labels, value)])"""


def render(samples: list[Sample]) -> bytes:
    out: list[str] = []
    for name, kind, help_text, values in samples:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in values:
            label = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            num = repr(float(value)) if value != int(value) else str(int(value))
            out.append(f"{name}{{{label}}} {num}" if label else f"{name} {num}")
    return ("\n".join(out) + "\n").encode()


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, collect: Callable[[], Deferred[list[Sample]]]) -> None:
        super().__init__()
        self.collect = collect

    def render_GET(self, request: Request) -> Any:
        if request.path not in (b"/metrics", b"/"):
            request.setResponseCode(404)
            return b"not found\n"
        d = self.collect()

        def done(samples: list[Sample]) -> None:
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            request.write(render(samples))
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("collecting metrics failed", failure)
            request.setResponseCode(500)
            request.write(b"metrics unavailable\n")
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET
