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

The set-up screens are `shtalk.clientui.setup`'s, the account commands of a running
client (/login, /passphrase ...) `shtalk.clientui.account`'s; this module builds the
parts, runs the loop and connects the client.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Coroutine
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import urwid
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shtalk.clientui.account import AccountCommands
from shtalk.clientui.config import ClientConfig
from shtalk.clientui.controller import Controller
from shtalk.clientui.device import CLIENT_NAME, store_file
from shtalk.clientui.errors import describe
from shtalk.clientui.history import LineRenderer
from shtalk.clientui.model import STATUS, ChatModel
from shtalk.clientui.screen import ScreenHost
from shtalk.clientui.setup import NewDevice, SetupFlow
from shtalk.clientui.steps import Cancelled, Steps, offer_totp
from shtalk.clientui.themes import THEMES
from shtalk.clientui.view import ChatView, Screen, ViewCallbacks

if TYPE_CHECKING:
    from shtalk.client.client import ShtalkClient
    from shtalk.client.events import Event
    from shtalk.client.knownhosts import KnownHosts
    from shtalk.client.localstore import HistoryMessage, KdfParams, LocalStore
    from shtalk.client.session import Credentials
    from shtalk.clientui.backend import ClientBackend
    from shtalk.clientui.logfile import ClientLog

log = Logger()


def load_client() -> None:
    """Import the client stack: the local store, the end-to-end crypto, TLS and the
    network session (see the module's docstring)."""
    import shtalk.client.client
    import shtalk.clientui.backend  # noqa: F401


class App:
    def __init__(self, reactor: Any, config: ClientConfig, host: str, port: int,
                 data_dir: Path, *, kdf: KdfParams | None = None, trust: str = "pin",
                 client_log: ClientLog | None = None) -> None:
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
        self.crashed = False
        self.dirty = True
        self._confirming_quit = False

        self.screen = Screen(keymap=self.keymap)
        self.screen.changed = self.mark_dirty
        self.ui = ScreenHost(self.screen, self.keymap, bell=self.ring, quit=self.request_quit,
                             redraw=self.full_redraw)
        self.model = ChatModel(self._history, page=100, cap=500)
        self.model.status.server = f"{host}:{port}"
        self.model.listeners.append(lambda what: self.mark_dirty())
        self.account = AccountCommands(self)
        self.controller = Controller(
            self.model, None, self.ui, config.notifications, clock=reactor.seconds,
            account_actions=self.account.actions(),
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
        self.client_log = client_log
        if client_log is not None:
            client_log.notify = lambda text: self.controller.notice(
                text, error=True, conversation=STATUS)
            self.controller.failures_logged = True

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
        if self.loop is not None and sys.__stdout__ is not None:
            sys.__stdout__.write("\a")  # (sys.stdout goes to the log while the screen runs)
            sys.__stdout__.flush()

    def _input(self, key: Any) -> bool:
        """Keys the widgets did not take (e.g. while a dialog is open)."""
        self.mark_dirty()
        if isinstance(key, str) and self.keymap.action(key) == "quit":
            self.request_quit()
            return True
        if key == "ctrl c":
            self.controller.model.set_status(
                notice="Ctrl-C does not quit: F10 or Ctrl-Q does (or /quit)", notice_error=False)
            return True
        return False

    def run(self) -> int:
        display = urwid.raw_display.Screen(input=sys.__stdin__, output=sys.__stdout__)
        display.set_terminal_properties(colors=max(self.theme.colors, 1))
        self.loop = urwid.MainLoop(
            self.screen, palette=list(self.theme.palette), screen=display,
            event_loop=urwid.TwistedEventLoop(reactor=self.reactor, manage_reactor=True),
            unhandled_input=self._input, handle_mouse=True)
        self.schedule()
        self.reactor.callWhenRunning(self._own_keys)
        try:
            self.loop.run()
        except Exception:
            # The screen is restored by now; the traceback goes to the log file only.
            log.failure("shtalk-urwid stopped after an internal error")
            self.crashed, self.exit_code = True, 1
        return self.exit_code

    def _own_keys(self) -> None:
        """Ctrl-Q and Ctrl-S reach the client (the terminal would take them for flow
        control), and Ctrl-C is a key, not a kill: quitting is F10, Ctrl-Q or /quit,
        after a question when something is unsent.  Restored when the screen stops."""
        screen: Any = self.loop.screen if self.loop is not None else None
        if screen is not None and sys.__stdin__ is not None and sys.__stdin__.isatty():
            screen.tty_signal_keys(intr="undefined", start="undefined", stop="undefined")

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
            from shtalk.client.connection import ConnectionLost, ServerError
            from shtalk.client.session import AuthenticationFailed

            if f.check(ServerError, ConnectionLost, AuthenticationFailed):
                log.info("refused: {error}", error=f.getErrorMessage())
                self.controller.fail(f, STATUS)
            else:
                log.failure("a background task failed", f)
                if not self.controller.failures_logged:
                    self.controller.fail(f, STATUS)
            self.mark_dirty()

        d.addErrback(failed)
        d.addBoth(lambda _: self.mark_dirty())
        return d

    def request_quit(self) -> None:
        """F10, Ctrl-Q, /quit: quit, after asking when a message or a typed line is not
        sent yet (the same key again while asked means yes)."""
        if self._confirming_quit:
            self.quit()
            return
        sending = self.controller.unsent()
        draft = self.view.input.edit_text.strip()
        reasons = ([f"{sending} message{'s are' if sending != 1 else ' is'} still being "
                    "sent"] if sending else []) + (["the line you typed is not sent"]
                                                   if draft else [])
        if not reasons:
            self.quit()
            return
        self._confirming_quit = True
        asked = self.ui.confirm("Quit shtalk-urwid?",
                                f"{' and '.join(reasons).capitalize()}. Quit anyway?")

        def answered(yes: bool) -> None:
            self._confirming_quit = False
            if yes:
                self.quit()

        asked.addCallback(answered)
        self.mark_dirty()

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
        flow = SetupFlow(self)
        if not self.store_path.exists():
            self.load_client()
            await self.start_new(await flow.new_device())
            return
        store = self.store = await flow.unlock()
        from shtalk.client.client import ShtalkClient

        creds = await ShtalkClient.saved_credentials(store)
        if creds is not None and (creds.access_token or creds.refresh_token):
            client = self.make_client(store, creds)
            await self.enter_chat(client)
            self.spawn(self.connect(client))
            return
        # A store without a session (after /logout): log in again as this device.
        await self.start_new(await flow.new_device(creds, store))

    async def start_new(self, outcome: NewDevice) -> None:
        """After the set-up of a new device: the store holds the login's tokens; the
        client resumes with them (publishing this device's keys) in the background."""
        client = self.make_client(outcome.store, outcome.credentials)
        await client.save_credentials()
        await self.enter_chat(client)
        self.spawn(self.connect(client, first=True, registered=outcome.registered))

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
            if self.screen.overlay is dialog:
                self.screen.show(None)
            self.mark_dirty()

    def confirm_fingerprint(self, fingerprint: str) -> Deferred[bool]:
        d = self.ui.confirm(
            "New server: check its certificate",
            f"{self.host}:{self.port} presents the SHA-256 fingerprint\n\n{fingerprint}\n\n"
            "Trust this server?")
        self.mark_dirty()
        return d

    def ask_password(self) -> Deferred[str]:
        client = self.client
        user = client.credentials.username if client else ""
        wrong = client is not None and client.session.state_message == \
            "wrong username or password"
        d = self.ui.ask("Password needed",
                        f"The server ended this device's session. Type the password of "
                        f"{user} to log in again (Esc: stay logged out; /login later).",
                        "Password:", mask=True,
                        error="That password was not accepted; type it again." if wrong else "")
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

    async def connect(self, client: ShtalkClient, *, first: bool = False,
                      registered: bool = False) -> None:
        from shtalk.client.connection import CertificateChanged

        try:
            await client.start()
        except CertificateChanged as e:
            await self.ui.message("Server certificate changed", describe(e))
            raise
        # Names known from rooms now complete and show.
        for room in self.backend.joined_rooms() if self.backend else []:
            self.model.ensure(f"room:{room}", load=False)
        if first:
            self.controller.notice(f"logged in as {client.credentials.username} on device "
                                   f"{client.credentials.device_id}", conversation=STATUS)
        if registered:
            await offer_totp(self.ui, client.session.request)


__all__ = ["App", "load_client"]
