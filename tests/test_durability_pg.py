# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""``ok`` means durable with the store in PostgreSQL: the same SIGKILL under load as
`tests.test_durability`, the server configured with ``[store] url``.

Skipped with the reason when PostgreSQL is not reachable (failed when
``SHTALK_REQUIRE_POSTGRES=1``); each run uses a schema of its own, dropped afterwards.
"""

from __future__ import annotations

from typing import Any

from shtalk.test.pgtest import fresh_schema
from tests import test_durability


class PostgresDurabilityTests(test_durability.DurabilityTests):
    def setUp(self) -> None:
        # Before the class's server starts: it is configured with this schema.
        type(self).server_config = {"store": {"url": fresh_schema(self)}}
        super().setUp()

    def test_sigkill_loses_nothing_acknowledged(self) -> Any:
        d = super().test_sigkill_loses_nothing_acknowledged()

        def on_postgres(result: object) -> object:
            self.assertIn("store: PostgreSQL at postgresql://", self.server.log_text())
            return result

        return d.addCallback(on_postgres)
