"""The table `parse_line` validates against: request name -> {field: validator}.

It is read off the request records (`shtalk.wire.requests`), so there is one
declaration of every field.  The server's handlers receive the checked values as plain
arguments (binary fields already base64-decoded) and never re-check them.
"""

from __future__ import annotations

from collections.abc import Mapping

from shtalk.wire.fields import Field
from shtalk.wire.limits import (
    DEFAULT_ENVELOPE_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_ID_LENGTH,
    PROTOCOL_VERSION,
)
from shtalk.wire.records import spec
from shtalk.wire.requests import PRE_AUTH, REQUEST_MAP

REQUESTS: dict[str, Mapping[str, Field]] = {
    name: spec(cls).fields for name, cls in REQUEST_MAP.items()
}

__all__ = [
    "DEFAULT_ENVELOPE_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_ID_LENGTH",
    "PRE_AUTH",
    "PROTOCOL_VERSION",
    "REQUESTS",
]
