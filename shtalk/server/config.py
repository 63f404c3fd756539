"""Server configuration: one frozen dataclass per INI section.

Why this shape: an operator's typo (``bcrypt_cots = 14``) must not silently leave the
default in force, so every section rejects keys it does not know, and the file rejects
sections nobody registered.  Each value is parsed to the type of its field and checked
against the bounds in the field's metadata, so the rest of the server only ever sees
valid, typed values.  Errors are one line naming the file, section and key, because
``twistd`` prints them to an operator, not to a developer.

Adding a section (``[smtp]``, ``[captcha]`` ...) is one class::

    @register_section("smtp")
    @dataclass(frozen=True)
    class SmtpSection(Section):
        host: str = setting("", "SMTP relay host; empty writes mail to the outbox")

and code reads it with ``config.section(SmtpSection)``.  Document the keys in
``conf/shtalk.ini`` as well (a test checks that file against the registry).
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar


class StartupError(Exception):
    """A problem that stops the server from starting; ``str()`` is one line for the operator.

    ``shtalk.server.tap`` prints any ``StartupError`` (raised by config, data
    directory, TLS or ``make_chat_service``) as one line on stderr and exits 1.
    """


class ConfigError(StartupError):
    """The configuration file or a command-line option is missing, unreadable or invalid."""


def setting(default: Any, help: str, *, min: int | None = None, max: int | None = None) -> Any:
    """A dataclass field with its documentation and (for integers) inclusive bounds."""
    return field(default=default, metadata={"help": help, "min": min, "max": max})


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
            if isinstance(value, int) and not isinstance(value, bool):
                if lo is not None and value < lo:
                    raise _FieldError(f.name, f"{value} is below the minimum {lo}")
                if hi is not None and value > hi:
                    raise _FieldError(f.name, f"{value} is above the maximum {hi}")


class _FieldError(ValueError):
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


@register_section("server")
@dataclass(frozen=True)
class ServerSection(Section):
    """Where and how the server listens, and the per-connection limits."""

    interface: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 or :: for all")
    port: int = setting(6697, "TLS port to listen on (0 picks a free one)", min=0, max=65535)
    listen: str = setting(
        "",
        "Twisted server endpoint string overriding interface/port, e.g. tcp:6697 behind a "
        "TLS-terminating proxy; empty uses shtalk's own TLS on interface:port",
    )
    data_dir: str = setting("", "data directory; empty means $XDG_DATA_HOME/shtalk")
    cert: str = setting(
        "", "TLS certificate chain (PEM); empty uses the data dir's self-signed one"
    )
    key: str = setting("", "TLS private key (PEM) for cert; set both or neither")
    max_connections_per_address: int = setting(
        20, "simultaneous connections allowed from one IP address past the TLS handshake",
        min=1,
    )
    handshake_timeout: int = setting(
        10, "seconds from accept for the TLS handshake; a socket not past it is aborted",
        min=1, max=300,
    )
    max_pending_handshakes: int = setting(
        1000, "sockets not yet past the TLS handshake, all addresses; the oldest goes first",
        min=1,
    )
    max_pending_handshakes_per_address: int = setting(
        20, "sockets not yet past the TLS handshake per client address (IPv6: per /64); "
        "the oldest goes first", min=1,
    )
    pre_auth_timeout: int = setting(30, "seconds a connection may stay unauthenticated", min=1)
    idle_timeout: int = setting(600, "seconds of silence before a connection is closed", min=1)
    max_line_length: int = setting(
        1048576, "longest protocol line in bytes; longer lines close the connection", min=1024
    )


@register_section("accounts")
@dataclass(frozen=True)
class AccountsSection(Section):
    """Password hashing and policy (SECURITY-CHECKLIST PW-1, PW-2)."""

    bcrypt_cost: int = setting(12, "bcrypt work factor (log2 rounds)", min=10, max=16)
    bcrypt_nice: int = setting(
        10, "CPU niceness of the bcrypt threads (Linux): logins yield to the chat", min=0, max=19
    )
    min_password_length: int = setting(
        12, "shortest password accepted, in characters", min=8, max=64
    )
    require_email_verification: bool = setting(
        True,
        "new accounts stay pending until the emailed code is entered; false only for "
        "closed deployments and tests",
    )
    require_captcha: bool = setting(
        True, "registration and password-reset requests need a solved CAPTCHA; false only "
        "for closed deployments and tests",
    )
    email_code_ttl: int = setting(
        600, "seconds an emailed verification or reset code stays valid", min=1, max=3600
    )
    email_code_attempts: int = setting(
        5, "wrong entries that kill an emailed code (a new one must be sent)", min=1, max=20
    )
    resend_interval: int = setting(
        60, "seconds between two mails of one account (verification, reset)", min=1
    )
    pending_purge_after: int = setting(
        172800, "seconds after which an account never verified is deleted", min=60
    )
    captcha_ttl: int = setting(120, "seconds a CAPTCHA challenge can be answered", min=5)
    captcha_words: bool = setting(
        True, "offer the accessible CAPTCHA (a short question in words) to those who ask"
    )
    totp_issuer: str = setting("shtalk", "issuer name shown in authenticator apps")


@register_section("smtp")
@dataclass(frozen=True)
class SmtpSection(Section):
    """Outgoing mail (verification and reset codes)."""

    host: str = setting("", "SMTP relay host; empty writes each mail to the data dir's outbox")
    port: int = setting(587, "SMTP relay port (submission)", min=1, max=65535)
    sender: str = setting("shtalk@localhost", "envelope and From address of the mails")
    username: str = setting("", "SMTP AUTH user name; empty sends without AUTH")
    password: str = setting("", "SMTP AUTH password (keep this file private)")
    require_starttls: bool = setting(
        True, "refuse to send unless the relay offers STARTTLS; false only for a loopback relay"
    )
    ca_file: str = setting("", "PEM CA certificates to verify the relay; empty: system trust")
    timeout: int = setting(30, "seconds one delivery attempt may take", min=1)
    retries: int = setting(5, "delivery attempts after the first failed one", min=0, max=20)
    retry_delay: int = setting(
        10, "seconds before the first retry; doubles each time (at most an hour)", min=1
    )


@register_section("throttle")
@dataclass(frozen=True)
class ThrottleSection(Section):
    """Failed logins and code entries: growing delays, then a CAPTCHA (ASVS 6.1.1, 6.3.1)."""

    free_failures: int = setting(
        5, "failures per account (or address) in an hour before delays start", min=0
    )
    address_free_failures: int = setting(
        20, "failures per client address in an hour before delays start", min=0
    )
    base_delay: int = setting(2, "first delay in seconds; doubles with each failure", min=1)
    max_delay: int = setting(60, "longest delay in seconds", min=1, max=3600)
    captcha_after: int = setting(
        10, "failures per account in an hour after which each attempt needs a CAPTCHA", min=1
    )
    address_captcha_after: int = setting(
        30, "failures per client address in an hour after which a CAPTCHA is needed", min=1
    )
    max_failures_per_hour: int = setting(
        100, "failed attempts per account let through in any hour (NIST 800-63B)", min=1,
        max=100,
    )


@register_section("tokens")
@dataclass(frozen=True)
class TokensSection(Section):
    """Session tokens: short-lived access JWTs, rotating refresh tokens."""

    issuer: str = setting("shtalk", "JWT 'iss' claim set and required")
    access_ttl: int = setting(900, "access token lifetime in seconds", min=60, max=86400)
    refresh_ttl: int = setting(2592000, "refresh token lifetime in seconds", min=3600)


@register_section("storage")
@dataclass(frozen=True)
class StorageSection(Section):
    """Queued ciphertext envelopes."""

    retention: int = setting(2592000, "seconds an undelivered envelope is kept", min=60)
    max_envelope_bytes: int = setting(65536, "largest envelope accepted, in bytes", min=1024)


# --- operations (issue 7): rate limits, sealed logs, monitoring, metrics, admin socket ---


def parse_limit(text: str) -> tuple[float, float] | None:
    """``"CAPACITY/SECONDS"`` -> (capacity, seconds); ``"0"`` or ``"off"`` -> no limit.

    A bucket holds CAPACITY tokens (the burst) and refills all of them over SECONDS, so
    the sustained rate is CAPACITY / SECONDS requests per second.
    """
    raw = text.strip().lower()
    if raw in ("0", "off", "none", ""):
        return None
    cap, sep, secs = raw.partition("/")
    try:
        capacity, seconds = float(cap), float(secs)
    except ValueError:
        raise ValueError(f"{text!r} is not CAPACITY/SECONDS (e.g. 20/60) or off") from None
    if not sep or capacity < 1 or seconds <= 0 or capacity > 1e9 or seconds > 1e9:
        raise ValueError(f"{text!r}: need CAPACITY >= 1 and SECONDS > 0 (e.g. 20/60)")
    return capacity, seconds


RATE_ACTIONS = (
    "register", "register_check", "login", "verify", "send", "prekey_fetch", "join", "report",
)


@register_section("ratelimit")
@dataclass(frozen=True)
class RateLimitSection(Section):
    """Token buckets per (action, account) and (action, address) (shtalk.server.ops.ratelimit)."""

    enabled: bool = setting(True, "apply the token buckets below")
    backend: str = setting("memory", "memory (one process) or redis (shared by processes)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis for backend = redis")
    redis_prefix: str = setting("shtalk:rl:", "prefix of the bucket keys in Redis")
    redis_timeout: float = setting(0.5, "seconds a Redis answer may take before falling back")
    redis_retry: float = setting(5.0, "seconds between reconnection probes while degraded")
    disconnect_after: int = setting(
        20, "refusals within a minute after which the connection is closed", min=1
    )
    register_account: str = setting("off", "registration attempts, per username tried")
    register_address: str = setting(
        "40/3600",
        "registration attempts per client address (a CAPTCHA fetched and answered is one "
        "attempt); sized for a classroom of 30 behind one NAT",
    )
    register_check_account: str = setting("off", "register requests, per username tried")
    register_check_address: str = setting(
        "120/600",
        "register requests per client address (name and password checks before the CAPTCHA)",
    )
    login_account: str = setting("10/60", "login attempts per account")
    login_address: str = setting("30/60", "login/resume/refresh attempts per address")
    verify_account: str = setting("10/300", "verification-code/CAPTCHA/TOTP attempts per account")
    verify_address: str = setting("60/300", "verification attempts per address")
    send_account: str = setting("60/10", "send per account")
    send_address: str = setting("300/10", "send per address")
    prekey_fetch_account: str = setting("60/60", "keys_fetch per account")
    prekey_fetch_address: str = setting("300/60", "keys_fetch per address")
    join_account: str = setting("30/60", "room_join per account")
    join_address: str = setting("100/60", "room_join per address")
    report_account: str = setting("10/3600", "report per account")
    report_address: str = setting("30/3600", "report per address")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in ("memory", "redis"):
            raise _FieldError("backend", f"{self.backend!r} is not memory or redis")
        if not self.redis_url.startswith("redis://"):
            raise _FieldError("redis_url", "use redis://HOST:PORT/DB")
        for f in dataclasses.fields(self):
            if f.name.endswith(("_account", "_address")):
                try:
                    parse_limit(getattr(self, f.name))
                except ValueError as e:
                    raise _FieldError(f.name, str(e)) from None

    def limit(self, action: str, scope: str) -> tuple[float, float] | None:
        """(capacity, seconds) of ``action`` per ``scope`` ("account"/"address"), or None."""
        return parse_limit(str(getattr(self, f"{action}_{scope}")))


@register_section("logs")
@dataclass(frozen=True)
class LogsSection(Section):
    """Sealed operator logs (shtalk.server.ops.seclog): HPKE to the operator's public key."""

    public_key_file: str = setting(
        "", "operator public key from `shtalk-admin logs keygen`; empty: no sealed log"
    )
    path: str = setting("", "sealed log file; empty means <data_dir>/logs/shtalk.log.sealed")
    max_bytes: int = setting(10485760, "rotate when the file reaches this size", min=4096)
    backup_count: int = setting(10, "rotated files kept (.1 .. .N)", min=1, max=1000)
    level: str = setting("info", "lowest level written: debug, info, warn, error, critical")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level not in ("debug", "info", "warn", "error", "critical"):
            raise _FieldError("level", f"{self.level!r} is not debug/info/warn/error/critical")


MONITOR_ACTIONS = ("flag", "captcha", "throttle", "suspend")


@register_section("monitor")
@dataclass(frozen=True)
class MonitorSection(Section):
    """Metadata-only abuse signals (shtalk.server.ops.monitor); each raises a flag."""

    enabled: bool = setting(True, "watch the signals below")
    window: int = setting(600, "seconds each signal counts over", min=10)
    send_rate: int = setting(600, "sends by one account within the window", min=1)
    send_rate_action: str = setting("throttle", "flag, captcha, throttle or suspend")
    strangers: int = setting(30, "accounts never contacted before, messaged in a window", min=1)
    strangers_action: str = setting("captcha", "flag, captcha, throttle or suspend")
    new_account_age: int = setting(86400, "an account younger than this is new", min=0)
    new_account_strangers: int = setting(5, "strangers a new account messages in a window", min=1)
    new_account_strangers_action: str = setting("captcha", "flag, captcha, throttle or suspend")
    registrations: int = setting(
        30, "registrations from one address within the window (a classroom is fine)", min=1
    )
    registrations_action: str = setting("captcha", "flag, captcha, throttle or suspend")
    same_size: int = setting(50, "envelopes of one size from one account in a burst", min=2)
    same_size_action: str = setting("throttle", "flag, captcha, throttle or suspend")
    burst: int = setting(60, "seconds that make a burst (same-size signal)", min=1)
    reports: int = setting(3, "reports against an account (a verified one counts 3)", min=1)
    reports_action: str = setting(
        "suspend", "flag, captcha, throttle or suspend; only once report_quorum is met")
    report_quorum: int = setting(
        3, "qualifying reporters (distinct accounts and addresses) before reports_action",
        min=2)
    reporter_min_age: int = setting(
        7 * 86400, "seconds a reporter's account must be old to qualify", min=0)
    throttle_factor: int = setting(10, "a throttled account gets 1/N of its buckets", min=2)
    throttle_seconds: int = setting(3600, "how long a throttle lasts", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in dataclasses.fields(self):
            if f.name.endswith("_action") and getattr(self, f.name) not in MONITOR_ACTIONS:
                raise _FieldError(f.name, f"must be one of {', '.join(MONITOR_ACTIONS)}")


@register_section("metrics")
@dataclass(frozen=True)
class MetricsSection(Section):
    """Prometheus text metrics over HTTP on loopback (shtalk.server.ops.metrics); off by default."""

    enabled: bool = setting(False, "serve /metrics")
    interface: str = setting("127.0.0.1", "loopback address to listen on (127.0.0.1 or ::1)")
    port: int = setting(9464, "HTTP port for /metrics (0 picks a free one)", min=0, max=65535)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.interface.startswith("127.") or self.interface in ("::1", "localhost")):
            raise _FieldError("interface", "metrics are served on loopback only")


@register_section("admin")
@dataclass(frozen=True)
class AdminSection(Section):
    """The operator's control socket for shtalk-admin monitor/review."""

    socket: str = setting("", "UNIX socket (0600); empty means <data_dir>/admin.sock; off: none")


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
    except _FieldError as e:
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
            except _FieldError as e:
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
