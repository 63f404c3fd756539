"""bench/newcomer: how long a newcomer waits for the machine, from client start to the first
message seen.  Part of ``python -m bench.urwid`` (its section of docs/PERFORMANCE.md);
alone: ``python -m bench.newcomer`` (prints only).

The scripted run, on a server as ``make run`` starts it (the default bcrypt cost 12,
CAPTCHA and email verification on, the default rate limits and monitoring): Alice starts
``shtalk-urwid`` in tmux (80x24), trusts the fingerprint, registers (the CAPTCHA read
through the server's test hook, the emailed code from its outbox), chooses her
passphrase, declines two-factor set-up; Bob does the same right after, from the same
address; Alice sends Bob a first direct message; the clock stops when it is on Bob's
screen.  The clients use the real Argon2id (64 MiB, 3 passes) for their stores.  The
driver types each answer as soon as its screen is there (tests/terminal.py polls every
20 ms; it never sleeps for "typing"), so the time is the machine's.

Baseline, measured in the same run against the same server: the same two registrations
(CAPTCHA, email code, login) and the same first message done by two headless clients
(`shtalk.client`, no terminal, no screens) in one process.  The ratio is the cost of the
terminal client's screens and flow over the protocol's own work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVER_CONFIG: dict[str, dict[str, object]] = {
    "accounts": {"bcrypt_cost": 12, "require_captcha": True,
                 "require_email_verification": True},
    "ratelimit": {"enabled": True},
    "monitor": {"enabled": True},
}


def run() -> dict[str, Any]:
    """The scripted newcomer run and its headless baseline (blocking; tmux needed)."""
    if shutil.which("tmux") is None:
        return {"skipped": "tmux is not installed"}
    sys.path.insert(0, str(REPO))
    from tests.harness import ServerProcess, fresh_name
    from tests.terminal import Newcomer, Terminal, cpu_seconds, unread

    tmp = Path(tempfile.mkdtemp(prefix="shtalk-bench-newcomer-"))
    answers = tmp / "captcha-answers.txt"
    os.environ["SHTALK_TEST_CAPTCHA_ANSWERS"] = str(answers)
    (tmp / "server").mkdir()
    server = ServerProcess(SERVER_CONFIG, base_dir=str(tmp / "server"))
    socket = f"shtalk-bench-{os.getpid()}"
    try:
        server.start()
        assert server.process is not None
        kit = Newcomer(answers, server.data_dir / "outbox")
        out: dict[str, Any] = {}
        alice_name, bob_name = fresh_name("a"), fresh_name("b")
        terminals = []
        cpu0 = cpu_seconds(server.process.pid)
        start = time.monotonic()
        for name, who in ((alice_name, "alice"), (bob_name, "bob")):
            home = tmp / who
            home.mkdir()
            t = Terminal(who, socket, server.port, home, cheap_kdf=False)
            t.start()
            kit.register(t, name)
            out[f"{who}_registered"] = time.monotonic() - start
            terminals.append(t)
        alice, bob = terminals
        alice.line(f"/msg {bob_name} hello {bob_name}, welcome")
        bob.wait_for(unread(alice_name))
        bob.key("M-a")
        bob.wait_for(f"hello {bob_name}, welcome")
        out["first_message_seen"] = time.monotonic() - start
        out["cpu_clients"] = sum(cpu_seconds(p) for t in terminals for p in t.pids())
        out["cpu_server"] = cpu_seconds(server.process.pid) - cpu0
        out["baseline"] = headless_baseline(server.port, answers, server.data_dir / "outbox")
        out["ratio"] = out["first_message_seen"] / out["baseline"]["first_message_seen"]
        return out
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
        server.cleanup()
        os.environ.pop("SHTALK_TEST_CAPTCHA_ANSWERS", None)
        shutil.rmtree(tmp, ignore_errors=True)


def headless_baseline(port: int, answers: Path, outbox: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "bench.newcomer", "--headless-child", str(port), str(answers),
         str(outbox)], capture_output=True, text=True, env=env, timeout=300, check=True)
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][-1]
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def email_code(outbox: Path, email: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for mail in sorted(outbox.glob("*.eml")):
            text = mail.read_text(errors="replace")
            m = re.search(r"^    (\S+)$", text, re.M)
            if f"To: {email}" in text and m:
                return m.group(1)
        time.sleep(0.02)
    raise AssertionError(f"no mail to {email}")


def headless_child(port: int, answers: Path, outbox: Path) -> None:
    """Two headless clients: register (CAPTCHA, code), log in, first message."""
    from twisted.internet import task

    async def main(reactor: Any) -> None:
        from twisted.internet.defer import succeed

        from shtalk.client.client import ShtalkClient
        from shtalk.client.connection import ServerError
        from shtalk.client.events import MessageReceived
        from shtalk.client.knownhosts import KnownHosts
        from shtalk.client.localstore import KdfParams, LocalStore
        from shtalk.client.session import Credentials
        from tests.harness import fresh_name
        from tests.terminal import PASSWORD

        tmp = Path(tempfile.mkdtemp(prefix="shtalk-bench-headless-"))
        seen: list[MessageReceived] = []
        clients = []
        start = time.monotonic()
        try:
            for who in ("a", "b"):
                name = fresh_name("h" + who)
                store = await LocalStore.create(str(tmp / f"{who}.sqlite3"), "pass", reactor,
                                                kdf=KdfParams())  # the real Argon2id too
                client = ShtalkClient(
                    reactor, store, "127.0.0.1", port, KnownHosts(str(tmp / "known_hosts")),
                    Credentials(name, f"{who}-dev"), confirm_fingerprint=lambda fp: succeed(True),
                    ask_password=lambda: succeed(PASSWORD),
                    on_event=lambda e: seen.append(e) if isinstance(e, MessageReceived) else None)
                try:
                    await client.register(PASSWORD, f"{name}@example.org")
                except ServerError as e:
                    challenge = e.reply["error"]["captcha"]
                    answer = dict(line.split(" ", 1) for line in answers.read_text().splitlines())
                    await client.register(PASSWORD, f"{name}@example.org", captcha={
                        "id": challenge["id"], "answer": answer[challenge["id"]]})
                await client.verify_email(email_code(outbox, f"{name}@example.org"))
                await client.login(PASSWORD)
                clients.append(client)
            alice, bob = clients
            await alice.send(f"user:{bob.credentials.username}", "hello")
            while not seen:
                await task.deferLater(reactor, 0.005, lambda: None)
            print(json.dumps({"first_message_seen": time.monotonic() - start}), flush=True)
        finally:
            for c in clients:
                await c.close()
            shutil.rmtree(tmp, ignore_errors=True)

    task.react(main)


def render(r: dict[str, Any]) -> list[str]:
    """The lines of PERFORMANCE.md about the newcomer run."""
    if "skipped" in r:
        return [f"Newcomer run: skipped ({r['skipped']})."]
    b = r["baseline"]["first_message_seen"]
    return [
        "### Newcomer: client start to first message seen",
        "",
        "Two accounts registered back to back from one address on a server as `make run` "
        "starts it (bcrypt cost 12, CAPTCHA and email code, default rate limits), each in "
        "`shtalk-urwid` in tmux at 80x24 (trust, register, CAPTCHA through the test hook, "
        "emailed code from the outbox, passphrase with the real Argon2id, no two-factor), "
        "then a first direct "
        "message; the clock runs from Alice's client start until the message is on Bob's "
        "screen. The driver answers each screen as soon as it is there (no typing pauses).",
        "",
        "| what | target | measured |",
        "|---|---|---|",
        f"| client start to first message seen | < 60 s | **{r['first_message_seen']:.1f} s** "
        f"(Alice registered at {r['alice_registered']:.1f} s, Bob at "
        f"{r['bob_registered']:.1f} s) |",
        f"| the same with two headless clients (baseline, same run, same server) | | "
        f"{b:.1f} s; ratio **{r['ratio']:.2f}x** |",
        f"| CPU time of both terminal clients / of the server during the run | | "
        f"{r['cpu_clients']:.1f} s / {r['cpu_server']:.1f} s |",
        "",
        "This is the machine's share of a newcomer's way in; the rest is reading and typing. "
        "Before the set-up screens of shtalk/clientui/setup.py a person needed 286 s and "
        "six CAPTCHAs for the first account and 558 s and a server restart for the second "
        "(the CAPTCHA's connection timed out under the person reading it, and the default "
        "limits allowed 10 registrations an hour per address).",
    ]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--headless-child":
        headless_child(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        result = run()
        print(json.dumps(result, indent=1))
        print("\n".join(render(result)))
