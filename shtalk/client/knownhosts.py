"""Pinned server certificates, trusted on first use, like ssh's ``known_hosts``.

Why a pin file and not the CA system: a fresh shtalk server has only a self-signed
certificate (``shtalk.server.tls``), so the client remembers the SHA-256 fingerprint it
was shown the first time (after a person confirmed it) and from then on accepts exactly
that certificate.  A later change is refused (`shtalk.client.connection.CertificateChanged`)
until the person removes the pin on purpose (`KnownHosts.forget`).

The file holds one line per server, ``host:port AB:CD:...`` (IPv6 hosts in brackets,
``[::1]:6697``); ``#`` comments and blank lines are kept.  It is tiny and read or
rewritten whole (a few hundred bytes, once per connection attempt), so plain file I/O on
the reactor thread is acceptable.  Rewrites are atomic (temporary file + ``os.replace``)
so a crash never leaves a half-written pin file, and the file is created 0600: it is not
secret, but nobody else should be able to swap a pin.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import tempfile

from shtalk.tlsutil import normalize_fingerprint


def canonical_fingerprint(fingerprint: bytes | str) -> str:
    """``AB:CD:...`` upper-case colon hex, from any form `normalize_fingerprint` accepts.

    Raises ``ValueError`` for anything that is not a SHA-256 digest.
    """
    return ":".join(f"{b:02X}" for b in normalize_fingerprint(fingerprint))


def fingerprints_equal(a: bytes | str, b: bytes | str) -> bool:
    """Compare two fingerprints in constant time, whatever their spelling."""
    return hmac.compare_digest(normalize_fingerprint(a), normalize_fingerprint(b))


def host_key(host: str, port: int) -> str:
    """The file's name for a server: ``host:port``, IPv6 literals bracketed, lower case
    (DNS names are case-insensitive, so ``Example.org`` and ``example.org`` share a pin)."""
    host = host.strip().lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


class KnownHosts:
    """The pin file at ``path``; re-read on every call so two clients sharing it agree."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _read_lines(self) -> list[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def _parse(line: str) -> tuple[str, str] | None:
        text = line.strip()
        if not text or text.startswith("#"):
            return None
        parts = text.split()
        if len(parts) != 2:
            return None
        try:
            return parts[0].lower(), canonical_fingerprint(parts[1])
        except ValueError:
            return None  # a damaged line pins nothing; it is kept, not "repaired"

    def lookup(self, host: str, port: int) -> str | None:
        """The pinned fingerprint (``AB:CD:...``) of ``host:port``, or None if unknown."""
        key = host_key(host, port)
        for line in self._read_lines():
            parsed = self._parse(line)
            if parsed is not None and parsed[0] == key:
                return parsed[1]
        return None

    def remember(self, host: str, port: int, fingerprint: str) -> None:
        """Pin ``fingerprint`` for ``host:port``, replacing an older pin (atomic rewrite)."""
        key = host_key(host, port)
        entry = f"{key} {canonical_fingerprint(fingerprint)}"
        lines = [ln for ln in self._read_lines() if (self._parse(ln) or ("",))[0] != key]
        lines.append(entry)
        self._write(lines)

    def forget(self, host: str, port: int) -> None:
        """Remove the pin of ``host:port`` (the next connection is a first contact again)."""
        key = host_key(host, port)
        lines = self._read_lines()
        kept = [ln for ln in lines if (self._parse(ln) or ("",))[0] != key]
        if len(kept) != len(lines):
            self._write(kept)

    def _write(self, lines: list[str]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=directory)  # created 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
