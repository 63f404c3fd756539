"""Abuse monitoring on metadata only (the server cannot read messages).

Signals (thresholds in ``[monitor]``, each counted over a sliding window):

* ``send_rate``: sends by one account;
* ``strangers``: distinct accounts messaged that the sender never had a conversation
  with (known partners come from the store; a new account starts with none);
* ``new_account_strangers``: the same, for accounts younger than ``new_account_age``;
* ``registrations``: registrations from one client address;
* ``same_size``: envelopes of exactly one size from one account within ``burst`` seconds
  (one text blasted to many people encrypts to equal sizes);
* ``reports``: user reports against an account (a report whose envelope signature the
  server verified counts three); its action runs only once ``report_quorum`` qualifying
  reporters from distinct addresses agree (before that: a flag for review).

A signal raises a `Flag` (subject, signal, reason, counts) and runs its configured
action once per flag: ``flag`` (nothing more), ``captcha`` (a demand of the account gates,
``CaptchaDemands.require``), ``throttle`` (the account's rate-limit buckets shrink
to 1/``throttle_factor`` for ``throttle_seconds``) or ``suspend`` (the account is
suspended pending review: its sessions end and it cannot log in).  Flags are kept in
``flags.json`` in the data directory and reviewed with ``shtalk-admin review``.
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.server.config import MonitorSection

log = Logger()

#: Reports older than this are forgotten.
REPORT_SPAN = 30 * 86400.0

SIGNALS = (
    "send_rate", "strangers", "new_account_strangers", "registrations", "same_size", "reports",
)


@dataclass
class Flag:
    id: int
    kind: str  # "account" or "address"
    subject: str  # user id, or the client address
    label: str  # the account's name, or the address
    signal: str
    reason: str
    action: str
    count: int
    first: float
    last: float
    status: str = "open"  # open, cleared
    evidence: list[dict[str, Any]] = field(default_factory=list)


class Window:
    """Timestamps per key within the last ``span`` seconds."""

    def __init__(self, span: float) -> None:
        self.span = span
        self.events: dict[Any, deque[float]] = {}

    def add(self, key: Any, now: float, n: int = 1) -> int:
        q = self.events.get(key)
        if q is None:
            q = self.events[key] = deque()
        for _ in range(n):
            q.append(now)
        cutoff = now - self.span
        while q and q[0] < cutoff:
            q.popleft()
        return len(q)

    def sweep(self, now: float) -> None:
        cutoff = now - self.span
        for key in [k for k, q in self.events.items() if not q or q[-1] < cutoff]:
            del self.events[key]


Action = Callable[[Flag], None]


class Monitor:
    def __init__(
        self,
        config: MonitorSection,
        clock: IReactorTime,
        path: Path | None = None,
        partners: Callable[[int], Any] | None = None,
        actions: Mapping[str, Action] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.path = path
        self.partners = partners  # user id -> Deferred[list[int]] (the store's dm_partners)
        self.enabled = config.enabled
        self.flags: dict[int, Flag] = {}
        self.open_by_key: dict[tuple[str, str, str], int] = {}
        self.next_id = 1
        w = float(config.window)
        self.sends = Window(w)
        self.new_peers = Window(w)
        self.registrations = Window(w)
        self.sizes = Window(float(config.burst))
        # Reports per reported account: reporter -> (weight, last time), and the
        # qualifying reporters -> their address (see `reported`).
        self.report_weights: dict[str, dict[str, tuple[int, float]]] = {}
        self.qualifying: dict[str, dict[str, str]] = {}
        self.contacted: dict[int, set[int]] = {}
        self._loading: dict[int, list[tuple[int, str, float, int]]] = {}
        self.actions: Mapping[str, Action] = actions or {}  # flag.action -> what it does
        self.routed = 0
        self.raised: Counter[str] = Counter()
        self._load()

    # --- persistence --------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for raw in data.get("flags", []):
                flag = Flag(**raw)
                self.flags[flag.id] = flag
                if flag.status == "open":
                    self.open_by_key[(flag.kind, flag.subject, flag.signal)] = flag.id
            self.next_id = max([0, *self.flags]) + 1
        except (OSError, ValueError, TypeError) as e:
            log.error("flags file unreadable ({what}); starting with no flags", what=str(e)[:100])

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"flags": [asdict(fl) for fl in self.flags.values()]}, f)
        os.replace(tmp, self.path)

    # --- raising flags ----------------------------------------------------------------
    def raise_flag(
        self, kind: str, subject: str, label: str, signal: str, reason: str, count: int,
        evidence: dict[str, Any] | None = None, action: str | None = None,
    ) -> Flag:
        """Raise (or update) a flag; ``action`` overrides the signal's configured one,
        and an open flag whose action was only "flag" runs a stronger one once given."""
        now = self.clock.seconds()
        key = (kind, subject, signal)
        existing = self.open_by_key.get(key)
        if existing is not None:
            flag = self.flags[existing]
            flag.count, flag.last, flag.reason = max(flag.count, count), now, reason
            if evidence is not None and len(flag.evidence) < 20:
                flag.evidence.append(evidence)
            escalate = action is not None and action != "flag" and flag.action == "flag"
            if escalate:
                assert action is not None
                flag.action = action
            self.save()
            if escalate:
                self._run(flag)
            return flag
        if action is None:
            action = str(getattr(self.config, f"{signal}_action", "flag"))
        flag = Flag(self.next_id, kind, subject, label, signal, reason, action, count, now, now,
                    evidence=[evidence] if evidence is not None else [])
        self.next_id += 1
        self.flags[flag.id] = flag
        self.open_by_key[key] = flag.id
        self.raised[signal] += 1
        self.save()
        log.warn("flag {flag_id} raised: {signal} on {kind} ({reason}); action {action}",
                 event="monitor.flag", flag_id=flag.id, signal=signal, kind=kind,
                 reason=reason, action=action,
                 **({"user_id": subject} if kind == "account" else {"address": subject}))
        self._run(flag)
        return flag

    def _run(self, flag: Flag) -> None:
        runner = self.actions.get(flag.action)
        if runner is not None:
            try:
                runner(flag)
            except Exception:
                log.failure("monitor action {action} failed", action=flag.action)

    def clear(self, flag_id: int) -> Flag | None:
        flag = self.flags.get(flag_id)
        if flag is None:
            return None
        flag.status = "cleared"
        self.open_by_key.pop((flag.kind, flag.subject, flag.signal), None)
        self.save()
        return flag

    def open_flags(self) -> list[Flag]:
        return [f for f in self.flags.values() if f.status == "open"]

    # --- signals ------------------------------------------------------------------------
    def registered(self, user_id: int | None, address: str) -> None:
        if not self.enabled:
            return
        if user_id is not None:
            self.contacted[user_id] = set()  # a new account has no conversations yet
        n = self.registrations.add(address, self.clock.seconds())
        if n > self.config.registrations:
            self.raise_flag("address", address, address, "registrations",
                            f"{n} registrations within {self.config.window} s", n)

    def sent(
        self, user_id: int, name: str, created: float, peers: Iterable[int], sizes: list[int]
    ) -> None:
        """After a stored send: ``peers`` are the direct-message recipients (none for rooms)."""
        self.routed += 1
        if not self.enabled:
            return
        now = self.clock.seconds()
        cfg = self.config
        key = str(user_id)
        n = self.sends.add(user_id, now)
        if n > cfg.send_rate:
            self.raise_flag("account", key, name, "send_rate",
                            f"{n} sends within {cfg.window} s", n)
        for size in set(sizes):
            same = self.sizes.add((user_id, size), now, sizes.count(size))
            if same >= cfg.same_size:
                self.raise_flag("account", key, name, "same_size",
                                f"{same} envelopes of {size} bytes within {cfg.burst} s", same)
        peers = [p for p in peers if p != user_id]
        if not peers:
            return
        known = self.contacted.get(user_id)
        if known is None:
            pending = self._loading.get(user_id)
            if pending is not None:
                pending.extend((p, name, created, 0) for p in peers)
                return
            if self.partners is None:
                self.contacted[user_id] = known = set()
            else:
                self._loading[user_id] = [(p, name, created, 0) for p in peers]
                self._load_partners(user_id)
                return
        self._strangers(user_id, name, created, peers, known, now)

    def preload(self, user_id: int) -> Deferred[None]:
        """Load an account's known partners before it can send (the chat service waits
        for this at login), so that its first message is judged like every other."""
        if not self.enabled or self.partners is None or user_id in self.contacted:
            return succeed(None)
        if user_id not in self._loading:
            self._loading[user_id] = []
        return self._load_partners(user_id)

    def _load_partners(self, user_id: int) -> Deferred[None]:
        assert self.partners is not None
        d: Deferred[Any] = self.partners(user_id)

        def loaded(partners: list[int]) -> None:
            pending = self._loading.pop(user_id, [])
            # Loaded after those sends committed, so their peers are in it already:
            # they cannot be judged (only when a send raced its own login's preload).
            known = self.contacted.setdefault(user_id, set(partners))
            known.update(p for p, *_ in pending)

        def failed(f: Failure) -> None:
            self._loading.pop(user_id, None)
            log.failure("loading the partners of {user_id} failed", f, user_id=user_id)

        d.addCallbacks(loaded, failed)
        return d

    def _strangers(
        self, user_id: int, name: str, created: float, peers: list[int], known: set[int],
        now: float,
    ) -> None:
        new = [p for p in peers if p not in known]
        if not new:
            return
        known.update(new)
        cfg = self.config
        n = self.new_peers.add(user_id, now, len(new))
        if n > cfg.strangers:
            self.raise_flag("account", str(user_id), name, "strangers",
                            f"messaged {n} accounts never contacted before within "
                            f"{cfg.window} s", n)
        if now - created < cfg.new_account_age and n > cfg.new_account_strangers:
            self.raise_flag("account", str(user_id), name, "new_account_strangers",
                            f"account {int(now - created)} s old messaged {n} strangers", n)

    def reported(
        self, target_id: int, target_name: str, reporter: str, verified: bool,
        evidence: dict[str, Any], qualifies: bool = False, address: str = "",
    ) -> Flag | None:
        """A report: weight 1, or 3 with a verified envelope, once per reporter (its
        strongest report counts).  Reaching ``reports`` raises a flag for review only;
        ``reports_action`` runs once ``report_quorum`` reporters qualify (the caller
        says whether one does: verified, in conversation with the sender, old enough)
        from as many distinct addresses, so no single report, nor one person's
        throwaway accounts, can suspend anyone."""
        now = self.clock.seconds()
        key = str(target_id)
        weights = self.report_weights.setdefault(key, {})
        quals = self.qualifying.setdefault(key, {})
        for who, (_, last) in list(weights.items()):
            if last < now - REPORT_SPAN:
                del weights[who]
                quals.pop(who, None)
        weights[reporter] = (max(weights.get(reporter, (0, now))[0], 3 if verified else 1), now)
        if qualifies:
            quals[reporter] = address
        n = sum(w for w, _ in weights.values())
        quorum = min(len(quals), len(set(quals.values())))
        cfg = self.config
        if n < cfg.reports and quorum < cfg.report_quorum:
            return None  # reports are explicit: counted even when the monitor is disabled
        action = cfg.reports_action if quorum >= cfg.report_quorum else "flag"
        return self.raise_flag(
            "account", key, target_name, "reports",
            f"reported by {len(weights)} account(s), weight {n}, {quorum} of "
            f"{cfg.report_quorum} qualifying" + (" (signature verified)" if verified else ""),
            n, evidence, action=action)

    def sweep(self) -> None:
        now = self.clock.seconds()
        for w in (self.sends, self.new_peers, self.registrations, self.sizes):
            w.sweep(now)
        for key, weights in list(self.report_weights.items()):
            if all(last < now - REPORT_SPAN for _, last in weights.values()):
                del self.report_weights[key]
                self.qualifying.pop(key, None)
