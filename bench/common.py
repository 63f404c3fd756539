"""What the benchmarks share: starting a real server, the configuration that keeps the
defences out of the measured path, the machine's description, an older revision's tree,
and writing one section of docs/PERFORMANCE.md (CPU accounting is in bench/cpu.py).

Each benchmark measures something else, but they must agree on these: a figure is only
comparable with a baseline when both ran the same server the same way, were charged CPU
the same way and were reported in the same document.  Nothing here starts a reactor;
`sleep` and `bounded` are for code that runs on one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "PERFORMANCE.md"
DOC_INTRO = (
    "# Performance\n\n"
    "Figures here are measured by the benchmarks in `bench/`, each run as one command on one\n"
    "machine, with every process (servers and load generators) on that machine talking over\n"
    "127.0.0.1. Each section names the machine, the command that reproduces it and the date;\n"
    "figures from different machines or runs are not comparable. Targets that are missed are\n"
    "reported as missed, with where the time goes.\n"
)
#: ``python -c`` program that runs twistd (a benchmark may put an experiment before it)
TWISTD = "from twisted.scripts.twistd import run; run()"
LISTENING = r"shtalk listening on [^:]+:(\d+)"
#: where an analysis written by hand starts, under a generated section: kept on rewrite
ANALYSIS = "<!-- analysis -->"


class BenchError(Exception):
    pass


def logger(name: str) -> Callable[[str], None]:
    """A progress log on stderr (stdout carries the report, or a child's result)."""

    def log(msg: str) -> None:
        sys.stderr.write(f"[{name} {time.strftime('%H:%M:%S')}] {msg}\n")
        sys.stderr.flush()

    return log


# --- servers ----------------------------------------------------------------------------


class Server:
    """A server subprocess; `port` is read from what it prints when listening."""

    def __init__(self, name: str, argv: list[str], pattern: str, log: Path,
                 pythonpath: Path = REPO, env: Mapping[str, str] | None = None,
                 start_timeout: float = 60) -> None:
        self.name = name
        self.start_timeout = start_timeout
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=str(log.parent),
            env={**os.environ, **(env or {}), "PYTHONPATH": str(pythonpath)},
            stdout=subprocess.PIPE, stderr=self._log_file, start_new_session=True,
        )
        self.port = self._wait_port(pattern)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_port(self, pattern: str) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        regex = re.compile(pattern)
        lines = []
        while time.monotonic() < deadline:
            raw = self.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            m = regex.search(line)
            if m:
                # Keep draining stdout so the server never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return int(m.group(1))
        self.stop()
        raise BenchError(
            f"{self.name} did not start: {''.join(lines)[-500:]} "
            f"{self.log.read_text(errors='replace')[-2000:]}"
        )

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in iter(self.proc.stdout.readline, b""):
            pass

    def stop(self) -> None:
        terminate(self.proc, 10)
        self._log_file.close()


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM and wait; SIGKILL if it takes longer than ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def launch_shtalk(work: Path, name: str, config: str, *, repo: Path = REPO,
                 boot: str = TWISTD, label: str | None = None, wrapper: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, start_timeout: float = 60) -> Server:
    """``twistd -n shtalk`` from ``repo`` with ``config`` as its ini file, a fresh data
    directory ``work/<name>-data``, any free port; its logs stay in ``work``.  ``wrapper``:
    the command that runs it (e.g. valgrind's), ``env``: added to the environment."""
    cfg = work / f"{name}.ini"
    cfg.write_text(config)
    argv = [
        *wrapper, sys.executable, "-c", boot,
        "-n", "--pidfile=", "--logfile", str(work / f"{name}-twistd.log"),
        "shtalk", "--port", "0", "--data-dir", str(work / f"{name}-data"), "--config", str(cfg),
    ]
    return Server(label or name, argv, LISTENING, work / f"{name}.stderr", pythonpath=repo,
                  env=env, start_timeout=start_timeout)


def run_child(argv: list[str], spec: dict[str, Any], timeout: float, what: str, *,
              show_stderr: bool = False) -> dict[str, Any]:
    """``python <argv>`` with ``spec`` (plus ``time_limit``) as JSON on stdin; the result
    of its ``RESULT {...}`` line.  A child bounds itself by ``time_limit``; 30 s more and
    it is killed.  ``show_stderr``: its progress goes to our terminal, not the error."""
    spec = dict(spec, time_limit=timeout)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run(
            [sys.executable, *argv], input=json.dumps(spec).encode(), stdout=subprocess.PIPE,
            stderr=None if show_stderr else subprocess.PIPE, env=env, cwd=str(REPO),
            timeout=timeout + 30,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what} overran its time limit") from e
    errors = "" if show_stderr else "\n" + proc.stderr.decode(errors="replace")[-3000:]
    for line in proc.stdout.decode().splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[7:])
            if "result" in outcome:
                return outcome["result"]  # type: ignore[no-any-return]
            raise BenchError(f"{what} failed: {outcome.get('error')}{errors}")
    raise BenchError(f"{what} exited {proc.returncode}:{errors}")


HUGE_RATE = "100000000/1"
#: the limits a load can reach; only these, so that an older server (bench/flood's
#: baseline), whose config refuses keys it does not know, still starts
RATE_KEYS = (
    "register_address", "login_account", "login_address", "send_account", "send_address",
    "join_account", "join_address",
)
MONITOR_KEYS = ("send_rate", "strangers", "new_account_strangers", "registrations", "same_size")


def lifted_limits(enabled: bool | None = None, rate_keys: tuple[str, ...] = RATE_KEYS,
                  monitor_keys: tuple[str, ...] = MONITOR_KEYS) -> str:
    """Every client comes from 127.0.0.1: the limiter stays on (its cost is part of the
    path measured) with limits no benchmark reaches; likewise the abuse monitor: on, but
    no benchmark pattern (many registrations from one address, fast same-size sends) may
    raise a flag.  ``enabled``: switch the limiter explicitly (bench/ratelimit)."""
    return (
        "[ratelimit]\n"
        + ("" if enabled is None else f"enabled = {'true' if enabled else 'false'}\n")
        + "".join(f"{key} = {HUGE_RATE}\n" for key in rate_keys)
        + "[monitor]\n"
        + "".join(f"{key} = 100000000\n" for key in monitor_keys)
    )


LIFTED_LIMITS = lifted_limits()
#: the same for this tree's server, whose registration checks have a limit of their own
#: (a bench registering hundreds of accounts from one address reaches it)
CURRENT_LIMITS = lifted_limits(rate_keys=(*RATE_KEYS, "register_check_address"))
#: the defences off altogether: for load they exist to throttle (bench/e2e)
NO_LIMITS = "[ratelimit]\nenabled = false\n[monitor]\nenabled = false\n"


def bench_config(bcrypt_cost: int, *, bcrypt_nice: int | None = None,
                 limits: str = LIFTED_LIMITS) -> str:
    """A server for load: many connections from one address, sessions that last the run,
    accounts usable at once (no mailbox, no human for CAPTCHAs)."""
    return (
        "[server]\n"
        "max_connections_per_address = 1000\n"
        "max_pending_handshakes_per_address = 1000\n"
        "idle_timeout = 3600\n"
        "pre_auth_timeout = 600\n"
        "[accounts]\n"
        f"bcrypt_cost = {bcrypt_cost}\n"
        + (f"bcrypt_nice = {bcrypt_nice}\n" if bcrypt_nice is not None else "")
        + "require_email_verification = false\n"
        "require_captcha = false\n"
        "[tokens]\n"
        "access_ttl = 7200\n"
        + limits
    )


def fingerprint(data_dir: Path) -> str:
    """The SHA-256 fingerprint of a server's certificate, for pinning."""
    from shtalk.server.datadir import DataDir
    from shtalk.server.tls import cert_fingerprint

    return cert_fingerprint(DataDir(str(data_dir)).cert_path.read_bytes())


def extract(rev: str, into: Path, repo: Path = REPO) -> Path:
    """The tree of ``rev`` (``git archive``: no worktree, no change to the repository),
    to run an older server beside this checkout's in the same run."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=str(repo), capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# --- on a reactor -----------------------------------------------------------------------


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def bounded(n: int, jobs: Sequence[Callable[[], Deferred[Any] | Coroutine[Any, Any, Any]]]
            ) -> Deferred[list[Any]]:
    """Run jobs (each returns a Deferred or a coroutine) with at most ``n`` in flight;
    their results in order."""
    sem = defer.DeferredSemaphore(n)

    def start(job: Callable[[], Deferred[Any] | Coroutine[Any, Any, Any]]) -> Deferred[Any]:
        return defer.ensureDeferred(job())

    return defer.gatherResults([sem.run(start, job) for job in jobs], consumeErrors=True)


# --- the report -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What a section says it was measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import twisted

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
        "revision": revision(),
    }


def revision() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(REPO),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp for one run's servers and stores, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(results: dict[str, Any], json_path: Path | None, section: str, doc: Path | None,
           log: Callable[[str], None]) -> None:
    """What a finished run leaves: every figure in ``json_path`` and its section of
    ``doc`` (each only if given)."""
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if doc is not None:
        write_section(section, doc)
        log(f"wrote {section.split(chr(10), 1)[0][3:]} in {doc}")


def write_section(section: str, path: Path = DOC, heading: str | None = None) -> None:
    """Replace (or add) one benchmark's section of docs/PERFORMANCE.md: from its heading
    (``heading``, else the section's first line) to the next ``## `` heading.  Whatever
    stood under an ``<!-- analysis -->`` line of the old section is kept under the new one;
    the other sections stay where they are."""
    heading = heading or section.split("\n", 1)[0]
    text = path.read_text() if path.exists() else DOC_INTRO
    if heading in text and f"\n{heading}\n" not in f"\n{text}":
        # Another writer glued our heading to the end of its last line: unglue it.
        text = text.replace(heading, "\n\n" + heading, 1)
    lines = text.split("\n")
    body = section.rstrip("\n")
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + body + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        old = "\n".join(lines[start:end])
        marker = old.find(ANALYSIS)
        if marker >= 0 and ANALYSIS in body:
            analysis = old[marker + len(ANALYSIS):].strip("\n")
            if analysis:
                body += "\n" + analysis
        tail = "\n".join(lines[end:])
        new = "\n".join(lines[:start]).rstrip("\n") + "\n\n" + body + "\n" + (
            "\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def child_main(spec: dict[str, Any],
               scenarios: Mapping[str, Callable[[dict[str, Any]], Any]]) -> bool:
    """The child side of `run_child`: run ``spec``'s scenario (a Deferred or a coroutine)
    on the reactor, bounded by ``spec["time_limit"]`` whatever happens, and print its
    ``RESULT {...}`` line.  True if it succeeded (the caller picks the exit)."""
    from twisted.internet import reactor
    from twisted.python.failure import Failure

    r: Any = reactor
    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        outcome["result"] = result

    def failed(failure: Failure) -> None:
        failure.printTraceback(file=sys.stderr)
        outcome["error"] = failure.getErrorMessage()

    def start() -> None:
        d = defer.ensureDeferred(scenarios[spec["scenario"]](spec))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: r.stop())

    def overrun() -> None:
        failed(Failure(TimeoutError("time limit")))
        r.stop()

    limit = r.callLater(float(spec.get("time_limit", 600)), overrun)
    r.callWhenRunning(start)
    r.run()
    if limit.active():
        limit.cancel()
    sys.stdout.write("RESULT " + json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return "result" in outcome


def report_main(doc: str | None, report: Callable[[bool], str],
                argv: list[str] | None = None) -> None:
    """The command line of an in-process benchmark: ``--quick`` for fewer iterations,
    ``--write FILE`` to put its section (``report``'s markdown) into that file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args(argv)
    section = report(args.quick)
    print(section)
    if args.write:
        write_section(section, args.write)
