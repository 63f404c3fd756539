"""The sections of operations: rate limits, sealed logs, abuse monitoring, metrics and
the admin socket (``shtalk.server.ops``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from shtalk.server.config.base import FieldError, Section, register_section, setting


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
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", "Redis for backend = redis", secret=True  # may hold a password
    )
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
            raise FieldError("backend", f"{self.backend!r} is not memory or redis")
        if not self.redis_url.startswith("redis://"):
            raise FieldError("redis_url", "use redis://HOST:PORT/DB")
        for f in dataclasses.fields(self):
            if f.name.endswith(("_account", "_address")):
                try:
                    parse_limit(getattr(self, f.name))
                except ValueError as e:
                    raise FieldError(f.name, str(e)) from None

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
            raise FieldError("level", f"{self.level!r} is not debug/info/warn/error/critical")


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
                raise FieldError(f.name, f"must be one of {', '.join(MONITOR_ACTIONS)}")


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
            raise FieldError("interface", "metrics are served on loopback only")


@register_section("admin")
@dataclass(frozen=True)
class AdminSection(Section):
    """The operator's control socket for shtalk-admin monitor/review."""

    socket: str = setting("", "UNIX socket (0600); empty means <data_dir>/admin.sock; off: none")
