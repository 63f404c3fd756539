"""The states of a ServerSession's link, as one transition table (like h11's
``_state.py``): what the person sees in the status bar, and what a test can check.

The session feeds inputs (a connection opened, authenticated, lost ...); the table says
where each leads from each state.  An input the table has no entry for in the current
state is ignored (``CONNECT`` while reconnecting keeps the backoff message on screen);
none is ever answered by a state nobody wrote down.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, StrEnum, auto

from twisted.logger import Logger

log = Logger()


class State(StrEnum):
    DISCONNECTED = "disconnected"  # stopped, or stopped for good by a fatal error
    CONNECTING = "connecting"  # the first attempt of a run is under way
    CONNECTED = "connected"  # TLS and hello done, not authenticated
    AUTHENTICATED = "authenticated"  # requests flow
    RECONNECTING = "reconnecting"  # the link was lost; the next attempt is scheduled


class Input(Enum):
    CONNECT = auto()  # the reconnect loop starts an attempt
    OPENED = auto()  # a new connection passed TLS and hello
    AUTHENTICATED = auto()  # resume, refresh or login succeeded
    REFUSED = auto()  # a password was refused; the connection stays up
    LOGGED_OUT = auto()  # the server ended the session (a ``logged_out`` push)
    LOST = auto()  # the link or an attempt failed; a retry is scheduled
    STOP = auto()  # stop(), logout, or an error no retry can fix


_ANY = tuple(State)

TRANSITIONS: dict[tuple[State, Input], State] = {
    **{(s, Input.CONNECT): State.CONNECTING
       for s in (State.DISCONNECTED, State.CONNECTING, State.CONNECTED)},
    # A connection can be (re)opened from any state: the loop after a loss, a
    # pre-authentication request while stopped, a re-login after the link dropped.
    **{(s, Input.OPENED): State.CONNECTED for s in _ANY},
    **{(s, Input.AUTHENTICATED): State.AUTHENTICATED
       for s in (State.CONNECTING, State.CONNECTED, State.AUTHENTICATED, State.RECONNECTING)},
    **{(s, Input.REFUSED): State.CONNECTED
       for s in (State.CONNECTING, State.CONNECTED, State.RECONNECTING)},
    (State.AUTHENTICATED, Input.LOGGED_OUT): State.CONNECTED,
    **{(s, Input.LOST): State.RECONNECTING for s in _ANY if s is not State.DISCONNECTED},
    **{(s, Input.STOP): State.DISCONNECTED for s in _ANY},
}
"""(state, input) -> the next state.  Not listed: CONNECT while reconnecting or
authenticated (ignored), LOGGED_OUT outside a session, LOST once stopped."""


class SessionState:
    """The current state, its message for people, and who hears of each change."""

    def __init__(self, on_change: Callable[[State, str], None] | None = None) -> None:
        self.state = State.DISCONNECTED
        self.message = ""
        self.on_change = on_change

    def feed(self, event: Input, message: str) -> bool:
        """Apply ``event``; False (and nothing changes) if the table ignores it here."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            log.debug("session: {event} ignored while {state}", event=event.name,
                      state=self.state)
            return False
        self.state, self.message = new, message
        if self.on_change is not None:
            try:
                self.on_change(new, message)
            except Exception:
                log.failure("on_state failed")
        return True
