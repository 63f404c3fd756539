"""Unit tests of shtalk.crypto: primitives, PQXDH, the Double Ratchet, Sender Keys."""
