"""JSON-lines framing for both sides of the wire.

Server side: bytes of one line in, a validated `Request` out (`parse_line`); replies and
pushes out as bytes.  Client side: a typed request out as one line (`request_line`), a
server line in as a JSON object (`read_server_line`), a reply's error as a code and a
message (`reply_error`); pushes are typed by `shtalk.wire.pushes.parse_push`.

Sans-IO: nothing here knows about transports, so every path is testable
with plain bytes (and fuzzed with hypothesis).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shtalk.wire.errors import ErrorCode, ProtocolError, code_of
from shtalk.wire.fields import check_fields
from shtalk.wire.limits import MAX_ID_LENGTH
from shtalk.wire.records import ClientRequest
from shtalk.wire.requests import REQUEST_MAP
from shtalk.wire.schema import REQUESTS

RequestId = str | int

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request as the server reads it: its arguments by wire name."""

    id: RequestId
    type: str
    args: Mapping[str, Any]

    def typed(self) -> ClientRequest:
        """The same request as its record (`shtalk.wire.requests`)."""
        return REQUEST_MAP[self.type].from_args(self.args)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's decoder accepts them by default.
    raise ValueError(name)


_strict_decoder = json.JSONDecoder(parse_constant=_reject_constant)


# A lone surrogate can only come from a \u escape (the UTF-8 decoder refuses encoded
# ones); no such escape in the bytes means no walk over the object.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_text(s: str) -> bool:
    """True unless ``s`` holds a lone surrogate (which no UTF-8 text can carry)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where the first lone surrogate is, for the error message (never the text itself)."""
    if isinstance(value, str):
        return None if _is_text(value) else f"field '{where}'"
    if isinstance(value, dict):
        for k, v in value.items():
            if not _is_text(k):
                return f"a field name in '{where}'" if where else "a field name"
            found = _lone_surrogate(v, f"{where}.{k}" if where else k)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _refuse_lone_surrogates(obj: dict[str, Any]) -> None:
    where = _lone_surrogate(obj, "")
    if where is None:
        return
    rid = _request_id(obj)
    if isinstance(rid, str) and not _is_text(rid):
        rid = None
    raise ProtocolError(
        ErrorCode.BAD_FIELD,
        f"{where} is not Unicode text: a \\u escape names a lone surrogate (U+D800-U+DFFF)",
        rid,
    )


def _request_id(obj: Mapping[str, Any]) -> RequestId | None:
    rid = obj.get("id")
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) and 0 <= rid < 2**53:
        return rid
    if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LENGTH:
        return rid
    return None


def parse_line(line: bytes) -> Request:
    """Decode and validate one request line (without its newline).

    Raises ProtocolError only; the error carries the request id whenever the
    line got far enough for one to be read, so the reply can echo it.
    """
    try:
        text = line.decode("utf-8")
        obj = _strict_decoder.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "the line is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.NOT_AN_OBJECT, "each line must be one JSON object")
    if _SURROGATE_ESCAPE.search(line) is not None:
        _refuse_lone_surrogates(obj)
    rid = _request_id(obj)
    if rid is None:
        if "id" not in obj:
            raise ProtocolError(ErrorCode.MISSING_FIELD, "field 'id' is required")
        raise ProtocolError(
            ErrorCode.BAD_FIELD,
            f"field 'id' must be a string of 1-{MAX_ID_LENGTH} characters or an integer",
        )
    rtype = obj.get("type")
    if rtype is None:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "field 'type' is required", rid)
    if not isinstance(rtype, str) or rtype not in REQUESTS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            "unknown request type; see docs/PROTOCOL.md for the list",
            rid,
        )
    schema = REQUESTS[rtype]
    for key in obj:
        if key not in schema and key not in ("id", "type"):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"'{rtype}' has no field '{key[:40]}'", rid)
    try:
        args = check_fields(schema, obj)
    except ProtocolError as e:
        e.request_id = rid
        raise
    return Request(rid, rtype, args)


def encode(obj: Mapping[str, Any]) -> bytes:
    """One compact JSON line; the bytes can be written to many transports."""
    return _encoder.encode(obj).encode("utf-8") + b"\n"


def ok(request_id: RequestId | None, **fields: Any) -> bytes:
    return encode({"id": request_id, "ok": True, **fields})


def error(request_id: RequestId | None, code: ErrorCode, message: str, **extra: Any) -> bytes:
    err: dict[str, Any] = {"code": str(code), "message": message}
    err.update(extra)
    return encode({"id": request_id, "ok": False, "error": err})


def error_from(exc: ProtocolError) -> bytes:
    return error(exc.request_id, exc.code, exc.message, **exc.extra)


def push(ptype: str, **fields: Any) -> bytes:
    return encode({"type": ptype, **fields})


# -- the client's side ---------------------------------------------------------------


def request_line(request_id: int, request: ClientRequest) -> bytes:
    """One request as the line a client writes (without its newline)."""
    return _encoder.encode({"id": request_id, **request.to_json()}).encode("utf-8")


def read_server_line(line: bytes) -> dict[str, Any] | None:
    """A line from the server as a JSON object; None if it is not one (the caller says
    so in its log, without the line: it may carry tokens)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def reply_error(reply: Mapping[str, Any]) -> tuple[ErrorCode | str, str]:
    """The code and the message of an ``ok: false`` reply.  A code this side does not
    know stays a string (a newer server's); a reply without an error object is
    ``internal_error``."""
    error = reply.get("error")
    if not isinstance(error, dict):
        return ErrorCode.INTERNAL_ERROR, "malformed error reply"
    return code_of(str(error.get("code", ErrorCode.INTERNAL_ERROR))), str(error.get("message", ""))
