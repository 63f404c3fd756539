# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""A person can speak the protocol by hand: docs/PROTOCOL.md's walk-through, typed into
the real ``openssl s_client -quiet -crlf`` binary.

The request lines are taken from the walk-through in PROTOCOL.md itself (with a fresh
username and room name), and each reply is compared with the documented one: same
keys, same values, except tokens and timestamps, which only have to look right.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from typing import Any

from tests.harness import REPO_ROOT, ServerTestCase, fresh_name

OPENSSL = shutil.which("openssl")


def walkthrough() -> list[tuple[str, list[str]]]:
    """``[(request line, [documented reply lines])]`` from PROTOCOL.md's walk-through."""
    text = (REPO_ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    section = text.split("## A walk-through by hand", 1)[1]
    block = section.split("```", 2)[1]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if "type" in obj and "id" in obj:
            steps.append((line, []))
        else:
            steps[-1][1].append(line)
    return steps


class LineReader:
    """Lines from a pipe, with a deadline (``select`` on the raw file descriptor)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.seen: list[bytes] = []

    def line(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no line from openssl s_client within {timeout} s; got so far: "
                    f"{self.seen!r}, partial: {self.buffer!r}"
                )
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"openssl s_client closed its output; got {self.seen!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        line = line.rstrip(b"\r")
        self.seen.append(line)
        return line


class OpensslWalkthroughTests(ServerTestCase):
    def setUp(self) -> None:
        if OPENSSL is None:
            self.skipTest("the openssl command-line tool is not installed (apt install openssl)")
        super().setUp()

    def assertLike(self, got: dict[str, Any], documented: dict[str, Any], where: str) -> None:
        self.assertEqual(sorted(got), sorted(documented), f"{where}: keys differ: {got}")
        for key, want in documented.items():
            value = got[key]
            if key == "access_token":
                self.assertRegex(value, r"^eyJ[\w-]+\.[\w-]+\.[\w-]+$", where)
            elif key == "refresh_token":
                self.assertTrue(value.startswith("rt_") and len(value) > 20, where)
            elif key in ("ts", "seq"):
                self.assertIsInstance(value, int, where)
                self.assertGreater(value, 0, where)
            elif key == "server":
                self.assertRegex(value, r"^shtalk/\d", where)
            else:
                self.assertEqual(value, want, f"{where}: {key}")

    def test_walkthrough_by_hand(self) -> None:
        steps = walkthrough()
        self.assertGreaterEqual(len(steps), 5, "could not read the walk-through")
        user, room = fresh_name("h"), fresh_name("r")

        def personalise(line: str) -> str:
            line = re.sub(r'"alice(@example\.org)?"', lambda m: f'"{user}{m.group(1) or ""}"',
                          line)
            return line.replace('"general"', f'"{room}"')

        first = self.typist()
        for request, replies in steps:
            typed = personalise(request)
            got_lines = first.type(typed, len(replies))
            for raw, documented in zip(got_lines, replies, strict=True):
                self.assertLike(raw, json.loads(personalise(documented)),
                                f"after typing {typed}")

        # A second person joins the room by hand and reads the next message.
        second, other = self.typist(), fresh_name("h")

        def fill(template: str) -> str:
            return template.replace("ROOM", room).replace("OTHER", other)

        self.assertTrue(second.request('{"id":1,"type":"hello","version":1}')["ok"])
        reg = second.request(fill('{"id":2,"type":"register","username":"OTHER",'
                                  '"password":"tangerine-quokka-43","email":"b@example.org"}'))
        self.assertTrue(reg["ok"], reg)
        login = second.request(fill('{"id":3,"type":"login","username":"OTHER",'
                                    '"password":"tangerine-quokka-43","device":{"id":"shell"}}'))
        self.assertTrue(login["ok"], login)
        self.assertEqual(second.type("", 1, send=False)[0], {"type": "backlog_done", "count": 0})
        joined = second.request(fill('{"id":4,"type":"room_join","room":"ROOM"}'))
        self.assertEqual((joined["ok"], joined["room"]), (True, room), joined)
        self.assertEqual(first.type("", 1, send=False)[0],
                         {"type": "member", "room": room, "user": other, "event": "joined"})
        sent = first.request(fill('{"id":6,"type":"send","to":{"room":"ROOM"},'
                                  '"envelope":"aGkgdGhlcmU=","client_id":"c2"}'))
        self.assertTrue(sent["ok"], sent)
        while True:
            push = second.type("", 1, send=False)[0]
            if push.get("type") != "member":  # possibly its own join
                break
        self.assertEqual(push["type"], "message")
        self.assertEqual((push["seq"], push["from"], push["to"], push["envelope"]),
                         (sent["seq"], {"user": user, "device": "shell"}, {"room": room},
                          "aGkgdGhlcmU="))

    def typist(self) -> Typist:
        assert OPENSSL is not None
        proc = subprocess.Popen(
            [OPENSSL, "s_client", "-quiet", "-crlf",
             "-connect", f"{self.server.host}:{self.server.port}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(_end, proc)
        return Typist(proc)


class Typist:
    """One person at one ``openssl s_client``: types a line, reads the lines it shows."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.stdin = proc.stdin
        self.reader = LineReader(proc.stdout.fileno())

    def type(self, line: str, replies: int = 1, send: bool = True) -> list[dict[str, Any]]:
        if send:
            self.stdin.write(line.encode("utf-8") + b"\n")  # -crlf makes it CRLF
            self.stdin.flush()
        out = []
        for _ in range(replies):
            raw = self.reader.line()
            try:
                out.append(json.loads(raw))
            except ValueError:
                raise AssertionError(f"after typing {line}: not JSON: {raw!r}") from None
        return out


    def request(self, line: str) -> dict[str, Any]:
        """Type a request; return its reply (lines in between, pushes, are dropped)."""
        rid = json.loads(line)["id"]
        out = self.type(line)[0]
        while out.get("id", object()) != rid:
            out = self.type("", 1, send=False)[0]
        return out


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.communicate(timeout=10)
