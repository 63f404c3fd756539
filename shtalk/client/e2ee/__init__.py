"""End-to-end encryption on this device: one manager (`E2EE`) built from small parts.

``common``: what the parts share (the store, the lock, the commit bookkeeping);
``prekeys``: this device's keys in the server's directory; ``contacts``: who has
which devices and what we trust; ``pairwise``: a Double Ratchet session per device;
``rooms``: Sender Keys per room; ``inbox``: received messages, one commit per batch;
``outbox``: sending, saving ahead of the message; ``manager``: builds and connects them.
"""

from shtalk.client.e2ee.manager import E2EE
from shtalk.client.errors import ClientError, IdentityNotAccepted

__all__ = ["E2EE", "ClientError", "IdentityNotAccepted"]
