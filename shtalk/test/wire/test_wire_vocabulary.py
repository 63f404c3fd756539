"""The wire's words are written in shtalk.wire only: no error code or protocol version is
spelled out anywhere else in the package (tests and docs may spell them).

The check reads the source (``ast``), so a code compared as a string (``e.code ==
"token_revoked"``), a table keyed by code strings, or a second ``PROTOCOL_VERSION``
fails here, naming the file and line; such code imports `ErrorCode` or
`shtalk.wire.limits.PROTOCOL_VERSION` instead.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from shtalk.wire.errors import ErrorCode

PACKAGE = Path(__file__).resolve().parents[2]
CODES = {c.value for c in ErrorCode}

#: Strings equal to a code that are not one: (file under shtalk/, string) -> why.
NOT_CODES = {
    ("server/net/admission.py", "timeout"): "why a pending socket was dropped (a log count)",
}


def sources() -> Iterator[tuple[str, ast.Module]]:
    """Every module of the package outside shtalk/wire and shtalk/test."""
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name.startswith(("wire/", "test/")):
            continue
        yield name, ast.parse(path.read_text(encoding="utf-8"), name)


def spelled_codes(name: str, tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value in CODES and (name, node.value) not in NOT_CODES):
            yield f"{name}:{node.lineno}: the error code {node.value!r}"


def spelled_versions(name: str, tree: ast.Module) -> Iterator[str]:
    """A protocol version number written down: ``PROTOCOL_VERSION = ...``, a call with
    ``version=<number>`` (a hello) or a ``{"version": <number>}`` object."""
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "PROTOCOL_VERSION":
                yield f"{name}:{t.lineno}: a PROTOCOL_VERSION of its own"
        if (isinstance(node, ast.keyword) and node.arg == "version"
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int)):
            yield f"{name}:{node.value.lineno}: version={node.value.value}"
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if (isinstance(k, ast.Constant) and k.value == "version"
                        and isinstance(v, ast.Constant) and isinstance(v.value, int)):
                    yield f"{name}:{k.lineno}: \"version\": {v.value}"


class VocabularyTests(SynchronousTestCase):
    def test_no_error_code_spelled_outside_the_wire(self) -> None:
        found = [hit for name, tree in sources() for hit in spelled_codes(name, tree)]
        self.assertEqual(found, [], "use shtalk.wire.errors.ErrorCode:\n" + "\n".join(found))

    def test_no_protocol_version_outside_the_wire(self) -> None:
        found = [hit for name, tree in sources() for hit in spelled_versions(name, tree)]
        self.assertEqual(found, [],
                         "use shtalk.wire.limits.PROTOCOL_VERSION:\n" + "\n".join(found))

    def test_the_checks_see_what_they_look_for(self) -> None:
        """The walkers find the forms this module forbids (the test can fail)."""
        tree = ast.parse('PROTOCOL_VERSION = 1\nif e.code == "token_revoked":\n'
                         '    conn.request("hello", version=1, extra={"version": 1})\n')
        self.assertEqual(len(list(spelled_codes("client/x.py", tree))), 1)
        self.assertEqual(len(list(spelled_versions("client/x.py", tree))), 3)
        every = {name for name, _ in sources()}
        self.assertIn("client/session.py", every)
        self.assertIn("server/net/connection.py", every)
        self.assertFalse(any(n.startswith(("wire/", "test/")) for n in every))
