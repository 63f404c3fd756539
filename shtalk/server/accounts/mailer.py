"""Outgoing mail: Twisted's ESMTP client with STARTTLS, or an outbox folder.

Why this shape: a mail relay that is down or slow must never block or fail a
registration, so `Mailer.send` only queues and returns at once; delivery runs in the
background with retries and exponential backoff, and a final failure is logged (without
the code: the log names the purpose and the attempt count only).  The Deferred that
`send` returns fires with True/False when delivery is done or given up (tests wait on
it; the server does not).

* `SmtpMailer`: ``ESMTPSenderFactory`` with ``requireTransportSecurity=True`` (STARTTLS
  with a verified certificate: system trust or ``[smtp] ca_file``), optional SMTP AUTH.
  Plain SMTP is allowed only to a loopback relay, and only when the config says so.
* `OutboxMailer`: the embedded default (no relay configured): one ``.eml`` file per
  message in the data directory's ``outbox/`` (mode 0600, written atomically), for
  ``make run`` and for operators who hand mail over some other way.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from io import BytesIO
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.server.config import ConfigError, SmtpSection

log = Logger()

MAX_RETRY_DELAY = 3600.0


def build_message(sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(body)  # text/plain; charset utf-8
    return msg


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Mailer:
    """Queue a message; deliver in the background with retries.  Subclasses deliver once."""

    def __init__(
        self, clock: IReactorTime, sender: str, retries: int = 5, retry_delay: float = 10.0
    ) -> None:
        self.clock = clock
        self.sender = sender
        self.retries = retries
        self.retry_delay = retry_delay
        self.sent = 0
        self.failed = 0
        self.description = ""

    def send(self, to: str, subject: str, body: str, purpose: str = "mail") -> Deferred[bool]:
        """Start delivering; never raises.  Fires True once delivered, False if given up."""
        msg = build_message(self.sender, to, subject, body)
        d: Deferred[bool] = self._deliver_with_retries(to, msg, purpose)
        return d

    @inlineCallbacks
    def _deliver_with_retries(self, to: str, msg: EmailMessage, purpose: str) -> Any:
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                yield self.deliver_once(to, msg)
            except Exception as e:
                # The reason may quote the relay; never the message (it holds a code).
                reason = " ".join(str(e).split())[:300] or type(e).__name__
                if attempt >= self.retries:
                    self.failed += 1
                    log.error(
                        "{purpose} mail not delivered after {n} attempts: {reason}",
                        purpose=purpose, n=attempt + 1, reason=reason,
                    )
                    return False
                log.warn(
                    "{purpose} mail attempt {n} failed ({reason}); retrying in {delay:.0f} s",
                    purpose=purpose, n=attempt + 1, reason=reason, delay=delay,
                )
                yield deferLater(self.clock, delay, lambda: None)
                delay = min(delay * 2, MAX_RETRY_DELAY)
            else:
                self.sent += 1
                log.info("{purpose} mail delivered", purpose=purpose)
                return True
        return False  # pragma: no cover - the loop always returns

    def deliver_once(self, to: str, msg: EmailMessage) -> Deferred[Any]:
        raise NotImplementedError

    def sweep(self) -> Deferred[int]:
        """Drop what is kept of mails whose codes have expired (the outbox's files)."""
        return succeed(0)


class OutboxMailer(Mailer):
    """One ``.eml`` file per message in ``directory`` (created 0700; files 0600).

    A file holds a live code, so it is removed once that code has expired
    (``keep_for``, the code's lifetime): by a timer after each write, and by `sweep`
    (run hourly, and at start-up for files left by an earlier run)."""

    def __init__(
        self, clock: IReactorTime, directory: Path, sender: str, keep_for: float = 600.0
    ) -> None:
        super().__init__(clock, sender, retries=2, retry_delay=1.0)
        self.directory = Path(directory)
        self.keep_for = keep_for
        self.description = f"mail is written to the outbox {self.directory} (no SMTP relay set)"

    def deliver_once(self, to: str, msg: EmailMessage) -> Deferred[Any]:
        d = deferToThread(self._write, bytes(msg), self.clock.seconds())
        d.addCallback(self._expire_later)
        return d

    def _expire_later(self, path: Path) -> Path:
        self.clock.callLater(self.keep_for, self.sweep)
        return path

    def sweep(self) -> Deferred[int]:
        d: Deferred[int] = deferToThread(self._remove_expired, self.clock.seconds())

        def failed(f: Failure) -> int:
            log.failure("sweeping the outbox failed", f)
            return 0

        return d.addErrback(failed)

    def _remove_expired(self, now: float) -> int:
        removed = 0
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        for path in entries:
            written = _written_at(path.name)
            if written is not None and written + self.keep_for <= now:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _write(self, data: bytes, now: float) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{now:.6f}-{secrets.token_hex(4)}"
        tmp = self.directory / f".{name}.tmp"
        final = self.directory / f"{name}.eml"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final


class SmtpMailer(Mailer):
    """Twisted's ESMTP client: STARTTLS (verified) required unless loopback and allowed."""

    def __init__(self, clock: IReactorTime, reactor: Any, section: SmtpSection) -> None:
        super().__init__(
            clock, section.sender, retries=section.retries,
            retry_delay=float(section.retry_delay),
        )
        if not section.require_starttls and not is_loopback(section.host):
            raise ConfigError(
                f"[smtp] require_starttls = false is allowed only for a loopback relay, not "
                f"{section.host!r}: mail carries account codes"
            )
        self.reactor = reactor
        self.section = section
        self.tls_options = self._tls_options(section)
        tls = "STARTTLS required" if section.require_starttls else "STARTTLS if offered"
        self.description = f"mail goes to the SMTP relay {section.host}:{section.port} ({tls})"

    @staticmethod
    def _tls_options(section: SmtpSection) -> Any:
        from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates

        if not section.ca_file:
            return optionsForClientTLS(section.host)
        try:
            pem = Path(section.ca_file).read_bytes()
        except OSError as e:
            raise ConfigError(f"[smtp] ca_file {section.ca_file}: {e.strerror}") from None
        certs = [
            Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + part)
            for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
        if not certs:
            raise ConfigError(f"[smtp] ca_file {section.ca_file}: no PEM certificate in it")
        root = trustRootFromCertificates(certs)  # type: ignore[no-untyped-call]
        return optionsForClientTLS(section.host, trustRoot=root)

    def deliver_once(self, to: str, msg: EmailMessage) -> Deferred[Any]:
        from twisted.mail.smtp import ESMTPSenderFactory

        s = self.section
        done: Deferred[Any] = Deferred()
        factory = ESMTPSenderFactory(  # type: ignore[no-untyped-call]
            s.username.encode() if s.username else None,
            s.password.encode() if s.username else None,
            s.sender,
            to,
            BytesIO(bytes(msg)),
            done,
            retries=0,
            timeout=s.timeout,
            contextFactory=self.tls_options,
            requireAuthentication=bool(s.username),
            requireTransportSecurity=s.require_starttls,
        )
        factory.noisy = False
        self.reactor.connectTCP(s.host, s.port, factory, timeout=s.timeout)
        return done


def _written_at(name: str) -> float | None:
    """The time an outbox file was written, from its name ("<time>-<random>.eml")."""
    stamp = name.lstrip(".").partition("-")[0]
    try:
        return float(stamp)
    except ValueError:
        return None


def make_mailer(
    section: SmtpSection, outbox: Path, clock: IReactorTime, reactor: Any,
    keep_for: float = 600.0,
) -> Mailer:
    if section.host:
        return SmtpMailer(clock, reactor, section)
    return OutboxMailer(clock, outbox, section.sender, keep_for)

