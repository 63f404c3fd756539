"""The client configuration: ``$XDG_CONFIG_HOME/shtalk/client.ini`` (``conf/client.ini``
is the documented example).

One class per INI section; unknown sections and keys are errors so a typo never silently
keeps a default.  ``ClientConfig.from_string`` is what tests use.
"""

from __future__ import annotations

import configparser
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from shtalk.client.rotation import RotationPolicy
from shtalk.clientui.keys import KEY_BINDINGS, KeyConfigError, KeyMap, parse_keys
from shtalk.clientui.themes import THEMES

DEFAULT_PORT = 6697


class ConfigError(ValueError):
    """The configuration file is wrong; the message says where and how."""


def config_home() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shtalk"


def data_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share")
    return Path(base) / "shtalk-urwid"


def parse_server(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[::1]:port`` -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty server address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"bad server address {text!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in server address {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"port out of range in {text!r}")
    return host, port


def _bool(section: str, key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"[{section}] {key}: say yes or no, not {value!r}")


@dataclass
class ServerSection:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    trust: str = "pin"  # pin (trust on first use) | system (CA-signed certificate)

    @classmethod
    def from_items(cls, items: dict[str, str]) -> ServerSection:
        s = cls()
        for key, value in items.items():
            if key == "address":
                s.host, s.port = parse_server(value)
            elif key == "trust":
                if value not in ("pin", "system"):
                    raise ConfigError("[server] trust: 'pin' or 'system'")
                s.trust = value
            else:
                raise ConfigError(f"[server] {key}: unknown key (known: address, trust)")
        return s


@dataclass
class UISection:
    theme: str = "dark256"
    timestamp_format: str = "%H:%M"
    conversation_list_width: int = 20

    @classmethod
    def from_items(cls, items: dict[str, str]) -> UISection:
        s = cls()
        for key, value in items.items():
            if key == "theme":
                if value not in THEMES:
                    raise ConfigError(f"[ui] theme: one of {', '.join(THEMES)}, not {value!r}")
                s.theme = value
            elif key == "timestamp_format":
                try:
                    time.strftime(value)
                except ValueError as e:
                    raise ConfigError(f"[ui] timestamp_format: {e}") from None
                s.timestamp_format = value
            elif key == "conversation_list_width":
                try:
                    s.conversation_list_width = int(value)
                except ValueError:
                    raise ConfigError("[ui] conversation_list_width: a number") from None
                if not 10 <= s.conversation_list_width <= 60:
                    raise ConfigError("[ui] conversation_list_width: between 10 and 60")
            else:
                raise ConfigError(f"[ui] {key}: unknown key (known: theme, timestamp_format, "
                                  "conversation_list_width)")
        return s


@dataclass
class NotificationsSection:
    bell: bool = True  # ring the terminal bell ...
    bell_on_direct: bool = True  # ... on a direct message
    bell_on_mention: bool = True  # ... on a room message naming you

    @classmethod
    def from_items(cls, items: dict[str, str]) -> NotificationsSection:
        s = cls()
        for key, value in items.items():
            if key not in ("bell", "bell_on_direct", "bell_on_mention"):
                raise ConfigError(f"[notifications] {key}: unknown key (known: bell, "
                                  "bell_on_direct, bell_on_mention)")
            setattr(s, key, _bool("notifications", key, value))
        return s


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(section: str, key: str, value: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` -> seconds."""
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    if not number.isdigit():
        raise ConfigError(f"[{section}] {key}: a duration like 90s, 30m, 12h, 7d or 2w, "
                          f"not {value!r}")
    return int(number) * _UNITS[unit]


@dataclass
class EncryptionSection:
    """When this device replaces its keys (``shtalk.client.rotation``)."""

    rotation: RotationPolicy = field(default_factory=RotationPolicy)

    @classmethod
    def from_items(cls, items: dict[str, str]) -> EncryptionSection:
        known = ("prekey_rotation", "prekey_grace", "room_key_messages", "room_key_age")
        values: dict[str, float] = {}
        for key, value in items.items():
            if key == "room_key_messages":
                if not value.strip().isdigit():
                    raise ConfigError(f"[encryption] {key}: a number of messages, not {value!r}")
                values[key] = int(value)
            elif key in known:
                values[key] = parse_duration("encryption", key, value)
            else:
                raise ConfigError(f"[encryption] {key}: unknown key (known: {', '.join(known)})")
        policy = RotationPolicy(**values)  # type: ignore[arg-type]
        try:
            policy.check()
        except ValueError as e:
            raise ConfigError(f"[encryption] {e}") from None
        return cls(policy)


@dataclass
class ClientConfig:
    server: ServerSection = field(default_factory=ServerSection)
    ui: UISection = field(default_factory=UISection)
    notifications: NotificationsSection = field(default_factory=NotificationsSection)
    encryption: EncryptionSection = field(default_factory=EncryptionSection)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_string(cls, text: str, path: str | None = None) -> ClientConfig:
        parser = configparser.ConfigParser(interpolation=None)
        where = path or "<string>"
        try:
            parser.read_string(text, source=where)
        except configparser.Error as e:
            raise ConfigError(f"{where}: {e}") from None
        config = cls(path=path)
        for name in parser.sections():
            items = dict(parser.items(name))
            try:
                if name == "server":
                    config.server = ServerSection.from_items(items)
                elif name == "ui":
                    config.ui = UISection.from_items(items)
                elif name == "notifications":
                    config.notifications = NotificationsSection.from_items(items)
                elif name == "keys":
                    config.keys = {k: parse_keys(v) for k, v in items.items()}
                    KeyMap(config.keys)  # validate now, with a clear message
                elif name == "encryption":
                    config.encryption = EncryptionSection.from_items(items)
                else:
                    raise ConfigError(f"[{name}]: unknown section (known: server, ui, "
                                      "notifications, encryption, keys)")
            except (ConfigError, KeyConfigError) as e:
                raise ConfigError(f"{where}: {e}") from None
        return config

    @classmethod
    def load(cls, path: str | None = None) -> ClientConfig:
        """The given file (must exist) or the default one (optional)."""
        if path is None:
            default = config_home() / "client.ini"
            if not default.exists():
                return cls()
            path = str(default)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        return cls.from_string(text, path)

    def keymap(self) -> KeyMap:
        return KeyMap(self.keys)


def example_keys_section() -> str:
    """The ``[keys]`` block of conf/client.ini, generated from the key table."""
    lines = []
    for b in KEY_BINDINGS:
        lines.append(f"# {b.help}")
        lines.append(f"# {b.name} = {', '.join(b.keys)}")
    return "\n".join(lines)
