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
suspended pending review: its sessions end and it cannot log in).  Flags are kept by an
``IFlagStore`` (the database's table; ``flags.json`` in the data directory when given a
path: ``shtalk.server.ops.flagstore``) and reviewed with ``shtalk-admin review``.  The
monitor works on its own copy and saves each change, one at a time and in order; in a
cluster each process raises its own flags and `refresh` reads everyone's.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.server.config import MonitorSection
from shtalk.server.ishared import IFlagStore
from shtalk.server.ops.flagstore import FileFlagStore
from shtalk.server.store.records import Flag

__all__ = ["SIGNALS", "Flag", "Monitor", "Window"]

log = Logger()

#: Reports older than this are forgotten.
REPORT_SPAN = 30 * 86400.0

SIGNALS = (
    "send_rate", "strangers", "new_account_strangers", "registrations", "same_size", "reports",
)


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
        store: IFlagStore | Path | None = None,
        partners: Callable[[int], Any] | None = None,
        actions: Mapping[str, Action] | None = None,
        load_now: bool = True,
    ) -> None:
        """``load_now`` False: the flags are read at the first `refresh` (a database is
        not open yet when the server is built; the operations service reads them)."""
        self.config = config
        self.clock = clock
        # None: flags live in this object only (tests).
        self.store: IFlagStore | None = FileFlagStore(store) if isinstance(store, Path) else store
        self.partners = partners  # user id -> Deferred[list[int]] (the store's dm_partners)
        self.enabled = config.enabled
        self.flags: dict[int, Flag] = {}  # stored flags by id
        self.open_by_key: dict[tuple[str, str, str], Flag] = {}  # stored or being stored
        self.next_id = 1  # without a store
        self._saves = DeferredLock()  # one save at a time, in order
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
        #: Fires once the stored flags are read (at once for a file).
        self.loaded: Deferred[None] = self.refresh() if load_now else succeed(None)
        self._load_later = not load_now

    # --- persistence --------------------------------------------------------------
    def load_stored(self) -> Deferred[None]:
        """Read the flags a database keeps, once it is open (the operations service
        starts after the store); flags read at construction are not read again."""
        if self._load_later:
            self._load_later = False
            self.loaded = self.refresh()
        return self.loaded

    def refresh(self) -> Deferred[None]:
        """Read the stored flags (every process's, in a cluster) after the saves queued
        so far; a flag known here takes the stored state.  Never fails (logged)."""
        store = self.store
        if store is None:
            return succeed(None)
        d: Deferred[list[Flag]] = self._saves.run(store.load_flags)

        def merge(stored: list[Flag]) -> None:
            for flag in stored:
                mine = self.flags.get(flag.id)
                if mine is None:
                    self.flags[flag.id] = mine = flag
                else:
                    for f in fields(Flag):
                        setattr(mine, f.name, getattr(flag, f.name))
                key = (mine.kind, mine.subject, mine.signal)
                if mine.status == "open":
                    self.open_by_key.setdefault(key, mine)
                elif self.open_by_key.get(key) is mine:
                    del self.open_by_key[key]

        def failed(failure: Failure) -> None:
            log.failure("the monitoring flags could not be read", failure)

        return d.addCallbacks(merge, failed)

    def save(self, flag: Flag) -> Deferred[None]:
        """Store ``flag`` (a new one gets its id then); never fails (logged)."""
        store = self.store
        if store is None:
            if not flag.id:
                flag.id, self.next_id = self.next_id, self.next_id + 1
            self.flags[flag.id] = flag
            return succeed(None)

        def stored(flag_id: int) -> None:
            # Still holding the lock: the next save of this flag sees its id.
            flag.id = flag_id
            self.flags[flag_id] = flag

        def failed(failure: Failure) -> None:
            log.failure("a monitoring flag was not saved", failure)

        def locked() -> Deferred[None]:
            return store.save_flag(flag).addCallback(stored)

        d: Deferred[None] = self._saves.run(locked)
        return d.addErrback(failed)

    def stored(self, flag: Flag) -> Deferred[Flag]:
        """Fires with ``flag`` once the saves queued so far are done (a new flag then has
        its id)."""
        d: Deferred[Flag] = self._saves.run(succeed, flag)
        return d

    # --- raising flags ----------------------------------------------------------------
    def raise_flag(
        self, kind: str, subject: str, label: str, signal: str, reason: str, count: int,
        evidence: dict[str, Any] | None = None, action: str | None = None,
    ) -> Flag:
        """Raise (or update) a flag; ``action`` overrides the signal's configured one,
        and an open flag whose action was only "flag" runs a stronger one once given."""
        now = self.clock.seconds()
        key = (kind, subject, signal)
        flag = self.open_by_key.get(key)
        if flag is not None:
            flag.count, flag.last, flag.reason = max(flag.count, count), now, reason
            if evidence is not None and len(flag.evidence) < 20:
                flag.evidence.append(evidence)
            escalate = action is not None and action != "flag" and flag.action == "flag"
            if escalate:
                assert action is not None
                flag.action = action
            self.save(flag)
            if escalate:
                self._run(flag)
            return flag
        if action is None:
            action = str(getattr(self.config, f"{signal}_action", "flag"))
        flag = Flag(0, kind, subject, label, signal, reason, action, count, now, now,
                    evidence=[evidence] if evidence is not None else [])
        self.open_by_key[key] = flag
        self.raised[signal] += 1

        def raised(_: object) -> None:
            log.warn("flag {flag_id} raised: {signal} on {kind} ({reason}); action {action}",
                     event="monitor.flag", flag_id=flag.id, signal=signal, kind=kind,
                     reason=reason, action=action,
                     **({"user_id": subject} if kind == "account" else {"address": subject}))

        self.save(flag).addCallback(raised)
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
        key = (flag.kind, flag.subject, flag.signal)
        if self.open_by_key.get(key) is flag:
            del self.open_by_key[key]
        self.save(flag)
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
