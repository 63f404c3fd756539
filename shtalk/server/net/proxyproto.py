"""The PROXY protocol header (HAProxy's; v2 binary and v1 text), sans-IO.

Why: behind HAProxy in TCP mode with TLS passed through, the server's TCP peer is the
proxy; the proxy writes the client's address in this header *before* the client's
TLS ClientHello.  `parse` reads it off the front of what a connection received so
far: a header and how many bytes it took, ``None`` while the bytes could still become
a header (a truncated header waits for more), or `ProxyHeaderError`, and nothing else,
for bytes that can never be one.  Specification:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: The first 12 bytes of every v2 header (chosen to be invalid in every text protocol).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included.
V1_MAX = 107

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM = 0x1
#: Address block size by family (source and destination address, then ports).
_ADDRESS_BYTES = {_INET: 12, _INET6: 36, _UNIX: 216}


class ProxyHeaderError(ValueError):
    """Bytes that are not, and can never become, a PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a proxy said about the connection it relays.

    ``source``/``destination`` are ``(host, port)`` of the client and of the address
    it connected to, or None when the header names no TCP client: a LOCAL header (the
    proxy's own connection, e.g. a health check), an UNSPEC or UNIX one.  Then the
    connection's own addresses stand.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took; the client's stream starts after them


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None: not enough bytes yet to tell."""
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        return _parse_v2(data)
    n = min(len(data), len(V1_PREFIX))
    if data[:n] == V1_PREFIX[:n]:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection did not start with a PROXY protocol header")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) > 12:
        if data[12] >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2: version {data[12] >> 4} is not 2")
        if data[12] & 0xF not in (_LOCAL, _PROXY):
            raise ProxyHeaderError(f"PROXY v2: unknown command {data[12] & 0xF}")
    if len(data) > 13:
        family, transport = data[13] >> 4, data[13] & 0xF
        if family > _UNIX or transport > 2:
            raise ProxyHeaderError(f"PROXY v2: unknown address family/transport {data[13]:#x}")
    if len(data) < 16:
        return None
    total = 16 + int.from_bytes(data[14:16], "big")
    if len(data) < total:
        return None
    family, transport = data[13] >> 4, data[13] & 0xF
    if data[12] & 0xF == _LOCAL or family == _UNSPEC:
        return ProxyHeader(2, None, None, total)
    if transport != _STREAM:
        raise ProxyHeaderError("PROXY v2: the proxied connection is not a stream (TCP)")
    body = data[16:total]
    if len(body) < _ADDRESS_BYTES[family]:
        raise ProxyHeaderError(f"PROXY v2: {len(body)} bytes cannot hold the addresses")
    if family == _UNIX:
        return ProxyHeader(2, None, None, total)
    size = 4 if family == _INET else 16
    src = ipaddress.ip_address(body[:size]).compressed
    dst = ipaddress.ip_address(body[size : 2 * size]).compressed
    ports = body[2 * size : 2 * size + 4]
    sport, dport = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
    # What follows the addresses (TLVs) is optional; unknown ones are ignored (spec 2.2.7).
    return ProxyHeader(2, (src, sport), (dst, dport), total)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyHeaderError("PROXY v1: no CRLF within 107 bytes")
        return None
    parts = data[:end].split(b" ")
    if parts[1:2] == [b"UNKNOWN"]:
        return ProxyHeader(1, None, None, end + 2)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport'")
    v6 = parts[1] == b"TCP6"
    src, dst = (_v1_address(p, v6) for p in parts[2:4])
    sport, dport = (_v1_port(p) for p in parts[4:6])
    return ProxyHeader(1, (src, sport), (dst, dport), end + 2)


def _v1_address(raw: bytes, v6: bool) -> str:
    try:
        text = raw.decode("ascii")
        if not text or "%" in text:  # no IPv6 zone: it means nothing on this host
            raise ValueError(text)
        address = ipaddress.IPv6Address(text) if v6 else ipaddress.IPv4Address(text)
    except ValueError:
        raise ProxyHeaderError("PROXY v1: not an address of the protocol named") from None
    return address.compressed


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or (raw[:1] == b"0" and raw != b"0"):
        raise ProxyHeaderError("PROXY v1: a port is 0..65535 in decimal")
    port = int(raw)
    if port > 65535:
        raise ProxyHeaderError("PROXY v1: a port is 0..65535 in decimal")
    return port


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] = ("127.0.0.1", 0),
    tlvs: bytes = b"",
) -> bytes:
    """What a proxy writes (HAProxy's ``send-proxy-v2``): a PROXY header for a TCP
    client at ``source``, or a LOCAL one for None; for tests and tools."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination of one family")
    family = _INET if src.version == 4 else _INET6
    body = (src.packed + dst.packed + source[1].to_bytes(2, "big")
            + destination[1].to_bytes(2, "big") + tlvs)
    return (V2_SIGNATURE + bytes([0x21, family << 4 | _STREAM])
            + len(body).to_bytes(2, "big") + body)
