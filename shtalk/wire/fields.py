"""Field validators: what a value on the wire may be, and how it maps to Python.

Validation happens once, at the edge: ``check`` turns a decoded JSON value into what a
handler may trust (the right type and range, binary fields already base64-decoded) or
raises `ProtocolError` whose message names the field and never echoes its value.
``load`` and ``dump`` go between that checked value and the typed records of
`shtalk.wire.records` (nested objects become records, lists become tuples), so the
server's plain-argument path and the typed path share one set of checks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.limits import MAX_DEVICE_ENVELOPES, MAX_ENVELOPE_BYTES


@dataclass(frozen=True)
class Field:
    """A validator; ``check`` returns the value handlers will see."""

    optional: bool = field(default=False, kw_only=True)
    #: ``load`` and ``dump`` change nothing (strings, numbers, booleans)
    plain: ClassVar[bool] = True

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def load(self, value: Any) -> Any:
        """The typed form of a checked value (most values are their own)."""
        return value

    def read(self, value: Any, where: str) -> Any:
        """``load(check(value))`` in one pass (what a record's ``from_json`` runs)."""
        return self.load(self.check(value, where))

    def dump(self, value: Any) -> Any:
        """The JSON form of a typed value (the inverse of ``load`` after ``check``)."""
        return value

    @staticmethod
    def bad(where: str, expected: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_FIELD, f"field '{where}' must be {expected}")


@dataclass(frozen=True)
class Str(Field):
    min_len: int = 1
    max_len: int = 256
    pattern: str | None = None
    pattern_help: str = ""
    _match: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:  # compiled once: this runs on every message
            object.__setattr__(self, "_match", re.compile(self.pattern).fullmatch)

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.bad(where, "a string")
        if not (self.min_len <= len(value) <= self.max_len):
            raise self.bad(where, f"{self.min_len}-{self.max_len} characters long")
        if self._match is not None and self._match(value) is None:
            raise self.bad(where, self.pattern_help or "in the documented form")
        return value

    def read(self, value: Any, where: str) -> str:
        return self.check(value, where)


@dataclass(frozen=True)
class Int(Field):
    min: int = 0
    max: int = 2**53

    def check(self, value: Any, where: str) -> int:
        # bool is an int subclass in Python; on the wire it is not a number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(where, "an integer")
        if not (self.min <= value <= self.max):
            raise self.bad(where, f"between {self.min} and {self.max}")
        return value

    def read(self, value: Any, where: str) -> int:
        return self.check(value, where)


@dataclass(frozen=True)
class Bool(Field):
    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(where, "true or false")
        return value


@dataclass(frozen=True)
class B64(Field):
    """Standard base64 with padding; decoded size bounded."""

    max_bytes: int = MAX_ENVELOPE_BYTES
    min_bytes: int = 1
    code: ErrorCode = ErrorCode.BAD_FIELD
    plain: ClassVar[bool] = False

    def _too_large(self, where: str) -> ProtocolError:
        code = (ErrorCode.ENVELOPE_TOO_LARGE if self.code is ErrorCode.ENVELOPE_TOO_LARGE
                else ErrorCode.BAD_FIELD)
        return ProtocolError(code, f"field '{where}' is larger than {self.max_bytes} bytes")

    def check(self, value: Any, where: str) -> bytes:
        if not isinstance(value, str):
            raise self.bad(where, "a base64 string")
        # Refuse before decoding: the encoded length bounds the work.
        if len(value) > (self.max_bytes + 2) // 3 * 4:
            raise self._too_large(where)
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.bad(where, "standard base64") from None
        if len(raw) > self.max_bytes:
            raise self._too_large(where)
        if len(raw) < self.min_bytes:
            raise self.bad(where, f"at least {self.min_bytes} bytes")
        return raw

    def dump(self, value: Any) -> str:
        return base64.b64encode(value).decode("ascii")


@dataclass(frozen=True)
class Obj(Field):
    """A nested object; with ``record`` its typed form is that record (see records.py)."""

    fields: Mapping[str, Field]
    record: Any = None
    plain: ClassVar[bool] = False

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(where, "an object")
        return check_fields(self.fields, value, where + ".")

    def load(self, value: Any) -> Any:
        return value if self.record is None else self.record.from_args(value)

    def read(self, value: Any, where: str) -> Any:
        if self.record is None:
            return self.check(value, where)
        if not isinstance(value, dict):
            raise self.bad(where, "an object")
        return self.record.from_json(value, where + ".")

    def dump(self, value: Any) -> Any:
        return value if self.record is None else value.to_json()


_INT_ONLY = {int}


@dataclass(frozen=True)
class ListOf(Field):
    item: Field
    max_items: int = 256
    min_items: int = 0
    plain: ClassVar[bool] = False

    def check(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.bad(where, "a list")
        if not (self.min_items <= len(value) <= self.max_items):
            raise self.bad(where, f"a list of {self.min_items}-{self.max_items} items")
        item = self.item
        # Fast path (ack seq lists): every item an int (not a bool) within range, the
        # types gathered in C (a generator's step per item cost more than the rest).
        if (
            isinstance(item, Int)
            and value
            and set(map(type, value)) == _INT_ONLY
            and item.min <= min(value)
            and max(value) <= item.max
        ):
            return list(value)
        return [item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]

    def load(self, value: Any) -> tuple[Any, ...]:
        if self.item.plain:
            return tuple(value)
        return tuple(self.item.load(v) for v in value)

    def dump(self, value: Any) -> list[Any]:
        if self.item.plain:
            return list(value)
        return [self.item.dump(v) for v in value]


@dataclass(frozen=True)
class MapOf(Field):
    key: Str
    value: Field
    max_items: int = MAX_DEVICE_ENVELOPES
    plain: ClassVar[bool] = False

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(where, "an object")
        if not (1 <= len(value) <= self.max_items):
            raise self.bad(where, f"an object with 1-{self.max_items} entries")
        out: dict[str, Any] = {}
        for k, v in value.items():
            self.key.check(k, f"{where} key")
            out[k] = self.value.check(v, f"{where}.{k}")
        return out

    def load(self, value: Any) -> dict[str, Any]:
        return {k: self.value.load(v) for k, v in value.items()}

    def dump(self, value: Any) -> dict[str, Any]:
        return {k: self.value.dump(v) for k, v in value.items()}


@dataclass(frozen=True)
class OneOf(Field):
    """An object with exactly one of the named keys (e.g. a user or a room)."""

    choices: Mapping[str, Field]
    record: Any = None
    plain: ClassVar[bool] = False

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.bad(where, "an object with exactly one of " + ", ".join(self.choices))
        ((k, v),) = value.items()
        if k not in self.choices:
            raise self.bad(where, "an object with exactly one of " + ", ".join(self.choices))
        return {k: self.choices[k].check(v, f"{where}.{k}")}

    def load(self, value: Any) -> Any:
        return value if self.record is None else self.record.from_args(value)

    def dump(self, value: Any) -> Any:
        return value if self.record is None else value.to_json()


def opt(f: Field) -> Field:
    """Mark a field optional without repeating every constructor argument."""
    return replace(f, optional=True)


def check_fields(
    schema: Mapping[str, Field], obj: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Check every field of ``schema`` in its order (so the first problem is the one
    reported); absent or null optional fields are left out."""
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in obj or obj[name] is None:
            if not spec.optional:
                raise ProtocolError(ErrorCode.MISSING_FIELD, f"field '{prefix}{name}' is required")
            continue
        out[name] = spec.check(obj[name], prefix + name)
    return out
