"""Reading the INI file: each value parsed to its field's type, each error one line.

`ServerConfig` holds one instance of every registered section (defaults for those the
file leaves out); the command line's overrides go through the same checks.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from shtalk.server.config.base import SECTIONS, ConfigError, FieldError, Section
from shtalk.server.config.core import (
    AccountsSection,
    ServerSection,
    StorageSection,
    TokensSection,
)

S = TypeVar("S", bound=Section)


def _parse_value(kind: Any, raw: str) -> object:
    if kind is bool:
        low = raw.strip().lower()
        if low in configparser.ConfigParser.BOOLEAN_STATES:
            return configparser.ConfigParser.BOOLEAN_STATES[low]
        raise ValueError(f"{raw!r} is not a boolean (use true or false)")
    if kind is int:
        try:
            return int(raw.strip().replace("_", ""), 10)
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number") from None
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    if kind is str:
        return raw.strip()
    raise TypeError(f"unsupported config field type {kind!r}")


def _build_section(cls: type[S], values: Mapping[str, str], where: str) -> S:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, object] = {}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key {key!r} in [{cls.NAME}] (known: {', '.join(sorted(known))})"
            )
        try:
            kwargs[key] = _parse_value(hints[key], raw)
        except ValueError as e:
            raise ConfigError(f"{where}: [{cls.NAME}] {key}: {e}") from None
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{where}: [{cls.NAME}] {e.key}: {e.problem}") from None


@dataclass(frozen=True)
class ServerConfig:
    """The whole, validated configuration: one instance of every registered section."""

    sections: Mapping[str, Section] = field(default_factory=dict)
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        filled = dict(self.sections)
        for name, cls in SECTIONS.items():
            filled.setdefault(name, cls())
        object.__setattr__(self, "sections", MappingProxyType(filled))

    def section(self, cls: type[S]) -> S:
        """The instance of section class ``cls`` (typed, for sections added later)."""
        value = self.sections[cls.NAME]
        assert isinstance(value, cls)
        return value

    @property
    def server(self) -> ServerSection:
        return self.section(ServerSection)

    @property
    def accounts(self) -> AccountsSection:
        return self.section(AccountsSection)

    @property
    def tokens(self) -> TokensSection:
        return self.section(TokensSection)

    @property
    def storage(self) -> StorageSection:
        return self.section(StorageSection)

    @classmethod
    def from_string(cls, text: str, source: str = "<string>") -> ServerConfig:
        """Parse INI ``text``; ``source`` names it in error messages."""
        parser = configparser.ConfigParser(
            interpolation=None, default_section="\0no-default-section", strict=True
        )
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read_string(text, source=source)
        except configparser.Error as e:
            raise ConfigError(f"{source}: {_one_line(e)}") from None
        sections: dict[str, Section] = {}
        for name in parser.sections():
            section_cls = SECTIONS.get(name)
            if section_cls is None:
                raise ConfigError(
                    f"{source}: unknown section [{name}] (known: "
                    f"{', '.join('[' + n + ']' for n in SECTIONS)})"
                )
            sections[name] = _build_section(section_cls, dict(parser.items(name)), source)
        return cls(sections=sections, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ServerConfig:
        """Read and parse the INI file at ``path``."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: config file not found; check the --config path "
                "(conf/shtalk.ini in the source tree is a documented example)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config file: {_one_line(e)}") from None
        return cls.from_string(text, source=str(path))

    def with_overrides(
        self, overrides: Mapping[str, Mapping[str, object]], source: str = "command line"
    ) -> ServerConfig:
        """A copy with typed values replaced, e.g. ``{"server": {"port": 7000}}``.

        The command line wins over the file; values are checked like the file's.
        """
        sections = dict(self.sections)
        for name, values in overrides.items():
            if not values:
                continue
            if name not in sections:
                raise ConfigError(f"{source}: unknown section [{name}]")
            try:
                sections[name] = dataclasses.replace(sections[name], **values)  # type: ignore[type-var]
            except FieldError as e:
                raise ConfigError(f"{source}: [{name}] {e.key}: {e.problem}") from None
            except TypeError as e:
                raise ConfigError(f"{source}: [{name}]: {_one_line(e)}") from None
        return ServerConfig(sections=sections, source=self.source)


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/shtalk``, falling back to ``~/.local/share/shtalk`` (XDG spec:
    a relative or empty ``XDG_DATA_HOME`` is invalid and ignored)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME", "")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "share")
    return Path(base) / "shtalk"


def resolve_data_dir(config: ServerConfig, environ: Mapping[str, str] | None = None) -> Path:
    """The data directory the configuration asks for (``~`` expanded)."""
    configured = config.server.data_dir
    if configured:
        return Path(os.path.expanduser(configured))
    return default_data_dir(environ)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
