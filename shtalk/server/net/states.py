"""The connection's state machine, as one table: states, inputs, transitions, and
which requests each state accepts (h11's ``_state.py`` is the model).

    NEW --hello--> READY --auth started--> AUTHENTICATING --auth ok--> AUTHENTICATED
                     ^                          |                          |
                     +-------- auth failed -----+                          |
                     +----------------- logged out / revoked --------------+

A request is refused by the state it arrives in before any handler runs: nothing but
``hello`` (and ``ping``) before the hello; nothing that needs a session before the
login; no second login on a logged-in connection.  An input that the table does not
allow in the current state is a bug of the server and raises `InvalidTransition`.
Automat was the other candidate; a table is as explicit, reads in one screen, and
costs two dict look-ups per request on the message path.
"""

from __future__ import annotations

import enum

from shtalk.wire.errors import ErrorCode
from shtalk.wire.schema import PRE_AUTH, REQUESTS


class State(enum.Enum):
    NEW = "new"  # connected; hello required
    READY = "ready"  # may authenticate
    AUTHENTICATING = "authenticating"  # a login, resume or refresh is running
    AUTHENTICATED = "authenticated"  # has an avatar


class Input(enum.Enum):
    HELLO = "hello"  # a hello of a version this server speaks
    AUTH_STARTED = "auth started"
    AUTH_OK = "auth ok"
    AUTH_FAILED = "auth failed"
    LOGGED_OUT = "logged out"  # logout here, or the session ended elsewhere


S, In = State, Input
TRANSITIONS: dict[State, dict[Input, State]] = {
    S.NEW: {In.HELLO: S.READY, In.LOGGED_OUT: S.NEW},
    S.READY: {
        In.HELLO: S.READY,
        In.AUTH_STARTED: S.AUTHENTICATING,
        In.AUTH_FAILED: S.READY,  # a login whose session was revoked while it ran
        In.LOGGED_OUT: S.READY,
    },
    S.AUTHENTICATING: {
        In.HELLO: S.AUTHENTICATING,
        In.AUTH_OK: S.AUTHENTICATED,
        In.AUTH_FAILED: S.READY,
        In.LOGGED_OUT: S.READY,
    },
    S.AUTHENTICATED: {In.HELLO: S.AUTHENTICATED, In.LOGGED_OUT: S.READY},
}


class Kind(enum.Enum):
    """Requests, by what they need of the connection's state."""

    ANY = "any"  # ping
    HELLO = "hello"
    LOGIN = "login"  # starts a session: login, resume, refresh, register
    OPEN = "open"  # other requests allowed before a login (CAPTCHA, codes)
    SESSION = "session"  # everything else


LOGINS = frozenset({"login", "resume", "refresh", "register"})


def kind_of(rtype: str) -> Kind:
    if rtype == "ping":
        return Kind.ANY
    if rtype == "hello":
        return Kind.HELLO
    if rtype in LOGINS:
        return Kind.LOGIN
    return Kind.OPEN if rtype in PRE_AUTH else Kind.SESSION


KINDS: dict[str, Kind] = {rtype: kind_of(rtype) for rtype in REQUESTS}

_HELLO_FIRST = (ErrorCode.HELLO_REQUIRED, 'send {"type": "hello", "version": 1}')
_LOG_IN = (ErrorCode.NOT_AUTHENTICATED, "log in first (login or resume)")
_LOGGED_IN = (ErrorCode.ALREADY_AUTHENTICATED, "this connection is logged in; logout first")

Refusal = tuple[ErrorCode, str]
#: state -> kind of request -> the refusal (None: accepted).
ACCEPTS: dict[State, dict[Kind, Refusal | None]] = {
    S.NEW: {
        Kind.ANY: None, Kind.HELLO: None, Kind.LOGIN: _HELLO_FIRST, Kind.OPEN: _HELLO_FIRST,
        Kind.SESSION: _HELLO_FIRST,
    },
    S.READY: {
        Kind.ANY: None, Kind.HELLO: None, Kind.LOGIN: None, Kind.OPEN: None,
        Kind.SESSION: _LOG_IN,
    },
    S.AUTHENTICATING: {
        Kind.ANY: None, Kind.HELLO: None, Kind.LOGIN: _LOGGED_IN, Kind.OPEN: None,
        Kind.SESSION: _LOG_IN,
    },
    S.AUTHENTICATED: {
        Kind.ANY: None, Kind.HELLO: None, Kind.LOGIN: _LOGGED_IN, Kind.OPEN: None,
        Kind.SESSION: None,
    },
}
del S, In


#: The same, by request type: one look-up per request (enum keys hash in Python).
REFUSALS: dict[State, dict[str, Refusal | None]] = {
    state: {rtype: row[kind] for rtype, kind in KINDS.items()} for state, row in ACCEPTS.items()
}


class InvalidTransition(Exception):
    """An input the table does not allow in the current state (a server bug)."""


class ConnectionState:
    __slots__ = ("refusals", "state")

    def __init__(self) -> None:
        self.state = State.NEW
        #: request type -> why it may not run now (None: it may)
        self.refusals = REFUSALS[self.state]

    def fire(self, event: Input) -> State:
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise InvalidTransition(f"{event.value} in state {self.state.value}") from None
        self.refusals = REFUSALS[self.state]
        return self.state

    def refusal(self, rtype: str) -> Refusal | None:
        """Why a request of this type may not run now (None: it may)."""
        return self.refusals[rtype]
