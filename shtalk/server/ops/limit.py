"""A token bucket's shape, shared by the limiter and its backends (memory, Redis).

Kept apart so each backend can import it without importing the limiter, and the
limiter can be built over any backend without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A bucket's shape: ``capacity`` tokens, refilled at ``rate`` tokens per second."""

    capacity: float
    rate: float

    @classmethod
    def of(cls, spec: tuple[float, float] | None) -> Limit | None:
        if spec is None:
            return None
        capacity, seconds = spec
        return cls(capacity, capacity / seconds)

    def scaled(self, factor: float) -> Limit:
        """A throttled bucket: 1/factor of the capacity and of the rate."""
        return Limit(max(1.0, self.capacity / factor), self.rate / factor)

    @property
    def ttl(self) -> float:
        """Seconds after which an untouched bucket is full again (and can be forgotten)."""
        return self.capacity / self.rate
