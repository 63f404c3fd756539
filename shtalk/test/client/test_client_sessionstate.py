"""The session's states: the transition table itself, and a real ServerSession driven
by hypothesis through drops, refusals, ``logged_out`` pushes and stops, checking that
what it says (its state) matches what it has (an authenticated connection or not)."""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shtalk.client.errors import ServerError
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.session import Credentials, ServerSession
from shtalk.client.sessionstate import TRANSITIONS, Input, SessionState, State
from shtalk.test.client.test_client_session import FP, ScriptedServer, error, tokens
from shtalk.testing import tempdir
from shtalk.wire import requests as rq


class TableTests(SynchronousTestCase):
    def test_stop_always_disconnects(self) -> None:
        for state in State:
            self.assertEqual(TRANSITIONS[(state, Input.STOP)], State.DISCONNECTED)

    def test_authenticated_only_by_authenticating(self) -> None:
        into = {i for (_, i), new in TRANSITIONS.items() if new is State.AUTHENTICATED}
        self.assertEqual(into, {Input.AUTHENTICATED})
        self.assertNotIn((State.DISCONNECTED, Input.AUTHENTICATED), TRANSITIONS)

    def test_ignored_inputs_change_nothing_and_tell_no_one(self) -> None:
        heard: list[tuple[str, str]] = []
        machine = SessionState(lambda s, m: heard.append((s, m)))
        self.assertTrue(machine.feed(Input.CONNECT, "connecting"))
        self.assertTrue(machine.feed(Input.LOST, "lost; reconnecting in 1 s"))
        self.assertFalse(machine.feed(Input.CONNECT, "connecting"))  # keeps the backoff text
        self.assertEqual((machine.state, machine.message),
                         (State.RECONNECTING, "lost; reconnecting in 1 s"))
        self.assertFalse(machine.feed(Input.LOGGED_OUT, "x"))
        self.assertEqual(heard, [("connecting", "connecting"),
                                 ("reconnecting", "lost; reconnecting in 1 s")])

    def test_states_read_as_their_names(self) -> None:
        self.assertEqual([str(s) for s in State], ["disconnected", "connecting", "connected",
                                                   "authenticated", "reconnecting"])


class SessionMachine(RuleBasedStateMachine):
    """One session against the scripted server; every rule is something the network,
    the server or the application can do at any moment."""

    home = ""

    def __init__(self) -> None:
        super().__init__()
        self.clock = MemoryReactorClock()
        self.server = ScriptedServer(self.clock)
        self.server.handlers["login"] = lambda r: tokens(1)
        self.server.handlers["refresh"] = lambda r: tokens(2)
        kh = KnownHosts(os.path.join(self.home, "known_hosts"))
        kh.remember("chat.example", 6697, FP)
        self.seen: list[tuple[str, str]] = []
        self.creds = Credentials("alice", "d1", "", "eyJ.access-token", "rt_refresh-token")
        self.session = ServerSession(
            self.clock, "chat.example", 6697, kh, lambda fp: True, lambda: "a password",
            self.creds, lambda c: None, lambda p: None,
            lambda state, message: self.seen.append((state, message)),
            backoff=(1.0, 4.0), rng=random.Random(0))
        self.session.connect_pinned = self.server.connect
        self.requests: list[Deferred[dict[str, Any]]] = []

    def pump(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        for _ in range(30):
            self.clock.advance(0)

    def live(self) -> int | None:
        """The index of the newest open connection, if any."""
        open_ = [i for i, (c, _) in enumerate(self.server.conns) if not c.closed]
        return open_[-1] if open_ else None

    @rule()
    def start(self) -> None:
        self.session.start().addErrback(lambda f: None)
        self.pump()

    @rule()
    def drop(self) -> None:
        index = self.live()
        if index is not None:
            self.server.drop(index)
        self.pump()

    @rule()
    def logged_out(self) -> None:
        index = self.live()
        if index is not None:
            self.server.push({"type": "logged_out", "reason": "elsewhere"}, index)
        self.pump()

    @rule(refusal=st.sampled_from(["token_revoked", "token_expired", "invalid_token", None]))
    def resume_answers(self, refusal: str | None) -> None:
        def resume(r: dict[str, Any]) -> dict[str, Any]:
            return {"user": "alice", "device": "d1"} if refusal is None else error(refusal)

        self.server.handlers["resume"] = resume

    @rule(wrong=st.booleans())
    def password_is(self, wrong: bool) -> None:
        self.server.handlers["login"] = (
            (lambda r: error("invalid_credentials")) if wrong else (lambda r: tokens(3)))

    @rule(n=st.integers(1, 3))
    def next_connects_fail(self, n: int) -> None:
        self.server.fail_connect = [ConnectionRefusedError("refused")] * n

    @rule()
    def request(self) -> None:
        d = self.session.request(rq.RoomList(), timeout=5)
        d.addErrback(lambda f: f.trap(ServerError))  # refused, timed out, or lost
        self.requests.append(d)
        self.pump()

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def wait(self, seconds: float) -> None:
        self.pump(seconds)

    @rule()
    def stop(self) -> None:
        self.session.stop()
        self.pump()
        assert self.session.state is State.DISCONNECTED
        assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()
        assert all(d.called for d in self.requests), "a request outlived the session"

    @invariant()
    def says_what_it_has(self) -> None:
        s = self.session
        assert (s.state is State.AUTHENTICATED) == s._is_authed(), (s.state, s._is_authed())

    @invariant()
    def moved_only_by_the_table(self) -> None:
        before = State.DISCONNECTED
        for state, _ in self.seen:
            assert any(TRANSITIONS.get((before, i)) == state for i in Input), (before, state)
            before = State(state)

    def teardown(self) -> None:
        self.stop()


class SessionMachineTests(SynchronousTestCase):
    def test_state_matches_the_link_whatever_happens(self) -> None:
        home = tempdir(self)

        class Machine(SessionMachine):
            pass

        Machine.home = home
        run_state_machine_as_test(
            Machine, settings=settings(max_examples=60, stateful_step_count=30, deadline=None))
