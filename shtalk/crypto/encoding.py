"""A small, strict binary codec shared by every wire format and state blob.

All multi-byte integers are big-endian.  Variable-length byte strings carry a
length prefix (``u16`` for short items, ``u32`` for long ones), text is UTF-8
inside a ``u16``-prefixed string.  There are no optional encodings and no
padding, so one value has exactly one encoding: that is what makes the
signatures over these bytes canonical.

:class:`Reader` never lets a :class:`struct.error`, :class:`IndexError` or
:class:`UnicodeDecodeError` escape: running past the end, an over-long length
or trailing bytes raise :class:`~shtalk.crypto.errors.DecodeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

from .errors import DecodeError, UnsupportedVersion

__all__ = ["MAX_BLOB", "Reader", "Writer", "read_whole"]

_T = TypeVar("_T")

#: Upper bound on any single length-prefixed item (1 MiB): far above anything
#: legitimate, low enough that a hostile length cannot make us allocate much.
MAX_BLOB = 1 << 20

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Writer:
    """Append-only encoder; :meth:`getvalue` returns the bytes."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(bytes((value,)))
        return self

    def u16(self, value: int) -> Writer:
        self._parts.append(_U16.pack(value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(_U32.pack(value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(_U64.pack(value))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        """Exactly ``size`` bytes, no prefix."""
        if len(data) != size:
            raise ValueError("fixed field has the wrong size")  # programming error
        self._parts.append(data)
        return self

    def raw(self, data: bytes) -> Writer:
        """Bytes with no prefix (only for trailing fields whose size is implied)."""
        self._parts.append(data)
        return self

    def short(self, data: bytes) -> Writer:
        """``u16`` length then bytes."""
        self._parts.append(_U16.pack(len(data)))
        self._parts.append(data)
        return self

    def blob(self, data: bytes) -> Writer:
        """``u32`` length then bytes."""
        if len(data) > MAX_BLOB:
            raise ValueError("blob too large")  # programming error
        self._parts.append(_U32.pack(len(data)))
        self._parts.append(data)
        return self

    def text(self, value: str) -> Writer:
        """``u16`` length then UTF-8."""
        return self.short(value.encode("utf-8"))

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Strict decoder over a bytes object; call :meth:`done` at the end."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str = "message") -> None:
        if type(data) is not bytes:
            if not isinstance(data, bytearray | memoryview):
                raise DecodeError(f"{what}: expected bytes")
            data = bytes(data)
        self._data = data
        self._pos = 0
        self._what = what

    def _truncated(self) -> DecodeError:
        return DecodeError(f"{self._what}: truncated")

    def _take(self, size: int) -> bytes:
        pos = self._pos
        end = pos + size
        if size < 0 or end > len(self._data):
            raise self._truncated()
        self._pos = end
        return self._data[pos:end]

    def _int(self, size: int) -> int:
        pos = self._pos
        end = pos + size
        if end > len(self._data):
            raise self._truncated()
        self._pos = end
        return int.from_bytes(self._data[pos:end], "big")

    def u8(self) -> int:
        pos = self._pos
        if pos >= len(self._data):
            raise self._truncated()
        self._pos = pos + 1
        return self._data[pos]

    def u16(self) -> int:
        return self._int(2)

    def u32(self) -> int:
        return self._int(4)

    def u64(self) -> int:
        return self._int(8)

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def short(self, max_size: int = 0xFFFF) -> bytes:
        data, pos = self._data, self._pos
        if pos + 2 > len(data):
            raise self._truncated()
        size = (data[pos] << 8) | data[pos + 1]
        end = pos + 2 + size
        if size > max_size:
            raise DecodeError(f"{self._what}: field too long")
        if end > len(data):
            raise self._truncated()
        self._pos = end
        return data[pos + 2 : end]

    def blob(self, max_size: int = MAX_BLOB) -> bytes:
        size = self._int(4)
        if size > max_size:
            raise DecodeError(f"{self._what}: field too long")
        return self._take(size)

    def text(self, max_size: int = 1024) -> str:
        data = self.short(max_size)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"{self._what}: text is not UTF-8") from None

    def version(self, *supported: int) -> int:
        """Read a version byte and refuse any not in ``supported``."""
        value = self.u8()
        if value not in supported:
            raise UnsupportedVersion(f"{self._what}: unsupported version {value}")
        return value

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise DecodeError(f"{self._what}: bad flag byte")
        return value == 1

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def done(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{self._what}: trailing bytes")


def read_whole(data: bytes, what: str, read: Callable[[Reader], _T]) -> _T:
    """``read`` over all of ``data``: a value followed by anything else is refused, so
    one value keeps exactly one encoding."""
    r = Reader(data, what)
    value = read(r)
    r.done()
    return value
