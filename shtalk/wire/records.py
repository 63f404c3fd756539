"""Typed records of the wire: a frozen dataclass whose fields carry their validators.

A field is declared once, as ``name: Annotated[type, validator]``; the validator (from
`shtalk.wire.fields`) is what both the server's `parse_line` and a record's `from_json`
run, so the typed path and the plain-argument path cannot disagree.  A field whose wire
name is not a Python name (``from``) adds ``Key("from")``.

Records are plain values: no I/O, no defaults beyond "absent" (None) for optional fields.
Every record class is declared with `record` (a frozen, slotted, keyword-only dataclass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import (
    Any,
    ClassVar,
    NamedTuple,
    Self,
    TypeVar,
    cast,
    dataclass_transform,
    get_type_hints,
)

from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.fields import Field, Obj, OneOf


class Key(NamedTuple):
    """The field's name on the wire when it differs from the attribute's."""

    name: str


class _Slot(NamedTuple):
    attr: str
    key: str
    field: Field


class Spec(NamedTuple):
    """A record class's wire fields, in declaration order (the order they are checked)."""

    slots: tuple[_Slot, ...]
    fields: Mapping[str, Field]
    by_key: Mapping[str, _Slot]


_SPECS: dict[type, Spec] = {}


def spec(cls: type) -> Spec:
    """The wire fields of a record class, read once from its annotations."""
    found = _SPECS.get(cls)
    if found is None:
        found = _SPECS[cls] = _read_spec(cls)
    return found


def _read_spec(cls: type) -> Spec:
    slots: list[_Slot] = []
    for attr, hint in get_type_hints(cls, include_extras=True).items():
        meta = getattr(hint, "__metadata__", ())
        check = next((m for m in meta if isinstance(m, Field)), None)
        if check is None:
            continue
        key = next((m.name for m in meta if isinstance(m, Key)), attr)
        slots.append(_Slot(attr, key, check))
    return Spec(tuple(slots), {s.key: s.field for s in slots}, {s.key: s for s in slots})


R = TypeVar("R", bound="Record")


@dataclass_transform(frozen_default=True, kw_only_default=True)
def record(cls: type[R]) -> type[R]:
    """``cls`` as a wire record: frozen (a record is a value), slotted (requests and
    pushes are made per message) and keyword-only (fields are named as on the wire)."""
    return dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)


class Record:
    """Base of every wire record (subclasses are frozen, slotted, keyword-only dataclasses)."""

    __slots__ = ()

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        """The record from values already checked against ``spec(cls).fields``."""
        kwargs = {s.attr: s.field.load(args[s.key]) for s in spec(cls).slots if s.key in args}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "") -> Self:
        """Check ``obj`` field by field, in the order and with the messages of
        `check_fields` (keys it does not know are ignored), and build the record."""
        kwargs: dict[str, Any] = {}
        for s in spec(cls).slots:
            value = obj.get(s.key)
            if value is None:
                if not s.field.optional:
                    raise ProtocolError(ErrorCode.MISSING_FIELD,
                                        f"field '{where}{s.key}' is required")
                continue
            kwargs[s.attr] = s.field.read(value, where + s.key)
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The JSON object, fields in declaration order, absent optional fields left out."""
        out: dict[str, Any] = {}
        for s in spec(type(self)).slots:
            value = getattr(self, s.attr)
            if value is not None:
                out[s.key] = value if s.field.plain else s.field.dump(value)
        return out


class Message(Record):
    """A request or a push: a record with a ``type`` name on the wire."""

    __slots__ = ()
    NAME: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.NAME, **Record.to_json(self)}


class ClientRequest(Message):
    """What a client sends.  The server refuses a key a request does not have, so
    `from_json` does too, with the server's message."""

    __slots__ = ()

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "") -> Self:
        fields = spec(cls).fields
        for key in obj:
            if key not in fields and key not in ("id", "type"):
                raise ProtocolError(ErrorCode.BAD_FIELD, f"'{cls.NAME}' has no field '{key[:40]}'")
        return super().from_json(obj, where)

    def amended(self, extra: Mapping[str, Any]) -> Self:
        """This request with more wire fields (a CAPTCHA answer, a TOTP code: what a
        refusal asked for), each checked like the server will."""
        slots = spec(type(self)).by_key
        changes: dict[str, Any] = {}
        for key, value in extra.items():
            slot = slots.get(key)
            if slot is None:
                raise ProtocolError(ErrorCode.BAD_FIELD, f"'{self.NAME}' has no field '{key[:40]}'")
            changes[slot.attr] = None if value is None else slot.field.read(value, key)
        return cast(Self, dataclasses.replace(cast(Any, self), **changes))


class ServerPush(Message):
    """What a server sends unasked.  Keys a push does not have are ignored (a newer
    server may add some); a field it has must be what the protocol says."""

    __slots__ = ()


def nested(cls: type[Record], optional: bool = False) -> Obj:
    """The validator of a field holding record ``cls`` as a JSON object."""
    return Obj(spec(cls).fields, record=cls, optional=optional)


def one_of(cls: type[Record], optional: bool = False) -> OneOf:
    """The validator of a field holding exactly one of ``cls``'s (optional) fields."""
    return OneOf(spec(cls).fields, record=cls, optional=optional)
