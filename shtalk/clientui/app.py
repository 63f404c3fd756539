"""The application: urwid's MainLoop on the Twisted reactor, the set-up flows (trust the
server, register or log in, choose or unlock the local passphrase) and the chat.

Everything runs on the reactor thread; Argon2 and SQLite run in threads behind
Deferreds, the network behind Deferreds; widgets are only touched here.

Start-up: this module imports only urwid, Twisted's core and the screen's modules, so
the first frame is drawn before the client stack (local store, end-to-end crypto, TLS,
the network session: about half of the start-up's imports) is loaded.  `App.load_client`
imports that stack once the first screen (the passphrase prompt, or the status window on
a first run) is on the terminal; the functions that use the client import its names
locally, which costs nothing once it is loaded.
"""

from __future__ import annotations

import re
import secrets
import socket
import sys
import time
from collections.abc import Coroutine
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import urwid
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shtalk.clientui.config import ClientConfig
from shtalk.clientui.controller import Controller
from shtalk.clientui.errors import describe
from shtalk.clientui.history import LineRenderer
from shtalk.clientui.model import STATUS, ChatModel
from shtalk.clientui.screen import ScreenHost
from shtalk.clientui.steps import Cancelled, Steps, enroll_totp, offer_totp
from shtalk.clientui.themes import THEMES
from shtalk.clientui.view import ChatView, Screen, ViewCallbacks

if TYPE_CHECKING:
    from shtalk.client.client import ShtalkClient
    from shtalk.client.events import Event
    from shtalk.client.knownhosts import KnownHosts
    from shtalk.client.localstore import HistoryMessage, KdfParams, LocalStore
    from shtalk.client.session import Credentials, ServerSession
    from shtalk.clientui.backend import ClientBackend

log = Logger()

CLIENT_NAME = "shtalk-urwid/0.1"
TEST_KDF_ENV = "SHTALK_URWID_TEST_KDF"


def test_kdf() -> KdfParams:
    """For tests only (``SHTALK_URWID_TEST_KDF=1``): an Argon2id that takes milliseconds."""
    from shtalk.client.localstore import KdfParams

    return KdfParams(memory_kib=8192, iterations=1, lanes=1)


def load_client() -> None:
    """Import the client stack: the local store, the end-to-end crypto, TLS and the
    network session (see the module's docstring)."""
    import shtalk.client.client
    import shtalk.clientui.backend  # noqa: F401


def store_file(data_dir: Path, host: str, port: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host)
    return data_dir / f"{safe}_{port}.sqlite3"


def new_device_id() -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname() or "device")[:40].strip("-")
    return f"{base or 'device'}-{secrets.token_hex(3)}"


class App:
    def __init__(self, reactor: Any, config: ClientConfig, host: str, port: int,
                 data_dir: Path, *, kdf: KdfParams | None = None, trust: str = "pin") -> None:
        self.reactor = reactor
        self.config = config
        self.host = host
        self.port = port
        self.data_dir = data_dir
        self.kdf = kdf  # None: the store's default (KdfParams())
        self.trust = trust
        self.store_path = store_file(data_dir, host, port)
        self.keymap = config.keymap()
        self.theme = THEMES[config.ui.theme]
        self.loop: urwid.MainLoop | None = None
        self.client: ShtalkClient | None = None
        self.store: LocalStore | None = None
        self.backend: ClientBackend | None = None
        self.exit_code = 0
        self.dirty = True
        self.registered_now = False

        self.screen = Screen(keymap=self.keymap)
        self.ui = ScreenHost(self.screen, self.keymap, bell=self.ring, quit=self.quit,
                             redraw=self.full_redraw)
        self.model = ChatModel(self._history, page=100, cap=500)
        self.model.status.server = f"{host}:{port}"
        self.model.listeners.append(lambda what: self.mark_dirty())
        self.controller = Controller(
            self.model, None, self.ui, config.notifications, clock=reactor.seconds,
            account_actions={"login": self.cmd_login, "logout": self.cmd_logout,
                             "register": self.cmd_register, "passphrase": self.cmd_passphrase,
                             "2fa": self.cmd_2fa},
            later=lambda delay, f: reactor.callLater(delay, f))
        c = self.controller
        self.view = ChatView(self.model, self.keymap,
                             ViewCallbacks(c.action, c.submit, c.candidates, c.trust, c.members),
                             LineRenderer(config.ui.timestamp_format, reactor.seconds),
                             config.ui.conversation_list_width,
                             defer_call=lambda f: reactor.callLater(0, f))
        self.screen.set_background(self.view)
        self.first_frame: float | None = None
        self.client_loaded = False

    @cached_property
    def known_hosts(self) -> KnownHosts:
        from shtalk.client.knownhosts import KnownHosts

        return KnownHosts(str(self.data_dir / "known_hosts"))

    def load_client(self) -> None:
        """Draw the screen as it is now, then import the client stack (`load_client`):
        keys typed meanwhile wait in the terminal and are handled right after."""
        if self.client_loaded:
            return
        self.client_loaded = True
        self.mark_dirty()
        self._tick()
        load_client()

    # ------------------------------------------------------------------ the loop
    def _history(self, conversation: str, limit: int,
                 before_ts: int | None) -> Deferred[list[HistoryMessage]]:
        if self.backend is None:
            return succeed([])
        return self.backend.history(conversation, limit, before_ts)

    def mark_dirty(self) -> None:
        self.dirty = True

    def _tick(self) -> None:
        if self.loop is not None and self.dirty:
            self.dirty = False
            self.loop.draw_screen()
            if self.first_frame is None:
                self.first_frame = time.monotonic()

    def full_redraw(self) -> None:
        if self.loop is not None:
            self.loop.screen.clear()
            self.mark_dirty()

    def ring(self) -> None:
        if self.loop is not None:
            sys.stdout.write("\a")
            sys.stdout.flush()

    def _input(self, key: Any) -> bool:
        """Keys the widgets did not take (e.g. while a dialog is open)."""
        self.mark_dirty()
        return False

    def run(self) -> int:
        display = urwid.raw_display.Screen()
        display.set_terminal_properties(colors=max(self.theme.colors, 1))
        self.loop = urwid.MainLoop(
            self.screen, palette=list(self.theme.palette), screen=display,
            event_loop=urwid.TwistedEventLoop(reactor=self.reactor, manage_reactor=True),
            unhandled_input=self._input, handle_mouse=True)
        self.schedule()
        self.loop.run()
        return self.exit_code

    def schedule(self) -> None:
        """What runs once the reactor does: the frame ticker, the set-up, the expiry
        countdown (bench/urwid calls it with a stand-in loop)."""
        ticker = LoopingCall(self._tick)
        ticker.clock = self.reactor
        self.reactor.callWhenRunning(ticker.start, 0.05)
        self.reactor.callWhenRunning(self.spawn, self.boot())
        self.reactor.callWhenRunning(self._expiry_ticker)

    def _expiry_ticker(self) -> None:
        # Timers on expiring messages count down on screen.
        self.mark_dirty()
        self.reactor.callLater(5, self._expiry_ticker)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        d = Deferred.fromCoroutine(coro)

        def failed(f: Any) -> None:
            if f.check(Cancelled):
                return
            log.failure("shtalk-urwid task failed", f)
            self.controller.fail(f, STATUS)
            self.mark_dirty()

        d.addErrback(failed)
        d.addBoth(lambda _: self.mark_dirty())
        return d

    def quit(self) -> None:
        self.spawn(self._quit())

    async def _quit(self) -> None:
        self.reactor.callLater(3, self._stop_reactor)  # never hang on the way out
        try:
            if self.client is not None:
                await self.client.close()
            if self.store is not None:
                await self.store.close()
        finally:
            self._stop_reactor()

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    # ------------------------------------------------------------------ set-up
    async def boot(self) -> None:
        self.controller.notice(f"shtalk-urwid: {self.host}:{self.port} (F1 for help)",
                               conversation=STATUS)
        if self.store_path.exists():
            store = await self.unlock()
            if store is None:
                return
            from shtalk.client.client import ShtalkClient

            creds = await ShtalkClient.saved_credentials(store)
            if creds is not None and (creds.access_token or creds.refresh_token):
                client = self.make_client(store, creds)
                await self.enter_chat(client)
                self.spawn(self.connect(client))
                return
            await self.account_flow(store, creds)
        else:
            self.load_client()
            await self.account_flow(None, None)

    async def progress(self, title: str, text: str, work: Deferred[Any],
                       expected: float = 1.0) -> Any:
        dialog = self.ui.progress(title, text, expected)
        start = time.monotonic()

        def tick() -> None:
            dialog.tick(time.monotonic() - start)
            self.mark_dirty()

        ticker = LoopingCall(tick)
        ticker.clock = self.reactor
        ticker.start(0.1)
        try:
            return await work
        finally:
            ticker.stop()
            dialog.done()
            self.screen.show(None)
            self.mark_dirty()

    async def unlock(self) -> LocalStore | None:
        error = ""
        while True:
            asking = self.ui.ask(
                "Unlock", f"This device's messages and keys for {self.host}:{self.port} are "
                f"encrypted. Type the local passphrase.\n(store: {self.store_path})",
                "Passphrase:", mask=True, error=error)
            self.load_client()  # while the passphrase is typed
            from shtalk.client.localstore import LocalStore, WrongPassphrase

            passphrase = await asking
            if passphrase is None:
                self.quit()
                return None
            try:
                store: LocalStore = await self.progress(
                    "Unlocking", "Deriving the key from your passphrase (Argon2id)\u2026",
                    LocalStore.open(str(self.store_path), passphrase, self.reactor))
            except WrongPassphrase as e:
                error = describe(e)
                continue
            self.store = store
            return store

    async def trust_server(self) -> bool:
        if self.trust == "system" or self.known_hosts.lookup(self.host, self.port):
            return True
        from shtalk.client.connection import fetch_fingerprint
        from shtalk.client.knownhosts import canonical_fingerprint

        while True:
            try:
                fingerprint = await fetch_fingerprint(self.reactor, self.host, self.port)
                break
            except Exception as e:
                again = await self.ui.choose(
                    "Cannot reach the server",
                    f"{self.host}:{self.port}: {describe(e)}",
                    [("r", "try again"), ("q", "quit")])
                if again != "r":
                    self.quit()
                    return False
        fp = canonical_fingerprint(fingerprint)
        yes = await self.ui.confirm(
            "New server: check its certificate",
            ["This is the first connection to ", ("help_key", f"{self.host}:{self.port}"),
             ". Its certificate's SHA-256 fingerprint is:\n\n", ("help_key", fp),
             "\n\nCompare it with the fingerprint the server's operator gave you (the server "
             "prints it when it starts). Trust this server from now on?"])
        if not yes:
            self.quit()
            return False
        self.known_hosts.remember(self.host, self.port, fp)
        return True

    def confirm_fingerprint(self, fingerprint: str) -> Deferred[bool]:
        d = self.ui.confirm(
            "New server: check its certificate",
            f"{self.host}:{self.port} presents the SHA-256 fingerprint\n\n{fingerprint}\n\n"
            "Trust this server?")
        self.mark_dirty()
        return d

    def ask_password(self) -> Deferred[str]:
        user = self.client.credentials.username if self.client else ""
        d = self.ui.ask("Password needed",
                        f"The server ended this device's session. Type the password of "
                        f"{user} to log in again.", "Password:", mask=True)
        self.mark_dirty()

        def check(answer: str | None) -> Deferred[str]:
            return succeed(answer) if answer is not None else fail(Cancelled("password"))

        return d.addCallback(check)

    def ask_extra(self, code: str, error: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """The reconnect loop's password login met a TOTP or CAPTCHA demand: prompt."""
        client = self.client
        if client is None:
            return fail(Cancelled(code))
        steps = Steps(self.ui, client.session.request_unauthenticated,
                      client.credentials.username)
        self.mark_dirty()
        return Deferred.fromCoroutine(steps.answer(code, error))

    def make_client(self, store: LocalStore, creds: Credentials) -> ShtalkClient:
        from shtalk.client.client import ShtalkClient

        client = ShtalkClient(
            self.reactor, store, self.host, self.port, self.known_hosts, creds,
            confirm_fingerprint=self.confirm_fingerprint, ask_password=self.ask_password,
            ask_extra=self.ask_extra, on_event=self.on_event, trust=self.trust,
            rotation=self.config.encryption.rotation)
        client.session.client_name = CLIENT_NAME
        self.client = client
        self.store = store
        return client

    def on_event(self, event: Event) -> None:
        self.controller.handle_event(event)
        self.mark_dirty()

    async def ask_field(self, title: str, text: Any, label: str, *, mask: bool = False,
                        error: str = "", default: str = "") -> str:
        answer = await self.ui.ask(title, text, label, mask=mask, error=error, default=default)
        if answer is None:
            raise Cancelled(title)
        return answer

    async def account_flow(self, store: LocalStore | None, creds: Credentials | None) -> None:
        try:
            await self._account_flow(store, creds)
        except Cancelled:
            self.quit()

    async def _account_flow(self, store: LocalStore | None,
                            creds: Credentials | None) -> None:
        from shtalk.client.connection import ServerError
        from shtalk.client.session import Credentials

        if not await self.trust_server():
            return
        username = creds.username if creds else ""
        password = ""
        if not username:
            choice = await self.ui.choose(
                "Welcome to shtalk",
                f"Server {self.host}:{self.port}. Do you have an account there?",
                [("r", "create an account"), ("l", "log in (this computer becomes a new device)")])
            if choice is None:
                raise Cancelled("welcome")
            if choice == "r":
                username, password = await self.register_flow()
                self.registered_now = True
            else:
                username = (await self.ask_field(
                    "Log in", "Log in to your account; this computer becomes a new device of "
                    "it.", "Username:")).strip()
        if not password:
            password = await self.ask_field("Log in", f"The password of {username}:",
                                            "Password:", mask=True)
        if store is None:
            store = await self.create_store()
        creds = creds or Credentials(username, new_device_id(), f"shtalk-urwid on "
                                     f"{socket.gethostname()}")
        client = self.make_client(store, creds)
        steps = Steps(self.ui, client.session.request_unauthenticated, username)
        # This first login answers the server's steps itself (between progress screens);
        # the session's ask_extra is for the logins of its reconnect loop.
        ask_extra, client.session.ask_extra = client.session.ask_extra, None
        try:
            while True:
                try:
                    await steps.run(partial(self._login, client, password))
                    break
                except ServerError as e:
                    if e.code != "invalid_credentials":
                        raise
                    password = await self.ask_field(
                        "Log in", f"The password of {username}:", "Password:", mask=True,
                        error=describe(e))
        finally:
            client.session.ask_extra = ask_extra
        await self.enter_chat(client)
        self.controller.notice(f"logged in as {client.credentials.username} on device "
                               f"{client.credentials.device_id}", conversation=STATUS)
        if self.registered_now:
            self.registered_now = False
            await offer_totp(self.ui, client.session.request)

    async def register_flow(self) -> tuple[str, str]:
        from shtalk.client.connection import ServerError
        from shtalk.client.session import Credentials, ServerSession

        error = ""
        username = email = ""
        while True:
            username = (await self.ask_field(
                "Create an account", "Pick a username (3-32 letters, digits, _ . -).",
                "Username:", error=error, default=username)).strip()
            email = (await self.ask_field(
                "Create an account", "Your email address (the server may send a code to "
                "confirm it).", "Email:", default=email)).strip()
            password = await self.ask_field(
                "Create an account", "Choose a password: at least 12 characters, not a "
                "common one.", "Password:", mask=True)
            again = await self.ask_field("Create an account", "The same password again.",
                                         "Password:", mask=True)
            if password != again:
                error = "The two passwords differ; try again."
                continue
            session = ServerSession(
                self.reactor, self.host, self.port, self.known_hosts,
                confirm_fingerprint=self.confirm_fingerprint,
                ask_password=lambda: fail(Cancelled("password")),
                credentials=Credentials(username, "registration"),
                on_tokens=lambda c: None, on_push=lambda p: None,
                trust=self.trust, client_name=CLIENT_NAME)
            steps = Steps(self.ui, session.request_unauthenticated, username)
            try:
                reply = await steps.run(partial(self._register, session, username, password, email))
                await steps.after_register(reply)
            except ServerError as e:
                if e.code in ("username_taken", "bad_username", "weak_password",
                              "password_too_long", "bad_email", "rate_limited"):
                    error = describe(e)
                    continue
                raise
            finally:
                await session.stop()
            return reply.get("user", username), password

    async def create_store(self) -> LocalStore:
        from shtalk.client.localstore import KdfParams, LocalStore

        error = ""
        while True:
            first = await self.ask_field(
                "Choose a local passphrase",
                "Your keys and messages are stored encrypted on this computer. Choose a "
                "passphrase to unlock them at each start (it never leaves this computer; "
                "losing it means losing this device's history).", "Passphrase:", mask=True,
                error=error)
            if not first:
                error = "The passphrase cannot be empty."
                continue
            again = await self.ask_field("Choose a local passphrase", "The same passphrase "
                                         "again.", "Passphrase:", mask=True)
            if first != again:
                error = "The two passphrases differ; try again."
                continue
            break
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store: LocalStore = await self.progress(
            "Creating the local store", "Deriving the key from your passphrase (Argon2id)\u2026",
            LocalStore.create(str(self.store_path), first, self.reactor,
                              kdf=self.kdf or KdfParams()))
        self.store = store
        return store

    async def _login(self, client: ShtalkClient, password: str,
                     extra: dict[str, Any]) -> None:
        await self.progress("Logging in", f"Logging in to {self.host}:{self.port} and "
                            "publishing this device's keys\u2026",
                            Deferred.fromCoroutine(client.login(password, **extra)), 2.0)

    async def _register(self, session: ServerSession, username: str, password: str,
                        email: str, extra: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.progress(
            "Creating the account", f"Registering {username} on {self.host}:{self.port}\u2026",
            session.register(username, password, email, **extra), 2.0)
        return reply

    # ------------------------------------------------------------------ the chat
    async def enter_chat(self, client: ShtalkClient) -> None:
        from shtalk.clientui.backend import ClientBackend

        backend = ClientBackend(client)
        self.backend = backend
        self.controller.backend = backend
        self.model.me = backend.me
        self.model.set_status(account=backend.me, device=backend.device)
        for window in (c.window for c in self.model.conversations.values()):
            window.me = backend.me
        convs = await backend.conversations()
        for key, _, _ in convs:
            conv = self.model.ensure(key)
            conv.timer = backend.timer(key)
        if convs:
            self.model.open(convs[0][0])
        self.mark_dirty()

    async def connect(self, client: ShtalkClient) -> None:
        from shtalk.client.connection import CertificateChanged

        try:
            await client.start()
        except CertificateChanged as e:
            await self.ui.message("Server certificate changed", describe(e))
            raise
        # Names known from rooms now complete and show.
        for room in self.backend.joined_rooms() if self.backend else []:
            self.model.ensure(f"room:{room}", load=False)

    # ------------------------------------------------------------ account commands
    def cmd_login(self) -> None:
        client = self.client
        if client is None:
            self.controller.notice("finish the set-up first", error=True)
            return
        if self.model.status.connection == "authenticated":
            self.controller.notice("already logged in")
            return

        async def run() -> None:
            password = await self.ask_field("Log in", f"The password of "
                                            f"{client.credentials.username}:", "Password:",
                                            mask=True)
            steps = Steps(self.ui, client.session.request_unauthenticated,
                          client.credentials.username)
            await steps.run(partial(self._login, client, password))
            self.controller.notice("logged in again")

        self.spawn(run())

    def cmd_logout(self) -> None:
        client = self.client
        if client is None:
            return

        async def run() -> None:
            await client.logout()
            self.controller.notice("logged out: this device's session is ended on the server. "
                                   "/login to log in again, /quit to leave.")

        self.spawn(run())

    def cmd_register(self) -> None:
        self.controller.notice(
            "This device already belongs to an account. To create another, run shtalk-urwid "
            "with another --data-dir.", error=True)

    def cmd_2fa(self) -> None:
        client = self.client
        if client is None:
            return
        self.spawn(enroll_totp(self.ui, client.session.request))

    def cmd_passphrase(self) -> None:
        store = self.store
        if store is None:
            return

        async def run() -> None:
            old = await self.ask_field("Change the local passphrase", "The current passphrase:",
                                       "Passphrase:", mask=True)
            new = await self.ask_field("Change the local passphrase", "The new passphrase:",
                                       "Passphrase:", mask=True)
            again = await self.ask_field("Change the local passphrase", "The new passphrase "
                                         "again:", "Passphrase:", mask=True)
            if not new or new != again:
                self.controller.notice("the new passphrases were empty or differed; nothing "
                                       "changed", error=True)
                return
            await self.progress("Changing the passphrase", "Argon2id, twice\u2026",
                                store.change_passphrase(old, new), 2.0)
            self.controller.notice("the local passphrase is changed")

        self.spawn(run())


def forget_server(data_dir: Path, host: str, port: int) -> str:
    from shtalk.client.knownhosts import KnownHosts

    kh = KnownHosts(str(data_dir / "known_hosts"))
    known = kh.lookup(host, port)
    kh.forget(host, port)
    if known:
        return (f"Forgot the certificate of {host}:{port} ({known}). The next connection "
                "asks you to check and trust the new one.")
    return f"No certificate was pinned for {host}:{port} in {kh.path}."


__all__ = ["TEST_KDF_ENV", "App", "forget_server", "load_client", "test_kdf"]
