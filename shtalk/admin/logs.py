"""``shtalk-admin logs``: make the operator's key pair; read (and follow) sealed logs.

Reading checks every record: one that cannot be decrypted (modified, truncated, or not
sealed to this key) and every break in a boot's chain of sequence numbers and hashes
(a removed, inserted or reordered record) is reported on stderr with its file and line,
and the exit status is 2; nothing is skipped silently.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from shtalk.server.ops import seclog


def keygen(out: str, force: bool, stdout: TextIO) -> int:
    private_path, public_path = Path(out), Path(out + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            print(f"shtalk-admin: {p} exists; use --force to overwrite", file=sys.stderr)
            return 1
    private, public = seclog.generate_keypair()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(private)
    public_path.write_text(public, encoding="ascii")
    print(f"private key: {private_path} (0600; keep it OFF the server)", file=stdout)
    print(f"public key:  {public_path} (set [logs] public_key_file to it on the server)",
          file=stdout)
    return 0


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds, ISO 8601 (UTC unless it says otherwise), or an age like 10m / 2h / 1d."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def order_files(paths: list[str]) -> list[Path]:
    """Oldest first: ``x.sealed.3, x.sealed.2, x.sealed.1, x.sealed``."""

    def key(p: str) -> tuple[str, int]:
        m = re.fullmatch(r"(.*)\.(\d+)", p)
        return (m.group(1), -int(m.group(2))) if m else (p, 0)

    return [Path(p) for p in sorted(paths, key=key)]


@dataclass
class Filters:
    level: int = 0
    since: float | None = None
    until: float | None = None
    events: list[str] = field(default_factory=list)

    def keep(self, rec: dict[str, Any]) -> bool:
        if seclog.LEVELS.get(str(rec.get("level")), 1) < self.level:
            return False
        ts = float(rec.get("ts", 0))
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts > self.until:
            return False
        if self.events:
            ev = str(rec.get("event", ""))
            return any(fnmatch.fnmatchcase(ev, pat) or ev.startswith(pat + ".")
                       for pat in self.events)
        return True


@dataclass
class Checker:
    """Follows each boot's chain; collects problems."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last: dict[str, tuple[int, str]] = field(default_factory=dict)

    def see(self, rec: dict[str, Any], line: str, where: str) -> None:
        boot, seq, prev = str(rec.get("boot")), int(rec.get("seq", -1)), str(rec.get("prev"))
        before = self.last.get(boot)
        if before is None:
            if seq != 0:
                self.notes.append(f"{where}: boot {boot} starts at record {seq} here "
                                  "(earlier ones are not in the files given, e.g. rotated away)")
        else:
            last_seq, last_hash = before
            if seq != last_seq + 1:
                self.problems.append(
                    f"{where}: boot {boot}: record {seq} follows record {last_seq} "
                    f"({'missing' if seq > last_seq + 1 else 'repeated or reordered'} records)")
            elif prev != last_hash:
                self.problems.append(f"{where}: boot {boot}: record {seq} does not chain to "
                                     "the previous line (a record was replaced)")
        self.last[boot] = (seq, seclog.chain_hash(line))


def format_record(rec: dict[str, Any]) -> str:
    ts = datetime.fromtimestamp(float(rec.get("ts", 0)), UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    parts = [ts[:-3] + "Z", str(rec.get("level", "?")).upper(), str(rec.get("event", "-")),
             f"[{rec.get('ns', '-')}]", str(rec.get("msg", ""))]
    extra = {k: rec[k] for k in ("fields", "dropped", "failure") if k in rec}
    if extra:
        parts.append(json.dumps(extra, sort_keys=True, ensure_ascii=True))
    return " ".join(parts)


def _records(
    path: Path, private: Any, checker: Checker, start: int = 0
) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    with path.open("r", encoding="ascii", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if n <= start:
                continue
            line = line.rstrip("\n")
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(seclog.unseal(line, private))
                if not isinstance(rec, dict):
                    raise ValueError("not a record")
            except Exception:
                checker.problems.append(
                    f"{where}: TAMPERED or unreadable record (it does not decrypt with this "
                    "key: modified, truncated, or sealed to another key)")
                yield n, None, line
                continue
            checker.see(rec, line, where)
            yield n, rec, line


def read(
    key_file: str, files: list[str], filters: Filters, follow: bool, as_json: bool,
    out: TextIO, err: TextIO, poll: float = 0.5, follow_for: float | None = None,
) -> int:
    private = seclog.load_private_key(Path(key_file).read_text(encoding="ascii"))
    checker = Checker()
    reported = 0

    def flush_problems() -> None:
        nonlocal reported
        for p in checker.problems[reported:]:
            print(f"shtalk-admin: {p}", file=err)
        reported = len(checker.problems)
        err.flush()

    def emit(rec: dict[str, Any] | None) -> None:
        if rec is not None and filters.keep(rec):
            print(json.dumps(rec, sort_keys=True) if as_json else format_record(rec), file=out)

    ordered = order_files(files)
    for path in ordered:
        for _, rec, _ in _records(path, private, checker):
            emit(rec)
        flush_problems()
    for note in checker.notes:
        print(f"shtalk-admin: note: {note}", file=err)
    out.flush()
    if follow and ordered:
        live = ordered[-1]
        seen = sum(1 for _ in live.open("rb"))
        ino = live.stat().st_ino
        started = time.monotonic()
        try:
            while follow_for is None or time.monotonic() - started < follow_for:
                time.sleep(poll)
                try:
                    st = live.stat()
                except FileNotFoundError:
                    continue
                if st.st_ino != ino:  # rotated: the old file became .1; read the new one
                    ino, seen = st.st_ino, 0
                for n, rec, _ in _records(live, private, checker, start=seen):
                    seen = n
                    emit(rec)
                out.flush()
                flush_problems()
        except KeyboardInterrupt:
            pass
    flush_problems()
    return 2 if checker.problems else 0
