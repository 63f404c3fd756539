# mypy: disallow-untyped-calls=False
"""Operations against the real ``twistd -n shtalk``: rate limits (memory and the
real Redis at 127.0.0.1:6379), sealed logs, reports, monitor flags, admin, metrics.

Tests that need Redis skip with the reason when it is absent, and fail instead when
``SHTALK_REQUIRE_REDIS=1`` (CI sets it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyotp
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from shtalk.admin import control
from shtalk.admin.main import main as admin_main
from shtalk.crypto.envelope import Envelope, MessageType, Recipient
from shtalk.crypto.identity import DeviceIdentity
from shtalk.server.ops import seclog
from tests.harness import (
    PASSWORD,
    ServerProcess,
    b64,
    connect,
    expect_error,
    free_port,
    fresh_client_id,
    fresh_name,
    register_and_login,
    sleep,
)

REDIS = ("127.0.0.1", 6379)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def redis_up(host: str = REDIS[0], port: int = REDIS[1]) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def need_redis(test: unittest.TestCase) -> None:
    if redis_up():
        return
    why = "no Redis at 127.0.0.1:6379"
    if os.environ.get("SHTALK_REQUIRE_REDIS") == "1":
        test.fail(f"{why}, and SHTALK_REQUIRE_REDIS=1 requires it")
    raise unittest.SkipTest(f"{why} (start redis-server; CI sets SHTALK_REQUIRE_REDIS=1)")


class _Servers(unittest.TestCase):
    timeout = 60

    def server(self, config: dict[str, dict[str, object]]) -> ServerProcess:
        server = ServerProcess(config)
        self.addCleanup(server.cleanup)
        server.start()
        return server

    @inlineCallbacks
    def client(self, server: ServerProcess) -> Any:
        c = yield connect(server)
        self.addCleanup(c.disconnect)
        yield c.hello()
        return c

    @inlineCallbacks
    def logged_in(self, server: ServerProcess, user: str | None = None) -> Any:
        s = yield register_and_login(server, user)
        self.addCleanup(s.client.disconnect)
        return s


class RateLimitTests(_Servers):
    @inlineCallbacks
    def test_memory_buckets_refuse_with_retry_after_then_disconnect(self) -> Any:
        server = self.server({"ratelimit": {
            "enabled": True, "login_account": "3/60", "send_account": "5/60",
            "disconnect_after": 4,
        }})
        s = yield self.logged_in(server)  # one login token used
        for _ in range(2):
            c = yield self.client(server)
            yield c.fail("login", "invalid_credentials", username=s.user,
                         password="wrong-password-123", device={"id": "x"})
        c = yield self.client(server)
        reply = yield c.request("login", username=s.user, password=PASSWORD,
                                device={"id": "x"})
        error = expect_error({}, reply, "rate_limited")
        self.assertGreaterEqual(error["retry_after"], 1)
        self.assertLessEqual(error["retry_after"], 20)
        # send: 5 pass, then refusals; sustained refusals close the connection.
        for i in range(5):
            yield s.client.send_user(s.user, b"x%d" % i)
        for _ in range(4):
            reply = yield s.client.request("send", to={"user": s.user},
                                           envelope=b64(b"y"), client_id=fresh_client_id())
            expect_error({}, reply, "rate_limited")
        s.client.send_line(json.dumps({"id": "last", "type": "send", "to": {"user": s.user},
                                       "envelope": b64(b"z"), "client_id": "c-z"}).encode())
        yield s.client.when_closed(timeout=5)


class RedisRateLimitTests(_Servers):
    @inlineCallbacks
    def test_two_servers_share_one_bucket(self) -> Any:
        need_redis(self)
        prefix = f"shtalk-test:{fresh_name('p')}:"
        cfg = {"ratelimit": {"enabled": True, "backend": "redis", "redis_prefix": prefix,
                             "login_account": "off", "login_address": "off",
                             "register_address": "off", "prekey_fetch_account": "4/60"}}
        a = self.server(cfg)
        b = self.server(cfg)
        # Same account on both servers (same data? no: the bucket key is the account id,
        # and each fresh server's first account has id 1).
        sa = yield self.logged_in(a)
        sb = yield self.logged_in(b)
        for _ in range(2):
            yield sa.client.ok("keys_fetch", user=sa.user)
            yield sb.client.ok("keys_fetch", user=sb.user)
        reply = yield sb.client.request("keys_fetch", user=sb.user)
        expect_error({}, reply, "rate_limited")
        reply = yield sa.client.request("keys_fetch", user=sa.user)
        expect_error({}, reply, "rate_limited")

    @inlineCallbacks
    def test_redis_going_away_degrades_to_memory_with_a_warning(self) -> Any:
        need_redis(self)
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("SHTALK_REQUIRE_REDIS") == "1":
                self.fail("redis-server not installed, and SHTALK_REQUIRE_REDIS=1")
            raise unittest.SkipTest("redis-server not installed (a private one is killed here)")
        port = free_port()
        redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(redis.wait)
        self.addCleanup(redis.kill)
        deadline = time.monotonic() + 10
        while not redis_up("127.0.0.1", port):
            self.assertLess(time.monotonic(), deadline, "private redis-server did not start")
            time.sleep(0.05)
        server = self.server({"ratelimit": {
            "enabled": True, "backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
            "redis_timeout": 0.3, "send_account": "3/60"}})
        s = yield self.logged_in(server)
        yield s.client.send_user(s.user, b"1")
        redis.kill()
        redis.wait()
        # No outage: requests are still answered, and the memory buckets still limit
        # (a fresh memory bucket: 3 sends, then a refusal).
        codes = []
        for _ in range(4):
            reply = yield s.client.request("send", to={"user": s.user}, envelope=b64(b"x"),
                                           client_id=fresh_client_id())
            codes.append("ok" if reply["ok"] else reply["error"]["code"])
        self.assertEqual(codes, ["ok", "ok", "ok", "rate_limited"])
        yield sleep(0.2)
        self.assertIn("Redis unavailable", server.log_text())


class SealedLogTests(_Servers):
    def setUp(self) -> None:
        self.keys = Path(tempfile.mkdtemp(prefix="shtalk-opkey-"))
        self.addCleanup(shutil.rmtree, self.keys, True)
        out = io.StringIO()
        self.assertEqual(admin_main(["logs", "keygen", "--out", str(self.keys / "op.key")],
                                    out=out), 0)
        self.private = self.keys / "op.key"
        self.assertEqual(self.private.stat().st_mode & 0o777, 0o600)

    def read_logs(self, files: list[Path], *extra: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = admin_main(["logs", "read", "--key", str(self.private), "--json", *extra,
                           *map(str, files)], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_secrets_never_reach_the_sealed_log_and_tampering_is_reported(self) -> Any:
        server = self.server({"logs": {"public_key_file": str(self.keys / "op.key.pub"),
                                       "max_bytes": 8192, "backup_count": 3}})
        log_dir = server.data_dir / "logs"
        for _ in range(14):  # enough records to rotate several times (about 1.7 KB each)
            c2 = yield self.client(server)
            yield c2.fail("resume", "invalid_token", access_token="not-a-token-" + "x" * 20)
            yield c2.disconnect()
        user = fresh_name()
        marker = "MARKER-" + os.urandom(6).hex()
        wrong = "Wrong-" + os.urandom(6).hex() + "-pw"
        s = yield self.logged_in(server, user)
        access, refresh = s.login["access_token"], s.login["refresh_token"]
        enrolled = yield s.client.ok("totp_enroll")
        otp = pyotp.TOTP(enrolled["secret"]).now()
        confirmed = yield s.client.ok("totp_confirm", code=otp)
        yield s.client.send_user(user, marker.encode())
        c = yield self.client(server)
        yield c.fail("login", "invalid_credentials", username=user, password=wrong,
                     device={"id": "d2"})
        yield c.fail("login", "invalid_credentials", username=wrong, password=PASSWORD,
                     device={"id": "d2"})  # a password typed into the username field
        r = yield c.ok("refresh", refresh_token=refresh)
        secrets = [PASSWORD, wrong, access, refresh, r["access_token"], r["refresh_token"],
                   marker, b64(marker.encode()), enrolled["secret"], enrolled["uri"],
                   *confirmed["recovery_codes"]]
        # The TOTP code is 6 digits: checked only in the decrypted records (as a field
        # value), since 6 digits occur by chance in random base64.
        server.stop()
        files = sorted(log_dir.iterdir())
        # Rotation keeps the configured count: the live file and backup_count old ones.
        self.assertEqual([f.name for f in files], ["shtalk.log.sealed"] + [
            f"shtalk.log.sealed.{i}" for i in (1, 2, 3)])
        for f in files:
            self.assertEqual(f.stat().st_mode & 0o777, 0o600)
        # With only the data dir and the logs nothing can be read: no private key is
        # there, the raw files show nothing, and no key from there opens a record.
        for path in server.base_dir.rglob("*"):
            if path.is_file() and not path.name.endswith(".sock"):
                raw = path.read_bytes()
                self.assertNotIn(seclog.PRIVATE_TAG.encode(), raw, path)
                for secret in secrets:
                    self.assertNotIn(secret.encode(), raw, f"{secret!r} in {path}")
        for f in files:
            self.assertNotIn(b"auth.", f.read_bytes())
        other, _ = seclog.generate_keypair()
        first = files[-1].read_text().splitlines()[0]
        with self.assertRaises(Exception):  # noqa: B017 (any failure to open will do)
            seclog.unseal(first, seclog.load_private_key(other))
        # With the operator's key: every auth event, no secret in any decrypted line.
        code, out, err = self.read_logs(files)
        self.assertEqual(code, 0, err)
        records = [json.loads(line) for line in out.splitlines()]
        events = [r.get("event") for r in records]
        self.assertIn("auth.refresh", events)
        self.assertIn("auth.login", events)
        for secret in secrets:
            self.assertNotIn(secret, out)
        for r in records:
            self.assertNotIn(otp, json.dumps(r.get("fields", {})))
            self.assertNotIn(otp, r.get("msg", ""))
        failed = [r for r in records if r.get("event") == "auth.login"
                  and r["fields"].get("result") == "invalid_credentials"]
        self.assertTrue(failed)
        self.assertTrue(all(r["fields"]["address"].startswith("h:") for r in failed))
        # Filters.
        code, only, _ = self.read_logs(files, "--event", "auth.refresh")
        self.assertTrue(only.strip())
        self.assertTrue(all(json.loads(x)["event"] == "auth.refresh" for x in only.splitlines()))
        # A modified record is reported (exit 2), not skipped silently; so is a removed one.
        # All records oldest first (shtalk.log.sealed.3 ... .1, then the live file).
        lines = [line for f in [*files[1:][::-1], files[0]]
                 for line in f.read_text().splitlines()]
        self.assertGreater(len(lines), 4)
        bad = self.keys / "tampered.sealed"
        flipped = lines[1][:100] + ("A" if lines[1][100] != "A" else "B") + lines[1][101:]
        bad.write_text("\n".join([lines[0], flipped, *lines[2:]]) + "\n")
        code, _, err = self.read_logs([bad])
        self.assertEqual(code, 2)
        self.assertIn("tampered.sealed:2: TAMPERED", err)
        gap = self.keys / "gap.sealed"
        gap.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
        code, _, err = self.read_logs([gap])
        self.assertEqual(code, 2)
        self.assertIn("missing", err)


def make_envelope(identity: DeviceIdentity, sender: str, device: str, to: str,
                  text: bytes) -> bytes:
    return Envelope.seal(
        identity, type=MessageType.MESSAGE, sender_user=sender, sender_device=device,
        recipient=Recipient.user(to), header=b"h" * 68, ciphertext=text,
        timestamp=int(time.time() * 1000),
    ).to_bytes()


class ReportMonitorAdminTests(_Servers):
    @inlineCallbacks
    def test_verified_report_flags_suspends_and_admin_reviews(self) -> Any:
        metrics_port = free_port()
        server = self.server({
            "monitor": {"enabled": True, "reports": 3, "reports_action": "suspend",
                        "report_quorum": 2, "reporter_min_age": 0},
            "metrics": {"enabled": True, "port": metrics_port},
        })
        alice = yield self.logged_in(server)
        bob = yield register_and_login(server, source="127.0.0.2")
        self.addCleanup(bob.client.disconnect)
        mallory = yield self.logged_in(server)
        ident = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
        yield mallory.client.ok("keys_publish",
                                bundle=b64(ident.public_bundle().base().to_bytes()))
        env = make_envelope(ident, mallory.user, mallory.device, alice.user, b"spam spam")
        yield mallory.client.ok("send", to={"user": alice.user}, envelope=b64(env),
                                client_id=fresh_client_id())
        # A forged envelope (signed by a key that is not mallory's) is refused.
        forger = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
        forged = make_envelope(forger, mallory.user, mallory.device, alice.user, b"lies")
        reply = yield alice.client.request("report", user=mallory.user, reason="spam",
                                           envelope=b64(forged))
        self.assertIn("signature", expect_error({}, reply, "bad_field")["message"])
        # ... and so is mallory's real envelope reported against someone else.
        reply = yield alice.client.request("report", user=alice.user, reason="x",
                                           envelope=b64(env))
        expect_error({}, reply, "bad_field")
        # The real one verifies; weight 3 reaches the threshold: a flag for review, and
        # nothing more from one report.
        r = yield alice.client.ok("report", user=mallory.user, reason="spam",
                                  envelope=b64(env), plaintext="spam spam")
        self.assertTrue(r["verified"])
        self.assertIsInstance(r["flag"], int)
        # A second qualifying reporter (another address, written to by mallory) meets the
        # quorum: the flag's action, suspension, runs.
        env2 = make_envelope(ident, mallory.user, mallory.device, bob.user, b"spam again")
        yield mallory.client.ok("send", to={"user": bob.user}, envelope=b64(env2),
                                client_id=fresh_client_id())
        r2 = yield bob.client.ok("report", user=mallory.user, reason="spam",
                                 envelope=b64(env2))
        self.assertEqual(r2["flag"], r["flag"])
        push = yield mallory.client.next_push("logged_out", timeout=5)
        self.assertIn("suspended", push["reason"])
        c = yield self.client(server)
        yield c.fail("login", "invalid_credentials", username=mallory.user, password=PASSWORD,
                     device={"id": "again"})
        # The operator's view.
        sock = str(server.data_dir / "admin.sock")
        self.assertEqual(os.stat(sock).st_mode & 0o777, 0o600)
        flags = control.call(sock, {"cmd": "flags"})["flags"]
        [flag] = [f for f in flags if f["label"] == mallory.user]
        self.assertEqual((flag["signal"], flag["action"]), ("reports", "suspend"))
        self.assertIn("signature verified", flag["reason"])
        out = io.StringIO()
        self.assertEqual(admin_main(["monitor", "--data-dir", str(server.data_dir), "--once"],
                                    out=out), 0)
        self.assertIn(mallory.user, out.getvalue())
        self.assertIn("open flags: 1", out.getvalue())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            text = resp.read().decode()
        self.assertIn('shtalk_flags_open{signal="reports"} 1', text)
        self.assertIn("shtalk_connections ", text)
        self.assertIn("shtalk_messages_routed_total 2", text)
        self.assertIn("shtalk_queue_depth ", text)
        # Review: unsuspend lets mallory in again; clear; delete ends the account.
        out = io.StringIO()
        self.assertEqual(admin_main(["review", "unsuspend", mallory.user, "--data-dir",
                                     str(server.data_dir)], out=out), 0)
        yield c.ok("login", username=mallory.user, password=PASSWORD, device={"id": "again"})
        self.assertEqual(admin_main(["review", "clear", str(flag["id"]), "--data-dir",
                                     str(server.data_dir)], out=io.StringIO()), 0)
        self.assertEqual(control.call(sock, {"cmd": "flags"})["flags"], [])
        self.assertEqual(admin_main(["review", "delete", mallory.user, "--yes", "--data-dir",
                                     str(server.data_dir)], out=io.StringIO()), 0)
        c2 = yield self.client(server)
        yield c2.fail("login", "invalid_credentials", username=mallory.user,
                      password=PASSWORD, device={"id": "again"})
