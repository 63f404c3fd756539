"""``shtalk-admin``: the operator's tool.

    shtalk-admin logs keygen [--out FILE]
    shtalk-admin logs read --key FILE [-f] [--level L] [--since T] [--until T]
                           [--event NAME]... [--json] LOGFILE...
    shtalk-admin monitor [--data-dir DIR | --socket PATH] [--interval S] [--once]
    shtalk-admin review list [--all] | clear FLAG | suspend USER | unsuspend USER
                        | delete USER [--yes]
    shtalk-admin port-db --from DATADIR --to postgresql://USER@HOST:PORT/DB
    shtalk-admin node-init [--from DATADIR] DATADIR

``monitor`` and ``review`` talk to the running server over its admin socket
(``<data_dir>/admin.sock``, reachable only by the server's own user).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from shtalk.admin import control, logs
from shtalk.server.config import StartupError
from shtalk.server.ops import seclog


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shtalk-admin", description="shtalk operator tool")
    sub = p.add_subparsers(dest="command", required=True)

    lg = sub.add_parser("logs", help="sealed logs: make the key pair, read")
    lsub = lg.add_subparsers(dest="logs_command", required=True)
    kg = lsub.add_parser("keygen", help="make the operator key pair (private stays with you)")
    kg.add_argument("--out", default="shtalk-log.key",
                    help="private key file; the public key goes to FILE.pub [shtalk-log.key]")
    kg.add_argument("--force", action="store_true", help="overwrite existing files")
    rd = lsub.add_parser("read", help="decrypt, check and filter sealed log files")
    rd.add_argument("--key", required=True, help="the private key from `logs keygen`")
    rd.add_argument("-f", "--follow", action="store_true", help="keep reading the live file")
    rd.add_argument("--level", choices=list(seclog.LEVELS), default="debug",
                    help="lowest level shown")
    rd.add_argument("--since", help="from: unix seconds, ISO 8601 or an age (10m, 2h, 1d)")
    rd.add_argument("--until", help="until: same forms as --since")
    rd.add_argument("--event", action="append", default=[],
                    help="only this event (glob, e.g. 'auth.*'; a prefix works too)")
    rd.add_argument("--json", action="store_true", help="one JSON record per line")
    rd.add_argument("files", nargs="+", metavar="LOGFILE",
                    help="sealed log files (rotated ones too: oldest are read first)")

    def where(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data-dir", help="the server's data directory (for admin.sock)")
        sp.add_argument("--socket", help="the admin socket's path")

    mo = sub.add_parser("monitor", help="live view of rates and flags")
    where(mo)
    mo.add_argument("--interval", type=float, default=control.default_interval(),
                    help="seconds between refreshes [2]")
    mo.add_argument("--once", action="store_true", help="print one screen and exit")

    rv = sub.add_parser("review", help="list and act on flags and accounts")
    where(rv)
    rv.add_argument("action", choices=["list", "clear", "suspend", "unsuspend", "delete"])
    rv.add_argument("target", nargs="?", help="flag id (clear) or account name")
    rv.add_argument("--all", action="store_true", help="list cleared flags too")
    rv.add_argument("--yes", action="store_true", help="delete without asking")

    pd = sub.add_parser("port-db", help="copy an SQLite data directory into PostgreSQL")
    pd.add_argument("--from", dest="source", required=True, metavar="DATADIR",
                    help="the data directory (server stopped; its storage.key stays in use)")
    pd.add_argument("--to", dest="target", required=True, metavar="URL",
                    help="an empty PostgreSQL database or schema: postgresql://USER@HOST/DB")
    ni = sub.add_parser("node-init", help="a cluster process's data directory: new keys, "
                        "or another process's copied")
    ni.add_argument("--from", dest="source", metavar="DATADIR",
                    help="copy the keys and certificate of this process's data directory")
    ni.add_argument("target", metavar="DATADIR", help="the data directory to make")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = build_parser().parse_args(argv)
    try:
        if args.command == "logs":
            if args.logs_command == "keygen":
                return logs.keygen(args.out, args.force, out)
            filters = logs.Filters(
                level=seclog.LEVELS[args.level],
                since=logs.parse_time(args.since) if args.since else None,
                until=logs.parse_time(args.until) if args.until else None,
                events=args.event,
            )
            return logs.read(args.key, args.files, filters, args.follow, args.json, out, err)
        if args.command == "port-db":
            from shtalk.admin import portdb

            try:
                portdb.port(args.source, args.target, out)
            except (portdb.PortError, StartupError) as e:
                print(f"shtalk-admin: port-db: {e}", file=err)
                return 1
            return 0
        if args.command == "node-init":
            from shtalk.admin.nodeinit import node_init

            try:
                node_init(args.target, args.source, out)
            except StartupError as e:
                print(f"shtalk-admin: node-init: {e}", file=err)
                return 1
            return 0
        path = control.socket_path(args.socket, args.data_dir)
        if args.command == "monitor":
            return control.monitor(path, args.interval, args.once, out)
        return control.review(path, args.action, args.target, args.all, args.yes, out)
    except (control.AdminError, OSError, ValueError) as e:
        print(f"shtalk-admin: error: {e}", file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
