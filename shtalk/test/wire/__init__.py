"""Unit tests of shtalk.wire: framing, records, the shared vocabulary."""
