"""Ports for the tests that start servers of their own (a Ray head, HAProxy's stats page, a dead address)."""

import socket


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
