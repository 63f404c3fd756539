"""The cluster section: several server processes sharing PostgreSQL and Redis.

Empty ``redis_url`` (the default) is the embedded single process: a local bus, local
presence, nothing shared.  Set, every process with the same ``prefix`` on that Redis is one
cluster: committed messages travel between them on the bus, presence and revocations are
shared, and each process must use the same database (``[store] url``) and the same storage
and token keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shtalk.server.config.base import FieldError, Section, register_section, setting
from shtalk.server.config.operations import RateLimitSection


@register_section("cluster")
@dataclass(frozen=True)
class ClusterSection(Section):
    """Several processes, one service: the Redis they share, and how they watch each other."""

    redis_url: str = setting(
        "", "Redis shared by the processes (redis://HOST:PORT/DB); empty: one process",
        secret=True,  # may hold a password
    )
    prefix: str = setting("shtalk:", "prefix of every Redis key and channel of this cluster")
    node_name: str = setting(
        "", "this process's name in the cluster; empty: host name, pid and a random tag"
    )
    heartbeat_interval: float = setting(
        2.0, "seconds between a process's heartbeats", min=0.1, max=60
    )
    node_timeout: float = setting(
        6.0, "seconds without a heartbeat after which a process counts as dead", min=0.5,
        max=600,
    )
    gap_wait: float = setting(
        0.05, "seconds a message waits for an earlier one of its mailbox before the gap is "
        "read from the store", min=0.0, max=10,
    )
    reconcile_interval: float = setting(
        5.0, "seconds between checks of subscribed mailboxes against the store", min=0.5,
        max=3600,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.redis_url and not self.redis_url.startswith("redis://"):
            raise FieldError("redis_url", "use redis://HOST:PORT/DB")
        if "|" in self.node_name:
            raise FieldError("node_name", "may not contain '|'")
        if self.node_timeout <= self.heartbeat_interval:
            raise FieldError("node_timeout", "must be longer than heartbeat_interval")

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


def cluster_ratelimit(cluster: ClusterSection, limits: RateLimitSection) -> RateLimitSection:
    """The rate-limit settings of a process of ``cluster``: its buckets must be shared.

    One process: ``limits`` as they are.  A cluster: the buckets live in Redis (one
    process's memory buckets would let a client spread its requests over the processes):
    ``[ratelimit] backend = redis`` keeps its own ``redis_url`` and ``redis_prefix`` (the
    operator chose them); ``memory``, the default, becomes the cluster's Redis under
    ``<[cluster] prefix>rl:``, so two clusters on one Redis never share a bucket.
    """
    if not cluster.enabled or not limits.enabled or limits.backend == "redis":
        return limits
    return replace(
        limits, backend="redis", redis_url=cluster.redis_url, redis_prefix=cluster.prefix + "rl:"
    )
