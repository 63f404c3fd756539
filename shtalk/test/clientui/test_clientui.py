"""shtalk-urwid unit tests: key table, commands and completion, config, the paged history
window and walker, the screen rendered with urwid's canvas against a fake client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import urwid
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError as ConnectionRefused
from twisted.trial import unittest

from shtalk.client.connection import CertificateChanged, ServerError
from shtalk.client.events import (
    BacklogDone,
    BadMessage,
    ConnectionChanged,
    IdentityChanged,
    MemberChanged,
    MessageReceived,
    MessageState,
    Presence,
)
from shtalk.client.localstore import WrongPassphrase
from shtalk.clientui import commands as cmds
from shtalk.clientui.config import ClientConfig, ConfigError, parse_server
from shtalk.clientui.controller import Controller
from shtalk.clientui.errors import describe
from shtalk.clientui.fakeclient import FakeBackend
from shtalk.clientui.handlers import CommandHandlers
from shtalk.clientui.history import LineRenderer
from shtalk.clientui.keys import KEY_BINDINGS, KeyConfigError, KeyMap
from shtalk.clientui.main import build_parser
from shtalk.clientui.model import STATUS, ChatModel, HistoryWindow, mentions
from shtalk.clientui.qr import draw
from shtalk.clientui.screen import ScreenHost
from shtalk.clientui.steps import Steps, enroll_totp
from shtalk.clientui.themes import ATTRS, THEMES
from shtalk.clientui.view import INPUT_ACTIONS, SCROLL_ACTIONS, ChatView, Screen, ViewCallbacks
from shtalk.testing import tempdir
from shtalk.wire.records import ClientRequest

T0 = 1_700_000_000_000


def text_of(widget: urwid.Widget, size: tuple[int] | tuple[int, int] = (80, 24)) -> str:
    canvas = widget.render(size, focus=True)
    return "\n".join(row.decode("utf-8") for row in canvas.text)


class Harness:
    """A ChatView + Controller + Screen against a FakeBackend, with recorded UI calls."""

    def __init__(self, messages: int = 0, conversation: str = "room:general",
                 size: tuple[int, int] = (80, 24)) -> None:
        self.size = size
        self.fake = FakeBackend("alice", "laptop")
        for i in range(messages):
            self.fake.add_history(conversation, "bob" if i % 2 else "alice",
                                  f"message {i}", T0 + i * 1000)
        self.model = ChatModel(self.fake.history, me="alice", page=50, cap=200)
        self.model.status.account, self.model.status.device = "alice", "laptop"
        self.model.status.server = "chat.example:6697"
        self.keymap = KeyMap()
        self.screen = Screen(keymap=self.keymap)
        self.bells = 0
        self.quits = 0
        self.host = ScreenHost(self.screen, self.keymap, bell=self._bell, quit=self._quit)
        self.actions: list[str] = []
        self.later: list[Any] = []  # what the app would run on the next reactor turn
        self.clock = [T0 / 1000 + 100000]
        self.controller = Controller(self.model, self.fake, self.host,
                                     clock=lambda: self.clock[0])
        c = self.controller
        self.view = ChatView(self.model, self.keymap,
                             ViewCallbacks(self._action, c.submit, c.candidates, c.trust,
                                           c.members),
                             LineRenderer("%H:%M", lambda: self.clock[0]),
                             defer_call=self.later.append)
        self.screen.set_background(self.view)
        if messages:
            self.model.open(conversation)

    def _bell(self) -> None:
        self.bells += 1

    def _quit(self) -> None:
        self.quits += 1

    def _action(self, name: str) -> None:
        self.actions.append(name)
        self.controller.action(name)

    def type(self, text: str) -> None:
        for ch in text:
            self.screen.keypress(self.size, ch)

    def press(self, *keys: str) -> None:
        for k in keys:
            self.screen.keypress(self.size, k)
            self.flush()

    def flush(self) -> None:
        while self.later:
            self.later.pop(0)()

    def line(self, text: str) -> None:
        self.type(text)
        self.press("enter")

    def text(self) -> str:
        text_of(self.screen, self.size)
        self.flush()
        return text_of(self.screen, self.size)


class KeyTableTests(unittest.TestCase):
    def test_every_binding_is_complete_and_unique(self) -> None:
        names = [b.name for b in KEY_BINDINGS]
        self.assertEqual(len(names), len(set(names)))
        keys = [k for b in KEY_BINDINGS for k in b.keys]
        self.assertEqual(len(keys), len(set(keys)))
        for b in KEY_BINDINGS:
            self.assertTrue(b.keys and b.help and b.category, b)

    def test_walk_the_table(self) -> None:
        """Each default key of each binding, pressed on the main screen, reaches its action
        (view-level actions by their effect, the rest through the controller)."""
        for b in KEY_BINDINGS:
            for key in b.keys:
                h = Harness(messages=300)
                if b.name in INPUT_ACTIONS:
                    h.type("first line")
                    h.press("meta enter")
                    h.type("second")
                    h.screen.keypress(h.size, key)
                    h.text()
                    self.assertEqual(h.actions, [], (b.name, key))
                    if b.name == "newline":
                        self.assertEqual(h.view.input.edit_text.count("\n"), 2)
                    elif b.name == "clear_input":
                        self.assertEqual(h.view.input.edit_text, "")
                    elif b.name == "line_start":
                        self.assertEqual(h.view.input.edit_pos,
                                         len("first line\n"))
                elif b.name in SCROLL_ACTIONS:
                    h.text()
                    before = h.view.pane.walker.focus
                    h.screen.keypress(h.size, key)
                    h.text()
                    after = h.view.pane.walker.focus
                    if b.name in ("scroll_up", "scroll_top"):
                        self.assertNotEqual(before, after, (b.name, key))
                    self.assertEqual(h.actions, [], (b.name, key))
                elif b.name == "send":
                    h.model.open("room:general")
                    h.type("hi")
                    h.screen.keypress(h.size, key)
                    self.assertIn(("send", ("room:general", "hi")), h.fake.calls)
                elif b.name == "complete":
                    h.type("/jo")
                    h.screen.keypress(h.size, key)
                    self.assertEqual(h.view.input.edit_text, "/join ")
                else:
                    h.screen.keypress(h.size, key)
                    self.assertEqual(h.actions, [b.name], key)

    def test_help_lists_every_key_and_command(self) -> None:
        h = Harness()
        h.press("f1")
        self.assertTrue(h.screen.showing_help)
        overlay: Any = h.screen.overlay
        listbox = overlay.listbox
        texts = []
        for w in listbox.body:
            texts.append(text_of(w, (100,)) if not isinstance(w, urwid.Divider) else "")
        joined = "\n".join(texts)
        for b in KEY_BINDINGS:
            self.assertIn(b.help[:30], joined)
        for c in cmds.COMMANDS:
            self.assertIn("/" + c.name, joined)
        h.press("esc")
        self.assertIsNone(h.screen.overlay)

    def test_config_overrides_and_rejects(self) -> None:
        km = KeyMap({"quit": ("ctrl q",)})
        self.assertEqual(km.action("ctrl q"), "quit")
        self.assertIsNone(km.action("f10"))
        self.assertRaises(KeyConfigError, KeyMap, {"nope": ("x",)})
        self.assertRaises(KeyConfigError, KeyMap, {"quit": ("f1",)})
        self.assertEqual(km.describe("next_conversation"), "Ctrl-N, Alt-Down")


class ConfigTests(unittest.TestCase):
    def test_example_file_parses(self) -> None:
        with open(Path(__file__).resolve().parents[3] / "conf" / "client.ini",
                  encoding="utf-8") as f:
            text = f.read()
        config = ClientConfig.from_string(text)
        self.assertEqual(config.ui.theme, "dark256")
        for b in KEY_BINDINGS:
            self.assertIn(f"# {b.name} = ", text)

    def test_values(self) -> None:
        c = ClientConfig.from_string(
            "[server]\naddress = chat.example:7000\n[ui]\ntheme = dark16\n"
            "timestamp_format = %H:%M:%S\n[notifications]\nbell = no\n"
            "[keys]\nquit = ctrl q, f9\n")
        self.assertEqual((c.server.host, c.server.port), ("chat.example", 7000))
        self.assertFalse(c.notifications.bell)
        self.assertEqual(c.keymap().action("f9"), "quit")

    def test_errors(self) -> None:
        for text in ("[sever]\n", "[ui]\ntheme = pink\n", "[ui]\nwidth = 3\n",
                     "[notifications]\nbell = maybe\n", "[keys]\nfly = f3\n"):
            self.assertRaises(ConfigError, ClientConfig.from_string, text)

    def test_parse_server(self) -> None:
        self.assertEqual(parse_server("h"), ("h", 6697))
        self.assertEqual(parse_server("h:1"), ("h", 1))
        self.assertEqual(parse_server("[::1]:5"), ("::1", 5))
        self.assertRaises(ConfigError, parse_server, "h:x")

    def test_themes_define_every_attribute(self) -> None:
        for theme in THEMES.values():
            names = {p[0] for p in theme.palette}
            self.assertEqual(names, set(ATTRS), theme.name)
            screen = urwid.raw_display.Screen()
            screen.register_palette(list(theme.palette))

    def test_help_option_explains(self) -> None:
        text = build_parser().format_help()
        for word in ("--forget-server", "fingerprint", "passphrase", "SHTALK_URWID_TEST_KDF",
                     "client.ini", "Ctrl-Q", "FOR TESTS ONLY", "shtalk-urwid.log"):
            self.assertIn(word, text)


class CommandTests(unittest.TestCase):
    def test_parse(self) -> None:
        self.assertIsNone(cmds.parse("   "))
        self.assertEqual(cmds.parse("hello"), cmds.Text("hello"))
        self.assertEqual(cmds.parse("//me"), cmds.Text("/me"))
        inv = cmds.parse("/msg bob hi there")
        assert isinstance(inv, cmds.Invocation)
        self.assertEqual(inv.command.name, "msg")
        self.assertEqual(inv.args, {"user": "bob", "text": "hi there"})
        inv = cmds.parse("/query bob")
        assert isinstance(inv, cmds.Invocation)
        self.assertEqual((inv.command.name, inv.args), ("msg", {"user": "bob"}))
        inv = cmds.parse("/verify bob phone yes")
        assert isinstance(inv, cmds.Invocation)
        self.assertEqual(inv.args["confirm"], "yes")

    def test_parse_errors_say_what_to_do(self) -> None:
        e = self.assertRaises(cmds.CommandError, cmds.parse, "/jion x")
        self.assertIn("/join", str(e))
        e = self.assertRaises(cmds.CommandError, cmds.parse, "/join")
        self.assertIn("ROOM", str(e))
        self.assertRaises(cmds.CommandError, cmds.parse, "/rooms extra")
        self.assertRaises(cmds.CommandError, cmds.parse, "/bell maybe")

    def test_durations(self) -> None:
        self.assertEqual(cmds.parse_duration("30s"), 30)
        self.assertEqual(cmds.parse_duration("10m"), 600)
        self.assertEqual(cmds.parse_duration("off"), 0)
        self.assertRaises(cmds.CommandError, cmds.parse_duration, "soon")
        self.assertEqual(cmds.format_duration(3600), "1h")

    def test_every_command_has_a_handler(self) -> None:
        for c in cmds.COMMANDS:
            self.assertTrue(hasattr(CommandHandlers, "cmd_" + c.name.replace("-", "_")), c.name)

    def test_completion(self) -> None:
        names = {"user": ["bob", "bobby", "carol"], "room": ["general", "games"],
                 "device": []}
        comp = cmds.Completer(lambda kind: names.get(kind, []))
        self.assertEqual(comp.complete("/jo", 3)[:2], ("/join ", 6))
        line, cur, opts = comp.complete("/join g", 7)
        self.assertEqual((line, opts), ("/join games ", ("games", "general")))
        self.assertEqual(comp.complete(line, cur)[0], "/join general ")
        comp.reset()
        self.assertEqual(comp.complete("/join ge", 8)[0], "/join general ")
        self.assertEqual(comp.complete("/msg c", 6)[0], "/msg carol ")
        # Cycling: bob -> bobby -> bob
        comp.reset()
        line, cur, _ = comp.complete("/msg bo", 7)
        self.assertEqual(line, "/msg bob")  # common prefix first
        line, cur, _ = comp.complete(line, cur)
        self.assertEqual(line, "/msg bob ")
        line, cur, _ = comp.complete(line, cur)
        self.assertEqual(line, "/msg bobby ")
        # Mentions in a message
        comp.reset()
        self.assertEqual(comp.complete("hi ca", 5)[0], "hi carol ")

    def test_mentions(self) -> None:
        self.assertTrue(mentions("hey alice!", "alice"))
        self.assertFalse(mentions("malice", "alice"))
        self.assertFalse(mentions("alice_b", "alice"))


class HistoryWindowTests(unittest.TestCase):
    def window(self, n: int) -> tuple[FakeBackend, HistoryWindow]:
        fake = FakeBackend()
        for i in range(n):
            fake.add_history("user:bob", "bob", f"m{i}", T0 + i)
        w = HistoryWindow("user:bob", fake.history, "alice", page=50, cap=120)
        w.load_latest()
        return fake, w

    def test_pages_and_cap(self) -> None:
        _, w = self.window(1000)
        self.assertEqual([x.body for x in w.items[-2:]], ["m998", "m999"])
        self.assertEqual(len(w.items), 50)
        self.assertTrue(w.has_older)
        for _ in range(5):
            w.load_older()
        self.assertEqual(len(w.items), 120)  # capped: the newest were dropped
        self.assertTrue(w.has_newer)
        self.assertEqual(w.items[0].body, "m700")
        first = w.first
        self.assertEqual(w.at(first).body, "m700")  # type: ignore[union-attr]
        # Live messages do not enter a window that does not reach the newest.
        self.assertFalse(w.add(w.items[0].__class__.notice("user:bob", "x", T0)))
        while w.has_newer:
            w.load_newer()
        self.assertEqual(w.items[-1].body, "m999")
        bodies = [x.body for x in w.items]
        self.assertEqual(bodies, [f"m{i}" for i in range(880, 1000)])
        self.assertLessEqual(len(w.items), 120)

    def test_to_the_very_top(self) -> None:
        _, w = self.window(130)
        while w.has_older:
            w.load_older()
        self.assertEqual(w.items[0].body, "m0")

    def test_walker_builds_only_visible_widgets(self) -> None:
        h = Harness(messages=10_000)
        h.text()
        walker = h.view.pane.walker
        self.assertLessEqual(walker.built, 30)
        for _ in range(40):
            h.press("page up")
            h.text()
        self.assertLessEqual(len(h.model.current_conversation.window.items), 200)
        self.assertIn("message 9", h.text())
        h.press("end")
        screen = h.text()
        self.assertIn("message 9999", screen)


class ScreenTests(unittest.TestCase):
    def test_80x24_layout(self) -> None:
        h = Harness(messages=100)
        screen = h.text()
        rows = screen.splitlines()
        self.assertEqual(len(rows), 24)
        self.assertIn("#general", rows[0])
        self.assertIn("message 99", screen)
        self.assertIn("bob", screen)
        self.assertIn("alice/laptop", rows[-2])
        self.assertTrue(rows[-1].startswith("> "))

    def test_resize(self) -> None:
        h = Harness(messages=100)
        for size in ((80, 24), (40, 10), (132, 50), (20, 5), (80, 24)):
            rows = text_of(h.screen, size).splitlines()
            self.assertEqual(len(rows), size[1])
            self.assertTrue(all(len(r) == size[0] for r in rows))
        small = text_of(h.screen, (40, 10))
        self.assertIn("message 99", small)

    def test_message_states_and_timer(self) -> None:
        h = Harness(messages=1)
        h.fake.errors["send"] = ServerError("rate_limited", "slow down",
                                            {"error": {"retry_after": 4}})
        h.line("will fail")
        screen = h.text()
        self.assertIn("not sent", screen)
        self.assertIn("rate-limiting", screen)
        del h.fake.errors["send"]
        h.line("will work")
        self.assertIn("will work \u2713", h.text())
        h.controller.handle_event(MessageReceived(
            "room:general", "bob", "phone", "soon gone", T0, "bob/phone/1",
            h.clock[0] + 300, False))
        self.assertIn("soon gone  \u23f15m", h.text())

    def test_sending_state_is_visible(self) -> None:
        h = Harness(messages=1)
        pending: Deferred[str] = Deferred()
        h.fake.send = lambda conversation, body: pending  # type: ignore[method-assign]
        h.line("in flight")
        self.assertIn("in flight  (sending)", h.text())
        pending.callback("alice/laptop/x")
        self.assertIn("in flight \u2713", h.text())

    def test_unread_bell_and_away(self) -> None:
        h = Harness(messages=1)
        h.controller.handle_event(MessageReceived("user:bob", "bob", "phone", "psst", T0,
                                                  "bob/phone/9", None, True))
        self.assertEqual(h.bells, 1)
        self.assertIn("@bob (1)", h.text())
        h.controller.handle_event(MessageReceived("room:general", "carol", "p", "hi alice",
                                                  T0, "carol/p/1", None, False))
        self.assertEqual(h.bells, 2)  # a mention
        h.controller.handle_event(BacklogDone(2))
        h.model.open(STATUS)
        self.assertIn("2 messages arrived while you were away", h.text())
        h.press("f2")
        self.assertIn("bell off", h.text())
        h.controller.handle_event(MessageReceived("user:bob", "bob", "phone", "again", T0,
                                                  "bob/phone/10", None, True))
        self.assertEqual(h.bells, 2)

    def test_presence_is_shown_for_direct_conversations(self) -> None:
        h = Harness(messages=1)
        h.controller.handle_event(MessageReceived("user:bob", "bob", "phone", "psst", T0,
                                                  "bob/phone/9", None, True))
        screen = h.text()
        self.assertIn("@bob (1)", screen)
        self.assertNotIn("\u25cf @bob", screen)  # nothing said yet: no mark
        h.controller.handle_event(Presence("bob", "online"))
        self.assertIn("\u25cf @bob", h.text())
        h.model.open("user:bob")
        self.assertIn("\u00b7 online", h.text())  # the status bar of the open DM
        h.controller.handle_event(Presence("bob", "offline"))
        screen = h.text()
        self.assertIn("\u25cb @bob", screen)
        self.assertIn("\u00b7 offline", screen)
        self.assertIn("bob", h.controller.candidates(cmds.USER))

    def test_conversation_switching_and_trust_marks(self) -> None:
        h = Harness(messages=3)
        h.fake.trust.update({"bob": "verified", "eve": "changed"})
        h.line("/msg bob hello")
        self.assertIn(("send", ("user:bob", "hello")), h.fake.calls)
        h.line("/msg eve")
        screen = h.text()
        self.assertIn("@bob\u2713", screen)
        self.assertIn("@eve!", screen)
        self.assertIn("IDENTITY CHANGED: /trust eve", screen)
        h.press("ctrl p")
        self.assertIn("e2ee \u00b7 verified", h.text())
        h.press("meta w")
        self.assertNotIn("@bob", h.text().splitlines()[1] + h.text().splitlines()[3])

    def test_commands_reach_the_client(self) -> None:
        h = Harness(messages=1)
        h.line("/create lounge")
        self.assertEqual(h.model.current, "room:lounge")
        h.line("/invite bob")
        h.line("/kick bob")
        h.line("/who")
        self.assertIn("#lounge: 1 members", h.text())
        h.line("/timer 10m")
        self.assertEqual(h.fake.timers["room:lounge"], 600)
        self.assertIn("vanish after 10m", h.text())
        h.press("esc")  # the notice gone, the status bar shows the conversation's state
        self.assertIn("\u23f1 10m", h.text())
        h.line("/rooms")
        h.line("/leave")
        h.line("/join general")
        h.line("/search message")
        h.fake.devices_of["bob"] = [("phone", "tofu")]
        h.line("/verify bob")
        self.assertIn("12345 67890", h.text())
        h.line("/verify bob phone yes")
        h.line("/trust bob")
        h.line("/devices")
        h.line("/device-remove old")
        names = [c[0] for c in h.fake.calls]
        for name in ("create_room", "invite", "kick", "members", "set_timer", "rooms",
                     "leave_room", "join_room", "search", "mark_verified", "accept_identity",
                     "devices", "remove_device"):
            self.assertIn(name, names)
        h.line("/nonsense")
        self.assertIn("no command /nonsense", h.text())
        h.line("/quit")
        self.assertEqual(h.quits, 1)

    def test_errors_people_meet_are_plain(self) -> None:
        h = Harness(messages=1)
        h.fake.errors["join_room"] = ServerError("invite_required", "x")
        h.line("/join secret")
        self.assertIn("invite-only", h.text())
        h.controller.handle_event(MemberChanged("general", "alice", "kicked", "bob"))
        self.assertIn("You were removed from #general by bob", h.text())
        h.controller.handle_event(IdentityChanged("bob", "phone"))
        h.model.open("user:bob")
        self.assertIn("identity key changed", h.text())
        h.controller.handle_event(BadMessage("mallory", "x", "bad signature", 3))
        h.controller.handle_event(ConnectionChanged("reconnecting", "lost; reconnecting"))
        h.model.open(STATUS)
        screen = h.text()
        self.assertIn("failed its", screen)
        self.assertIn("reconnecting", screen)
        for error, words in (
                (CertificateChanged("h", 1, "AA:BB", "CC:DD", None), "--forget-server h:1"),
                (WrongPassphrase("x"), "passphrase does not unlock"),
                (ServerError("invalid_credentials", "x"), "Wrong username or password"),
                (ConnectionRefused(), "cannot be reached")):
            self.assertIn(words, describe(error))

    def test_message_state_event(self) -> None:
        h = Harness(messages=2)
        line = h.model.current_conversation.window.items[-1]
        h.controller.handle_event(MessageState(line.id, "room:general", "failed", "boom"))
        self.assertEqual(line.state, "failed")

    def test_input_history_and_multiline(self) -> None:
        h = Harness(messages=1)
        h.line("one")
        h.line("two")
        h.press("up")
        self.assertEqual(h.view.input.edit_text, "two")
        h.press("up")
        self.assertEqual(h.view.input.edit_text, "one")
        h.press("down", "down")
        self.assertEqual(h.view.input.edit_text, "")
        h.type("a")
        h.press("meta enter")
        h.type("b")
        h.press("enter")
        self.assertIn(("send", ("room:general", "a\nb")), h.fake.calls)

    def test_mouse_wheel_scrolls(self) -> None:
        h = Harness(messages=300)
        h.text()
        before = h.view.pane.walker.focus
        for _ in range(10):
            h.screen.mouse_event(h.size, "mouse press", 4, 40, 10, True)
        h.text()
        self.assertNotEqual(before, h.view.pane.walker.focus)


class DialogTests(unittest.TestCase):
    def test_prompt_and_question(self) -> None:
        h = Harness()
        d = h.host.ask("Unlock", "Type it", "Passphrase:", mask=True)
        h.type("secret")
        self.assertIn("******", h.text())
        self.assertNotIn("secret", h.text())
        h.press("enter")
        self.assertEqual(self.successResultOf(d), "secret")
        d2 = h.host.confirm("Trust?", "AB:CD")
        self.assertIn("AB:CD", h.text())
        h.press("y")
        self.assertTrue(self.successResultOf(d2))
        d3 = h.host.ask("x", "y", "z")
        h.press("esc")
        self.assertIsNone(self.successResultOf(d3))

    def test_progress(self) -> None:
        h = Harness()
        p = h.host.progress("Unlocking", "Argon2id", 1.0)
        p.tick(0.5)
        self.assertIn("50 %", h.text())
        p.tick(5)
        self.assertIn("95 %", h.text())

    def test_server_driven_steps(self) -> None:
        """A CAPTCHA refusal carrying a challenge, then an OTP demand: each is a prompt,
        and the retry carries the answers."""
        h = Harness()
        seen: list[dict[str, Any]] = []
        answers = iter([
            ServerError("captcha_required", "solve",
                        {"error": {"code": "captcha_required",
                                   "captcha": {"id": "cap_1", "art": "#  ##  #",
                                               "hint": "type the 4 characters"}}}),
            ServerError("otp_required", "code"),
            None,
        ])

        def op(extra: dict[str, Any]) -> Deferred[str]:
            seen.append(extra)
            e = next(answers)
            if e is not None:
                raise e
            return succeed("ok")

        async def run() -> str:
            return await Steps(h.host, lambda *a, **k: succeed({}), "alice").run(op)

        d = Deferred.fromCoroutine(run())
        self.assertIn("#  ##  #", h.text())
        h.type("AB12")
        h.press("enter")
        self.assertIn("6-digit code", h.text())
        h.type("123456")
        h.press("enter")
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(seen[-1], {"captcha": {"id": "cap_1", "answer": "AB12"},
                                    "otp": "123456"})

    def test_reconnect_login_steps_are_prompts(self) -> None:
        """The reconnect loop's password login meets a TOTP or CAPTCHA demand: the app's
        ``ask_extra`` (handed to the client) prompts and answers in the session's terms."""
        from types import SimpleNamespace

        from twisted.internet.task import Clock

        from shtalk.clientui.app import App

        app = App(Clock(), ClientConfig(), "chat.example", 6697, Path(tempdir(self)))
        app.client = SimpleNamespace(  # type: ignore[assignment]
            credentials=SimpleNamespace(username="alice"),
            session=SimpleNamespace(request_unauthenticated=lambda *a, **k: succeed({})))
        size = (80, 24)

        def keys(text: str) -> None:
            for ch in [*text, "enter"]:
                app.screen.keypress(size, ch)

        d = app.ask_extra("otp_required", {"code": "otp_required"})
        self.assertIn("6-digit code", text_of(app.screen, size))
        keys("123456")
        self.assertEqual(self.successResultOf(d), {"otp": "123456"})
        d = app.ask_extra("captcha_required", {"captcha": {"id": "cap_9", "art": "# # #",
                                                            "hint": "type it"}})
        self.assertIn("# # #", text_of(app.screen, size))
        keys("XYZ")
        self.assertEqual(self.successResultOf(d),
                         {"captcha": {"id": "cap_9", "answer": "XYZ"}})
        # Something it cannot answer goes back to the session as a refusal.
        self.failureResultOf(app.ask_extra("email_not_verified", {}))

    def test_email_code_step(self) -> None:
        h = Harness()
        calls: list[tuple[str, dict[str, Any]]] = []

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            fields = req.to_json()
            rtype = fields.pop("type")
            calls.append((rtype, fields))
            if rtype == "verify_email" and fields["code"] != "good":
                raise ServerError("invalid_code", "no")
            return succeed({"status": "active"})

        steps = Steps(h.host, request, "alice")
        d = Deferred.fromCoroutine(steps.after_register({"status": "pending"}))
        self.assertIn("Confirm your email", h.text())
        h.press("enter")  # empty: send again
        self.assertEqual(calls[-1][0], "resend_verification")
        h.type("bad")
        h.press("enter")
        self.assertIn("wrong or expired", h.text())
        h.type("good")
        h.press("enter")
        self.successResultOf(d)
        self.assertEqual(calls[-1], ("verify_email", {"username": "alice", "code": "good"}))

    def test_totp_enrolment(self) -> None:
        h = Harness()

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            fields = req.to_json()
            rtype = fields.pop("type")
            if rtype == "totp_enroll":
                return succeed({"secret": "JBSWY3DPEHPK3PXP",
                                "uri": "otpauth://totp/shtalk:alice?secret=JBSWY3DPEHPK3PXP"})
            if fields.get("code") != "123456":
                raise ServerError("invalid_code", "no")
            return succeed({"enabled": True, "recovery_codes": ["rc-one", "rc-two"]})

        d = Deferred.fromCoroutine(enroll_totp(h.host, request))
        self.assertIn("Scan this with your authenticator app", h.text())
        h.press("enter")
        screen = text_of(h.screen, (100, 60))
        self.assertIn("JBSWY3DPEHPK3PXP", screen)
        h.type("000000")
        h.press("enter")
        self.assertIn("not accepted", h.text())
        h.press(*["backspace"] * 6)
        h.type("123456")
        h.press("enter")
        self.assertIn("rc-two", h.text())
        h.press("enter")
        self.assertTrue(self.successResultOf(d))

    def test_qr_drawing(self) -> None:
        art = draw([[True, False], [False, True], [True, True]])
        self.assertEqual(art.splitlines(), ["\u2584\u2580", "\u2584\u2584"])
