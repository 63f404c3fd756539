"""``shtalk-admin monitor`` and ``review``: clients of the server's admin socket."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO


class AdminError(Exception):
    pass


def socket_path(explicit: str | None, data_dir: str | None) -> str:
    if explicit:
        return explicit
    if data_dir:
        return str(Path(data_dir) / "admin.sock")
    from shtalk.server.config import default_data_dir

    return str(default_data_dir() / "admin.sock")


def call(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request over the admin socket; the reply, or AdminError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise AdminError(f"cannot reach the server's admin socket {path}: {e.strerror or e}"
                         ) from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise AdminError("the server sent no valid answer") from None
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error", "refused")))
    return dict(reply)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _value(metrics: dict[str, Any], name: str) -> float:
    values = metrics.get(name) or []
    return float(sum(v for _, v in values))


def render_flags(flags: list[dict[str, Any]]) -> list[str]:
    if not flags:
        return ["  (no flags)"]
    # The subject in full ("account:alice", "address:2001:db8::/64"): the column is as
    # wide as its longest entry, never cut.
    subjects = [f"{f['kind']}:{f['label']}" for f in flags]
    width = max(len("subject"), *map(len, subjects))
    lines = [f"  {'id':>4}  {'status':8} {'signal':22} {'subject':{width}} {'action':9} "
             f"{'count':>5}  last seen             reason"]
    for f, subject in zip(flags, subjects, strict=True):
        lines.append(f"  {f['id']:>4}  {f['status']:8} {f['signal']:22} {subject:{width}} "
                     f"{f['action']:9} {f['count']:>5}  {_when(f['last'])}  {f['reason']}")
        for ev in f.get("evidence", [])[:3]:
            bits = [f"by {ev.get('reporter')}", f"reason: {ev.get('reason')}"]
            if "envelope_id" in ev:
                bits.append(f"verified envelope {ev['envelope_id'][:16]} from device "
                            f"{ev.get('device')}")
            if "plaintext" in ev:
                bits.append(f"says: {json.dumps(ev['plaintext'][:120])}")
            lines.append("          " + "; ".join(bits))
    return lines


def render_stats(stats: dict[str, Any], flags: list[dict[str, Any]],
                 rates: dict[str, float]) -> str:
    m = stats["metrics"]
    hits = {labels.get("action", "-"): v for labels, v in m.get("shtalk_ratelimit_hits_total", [])
            if labels}
    lines = [
        f"shtalk monitor  {_when(time.time())}   (Ctrl-C quits)",
        "",
        f"  connections {int(_value(m, 'shtalk_connections')):>6}   online accounts "
        f"{int(_value(m, 'shtalk_online_users')):>6}   queue depth "
        f"{int(_value(m, 'shtalk_queue_depth')):>8}",
        f"  requests/s  {rates.get('requests', 0.0):>6.1f}   messages/s      "
        f"{rates.get('messages', 0.0):>6.1f}   messages routed "
        f"{int(_value(m, 'shtalk_messages_routed_total')):>8}",
        f"  rate limiting: backend {stats.get('ratelimit_backend')}, refusals "
        + (", ".join(f"{a} {int(v)}" for a, v in sorted(hits.items())) or "none"),
        "",
        f"  busiest senders (last {stats.get('window')} s): "
        + (", ".join(f"{t['user']} {t['sends']}" for t in stats.get("top_senders", []))
           or "none"),
        "",
        f"  open flags: {len(flags)}",
        *render_flags(flags),
    ]
    return "\n".join(lines)


def monitor(path: str, interval: float, once: bool, out: TextIO) -> int:
    previous: tuple[float, float, float] | None = None
    try:
        while True:
            stats = call(path, {"cmd": "stats"})
            flags = call(path, {"cmd": "flags"})["flags"]
            now = time.monotonic()
            req = _value(stats["metrics"], "shtalk_requests_total")
            msg = _value(stats["metrics"], "shtalk_messages_routed_total")
            rates: dict[str, float] = {}
            if previous is not None:
                dt = max(1e-6, now - previous[0])
                rates = {"requests": (req - previous[1]) / dt, "messages": (msg - previous[2]) / dt}
            previous = (now, req, msg)
            screen = render_stats(stats, flags, rates)
            if once:
                out.write(screen + "\n")
                return 0
            out.write("\x1b[H\x1b[2J" + screen + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def review(path: str, action: str, target: str | None, show_all: bool, yes: bool,
           out: TextIO) -> int:
    if action == "list":
        flags = call(path, {"cmd": "flags", "all": show_all})["flags"]
        out.write("\n".join(render_flags(flags)) + "\n")
        return 0
    if target is None:
        raise AdminError(f"review {action} needs a {'flag id' if action == 'clear' else 'user'}")
    if action == "clear":
        reply = call(path, {"cmd": "clear", "flag": int(target)})
        out.write(f"flag {reply['flag']['id']} cleared\n")
        return 0
    if action == "delete" and not yes:
        if not sys.stdin.isatty():
            raise AdminError("delete needs --yes when not run at a terminal")
        answer = input(f"delete the account {target!r} for good? type its name: ")
        if answer.strip() != target:
            out.write("not deleted\n")
            return 1
    reply = call(path, {"cmd": action, "user": target})
    verb = {"suspend": "suspended", "unsuspend": "active again", "delete": "deleted"}[action]
    out.write(f"{reply['user']}: {verb}" + ("" if reply.get("changed") else " (no change)")
              + "\n")
    return 0


def default_interval() -> float:
    return float(os.environ.get("SHTALK_MONITOR_INTERVAL", "2"))
