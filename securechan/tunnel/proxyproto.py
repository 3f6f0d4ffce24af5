"""PROXY protocol version 2 headers (the HAProxy spec, section 2.2), written by the server tunnel to its target.

The header tells the target who the real client is: the source and destination of the
securechan connection, followed by a ``PP2_TYPE_SSL`` TLV describing the channel (version,
suite, and the client certificate's common name when the client authenticated). A
connection that did not arrive over TCP/IP (a Unix-socket listener) gets a ``LOCAL``
header, which tells the target to use the connection's own addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_CMD_LOCAL = 0x20
_CMD_PROXY = 0x21
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
_MAX_TLV_VALUE = 0xFFFF


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_TLV_VALUE:
        raise ValueError("PROXY v2 TLV value longer than 65535 bytes")
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(version: str, suite: str, client_cn: str | None) -> bytes:
    """``PP2_TYPE_SSL``: the channel is encrypted; verify=0 (the client certificate, if any, was verified)."""
    flags = PP2_CLIENT_SSL
    subs = _tlv(PP2_SUBTYPE_SSL_VERSION, version.encode()) + _tlv(PP2_SUBTYPE_SSL_CIPHER, suite.encode())
    if client_cn is not None:
        flags |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS
        subs += _tlv(PP2_SUBTYPE_SSL_CN, client_cn.encode()[:1024])
    return _tlv(PP2_TYPE_SSL, struct.pack("!BI", flags, 0) + subs)


def header(source: Any, destination: Any, tlvs: bytes = b"") -> bytes:
    """A v2 header for a connection from ``source`` to ``destination`` (``getpeername``/``getsockname`` values).

    Non-IP endpoints (Unix sockets, or a family mismatch) produce a ``LOCAL`` header.
    """
    src = _ip(source)
    dst = _ip(destination)
    if src is None or dst is None or src[0].version != dst[0].version:
        return SIGNATURE + struct.pack("!BBH", _CMD_LOCAL, _FAM_UNSPEC, len(tlvs)) + tlvs
    (src_ip, src_port), (dst_ip, dst_port) = src, dst
    family = _FAM_TCP4 if src_ip.version == 4 else _FAM_TCP6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port) + tlvs
    return SIGNATURE + struct.pack("!BBH", _CMD_PROXY, family, len(body)) + body


def _ip(sockaddr: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        return None
    try:
        host = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone id
        return ipaddress.ip_address(host), int(sockaddr[1])
    except ValueError:
        return None
