# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's endpoints are untyped; strict otherwise.)
"""Tests for shtalk.server.config: typed sections, strict keys, clear errors, precedence."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from twisted.trial import unittest

from shtalk.server import config as config_module
from shtalk.server.config import (
    SECTIONS,
    AccountsSection,
    ConfigError,
    RateLimitSection,
    Section,
    ServerConfig,
    ServerSection,
    SmtpSection,
    default_data_dir,
    register_section,
    resolve_data_dir,
    setting,
)

EXAMPLE_INI = Path(__file__).resolve().parents[3] / "conf" / "shtalk.ini"


class DefaultsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        c = ServerConfig()
        self.assertEqual(c.server.interface, "127.0.0.1")
        self.assertEqual(c.server.port, 6697)
        self.assertEqual(c.server.listen, "")
        self.assertEqual(c.server.data_dir, "")
        self.assertEqual((c.server.cert, c.server.key), ("", ""))
        self.assertEqual(c.server.max_connections_per_address, 20)
        self.assertEqual(c.server.pre_auth_timeout, 30)
        self.assertEqual(c.server.idle_timeout, 600)
        self.assertEqual(c.server.max_line_length, 1048576)
        self.assertEqual(c.accounts.bcrypt_cost, 12)
        self.assertEqual(c.accounts.min_password_length, 12)
        self.assertEqual(c.tokens.issuer, "shtalk")
        self.assertEqual(c.tokens.access_ttl, 900)
        self.assertEqual(c.tokens.refresh_ttl, 2592000)
        self.assertEqual(c.storage.retention, 2592000)
        self.assertEqual(c.storage.max_envelope_bytes, 65536)

    def test_empty_string_is_defaults(self) -> None:
        self.assertEqual(ServerConfig.from_string("").server, ServerSection())

    def test_secrets_stay_out_of_reprs(self) -> None:
        config = ServerConfig.from_string(
            "[smtp]\npassword = hunter2-smtp\n"
            "[ratelimit]\nredis_url = redis://:hunter2-redis@127.0.0.1:6379/0\n"
        )
        for text in (repr(config.section(SmtpSection)), repr(config.section(RateLimitSection))):
            self.assertNotIn("hunter2", text)
        self.assertIn("require_starttls=True", repr(config.section(SmtpSection)))

    def test_frozen(self) -> None:
        c = ServerConfig()
        with self.assertRaises(AttributeError):
            c.server.port = 1  # type: ignore[misc]


class ParseTests(unittest.TestCase):
    def test_typed_values(self) -> None:
        c = ServerConfig.from_string(
            "[server]\nport = 7000\ninterface = ::\n[accounts]\nbcrypt_cost = 14\n"
            "[tokens]\nissuer = example\n"
        )
        self.assertEqual(c.server.port, 7000)
        self.assertIsInstance(c.server.port, int)
        self.assertEqual(c.server.interface, "::")
        self.assertEqual(c.accounts.bcrypt_cost, 14)
        self.assertEqual(c.tokens.issuer, "example")
        self.assertEqual(c.storage.retention, 2592000)

    def test_unknown_key(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[server]\nprot = 1\n", source="my.ini")
        msg = str(e.exception)
        self.assertIn("my.ini", msg)
        self.assertIn("prot", msg)
        self.assertIn("[server]", msg)
        self.assertNotIn("\n", msg)

    def test_unknown_section(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[sever]\nport = 1\n", source="my.ini")
        self.assertIn("my.ini: unknown section [sever]", str(e.exception))

    def test_keys_are_case_sensitive(self) -> None:
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[server]\nPort = 1\n")

    def test_bad_int(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[server]\nport = six\n", source="my.ini")
        self.assertEqual(str(e.exception), "my.ini: [server] port: 'six' is not a whole number")

    def test_out_of_range(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[server]\nport = 70000\n", source="x.ini")
        self.assertIn("x.ini: [server] port: 70000 is above the maximum 65535", str(e.exception))

    def test_a_cluster_node_name_may_not_hold_the_field_separator(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[cluster]\nnode_name = a|b\n", source="x.ini")
        self.assertIn("node_name", str(e.exception))
        self.assertIn("'|'", str(e.exception))

    def test_bcrypt_cost_bounds(self) -> None:
        for bad in ("9", "17"):
            with self.assertRaises(ConfigError):
                ServerConfig.from_string(f"[accounts]\nbcrypt_cost = {bad}\n")
        for good in ("10", "16"):
            c = ServerConfig.from_string(f"[accounts]\nbcrypt_cost = {good}\n")
            self.assertEqual(c.accounts.bcrypt_cost, int(good))

    def test_duplicate_key_is_error(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("[server]\nport = 1\nport = 2\n", source="d.ini")
        self.assertTrue(str(e.exception).startswith("d.ini: "))
        self.assertNotIn("\n", str(e.exception))

    def test_syntax_error(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_string("port = 1\n", source="s.ini")
        self.assertTrue(str(e.exception).startswith("s.ini: "))
        self.assertNotIn("\n", str(e.exception))

    def test_default_section_is_unknown(self) -> None:
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[DEFAULT]\nport = 1\n")

    def test_no_interpolation(self) -> None:
        c = ServerConfig.from_string("[tokens]\nissuer = a%(b)s\n")
        self.assertEqual(c.tokens.issuer, "a%(b)s")


class FileTests(unittest.TestCase):
    def test_from_file(self) -> None:
        path = Path(self.mktemp())
        path.write_text("[server]\nport = 7001\n")
        c = ServerConfig.from_file(path)
        self.assertEqual(c.server.port, 7001)
        self.assertEqual(c.source, str(path))

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_file("/nonexistent/shtalk.ini")
        self.assertIn("/nonexistent/shtalk.ini: config file not found", str(e.exception))

    def test_directory_is_unreadable(self) -> None:
        path = self.mktemp()
        os.mkdir(path)
        with self.assertRaises(ConfigError) as e:
            ServerConfig.from_file(path)
        self.assertIn(path, str(e.exception))

    def test_not_utf8(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"[server]\ninterface = \xff\n")
        with self.assertRaises(ConfigError):
            ServerConfig.from_file(path)


class OverrideTests(unittest.TestCase):
    def test_command_line_wins(self) -> None:
        c = ServerConfig.from_string("[server]\nport = 7000\ninterface = ::1\n")
        c2 = c.with_overrides({"server": {"port": 7100}})
        self.assertEqual(c2.server.port, 7100)
        self.assertEqual(c2.server.interface, "::1")
        self.assertEqual(c.server.port, 7000)  # the original is untouched

    def test_override_checked(self) -> None:
        with self.assertRaises(ConfigError) as e:
            ServerConfig().with_overrides({"server": {"max_connections_per_address": 0}})
        self.assertIn("command line: [server] max_connections_per_address", str(e.exception))

    def test_override_unknown(self) -> None:
        with self.assertRaises(ConfigError):
            ServerConfig().with_overrides({"server": {"nope": 1}})
        with self.assertRaises(ConfigError):
            ServerConfig().with_overrides({"nope": {"x": 1}})


class RegistryTests(unittest.TestCase):
    def test_adding_a_section_is_one_class(self) -> None:
        self.addCleanup(SECTIONS.pop, "example", None)

        @register_section("example")
        @dataclass(frozen=True)
        class ExampleSection(Section):
            host: str = setting("", "a host")
            enabled: bool = setting(False, "on or off")
            ratio: float = setting(0.5, "a ratio")
            count: int = setting(3, "a count", min=1)

        self.assertEqual(ServerConfig().section(ExampleSection), ExampleSection())
        c = ServerConfig.from_string("[example]\nhost = h\nenabled = yes\nratio = 2.5\n")
        self.assertEqual(c.section(ExampleSection), ExampleSection("h", True, 2.5, 3))
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[example]\nenabled = maybe\n")
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[example]\ncount = 0\n")

    def test_registering_twice_fails(self) -> None:
        with self.assertRaises(ValueError):
            register_section("server")(AccountsSection)

    def test_every_field_documented(self) -> None:
        for cls in SECTIONS.values():
            for f in fields(cls):  # type: ignore[arg-type]
                self.assertTrue(f.metadata.get("help"), f"{cls.NAME}.{f.name} has no help")


class ExampleFileTests(unittest.TestCase):
    """conf/shtalk.ini documents every key with its default, and parses."""

    def test_example_parses(self) -> None:
        c = ServerConfig.from_file(EXAMPLE_INI)
        self.assertEqual(c.server, ServerSection())

    def test_every_key_documented_with_default(self) -> None:
        text = EXAMPLE_INI.read_text()
        for name in ("server", "accounts", "tokens", "storage", "smtp", "throttle"):
            cls = SECTIONS[name]
            self.assertIn(f"\n[{name}]\n", text)
            body = text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
            for f in fields(cls):  # type: ignore[arg-type]
                default = f.default
                pattern = rf"(?m)^# {re.escape(f.name)} =[ ]?{re.escape(str(default))}$"
                self.assertRegex(body, pattern, f"[{name}] {f.name} not documented")
                # ...with a comment line above it
                idx = re.search(pattern, body)
                assert idx is not None
                self.assertTrue(body[: idx.start()].rstrip().splitlines()[-1].startswith("#"))


class DataDirLocationTests(unittest.TestCase):
    def test_xdg(self) -> None:
        self.assertEqual(default_data_dir({"XDG_DATA_HOME": "/x/data", "HOME": "/h"}),
                         Path("/x/data/shtalk"))

    def test_home_fallback(self) -> None:
        self.assertEqual(default_data_dir({"HOME": "/h"}), Path("/h/.local/share/shtalk"))
        # The XDG spec says relative values are invalid and must be ignored.
        self.assertEqual(default_data_dir({"HOME": "/h", "XDG_DATA_HOME": "rel"}),
                         Path("/h/.local/share/shtalk"))

    def test_configured_wins(self) -> None:
        c = ServerConfig.from_string("[server]\ndata_dir = ~/d\n")
        self.assertEqual(resolve_data_dir(c, {"HOME": "/h"}),
                         Path(os.path.expanduser("~/d")))

    def test_module_has_docstring(self) -> None:
        self.assertIn("typo", config_module.__doc__ or "")
