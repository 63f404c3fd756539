"""TCP_NODELAY for every connection shtalk makes or accepts: client, server, and a
cluster's Redis connections."""

from __future__ import annotations

import contextlib
from typing import Any


def set_nodelay(transport: Any) -> None:
    """Small writes go out at once: shtalk writes whole lines and waits for answers (the
    bus's publisher for none at all), where Nagle's algorithm would hold the next write
    until the peer's delayed ACK.  The TLS wrapper forwards to the TCP transport under
    it; another transport (a test's, a UNIX socket) is left as it is."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        with contextlib.suppress(Exception):
            setter(True)
