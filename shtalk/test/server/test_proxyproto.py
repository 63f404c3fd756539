"""The PROXY protocol header parser (shtalk.server.net.proxyproto): what a proxy, or an
attacker in front of the server, can send as the first bytes of a connection."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from shtalk.server.net.proxyproto import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    v2_header,
)

HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a TLS ClientHello

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: ipaddress.IPv6Address(n).compressed, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
tlvs = st.binary(max_size=64)


Made = tuple[bytes, tuple[str, int], tuple[str, int]]


@st.composite
def v2_headers(draw: st.DrawFn) -> Made:
    hosts = draw(st.sampled_from([ipv4, ipv6]))
    src, dst = (draw(hosts), draw(ports)), (draw(hosts), draw(ports))
    return v2_header(src, dst, draw(tlvs)), src, dst


def v1_header(proto: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


class V2Tests(unittest.TestCase):
    def test_haproxy_ipv4_header_names_the_client(self) -> None:
        # As HAProxy 2.6 writes it for 203.0.113.7:51000 -> 127.0.0.1:6697.
        raw = (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 127, 0, 0, 1])
               + (51000).to_bytes(2, "big") + (6697).to_bytes(2, "big"))
        self.assertEqual(parse(raw + HELLO),
                         ProxyHeader(2, ("203.0.113.7", 51000), ("127.0.0.1", 6697), 28))

    def test_ipv6_client(self) -> None:
        raw = v2_header(("2001:db8::1", 443), ("2001:db8::2", 6697))
        header = parse(raw)
        assert header is not None
        self.assertEqual(header.source, ("2001:db8::1", 443))
        self.assertEqual(header.length, 16 + 36)

    def test_local_header_names_no_client(self) -> None:
        # A proxy's own connection (a health check): the connection's addresses stand.
        self.assertEqual(parse(v2_header(None) + HELLO), ProxyHeader(2, None, None, 16))

    def test_tlvs_after_the_addresses_are_skipped(self) -> None:
        tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
        raw = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2), tlv)
        self.assertEqual(parse(raw + HELLO).length, len(raw))  # type: ignore[union-attr]

    def test_refusals(self) -> None:
        good = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2))
        cases = {
            "version": good[:12] + b"\x11" + good[13:],
            "command": good[:12] + b"\x2f" + good[13:],
            "family": good[:13] + b"\x41" + good[14:],
            "stream": good[:13] + b"\x12" + good[14:],  # UDP
            "short": good[:14] + b"\x00\x04" + good[16:20],  # 4 bytes cannot hold them
        }
        for why, raw in cases.items():
            with self.subTest(why), self.assertRaises(ProxyHeaderError):
                parse(raw)

    def test_a_bad_command_is_refused_before_the_rest_arrives(self) -> None:
        with self.assertRaises(ProxyHeaderError):
            parse(V2_SIGNATURE + b"\x22")

    @settings(max_examples=300, deadline=None)
    @given(v2_headers(), st.binary(max_size=32))
    def test_roundtrip_and_what_follows_is_left(self, made: Made, rest: bytes) -> None:
        raw, src, dst = made
        header = parse(raw + rest)
        self.assertEqual(header, ProxyHeader(2, src, dst, len(raw)))

    @settings(max_examples=300, deadline=None)
    @given(v2_headers(), st.data())
    def test_a_truncated_header_waits_for_more(self, made: Made, data: st.DataObject) -> None:
        raw = made[0]
        cut = data.draw(st.integers(0, len(raw) - 1))
        self.assertIsNone(parse(raw[:cut]))


class V1Tests(unittest.TestCase):
    def test_tcp4_and_tcp6(self) -> None:
        raw = b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\n"
        self.assertEqual(parse(raw + HELLO),
                         ProxyHeader(1, ("198.51.100.22", 35646), ("203.0.113.7", 80), len(raw)))
        raw = b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
        self.assertEqual(parse(raw).source, ("2001:db8::1", 1))  # type: ignore[union-attr]

    def test_unknown_names_no_client(self) -> None:
        raw = b"PROXY UNKNOWN ffff:f...f:ffff 0 0\r\n"
        self.assertEqual(parse(raw + HELLO), ProxyHeader(1, None, None, len(raw)))

    def test_refusals(self) -> None:
        for raw in [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF alone
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",  # family mismatch
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 " + b"1" * V1_MAX,  # no end within 107 bytes
        ]:
            with self.subTest(raw), self.assertRaises(ProxyHeaderError):
                parse(raw)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from([("TCP4", ipv4), ("TCP6", ipv6)]), st.data())
    def test_roundtrip_and_truncation(self, kind: tuple[str, st.SearchStrategy[str]],
                                      data: st.DataObject) -> None:
        proto, hosts = kind
        src = (data.draw(hosts), data.draw(ports))
        dst = (data.draw(hosts), data.draw(ports))
        raw = v1_header(proto, src, dst)
        self.assertEqual(parse(raw + HELLO), ProxyHeader(1, src, dst, len(raw)))
        self.assertIsNone(parse(raw[: data.draw(st.integers(0, len(raw) - 1))]))


class AnyBytesTests(unittest.TestCase):
    def test_tls_straight_away_is_refused(self) -> None:
        with self.assertRaises(ProxyHeaderError):
            parse(HELLO)

    @settings(max_examples=1000, deadline=None)
    @given(st.one_of(
        st.binary(max_size=300),
        st.builds(lambda b: V2_SIGNATURE + b, st.binary(max_size=300)),
        st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
        st.builds(lambda t: ("PROXY " + t).encode(), st.text(
            alphabet="TCP46UNKOW0123456789abcdef.: \r\n", max_size=110)),
    ))
    def test_never_raises_anything_else_and_never_takes_more_than_given(self, raw: bytes
                                                                        ) -> None:
        try:
            header = parse(raw)
        except ProxyHeaderError:
            return
        if header is not None:
            self.assertLessEqual(header.length, len(raw))
            self.assertGreaterEqual(header.length, 8)
            # What was taken is a header on its own too: nothing after it was needed.
            self.assertEqual(parse(raw[: header.length]), header)
