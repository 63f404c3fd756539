"""The account commands of a running client: /login, /logout, /register, /2fa and
/passphrase.

They are dialog flows on the screen (ask, check, ask again) over the live client and its
local store, so they sit with the application rather than with the chat commands, which
only need the backend.  `AccountHost` is what they use of the application.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

from shtalk.clientui.controller import Controller
from shtalk.clientui.errors import describe
from shtalk.clientui.model import STATUS, ChatModel
from shtalk.clientui.screen import ScreenHost
from shtalk.clientui.steps import Cancelled, Steps, enroll_totp

if TYPE_CHECKING:  # the client stack (crypto, TLS) is imported after the first frame
    from shtalk.client.client import ShtalkClient
    from shtalk.client.localstore import LocalStore


class AccountHost(Protocol):
    host: str
    port: int

    @property
    def client(self) -> ShtalkClient | None: ...
    @property
    def store(self) -> LocalStore | None: ...
    @property
    def ui(self) -> ScreenHost: ...
    @property
    def model(self) -> ChatModel: ...
    @property
    def controller(self) -> Controller: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Deferred[Any]: ...
    async def progress(self, title: str, text: str, work: Deferred[Any],
                       expected: float = 1.0) -> Any: ...


class AccountCommands:
    def __init__(self, app: AccountHost) -> None:
        self.app = app

    def actions(self) -> dict[str, Callable[[], None]]:
        """The controller's ``account_actions``: command name -> what runs it."""
        return {"login": self.login, "logout": self.logout, "register": self.register,
                "passphrase": self.passphrase, "2fa": self.two_factor}

    def _notice(self, text: str, *, error: bool = False,
                conversation: str | None = None) -> None:
        self.app.controller.notice(text, error=error, conversation=conversation)

    async def _login(self, client: ShtalkClient, password: str,
                     extra: dict[str, Any]) -> None:
        app = self.app
        await app.progress("Logging in", f"Logging in to {app.host}:{app.port} and "
                           "publishing this device's keys\u2026",
                           Deferred.fromCoroutine(client.login(password, **extra)), 2.0)

    def login(self) -> None:
        client = self.app.client
        if client is None:
            self._notice("finish the set-up first", error=True)
            return
        if self.app.model.status.connection == "authenticated":
            self._notice("already logged in")
            return

        async def run() -> None:
            from shtalk.client.connection import ServerError

            error = ""
            while True:
                password = await self.app.ui.ask(
                    "Log in", f"The password of {client.credentials.username}:",
                    "Password:", mask=True, error=error)
                if password is None:
                    self._notice("not logged in; /login to try again", conversation=STATUS)
                    return
                steps = Steps(self.app.ui, client.session.request_unauthenticated,
                              client.credentials.username)
                # These steps answer the code or CAPTCHA themselves (Esc: back to the
                # password); the session's ask_extra is for its reconnect loop.
                ask_extra, client.session.ask_extra = client.session.ask_extra, None
                try:
                    await steps.run(partial(self._login, client, password))
                except Cancelled:
                    continue
                except ServerError as e:
                    if e.code not in ("invalid_credentials", "rate_limited"):
                        raise
                    error = describe(e) + " Type the password again, or Esc to stay " \
                        "logged out." if e.code == "invalid_credentials" else describe(e)
                    continue
                finally:
                    client.session.ask_extra = ask_extra
                self._notice("logged in again", conversation=STATUS)
                return

        self.app.spawn(run())

    def logout(self) -> None:
        client = self.app.client
        if client is None:
            return

        async def run() -> None:
            await client.logout()
            self._notice("logged out: this device's session is ended on the server. "
                         "/login to log in again, /quit to leave.")

        self.app.spawn(run())

    def register(self) -> None:
        self._notice(
            "This device already belongs to an account. To create another, run shtalk-urwid "
            "with another --data-dir.", error=True)

    def two_factor(self) -> None:
        client = self.app.client
        if client is None:
            return
        self.app.spawn(enroll_totp(self.app.ui, client.session.request))

    def passphrase(self) -> None:
        store = self.app.store
        if store is None:
            return

        async def run() -> None:
            from shtalk.client.localstore import WrongPassphrase

            title, steps = "Change the local passphrase", ("old", "new", "again")
            texts = {"old": "The current passphrase:", "new": "The new passphrase:",
                     "again": "The new passphrase again:"}
            answers: dict[str, str] = {}
            error, i = "", 0
            while i < len(steps):  # Esc goes back one step; on the first, closes
                answer = await self.app.ui.ask(title, texts[steps[i]], "Passphrase:",
                                               mask=True, error=error)
                error = ""
                if answer is None:
                    if i == 0:
                        return
                    i -= 1
                    continue
                answers[steps[i]] = answer
                if steps[i] == "new" and not answer:
                    error = "The passphrase cannot be empty."
                    continue
                if steps[i] == "again" and answer != answers["new"]:
                    error, i = "The two passphrases differ; type the new one again.", 1
                    continue
                if steps[i] == "again":
                    try:
                        await self.app.progress("Changing the passphrase",
                                                "Argon2id, twice\u2026",
                                                store.change_passphrase(answers["old"], answer),
                                                2.0)
                    except WrongPassphrase as e:
                        error, i = describe(e), 0
                        continue
                i += 1
            self._notice("the local passphrase is changed", conversation=STATUS)

        self.app.spawn(run())
