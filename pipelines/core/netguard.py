"""The SSRF guard: where a webhook may be delivered, and which hosts an HTTP source may be led to.

A URL must be http(s), and every address its host resolves to must be public, unless the operator
allows private addresses. The delivery then connects to the very address that was checked (no second
lookup), so a DNS answer that changes between check and connect cannot slip past.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from pipelines.core.errors import Invalid

log = logging.getLogger(__name__)

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_EXTRA = [ipaddress.ip_network(n) for n in ("0.0.0.0/8", "192.0.0.0/24", "198.18.0.0/15", "64:ff9b::/96",
                                            "64:ff9b:1::/48", "2001::/23", "fc00::/7", "fec0::/10")]


class UnsafeUrl(Invalid):
    """The URL may not receive webhooks."""


def blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and blocked(embedded):
            return True
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address in _CGNAT
        or any(address in network for network in _EXTRA if network.version == address.version)
    )


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of URL, or UnsafeUrl if it is not a plain http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UnsafeUrl("the URL must not carry credentials")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve(url: str, allow_private: bool) -> str:
    """The address to connect to for URL, checked; UnsafeUrl if any answer is not allowed."""
    _scheme, host, port = parse(url)
    # One answer for a name that does not resolve and for one that resolves to a private address: two
    # would let a caller probe which internal names exist. The server's log says which it was.
    unusable = UnsafeUrl(f"{host} cannot receive webhooks: it does not resolve to a public address (set "
                         "INGOT_WEBHOOK_ALLOW_PRIVATE=true to allow private ones)")
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        log.info("webhook host %s does not resolve: %s", host, exc.strerror)
        raise unusable from None
    addresses = [ipaddress.ip_address(str(a[4][0]).split("%")[0]) for a in answers]
    if not allow_private and any(blocked(a) for a in addresses):
        log.info("webhook host %s resolves to a private or reserved address", host)
        raise unusable
    return str(addresses[0])
