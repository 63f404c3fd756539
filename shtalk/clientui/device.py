"""Where this device keeps its things and what it calls itself: the local store's file
per server, a new device's id, the client's name, and forgetting a server's pinned
certificate.

Plain functions, used by the start-up (`shtalk.clientui.main`) and the set-up flows
before the client stack is loaded, so nothing here imports it at module level.
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shtalk.client.localstore import KdfParams

CLIENT_NAME = "shtalk-urwid/0.1"
TEST_KDF_ENV = "SHTALK_URWID_TEST_KDF"


def test_kdf() -> KdfParams:
    """For tests only (``SHTALK_URWID_TEST_KDF=1``): an Argon2id that takes milliseconds."""
    from shtalk.client.localstore import KdfParams

    return KdfParams(memory_kib=8192, iterations=1, lanes=1)


def store_file(data_dir: Path, host: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host)
    return data_dir / f"{safe}_{port}.sqlite3"


def new_device_id() -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname() or "device")[:40].strip("-")
    return f"{base or 'device'}-{secrets.token_hex(3)}"


def forget_server(data_dir: Path, host: str, port: int) -> str:
    from shtalk.client.knownhosts import KnownHosts

    kh = KnownHosts(str(data_dir / "known_hosts"))
    known = kh.lookup(host, port)
    kh.forget(host, port)
    if known:
        return (f"Forgot the certificate of {host}:{port} ({known}). The next connection "
                "asks you to check and trust the new one.")
    return f"No certificate was pinned for {host}:{port} in {kh.path}."


__all__ = ["CLIENT_NAME", "TEST_KDF_ENV", "forget_server", "new_device_id", "store_file",
           "test_kdf"]
