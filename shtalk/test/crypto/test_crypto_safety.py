"""Safety numbers."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import safety_number, safety_number_digits
from shtalk.test.crypto.test_crypto_support import identity


class SafetyNumberTests(SynchronousTestCase):
    def test_same_on_both_sides_and_format(self) -> None:
        a, b = identity(0, 0).identity_key, identity(0, 0).identity_key
        ours = safety_number("alice/laptop", a, "bob/phone", b)
        theirs = safety_number("bob/phone", b, "alice/laptop", a)
        self.assertEqual(ours, theirs)
        groups = ours.split(" ")
        self.assertEqual(len(groups), 12)
        self.assertTrue(all(len(g) == 5 and g.isdigit() for g in groups))
        self.assertEqual(safety_number_digits("alice/laptop", a, "bob/phone", b),
                         ours.replace(" ", ""))

    def test_changes_with_identity_or_name(self) -> None:
        a, b, c = (identity(0, 0).identity_key for _ in range(3))
        base = safety_number("alice/laptop", a, "bob/phone", b)
        self.assertNotEqual(base, safety_number("alice/laptop", a, "bob/phone", c))
        self.assertNotEqual(base, safety_number("alice/laptop", c, "bob/phone", b))
        self.assertNotEqual(base, safety_number("alice/laptop", a, "bob/tablet", b))
        self.assertEqual(base, safety_number("alice/laptop", a, "bob/phone", b))
