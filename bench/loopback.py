"""Loopback ports for the harnesses: the one `free_port` of bench/ and tests/.

Shared kit (no jobwatch layer: bench and test code only). Importable by name from
bench scripts (their own folder is on sys.path) and from tests (pyproject's pytest
`pythonpath`).
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
