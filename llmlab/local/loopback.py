"""Whether a host name (as in a URL or a `Host` header) is this machine's loopback; binding a server's port.

>>> is_loopback("127.0.0.1:8000")
True
"""

from __future__ import annotations

import ipaddress
import socket


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


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A socket bound to `host`:`port` (0 = a free port); OSError (EADDRINUSE) when the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
