"""The server's data directory: its secrets, certificate and database, kept private.

Why a class of its own: a fresh ``twistd -n shtalk`` must just work (so the secrets are
made on first start), and a later start must either reuse exactly those secrets or stop
with a message an operator can act on; it must never quietly make new ones (that would
make queued envelopes unreadable and log every user out) nor run with secrets other
accounts on the host can read or replace.  Hence: directory 0700, files 0600, owned by
us, created atomically (written to a temporary name, then hard-linked into place, which
fails instead of overwriting if a concurrent start got there first), and checked on
every start.

Layout::

    storage.key          32 random bytes: AES-256-GCM key for data at rest
    jwt-signing-key.pem  ECDSA P-256 private key (PKCS#8 PEM) for ES256 tokens
    tls-key.pem          ECDSA P-256 private key of the self-signed TLS certificate
    tls-cert.pem         the self-signed TLS certificate (its fingerprint is printed)
    shtalk.sqlite3       the database (made by the store, not here)
    outbox/              mail written instead of sent when no SMTP relay is configured
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.ssl import CertificateOptions

from shtalk.server import tls
from shtalk.server.config import StartupError

STORAGE_KEY_BYTES = 32
DEFAULT_TLS_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
REGENERATE = "delete it to have a new one generated, or restore it from a backup"


class DataDirError(StartupError):
    """The data directory or one of its files is unusable; ``str()`` is one line."""


class DataDir:
    """Paths and secrets under one directory.  The constructor does no I/O; call `ensure`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # What lives in it:
        self.storage_key_path = self.path / "storage.key"
        self.jwt_key_path = self.path / "jwt-signing-key.pem"
        self.cert_path = self.path / "tls-cert.pem"
        self.key_path = self.path / "tls-key.pem"
        self.db_path = self.path / "shtalk.sqlite3"
        self.outbox_dir = self.path / "outbox"

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    def ensure(
        self, tls_names: Sequence[str] | None = DEFAULT_TLS_NAMES, mint_keys: bool = True
    ) -> None:
        """Create what is missing, then check everything is private and loadable.

        ``tls_names`` are the subjectAltNames for a new self-signed certificate; ``None``
        means the operator brings their own certificate, so none is made here.
        ``mint_keys`` False (a process of a cluster): a missing storage or token key is an
        error, since a key made here would differ from the other processes' (what they
        stored would be unreadable here, and their tokens refused).
        Raises `DataDirError`.
        """
        self._ensure_dir()
        if not mint_keys:
            for path in (self.storage_key_path, self.jwt_key_path):
                if not (path.exists() or path.is_symlink()):
                    raise DataDirError(
                        f"{path}: missing, and a process of a cluster does not make one "
                        "(every process must share it): copy storage.key and "
                        "jwt-signing-key.pem from another process's data directory"
                    )
        self._create_if_missing(self.storage_key_path, _new_storage_key)
        self._create_if_missing(self.jwt_key_path, _new_jwt_key)
        if tls_names is not None:
            cert_exists = self.cert_path.exists() or self.cert_path.is_symlink()
            key_exists = self.key_path.exists() or self.key_path.is_symlink()
            if cert_exists != key_exists:
                present, missing = (
                    (self.cert_path, self.key_path)
                    if cert_exists
                    else (self.key_path, self.cert_path)
                )
                raise DataDirError(
                    f"{missing}: missing while {present.name} exists; delete {present} "
                    "too to have a new pair generated, or restore both from a backup"
                )
            if not cert_exists:
                key_pem, cert_pem = tls.make_self_signed(tls_names)
                self._create_if_missing(self.key_path, lambda: key_pem)
                self._create_if_missing(self.cert_path, lambda: cert_pem)
            self._read_private(self.cert_path)
            self._read_private(self.key_path)
        # Validate now so a corrupt secret stops the start, not the first login.
        self.storage_key()
        self.jwt_private_key_pem()

    def storage_key(self) -> bytes:
        """The 32-byte AES-256-GCM key for data at rest."""
        data = self._read_private(self.storage_key_path)
        if len(data) != STORAGE_KEY_BYTES:
            raise DataDirError(
                f"{self.storage_key_path}: has {len(data)} bytes, not {STORAGE_KEY_BYTES} "
                f"(corrupt); restore it from a backup (deleting it makes stored data unreadable)"
            )
        return data

    def jwt_private_key_pem(self) -> bytes:
        """The ES256 token-signing key: an ECDSA P-256 private key in PKCS#8 PEM."""
        data = self._read_private(self.jwt_key_path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise DataDirError(
                f"{self.jwt_key_path}: not a PEM private key (corrupt); {REGENERATE} "
                "(a new key logs everyone out)"
            ) from None
        if not (
            isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
        ):
            raise DataDirError(f"{self.jwt_key_path}: not an ECDSA P-256 key; {REGENERATE}")
        return data

    def tls_server_options(self) -> CertificateOptions:
        """Server TLS options from the data dir's own certificate and key."""
        try:
            return tls.load_server_options(
                self.cert_path, self.key_path, remedy=f"{REGENERATE} (together with its partner)"
            )
        except tls.TLSFileError as e:
            raise DataDirError(str(e)) from None

    # -- internals -------------------------------------------------------------

    def _ensure_dir(self) -> None:
        try:
            if not self.path.exists():
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.path, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as e:
            raise DataDirError(
                f"{self.path}: cannot create the data directory ({e.strerror}); "
                "choose another with --data-dir"
            ) from None
        try:
            st = self.path.stat()
        except OSError as e:
            raise DataDirError(f"{self.path}: cannot inspect ({e.strerror})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise DataDirError(f"{self.path}: not a directory; choose another with --data-dir")
        if st.st_uid != os.geteuid():
            raise DataDirError(
                f"{self.path}: owned by uid {st.st_uid}, not by this user ({os.geteuid()}); "
                "run as its owner or choose another --data-dir"
            )
        if st.st_mode & 0o022:
            raise DataDirError(
                f"{self.path}: writable by group or others (mode {st.st_mode & 0o777:o}); "
                f"run: chmod 700 {self.path}"
            )
        try:
            self.outbox_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise DataDirError(f"{self.outbox_dir}: cannot create ({e.strerror})") from None

    def _create_if_missing(self, path: Path, make: Callable[[], bytes]) -> None:
        if path.exists() or path.is_symlink():
            return
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # in case the umask is odd; 0600 is what we want
                data = make()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            # Atomic, and never overwrites the file of a concurrent start that won the race.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        except OSError as e:
            raise DataDirError(f"{path}: cannot create ({e.strerror})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(self.path)

    def _read_private(self, path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise DataDirError(f"{path}: missing; {REGENERATE}") from None
        except OSError as e:
            raise DataDirError(
                f"{path}: cannot read ({e.strerror}); it must be a regular file owned by this user"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DataDirError(f"{path}: not a regular file; {REGENERATE}")
            if st.st_uid != os.geteuid():
                raise DataDirError(
                    f"{path}: owned by uid {st.st_uid}, not this user; fix with chown"
                )
            if st.st_mode & 0o077:
                raise DataDirError(
                    f"{path}: readable or writable by others (mode {st.st_mode & 0o777:o}); "
                    f"run: chmod 600 {path}"
                )
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        except OSError as e:
            raise DataDirError(f"{path}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)


def _new_storage_key() -> bytes:
    return secrets.token_bytes(STORAGE_KEY_BYTES)


def _new_jwt_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
