"""What stands between the network and the endpoints: Host check, concurrency limit, read timeouts.

    hosts = HostCheck("127.0.0.1", ["chat.example.com"])    # --host, --allowed-hosts
    hosts.allows("127.0.0.1:8000"), hosts.allows("evil.test")   # True, False
    config = uvicorn.Config(app, http=head_timeout_protocol(10.0))

DNS rebinding: a page on evil.test re-points its name at 127.0.0.1, and the browser then sends it
requests to this server as same-origin, with `Host: evil.test`. The one thing it cannot forge is
that Host header, so every request must name this server: the address it is bound to, a loopback
name when bound to loopback, any IP literal when bound to all interfaces (a literal cannot be
re-pointed), or a name in --allowed-hosts ('*.example.com' for subdomains, '*' for any host).
Other requests get 421 Misdirected Request.

Slow clients: uvicorn times out idle keep-alive connections, but not a client that sends its request
head a byte at a time; `head_timeout_protocol` closes a connection whose request line and headers
are not complete within the timeout. The body has its own deadline in app.read_json, and
`Guard` answers 503 beyond --max-concurrency requests in flight (/health and /metrics exempt).
Both answers have OpenAI's error shape.
"""

from __future__ import annotations

import ipaddress
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
EXEMPT = ("/health", "/metrics")     # probes must answer even when the server is full


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def split_host(header: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:8000' -> '::1' (no port, lower case, no final dot)."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else ""
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


class HostCheck:
    def __init__(self, bound: str, allowed: list[str] | None = None):
        self.any = "*" in (allowed or [])
        names = {split_host(a) for a in allowed or [] if not a.startswith("*.")}
        self.suffixes = tuple(a[1:].lower() for a in allowed or [] if a.startswith("*."))
        ip = _ip(bound)
        self.any_ip = ip is not None and ip.is_unspecified          # bound to 0.0.0.0 or ::
        self.names = names | {split_host(bound)} | set(LOOPBACK_NAMES if ip is None or ip.is_loopback
                                                        or ip.is_unspecified else ())

    def allows(self, header: str | None) -> bool:
        if header is None or self.any:     # HTTP/1.0 without Host: no browser sends that
            return True
        name = split_host(header)
        if name in self.names or (self.suffixes and name.endswith(self.suffixes)):
            return True
        if name.endswith(".localhost"):     # browsers resolve *.localhost to loopback themselves
            return "localhost" in self.names
        ip = _ip(name)
        return ip is not None and (self.any_ip or (ip.is_loopback and "localhost" in self.names))


def head_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request head takes longer than `seconds`."""

    class HeadTimeout(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._head_timer = self.loop.call_later(seconds, self._expired, self.cycle)

        def _expired(self, cycle):
            if self.cycle is cycle and not self.transport.is_closing():   # no new request head since armed
                self.transport.close()

        def on_response_complete(self):
            before = self.cycle
            super().on_response_complete()
            if self.cycle is before and not self.transport.is_closing():  # waiting for the next head
                self._head_timer.cancel()
                self._arm()

        def connection_lost(self, exc):
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadTimeout


class Guard:
    """ASGI middleware: 421 for a Host that is not this server, 503 beyond `max_concurrency` requests."""

    def __init__(self, app, hosts: HostCheck, max_concurrency: int | None = None):
        self.app, self.hosts, self.max_concurrency = app, hosts, max_concurrency
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        if not self.hosts.allows(host):
            return await _error(send, ApiError(421, f"this server does not answer to Host {str(host)[:100]!r} "
                                                    "(see --allowed-hosts)", code="invalid_host"))
        counted = self.max_concurrency is not None and scope.get("path") not in EXEMPT
        if counted and self.in_flight >= self.max_concurrency:
            return await _error(send, ApiError(503, f"the server is handling {self.in_flight} requests, its limit "
                                                    "(--max-concurrency); retry later", code="overloaded"))
        self.in_flight += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= counted


async def _error(send, e: ApiError):
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.status in (429, 503):
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
