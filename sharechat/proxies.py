"""The client's address, scheme and host, read from X-Forwarded-* when a trusted proxy sent them.

Behind a proxy every connection comes from the proxy, so the client's address
(what the per-address budgets count), the scheme and the public host (what the
welcome text and the origin check name) are in headers the proxy adds. A client
can send those headers too, so they count only from a peer in
`--forwarded-allow-ips`, the flat set of addresses and networks of uvicorn's and
gunicorn's FORWARDED_ALLOW_IPS. One middleware, first in the chain, rewrites
`request.remote`, `request.scheme` and `request.host`; every handler reads those.

aiohttp-remotes 1.4.0 was evaluated and does not fit:
- XForwardedStrict takes one set of proxies per hop and demands exactly that
  many X-Forwarded-For entries, so a client that connects directly (no header)
  or through another number of hops is answered 400 instead of being served
  with its own address; there is no flat set and no `*`;
- XForwardedFiltered never looks at the peer: a client that connects directly
  picks its own address by sending X-Forwarded-For, and when every entry is
  trusted it takes the leftmost one, which the client wrote;
- XForwardedRelaxed believes every peer and counts hops instead of checking
  addresses;
- all three answer 400 to one malformed entry or a repeated header, and take
  X-Forwarded-Host without checking it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

Address = IPv4Address | IPv6Address

SCHEMES = frozenset({"http", "https"})
CLIENT = web.RequestKey("client", str)  # the client's address, when a trusted proxy named it
_PORTED = re.compile(r"\[(?P<ipv6>[^\]]+)\](?::[0-9]+)?|(?P<ipv4>[0-9.]+):[0-9]+")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(
    rf"(?:{_LABEL}(?:\.{_LABEL})*|\[(?P<ipv6>[0-9a-f.]*:[0-9a-f:.]*)\])(?::(?P<port>[0-9]{{1,5}}))?"
)


class TrustedProxies:
    """The peers whose X-Forwarded-* headers we believe: `("*",)` for any, `()` for none."""

    def __init__(self, allow: Iterable[str]) -> None:
        allow = tuple(allow)
        self.anyone = "*" in allow
        self.networks = tuple(ip_network(item, strict=False) for item in allow if item != "*")

    def __bool__(self) -> bool:
        return self.anyone or bool(self.networks)

    def sent(self, peer: str) -> bool:
        """Whether this peer is a proxy whose headers we believe."""
        return self.anyone or self.hop(_address(peer))

    def hop(self, address: Address | None) -> bool:
        """Whether an X-Forwarded-For entry is one of our proxies. With `*` none is: a
        router that accepts everyone (Heroku, Railway) is the only hop we know of."""
        return address is not None and any(address in net for net in self.networks)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The peer, or from a trusted proxy the rightmost X-Forwarded-For entry that is not
    itself a trusted proxy.

    Each proxy appends the address it saw, so entries are believable only from the
    right up to the first one that is not ours; whatever lies to its left, the client
    wrote. A malformed entry ends the walk too: it is never the address, and nothing
    left of it is more believable, so the address is then the nearest hop on its
    right (at worst the proxy's own, which no client can choose). When every entry is
    a trusted proxy, the leftmost is the client, a machine of ours.
    """
    if not forwarded_for or not trusted.sent(peer):
        return peer
    client = peer
    for entry in reversed(_items(forwarded_for)):
        address = _address(entry)
        if address is None:
            break
        client = str(address)
        if not trusted.hop(address):
            break
    return client


def forwarded_proto(values: Sequence[str]) -> str | None:
    """The rightmost X-Forwarded-Proto (our proxy's), if it is http or https."""
    items = _items(values)
    proto = items[-1].lower() if items else None
    return proto if proto in SCHEMES else None


def forwarded_host(values: Sequence[str]) -> str | None:
    """The rightmost X-Forwarded-Host (our proxy's), if it is a plain host[:port]."""
    items = _items(values)
    host = items[-1].lower() if items else ""
    match = _HOST.fullmatch(host) if len(host) <= 255 else None
    if match is None:
        return None
    if match["port"] and not 0 < int(match["port"]) < 1 << 16:
        return None
    if match["ipv6"] and _address(match["ipv6"]) is None:
        return None
    return host


def forwarded_headers(forwarded_allow_ips: Iterable[str]) -> Middleware:
    """The middleware that gives every handler the client's address, scheme and host."""
    trusted = TrustedProxies(forwarded_allow_ips)

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote
        if not trusted or peer is None or not trusted.sent(peer):
            return await handler(request)
        headers = request.headers
        remote = client_address(peer, headers.getall(hdrs.X_FORWARDED_FOR, ()), trusted)
        scheme = forwarded_proto(headers.getall(hdrs.X_FORWARDED_PROTO, ()))
        host = forwarded_host(headers.getall(hdrs.X_FORWARDED_HOST, ()))
        if remote == peer and scheme is None and host is None:
            return await handler(request)
        request[CLIENT] = remote  # for the access log, which sees this request, not the clone
        return await handler(
            request.clone(
                remote=remote, scheme=scheme or request.scheme, host=host or request.host
            )
        )

    return forwarded


def _items(values: Sequence[str]) -> list[str]:
    """A header's list, across repeated headers; empty elements are ignored (RFC 9110, 5.6.1)."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _address(entry: str) -> Address | None:
    """An address, as `1.2.3.4`, `1.2.3.4:port`, `2001:db8::1` or `[2001:db8::1]:port`
    (some proxies add the port); an IPv4-mapped IPv6 address is the IPv4 one."""
    ported = _PORTED.fullmatch(entry)
    host = (ported["ipv6"] or ported["ipv4"]) if ported else entry
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address

