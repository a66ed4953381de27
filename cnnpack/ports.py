"""The ports a local Triton server listens on: free ones found, asked-for ones checked, and where a client on this
machine reaches the address the server binds to. `cnnpack serve`, `cnnpack deploy` and the tests share them."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from cnnpack.errors import UserInputError


@dataclass
class Ports:
    http: int
    grpc: int
    metrics: int


def bind_address(host: str) -> str:
    """The IPv4 address the local Triton server is to bind for `--host` (a name resolved): its 2.51 binds nothing
    else as asked (`localhost` bound HTTP to 255.255.255.255, `::1` failed as "already in use")."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return host
    except OSError:
        pass
    if ":" in host:
        raise UserInputError(f"--host {host}: the local Triton server binds IPv4 addresses only; use 127.0.0.1 "
                             "(this machine) or 0.0.0.0 (every interface)")
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except (socket.gaierror, IndexError) as e:
        raise UserInputError(f"cannot listen on {host}: {getattr(e, 'strerror', None) or e}; check --host") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: a port in TIME_WAIT is free
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def free_ports(host: str, n: int) -> list[int]:
    """`n` distinct ports the OS says are free on `host` now."""
    socks = []
    try:
        for _ in range(n):
            socks.append(_bind(host, 0))
    except OSError as e:  # an address that does not resolve (gaierror) or is not this machine's
        for sock in socks:
            sock.close()
        raise UserInputError(f"cannot listen on {host}: {e.strerror or e}; check --host") from None
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_port(host: str, port: int, what: str) -> None:
    try:
        _bind(host, port).close()
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserInputError(f"{what} port {port} on {host} is already in use (another Triton server?); "
                                 f"stop that process or choose another --{what}-port (0: any free port)") from None
        raise UserInputError(f"cannot listen on {host}:{port} for {what}: {e.strerror}; check --host") from None


def url_host(host: str) -> str:
    """Where a local client reaches a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
