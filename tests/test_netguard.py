"""The SSRF guard, table-driven: which addresses are refused, which URLs are not URLs for us."""

import ipaddress

import pytest

from pipelines.core import netguard


@pytest.mark.parametrize(("address", "refused"), [
    ("127.0.0.1", True),  # loopback
    ("10.1.2.3", True),  # RFC 1918
    ("172.16.0.1", True),
    ("192.168.1.1", True),
    ("169.254.169.254", True),  # link-local: cloud metadata
    ("100.64.0.1", True),  # carrier-grade NAT
    ("0.0.0.0", True),
    ("198.18.0.1", True),  # benchmarking
    ("224.0.0.1", True),  # multicast
    ("::1", True),
    ("fc00::1", True),  # unique local
    ("fec0::1", True),  # site-local (deprecated, still routed inside sites)
    ("fe80::1", True),  # link-local
    ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
    ("2002:7f00:1::", True),  # 6to4 around 127.0.0.1
    ("64:ff9b::a00:1", True),  # NAT64 around 10.0.0.1
    ("93.184.216.34", False),  # public
    ("2606:4700:4700::1111", False),
])
def test_blocked(address, refused):
    assert netguard.blocked(ipaddress.ip_address(address)) is refused


@pytest.mark.parametrize(("url", "expected"), [
    ("http://example.com/hook", ("http", "example.com", 80)),
    ("https://example.com/hook", ("https", "example.com", 443)),
    ("https://example.com:8443/x?y=1", ("https", "example.com", 8443)),
    ("http://[2001:db8::1]:9000/", ("http", "2001:db8::1", 9000)),
])
def test_parse_accepts(url, expected):
    assert netguard.parse(url) == expected


@pytest.mark.parametrize(("url", "reason"), [
    ("ftp://example.com/x", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("http:///path-only", "http:// or https://"),
    ("http://user:pw@example.com/", "credentials"),
    ("http://example.com:99999/", "not a valid URL"),
])
def test_parse_refuses(url, reason):
    with pytest.raises(netguard.UnsafeUrl, match=reason):
        netguard.parse(url)


def test_resolve_refuses_private_answers_unless_allowed():
    with pytest.raises(netguard.UnsafeUrl, match="does not resolve to a public address") as refused:
        netguard.resolve("http://localhost:8080/x", allow_private=False)
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)  # the network is not mapped
    # A name that does not resolve gets the same answer: a caller cannot tell which internal names exist.
    with pytest.raises(netguard.UnsafeUrl) as unknown:
        netguard.resolve("http://no-such-host.invalid:8080/x", allow_private=False)
    assert str(unknown.value).replace("no-such-host.invalid", "localhost") == str(refused.value)
    assert netguard.resolve("http://127.0.0.1:8080/x", allow_private=True) == "127.0.0.1"
