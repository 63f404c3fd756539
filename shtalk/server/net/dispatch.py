"""Which code runs a request: each request type to its one handler, resolved once.

Two stages, as Synapse's ``handle_command``: the connection's own ``on_<type>``
(``hello``, ``ping``: about the connection itself), else the ``on_<type>`` of the one
handler object that has it (login flows, chat, account).  Each handler is called as
``handler(connection, request)``.  The table is built when the factory is, so a request
type with no handler, or with two, stops the server at start-up instead of failing a
request later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from shtalk.wire.frames import Request
from shtalk.wire.schema import REQUESTS

Handler = Callable[[Any, Request], Any]


def dispatch_table(connection: type, handlers: Iterable[object]) -> dict[str, Handler]:
    """Each request type to the function that runs it (``connection``: its class)."""
    handlers = list(handlers)
    table: dict[str, Handler] = {}
    for rtype in REQUESTS:
        name = "on_" + rtype
        found = [getattr(connection, name)] if hasattr(connection, name) else []
        found += [getattr(h, name) for h in handlers if hasattr(h, name)]
        if len(found) != 1:
            raise ValueError(f"request {rtype!r} has {len(found)} handlers; it needs one")
        table[rtype] = found[0]
    return table
