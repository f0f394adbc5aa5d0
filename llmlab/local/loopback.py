"""Whether a host name (as in a URL or a `Host` header) is this machine's loopback; binding a server's port.

>>> is_loopback("127.0.0.1:8000")
True
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from urllib.parse import urlsplit


def is_loopback(host: str | None) -> bool:
    """True for a loopback host name, with or without a port: localhost, 127.x.y.z, ::1.

    >>> [is_loopback(h) for h in ("localhost:8000", "127.0.0.1", "[::1]:80", "evil.example", None)]
    [True, True, True, False, False]
    """
    name = (host or "").strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refusal(headers: Mapping[str, str], allow_remote: bool) -> str | None:
    """Why a request with these (lower-case) headers is refused, or None: "host_not_allowed" when its `Host` is
    not a loopback name (DNS rebinding; allowed with `allow_remote`), "origin_not_allowed" when a browser sends
    it from a page whose `Origin` is not loopback (a web page the learner visits).

    >>> refusal({"host": "evil.example"}, False), refusal({"host": "localhost:8", "origin": "http://[::1]:9"}, False)
    ('host_not_allowed', None)
    """
    if not allow_remote and "host" in headers and not is_loopback(headers["host"]):
        return "host_not_allowed"
    if "origin" in headers and not is_loopback(urlsplit(headers["origin"]).hostname):
        return "origin_not_allowed"
    return None


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to `host`:`port` (0 = a free port) and listening; OSError (EADDRINUSE) when the port is
    taken. Listening at once, a client that read the server's record queues in the backlog until the server
    accepts: bound only, its connection was refused until uvicorn began to listen (a CI run met that window)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's own backlog; it listens again on the same socket, which is fine
    except OSError:
        sock.close()
        raise
    return sock
