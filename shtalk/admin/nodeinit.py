"""``shtalk-admin node-init``: the data directory of a cluster's process.

A process of a cluster never makes its own keys (another key would make what the others
stored unreadable there, and refuse their tokens), so they are made once, for the
first, and copied for the others: the storage key, the token-signing key, and the TLS
certificate and key (a client pins one fingerprint, whichever process it reaches).
"""

from __future__ import annotations

import os
from typing import TextIO

from shtalk.server.datadir import DataDir

SHARED = ("storage.key", "jwt-signing-key.pem", "tls-cert.pem", "tls-key.pem")


def node_init(target: str, source: str | None, out: TextIO) -> None:
    """Make ``target`` (0700) with new keys, or with ``source``'s copied (0600 each)."""
    new = DataDir(target)
    if source is None:
        new.ensure()
        print(f"{target}: new storage, token and TLS keys; give the next processes a copy: "
              f"shtalk-admin node-init --from {target} DIR", file=out)
        return
    old = DataDir(source)
    old.ensure(mint_keys=False)  # what is copied is checked first: present, private
    new.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in SHARED:
        dest = new.path / name
        if dest.exists():
            if dest.read_bytes() != (old.path / name).read_bytes():
                raise ValueError(f"{dest} exists and differs from {old.path / name}; "
                                 "remove it first if this directory joins that cluster")
            continue
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((old.path / name).read_bytes())
    new.ensure(mint_keys=False)
    print(f"{target}: the keys and certificate of {source}", file=out)
