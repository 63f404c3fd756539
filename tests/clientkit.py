"""Real headless clients against a real server, for system tests and benchmarks."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import succeed

from shtalk.client.client import ShtalkClient
from shtalk.client.events import Event, MessageReceived
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.localstore import KdfParams, LocalStore
from shtalk.client.rotation import RotationPolicy
from shtalk.client.session import Credentials
from tests.harness import wait_until

PASSWORD = "tangerine-quokka-43"
PASSPHRASE = "local passphrase for tests"
CHEAP_KDF = KdfParams(memory_kib=8192, iterations=1, lanes=1)


class Person:
    """One device of one user: a ShtalkClient plus everything it reported."""

    def __init__(self, port: int, username: str, device: str, home: str | None = None) -> None:
        self.port = port
        self.username = username
        self.device = device
        if home is None:  # a restart keeps it; the test process removes it at exit
            home = tempfile.mkdtemp(prefix=f"shtalk-{username}-{device}-")
            atexit.register(shutil.rmtree, home, True)
        self.home = home
        self.events: list[Event] = []
        self.client: ShtalkClient | None = None
        self.store: LocalStore | None = None
        self.listeners: list[Callable[[Event], None]] = []
        self.ask_extra: Any = None  # answers otp_required / captcha_required at login
        self.rotation: RotationPolicy | None = None  # the client's [encryption] settings

    @property
    def db(self) -> str:
        return os.path.join(self.home, "local.sqlite3")

    def on_event(self, event: Event) -> None:
        self.events.append(event)
        for f in list(self.listeners):
            f(event)

    async def open(self, credentials: Credentials | None = None) -> ShtalkClient:
        if os.path.exists(self.db):
            self.store = await LocalStore.open(self.db, PASSPHRASE, reactor)
            saved = await ShtalkClient.saved_credentials(self.store)
            credentials = credentials or saved
        else:
            self.store = await LocalStore.create(self.db, PASSPHRASE, reactor, kdf=CHEAP_KDF)
        creds = credentials or Credentials(self.username, self.device, f"{self.device} (tests)")
        self.client = ShtalkClient(
            reactor,
            self.store,
            "127.0.0.1",
            self.port,
            KnownHosts(os.path.join(self.home, "known_hosts")),
            creds,
            confirm_fingerprint=lambda fp: succeed(True),
            ask_password=lambda: succeed(PASSWORD),
            on_event=self.on_event,
            ask_extra=self.ask_extra,
            rotation=self.rotation,
        )
        return self.client

    async def register(self) -> ShtalkClient:
        client = await self.open()
        await client.register(PASSWORD, f"{self.username}@example.org")
        await client.login(PASSWORD)
        return client

    async def login(self) -> ShtalkClient:
        client = await self.open()
        await client.login(PASSWORD)
        return client

    async def restart(self) -> ShtalkClient:
        await self.close()
        client = await self.open()
        await client.start()
        return client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.store is not None:
            await self.store.close()
            self.store = None

    def received(self, conversation: str | None = None) -> list[MessageReceived]:
        return [
            e
            for e in self.events
            if isinstance(e, MessageReceived)
            and (conversation is None or e.conversation == conversation)
        ]

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "event"
    ) -> Any:
        return await wait_until(predicate, timeout, 0.02,
                                f"{self.username}/{self.device}: timed out waiting for {what}")

    async def wait_messages(
        self, n: int, conversation: str | None = None, timeout: float = 10.0
    ) -> list[MessageReceived]:
        await self.wait_for(
            lambda: len(self.received(conversation)) >= n,
            timeout,
            f"{n} messages in {conversation}",
        )
        return self.received(conversation)
