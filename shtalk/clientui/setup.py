"""The set-up screens of shtalk-urwid: trust the server, create an account or log in as a
new device, choose the local passphrase; or unlock this device's store.

Why it is shaped like this:

* Every screen's Esc goes back one step; on the first screen it stays (F10 or Ctrl-Q
  quits), so a stray Esc never throws away what was typed or closes the client.
* Cheap mistakes are caught before anything is sent: the username's form and the
  password policy (`shtalk.wire.passwords`) are checked here, then by the server
  before it draws a CAPTCHA; a refusal sends the person back to the field it concerns.
* On a new device the account password (and TOTP code) are checked by logging in before
  the local passphrase is asked for: nobody picks a passphrase for a login that fails.
  That login's tokens then go into the new store, and the client resumes with them.

Each form is an explicit state machine: a state names the screen shown, `BACK` where
Esc leads, and server refusals map to the state of the field they are about.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, fail

from shtalk.clientui.device import CLIENT_NAME, new_device_id
from shtalk.clientui.errors import describe
from shtalk.clientui.screen import ScreenHost
from shtalk.clientui.steps import Cancelled, Steps

if TYPE_CHECKING:
    from shtalk.client.connection import ServerError
    from shtalk.client.knownhosts import KnownHosts
    from shtalk.client.localstore import KdfParams, LocalStore
    from shtalk.client.session import Credentials, ServerSession

FIRST_STEP = "This is the first step: F10 or Ctrl-Q quits shtalk-urwid."
FIELD_OF = {  # server refusal -> the state of the field it is about
    "username_taken": "username", "bad_username": "username", "weak_password": "password",
    "password_too_long": "password", "bad_email": "email", "invalid_credentials": "password",
}
REGISTER_BACK = {"email": "username", "password": "email", "again": "password",
                 "submit": "again"}
LOGIN_BACK = {"password": "username", "submit": "password", "passphrase": "password"}


def username_problem(name: str) -> str:
    from shtalk.wire.names import NameError_, normalise_username

    try:
        normalise_username(name)
    except NameError_ as e:
        return f"That username cannot be used: {e}."
    return ""


def email_problem(email: str) -> str:
    local, at, domain = email.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in email):
        return "Give an email address like name@example.org."
    return ""


@dataclass
class Form:
    """What was typed so far (shown again when the person comes back to a field)."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def refuse(self, key: str, why: str) -> None:
        """Show ``why`` over the field ``key`` when it is asked for next."""
        self.errors[key] = why


@dataclass
class NewDevice:
    """The outcome of the set-up on a new device."""

    store: LocalStore
    credentials: Credentials
    registered: bool


class SetupHost(Protocol):
    """What the set-up uses of the application (`shtalk.clientui.app.App`)."""

    reactor: Any
    host: str
    port: int
    trust: str
    data_dir: Path
    store_path: Path
    kdf: KdfParams | None

    @property
    def ui(self) -> ScreenHost: ...
    @property
    def known_hosts(self) -> KnownHosts: ...
    def load_client(self) -> None: ...
    def confirm_fingerprint(self, fingerprint: str) -> Deferred[bool]: ...
    async def progress(self, title: str, text: str, work: Deferred[Any],
                       expected: float = 1.0) -> Any: ...


class SetupFlow:
    def __init__(self, app: SetupHost) -> None:
        self.app = app
        self.ui = app.ui
        self.where = f"{app.host}:{app.port}"

    async def field(self, form: Form, key: str, title: str, text: Any, label: str, *,
                    mask: bool = False) -> str:
        answer = await self.ui.ask(title, text, label, mask=mask,
                                   default="" if mask else form.values.get(key, ""),
                                   error=form.errors.pop(key, ""))
        if answer is None:
            raise Cancelled(key)
        form.values[key] = answer if mask else answer.strip()
        return form.values[key]

    async def retry_later(self, e: ServerError) -> bool:
        """A ``rate_limited`` refusal: say how long (the server's honest ``retry_after``);
        True to try again, False for Esc."""
        again = await self.ui.choose("Not just now", describe(e), [("enter", "try again")])
        return again is not None

    # -- trust and unlock ---------------------------------------------------------------
    async def trust_server(self) -> None:
        app = self.app
        if app.trust == "system" or app.known_hosts.lookup(app.host, app.port):
            return
        from shtalk.client.connection import fetch_fingerprint
        from shtalk.client.knownhosts import canonical_fingerprint

        while True:
            try:
                fingerprint = await fetch_fingerprint(app.reactor, app.host, app.port)
                break
            except Exception as e:
                await self.ui.choose("Cannot reach the server", f"{self.where}: {describe(e)}",
                                     [("enter", "try again")])
        fp = canonical_fingerprint(fingerprint)
        note = ""
        while True:
            yes = await self.ui.choose(
                "New server: check its certificate",
                ["This is the first connection to ", ("help_key", self.where),
                 ". Its certificate's SHA-256 fingerprint is:\n\n", ("help_key", fp),
                 "\n\nCompare it with the fingerprint the server's operator gave you (the "
                 "server prints it when it starts). Trust this server from now on?",
                 ("error", note)],
                [("y", "yes"), ("n", "no")])
            if yes == "y":
                app.known_hosts.remember(app.host, app.port, fp)
                return
            note = ("\n\nNot trusted: shtalk will not connect. Ask the operator for the "
                    "fingerprint; F10 or Ctrl-Q quits." if yes == "n" else "\n\n" + FIRST_STEP)

    async def unlock(self) -> LocalStore:
        from shtalk.client.localstore import LocalStore, WrongPassphrase

        app, error = self.app, ""
        while True:
            asking = self.ui.ask(
                "Unlock", f"This device's messages and keys for {self.where} are "
                f"encrypted. Type the local passphrase.\n(store: {app.store_path})",
                "Passphrase:", mask=True, error=error)
            app.load_client()  # while the passphrase is typed
            passphrase = await asking
            if passphrase is None:
                error = FIRST_STEP
                continue
            try:
                store: LocalStore = await app.progress(
                    "Unlocking", "Deriving the key from your passphrase (Argon2id)\u2026",
                    LocalStore.open(str(app.store_path), passphrase, app.reactor))
            except WrongPassphrase as e:
                error = describe(e)
                continue
            return store

    # -- a new device -------------------------------------------------------------------
    async def new_device(self, credentials: Credentials | None = None,
                         store: LocalStore | None = None) -> NewDevice:
        """Welcome -> register or log in -> local passphrase.  ``credentials`` and
        ``store``: this device has its store (after /logout); only the login is needed."""
        from shtalk.client.session import Credentials

        await self.trust_server()
        note = ""
        while True:
            choice: str | None = "l"
            if credentials is None:
                choice = await self.ui.choose(
                    "Welcome to shtalk",
                    [f"Server {self.where}. Do you have an account there?", ("error", note)],
                    [("r", "create an account"),
                     ("l", "log in (this computer becomes a new device)")])
            if choice is None:
                note = "\n\n" + FIRST_STEP
                continue
            creds = credentials or Credentials(
                "", new_device_id(), f"shtalk-urwid on {socket.gethostname()}")
            form, state, registered = Form(), "username", False
            try:
                if choice == "r":
                    await self.register(form)
                    state, registered = "submit", True
                else:
                    form.values["username"] = creds.username
                    if creds.username:
                        state = "password"
                return await self.login(form, creds, state, registered, store)
            except Cancelled:
                if credentials is not None:
                    raise
                continue

    def session(self, creds: Credentials) -> ServerSession:
        """An unauthenticated session for the set-up (its pushes are not wanted yet)."""
        from shtalk.client.session import ServerSession

        app = self.app
        return ServerSession(
            app.reactor, app.host, app.port, app.known_hosts,
            confirm_fingerprint=app.confirm_fingerprint,
            ask_password=lambda: fail(Cancelled("password")), credentials=creds,
            on_tokens=lambda c: None, on_push=lambda p: None, trust=app.trust,
            client_name=CLIENT_NAME)

    async def register(self, form: Form) -> None:
        """The registration form; returns once the account exists (and its email is
        confirmed when the server wants that).  Esc on the first field: `Cancelled`."""
        from shtalk.client.connection import ServerError
        from shtalk.client.session import Credentials
        from shtalk.wire.passwords import DEFAULT_MIN_LENGTH, password_problem

        title = "Create an account"
        session = self.session(Credentials("", "registration"))
        # Connected while the form is filled in: the hello says the password policy.
        session.request_unauthenticated("ping").addErrback(lambda _: None)
        state = "username"
        try:
            while True:
                try:
                    if state == "username":
                        name = await self.field(form, "username", title, "Pick a username "
                                                "(3-32 letters, digits, _ . -).", "Username:")
                        form.errors["username"] = username_problem(name)
                        state = "username" if form.errors["username"] else "email"
                    elif state == "email":
                        email = await self.field(form, "email", title, "Your email address "
                                                 "(the server may send a code to confirm it).",
                                                 "Email:")
                        form.errors["email"] = email_problem(email)
                        state = "email" if form.errors["email"] else "password"
                    elif state == "password":
                        least = session.server_hello.get("min_password_length")
                        least = least if isinstance(least, int) else DEFAULT_MIN_LENGTH
                        pw = await self.field(form, "password", title, "Choose a password: at "
                                              f"least {least} characters, not a common one; "
                                              "a few unrelated words make a good one.",
                                              "Password:", mask=True)
                        found = password_problem(pw, form.values["username"], least)
                        form.errors["password"] = f"{found[1].capitalize()}." if found else ""
                        state = "password" if found else "again"
                    elif state == "again":
                        again = await self.field(form, "again", title,
                                                 "The same password again.", "Password:",
                                                 mask=True)
                        if again != form.values["password"]:
                            form.refuse("password", "The two passwords differ; try again.")
                            state = "password"
                        else:
                            state = "submit"
                    else:
                        steps = Steps(self.ui, session.request_unauthenticated,
                                      form.values["username"])
                        reply = await steps.run(partial(
                            self._register, session, form.values["username"],
                            form.values["password"], form.values["email"]))
                        form.values["username"] = reply.get("user", form.values["username"])
                        state = "verify"
                        # The account exists now: Esc on its email code goes back to the
                        # welcome screen (logging in asks for the code again).
                        steps.username = form.values["username"]
                        await steps.after_register(reply)
                        return
                except Cancelled:
                    if state in ("username", "verify"):
                        raise
                    state = REGISTER_BACK.get(state, "username")
                except ServerError as e:
                    if e.code == "rate_limited":
                        state = "submit" if await self.retry_later(e) else "again"
                    elif e.code in FIELD_OF:
                        state = FIELD_OF[e.code]
                        form.errors[state] = describe(e)
                    else:
                        raise
        finally:
            await session.stop()

    async def _register(self, session: ServerSession, username: str, password: str,
                        email: str, extra: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.app.progress(
            "Creating the account", f"Registering {username} on {self.where}\u2026",
            session.register(username, password, email, **extra), 2.0)
        return reply

    async def login(self, form: Form, creds: Credentials, state: str, registered: bool,
                    store: LocalStore | None = None) -> NewDevice:
        """Username -> password (-> two-factor code) -> logged in -> local passphrase.
        Esc on the username: `Cancelled` (back to the welcome screen)."""
        from shtalk.client.connection import ServerError

        title = "Log in"
        session: ServerSession | None = None
        try:
            while True:
                try:
                    if state == "username":
                        creds.username = await self.field(
                            form, "username", title, "Log in to your account; this computer "
                            "becomes a new device of it.", "Username:")
                        form.errors["username"] = username_problem(creds.username)
                        state = "username" if form.errors["username"] else "password"
                    elif state == "password":
                        await self.field(form, "password", title,
                                         f"The password of {form.values['username']}:",
                                         "Password:", mask=True)
                        state = "submit"
                    elif state == "submit":
                        creds.username = form.values["username"]
                        if session is None:
                            session = self.session(creds)
                        steps = Steps(self.ui, session.request_unauthenticated, creds.username)
                        await steps.run(partial(self._login, session, form.values["password"]))
                        state = "passphrase"
                    else:
                        if store is None:
                            store = await self.create_store(form, state)
                        return NewDevice(store, creds, registered)
                except Cancelled:
                    if state == "username":
                        raise
                    if state.startswith("passphrase") and session is not None:
                        # Back before the store exists: end the session just opened.
                        await session.logout().addErrback(lambda _: None)
                        session = None
                    state = LOGIN_BACK.get(state, "username") if state != "passphrase_again" \
                        else "passphrase"
                except ServerError as e:
                    if e.code == "rate_limited":
                        state = "submit" if await self.retry_later(e) else "password"
                    elif e.code in FIELD_OF:
                        state = FIELD_OF[e.code]
                        form.errors[state] = describe(e) + (
                            " (Esc goes back to the username.)" if state == "password" else "")
                    else:
                        raise
        finally:
            if session is not None:
                await session.stop()

    async def _login(self, session: ServerSession, password: str,
                     extra: dict[str, Any]) -> None:
        reply = await self.app.progress(
            "Logging in", f"Checking the password with {self.where}\u2026",
            session.login(password, **extra), 2.0)
        # The server's spelling of the name is what others see.
        session.credentials.username = reply.get("user", session.credentials.username)

    async def create_store(self, form: Form, state: str) -> LocalStore:
        """The passphrase, twice (raises `Cancelled` on Esc in the first prompt)."""
        from shtalk.client.localstore import KdfParams, LocalStore

        title = "Choose a local passphrase"
        while True:
            if state == "passphrase":
                first = await self.field(
                    form, "passphrase", title, "Your keys and messages are stored encrypted "
                    "on this computer. Choose a passphrase to unlock them at each start (it "
                    "never leaves this computer; losing it means losing this device's "
                    "history).", "Passphrase:", mask=True)
                if not first:
                    form.refuse("passphrase", "The passphrase cannot be empty.")
                    continue
                state = "passphrase_again"
            try:
                again = await self.field(form, "passphrase_again", title,
                                         "The same passphrase again.", "Passphrase:",
                                         mask=True)
            except Cancelled:
                state = "passphrase"
                continue
            if again != form.values["passphrase"]:
                form.refuse("passphrase", "The two passphrases differ; try again.")
                state = "passphrase"
                continue
            break
        app = self.app
        app.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store: LocalStore = await app.progress(
            "Creating the local store", "Deriving the key from your passphrase (Argon2id)\u2026",
            LocalStore.create(str(app.store_path), form.values["passphrase"], app.reactor,
                              kdf=app.kdf or KdfParams()))
        return store

