"""The numbers both sides of the wire agree on: the protocol version and size ceilings.

They live apart from the validators so a client can read them (to refuse locally what the
server would refuse) without loading anything else.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
"""What ``hello`` carries; a server answers another with ``unsupported_version``."""

# The wire format's hard ceiling; the server's configured limit
# ([storage] max_envelope_bytes, 64 KiB by default) is checked on send.
MAX_ENVELOPE_BYTES = 1 << 20
DEFAULT_ENVELOPE_BYTES = 65536
MAX_DEVICE_ENVELOPES = 64
MAX_ACK_BATCH = 1024
MAX_ID_LENGTH = 64
MAX_EXPIRY_SECONDS = 30 * 24 * 3600
MAX_BUNDLE_BYTES = 16384
MAX_ONE_TIME_KEY_BYTES = 4096
MAX_ONE_TIME_KEYS_PER_PUBLISH = 100
MAX_SEQ = 2**63 - 1
"""Message sequence numbers are SQLite rowids: positive signed 64-bit integers."""
