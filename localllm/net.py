"""Network addresses as flags spell them: the one ``HOST:PORT`` parser and loopback check.

``--rpc`` endpoints, rpc-server's and serve's ``--host`` all go through here, so a host that
one command calls loopback every command does.
"""

from __future__ import annotations

import ipaddress
import re

from localllm.errors import InvalidArgument

__all__ = ["LOOPBACK_NAMES", "is_loopback", "parse_host_port"]

# The names a loopback server answers to (serve's Host check admits them always).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

# A DNS name (RFC 1123 labels) or a dotted IPv4 address, which the same pattern admits.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name, IPv4 or [IPv6] address) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_host_port(item: str, what: str = "RPC server") -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``, IPv4 or a host name (llama.cpp's RPC client
    splits at the first colon and speaks IPv4 only), each fault named in one line."""
    if item.startswith("[") or item.count(":") > 1:
        raise InvalidArgument(
            f"{what} {item!r}: llama.cpp's RPC client speaks IPv4 only; "
            "use an IPv4 address or a host name"
        )
    host, sep, port = item.partition(":")
    if not sep:
        raise InvalidArgument(f"{what} {item!r} needs a port: HOST:PORT, e.g. {item}:50052")
    if not host:
        raise InvalidArgument(f"{what} {item!r} needs a host: HOST:PORT, e.g. 127.0.0.1{item}")
    if not _HOSTNAME.match(host):
        raise InvalidArgument(f"{what} {item!r}: {host!r} is not an IPv4 address or host name")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} {item!r}: port {port!r} must be a number 1-65535")
    return host, int(port)
