"""The store section: which database engine holds the server's state.

Empty ``url`` (the default) is the embedded store: one SQLite file in the data
directory, nothing to run beside the server.  A ``postgresql://`` URL puts the state in
PostgreSQL, which several server processes can share (see ``[cluster]``).
"""

from __future__ import annotations

from dataclasses import dataclass

from shtalk.server.config.base import FieldError, Section, register_section, setting


@register_section("store")
@dataclass(frozen=True)
class StoreSection(Section):
    """Where the accounts, rooms and queued envelopes live."""

    url: str = setting(
        "", "PostgreSQL URL (postgresql://USER@HOST:PORT/DB); empty: SQLite in the data "
        "directory", secret=True,  # may hold a password
    )
    readers: int = setting(4, "PostgreSQL connections for reads (one more writes)", min=1,
                           max=64)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise FieldError("url", "use postgresql://USER@HOST:PORT/DB (or leave it empty)")

    @property
    def postgres(self) -> bool:
        return bool(self.url)
