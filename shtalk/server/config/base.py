"""What every configuration section is made of: errors, fields, the registry.

A section is a frozen dataclass whose fields are made with `setting` (a default, the
help text an operator reads in ``conf/shtalk.ini``, and for integers inclusive
bounds); `register_section` files it under its INI name so the parser knows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import field
from typing import Any, ClassVar, TypeVar


class StartupError(Exception):
    """A problem that stops the server from starting; ``str()`` is one line for the operator.

    ``shtalk.server.tap`` prints any ``StartupError`` (raised by config, data
    directory, TLS or ``make_chat_service``) as one line on stderr and exits 1.
    """


class ConfigError(StartupError):
    """The configuration file or a command-line option is missing, unreadable or invalid."""


def setting(
    default: Any, help: str, *, min: float | None = None, max: float | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with its documentation and (for numbers) inclusive bounds;
    a ``secret`` one stays out of the section's repr (and so out of any log line)."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "min": min, "max": max})


class Section:
    """Base of all section dataclasses: validates bounds after construction.

    ``dataclasses.replace`` goes through ``__post_init__`` too, so overrides from the
    command line are checked exactly like values from the file.
    """

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if lo is not None and value < lo:
                    raise FieldError(f.name, f"{value} is below the minimum {lo}")
                if hi is not None and value > hi:
                    raise FieldError(f.name, f"{value} is above the maximum {hi}")


class FieldError(ValueError):
    """A value out of its bounds; the parser adds the file and section to the message."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


SECTIONS: dict[str, type[Section]] = {}
"""Registry: INI section name -> its dataclass.  Filled by `register_section`."""

S = TypeVar("S", bound=Section)


def register_section(name: str) -> Callable[[type[S]], type[S]]:
    """Class decorator adding a section class to `SECTIONS` under ``name``."""

    def register(cls: type[S]) -> type[S]:
        if name in SECTIONS:
            raise ValueError(f"config section [{name}] registered twice")
        cls.NAME = name
        SECTIONS[name] = cls
        return cls

    return register
