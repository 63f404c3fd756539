# mypy: disallow-untyped-calls=False
"""Several real ``twistd shtalk`` processes as one cluster, for system tests and benchmarks.

`Cluster` gives each run its own PostgreSQL database (made on the machine's server, dropped
at cleanup) and its own ``redis-server`` (a private process on a free port, so a test can
restart it without touching anyone else's), makes the keys every process must share once,
copies them into each process's data directory (a process of a cluster refuses to make
its own) and starts N `ServerProcess` on one database, one Redis, one Redis prefix::

    cluster = Cluster(2)
    cluster.start()            # blocks until every process listens
    a, b = cluster.servers
    ...
    cluster.cleanup()          # stop the processes and Redis, drop the database

PostgreSQL and Redis are required where ``SHTALK_REQUIRE_POSTGRES=1`` /
``SHTALK_REQUIRE_REDIS=1`` (CI); elsewhere a test without them is skipped with a reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from shtalk.server.datadir import DataDir
from tests.harness import HarnessError, ServerProcess, free_port, merge_config

PG_ADMIN_URL = os.environ.get("SHTALK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
"""Where test databases are made (trust auth on the machine's PostgreSQL 15)."""

SHARED_FILES = ("storage.key", "jwt-signing-key.pem", "tls-cert.pem", "tls-key.pem")
"""What every process of a cluster must have the same of (the certificate too: a client
pins one fingerprint, whichever process a balancer sends it to)."""


def _skip_or_fail(test: unittest.TestCase | None, why: str, env: str) -> None:
    if os.environ.get(env) == "1":
        raise HarnessError(f"{why}, and {env}=1 requires it")
    raise unittest.SkipTest(f"{why} (CI sets {env}=1)")


def need_postgres(test: unittest.TestCase | None = None) -> None:
    """Skip (or fail, under SHTALK_REQUIRE_POSTGRES=1) without a reachable PostgreSQL."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            pass
    except Exception as e:
        _skip_or_fail(test, f"no PostgreSQL at {PG_ADMIN_URL} ({type(e).__name__})",
                      "SHTALK_REQUIRE_POSTGRES")


def need_redis_server(test: unittest.TestCase | None = None) -> str:
    """The redis-server binary; skip (or fail, under SHTALK_REQUIRE_REDIS=1) without it."""
    binary = shutil.which("redis-server")
    if binary is None:
        _skip_or_fail(test, "redis-server is not installed", "SHTALK_REQUIRE_REDIS")
    assert binary is not None
    return binary


class PrivateRedis:
    """A redis-server of our own on a free loopback port, keeping nothing on disk."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


class TestDatabase:
    """A fresh PostgreSQL database, dropped (connections and all) at `drop`."""

    def __init__(self) -> None:
        self.name = "shtalk_t_" + secrets.token_hex(6)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        return f"{base}/{self.name}"

    def create(self) -> None:
        self._admin(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Cluster:
    """N processes of one cluster: one database, one Redis, shared keys."""

    def __init__(
        self,
        n: int = 2,
        config: Mapping[str, Mapping[str, object]] | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        test: unittest.TestCase | None = None,
    ) -> None:
        need_postgres(test)
        self.redis = PrivateRedis(need_redis_server(test))
        self.database = TestDatabase()
        self.base_dir = Path(tempfile.mkdtemp(prefix="shtalk-cluster-"))
        self.prefix = f"shtalk-t-{secrets.token_hex(4)}:"
        self.n = n
        self.user_config = config
        self.extra_args = extra_args
        self.servers: list[ServerProcess] = []

    def config(self, index: int) -> dict[str, dict[str, object]]:
        return merge_config(
            {
                "store": {"url": self.database.url},
                "cluster": {
                    "redis_url": self.redis.url, "prefix": self.prefix,
                    "node_name": f"node{index}", "heartbeat_interval": 0.5,
                    "node_timeout": 2.0,
                },
            },
            self.user_config,
        )

    def start(self) -> Cluster:
        self.redis.start()
        self.database.create()
        keys = DataDir(self.base_dir / "keys")
        keys.ensure()
        for i in range(self.n):
            server = ServerProcess(self.config(i), extra_args=self.extra_args,
                                   base_dir=str(self.base_dir / f"node{i}"))
            server.base_dir.mkdir(mode=0o700)
            server.data_dir.mkdir(mode=0o700)
            for name in SHARED_FILES:
                target = server.data_dir / name
                target.write_bytes((keys.path / name).read_bytes())
                os.chmod(target, 0o600)
            self.servers.append(server)
        for server in self.servers:
            server.start()
        return self

    def cleanup(self) -> None:
        try:
            for server in self.servers:
                server.stop()
        finally:
            self.redis.stop()
            try:
                self.database.drop()
            finally:
                if not os.environ.get("SHTALK_KEEP"):
                    shutil.rmtree(self.base_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"===== node{i}\n{s.log_text(8000)}" for i, s in enumerate(self.servers))


def start_cluster(test: unittest.TestCase, n: int = 2, **kwargs: Any) -> Cluster:
    """A started `Cluster`, cleaned up after ``test``."""
    cluster = Cluster(n, test=test, **kwargs)
    test.addCleanup(cluster.cleanup)
    return cluster.start()
