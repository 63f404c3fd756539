"""The shtalk wire protocol, sans-IO: JSON lines in, validated requests out.

Nothing in this package touches a socket, a reactor or a key; the server's
LineOnlyReceiver frames bytes and hands each line to :func:`parse_line`.
"""

from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import Request, encode, error, error_from, ok, parse_line, push
from shtalk.wire.schema import PRE_AUTH, PROTOCOL_VERSION, REQUESTS

__all__ = [
    "PRE_AUTH",
    "PROTOCOL_VERSION",
    "REQUESTS",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "encode",
    "error",
    "error_from",
    "ok",
    "parse_line",
    "push",
]
