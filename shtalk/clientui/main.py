"""``shtalk-urwid``: the terminal client (console script)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shtalk.clientui.config import ClientConfig, ConfigError, config_home, data_home, parse_server
from shtalk.clientui.keys import KEY_BINDINGS, pretty_key

DESCRIPTION = """\
shtalk-urwid: end-to-end encrypted chat in the terminal.

First run: it connects to the server, shows the SHA-256 fingerprint of the server's
certificate and asks you to trust it (compare it with the one the server's operator
gave you); then you create an account (username, email, password twice, and whatever
the server asks for: a CAPTCHA, a code sent by email) or log in to an existing account
(password, and the two-factor code if the account has one), and this computer becomes
a new device of it. Once the server accepted the password, you choose a local
passphrase: keys and history are stored encrypted under it (Argon2id).
Esc goes back one step in every dialog; in the CAPTCHA, F5 draws a new one and F6 asks
a question in words instead (for screen readers).

Later runs: type the passphrase (a progress bar shows the key derivation), and the
session resumes; what arrived while you were away is listed in the status window.

In the client: F1 or /help lists every key and command. Type a line and Enter to send
it to the open conversation; /msg USER opens a direct conversation, /join ROOM a room.
F10 or Ctrl-Q (or /quit) quits, asking first if something is not sent yet.
"""

EPILOG = """\
files:
  config        $XDG_CONFIG_HOME/shtalk/client.ini (default ~/.config/shtalk/client.ini);
                every key is documented in conf/client.ini of the source tree
  data          $XDG_DATA_HOME/shtalk-urwid (default ~/.local/share/shtalk-urwid):
                known_hosts (pinned server certificates) and one encrypted store per
                server, HOST_PORT.sqlite3 (0600)
  log           shtalk-urwid.log in the data directory (0600, rotated at 1 MB, 5 kept):
                what went wrong, in full; the screen shows one sentence about it

certificate changed:
  If the server's certificate changes, shtalk refuses to connect: someone may be
  intercepting. If the operator confirms they replaced it, run
      shtalk-urwid --forget-server HOST:PORT
  and trust the new fingerprint on the next start.

environment:
  SHTALK_URWID_TEST_KDF=1   FOR TESTS ONLY: new local stores use a cheap Argon2id
                            (8 MiB, 1 pass) so test runs are fast. Never use it for a
                            real store: it makes the passphrase much easier to guess.

keys (defaults; change them in [keys] of client.ini):
"""


def _keys_epilog() -> str:
    lines = []
    for b in KEY_BINDINGS:
        keys = ", ".join(pretty_key(k) for k in b.keys)
        lines.append(f"  {keys:<20} {b.help}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shtalk-urwid", description=DESCRIPTION, epilog=EPILOG + _keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("server", nargs="?", metavar="HOST[:PORT]",
                   help="the server (default: [server] address of client.ini, else "
                        "127.0.0.1:6697)")
    p.add_argument("--config", metavar="FILE",
                   help=f"configuration file (default: {config_home() / 'client.ini'})")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"where the stores and known_hosts live (default: {data_home()})")
    p.add_argument("--theme", help="colour theme: dark256, dark16, light16 or mono "
                                   "(overrides [ui] theme)")
    p.add_argument("--trust", choices=("pin", "system"),
                   help="pin: trust the certificate on first use (default); system: the "
                        "server has a CA-signed certificate for its name")
    p.add_argument("--forget-server", metavar="HOST:PORT",
                   help="forget the pinned certificate of HOST:PORT and exit (after the "
                        "operator confirmed a certificate change)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else data_home()
    from shtalk.clientui.app import App
    from shtalk.clientui.device import TEST_KDF_ENV, forget_server, test_kdf

    try:
        config = ClientConfig.load(args.config)
        if args.forget_server:
            host, port = parse_server(args.forget_server)
            print(forget_server(data_dir, host, port))
            return 0
        if args.server:
            host, port = parse_server(args.server)
        else:
            host, port = config.server.host, config.server.port
    except ConfigError as e:
        print(f"shtalk-urwid: {e}", file=sys.stderr)
        return 2
    if args.theme:
        from shtalk.clientui.themes import THEMES

        if args.theme not in THEMES:
            print(f"shtalk-urwid: no theme {args.theme!r} ({', '.join(THEMES)})",
                  file=sys.stderr)
            return 2
        config.ui.theme = args.theme
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        print("shtalk-urwid: needs a terminal (stdin and stdout)", file=sys.stderr)
        return 2
    kdf = test_kdf() if os.environ.get(TEST_KDF_ENV) == "1" else None
    from twisted.internet import reactor

    from shtalk.clientui.logfile import ClientLog

    client_log = ClientLog(data_dir, reactor)
    try:
        client_log.start()
    except OSError as e:
        print(f"shtalk-urwid: cannot write the log in {data_dir}: {e.strerror}; choose "
              "another --data-dir", file=sys.stderr)
        return 2
    app = App(reactor, config, host, port, data_dir, kdf=kdf,
              trust=args.trust or config.server.trust, client_log=client_log)
    code = app.run()
    if app.crashed and sys.__stderr__ is not None:
        sys.__stderr__.write(f"shtalk-urwid stopped after an internal error; the details are "
                             f"in {client_log.path}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
