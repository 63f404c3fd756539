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

The parts: `base` (errors, `Section`, `setting`, the registry), `core` (the sections of
the chat server itself), `operations` (limits, logs, monitoring, metrics, admin), and
`parser` (reading the INI file into a `ServerConfig`).  Everything is importable from
here; the sections are registered in the order these modules are imported.
"""

from shtalk.server.config.base import (
    SECTIONS,
    ConfigError,
    FieldError,
    Section,
    StartupError,
    register_section,
    setting,
)
from shtalk.server.config.cluster import ClusterSection
from shtalk.server.config.core import (
    AccountsSection,
    ServerSection,
    SmtpSection,
    StorageSection,
    ThrottleSection,
    TokensSection,
)
from shtalk.server.config.operations import (
    MONITOR_ACTIONS,
    RATE_ACTIONS,
    AdminSection,
    LogsSection,
    MetricsSection,
    MonitorSection,
    RateLimitSection,
    parse_limit,
)
from shtalk.server.config.parser import ServerConfig, default_data_dir, resolve_data_dir
from shtalk.server.config.store import StoreSection

__all__ = [
    "MONITOR_ACTIONS",
    "RATE_ACTIONS",
    "SECTIONS",
    "AccountsSection",
    "AdminSection",
    "ClusterSection",
    "ConfigError",
    "FieldError",
    "LogsSection",
    "MetricsSection",
    "MonitorSection",
    "RateLimitSection",
    "Section",
    "ServerConfig",
    "ServerSection",
    "SmtpSection",
    "StartupError",
    "StorageSection",
    "StoreSection",
    "ThrottleSection",
    "TokensSection",
    "default_data_dir",
    "parse_limit",
    "register_section",
    "resolve_data_dir",
    "setting",
]
