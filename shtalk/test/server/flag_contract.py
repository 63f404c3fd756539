"""What an ``IFlagStore`` must do, whichever keeps the flags: a mixin of test methods.

Runs on memory, the file and SQLite (``shtalk.test.server.test_flagstore``); a database
backend runs it too by giving ``make_flags()`` (an awaitable of a fresh, empty store;
``reopen()`` the same data through a new store object).
"""

from __future__ import annotations

from typing import Any

from zope.interface.verify import verifyObject

from shtalk.server.ishared import IFlagStore
from shtalk.server.store.records import Flag


def flag(subject: str = "7", signal: str = "send_rate", first: float = 1000.0) -> Flag:
    return Flag(0, "account", subject, "olive", signal, "60 sends in 60 s", "captcha", 60,
                first, first + 5, evidence=[{"reporter": "pat", "plaintext": "buy now"}])


class FlagStoreContract:
    assertEqual: Any
    assertTrue: Any

    async def make_flags(self) -> Any:
        raise NotImplementedError

    async def reopen(self) -> Any:
        raise NotImplementedError

    async def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IFlagStore, await self.make_flags()))

    async def test_save_assigns_ids_then_updates(self) -> None:
        store = await self.make_flags()
        self.assertEqual(await store.load_flags(), [])
        a, b = flag("7"), flag("8", "strangers")
        id_a = await store.save_flag(a)
        id_b = await store.save_flag(b)
        self.assertTrue(0 < id_a < id_b)
        a.id = id_a
        a.status, a.count = "cleared", 61
        a.evidence.append({"reporter": "quinn"})
        self.assertEqual(await store.save_flag(a), id_a)
        b.id = id_b
        stored = await (await self.reopen()).load_flags()
        self.assertEqual(stored, [a, b])

    async def test_a_stored_flag_is_a_copy(self) -> None:
        store = await self.make_flags()
        a = flag()
        a.id = await store.save_flag(a)
        a.count = 999  # changed, not saved
        [stored] = await store.load_flags()
        self.assertEqual(stored.count, 60)

    async def test_delete_and_given_ids(self) -> None:
        store = await self.make_flags()
        a, b = flag("1"), flag("2")
        a.id, b.id = 40, 41  # ids kept (an import)
        self.assertEqual(await store.save_flag(a), 40)
        self.assertEqual(await store.save_flag(b), 41)
        await store.delete_flag(40)
        await store.delete_flag(40)  # twice: nothing more
        self.assertEqual([f.id for f in await store.load_flags()], [41])
        self.assertTrue(await store.save_flag(flag("3")) > 41)
