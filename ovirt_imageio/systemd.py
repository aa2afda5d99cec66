"""Readiness notification for systemd's Type=notify services."""

import os
import socket


def notify(state):
    """Send state (e.g. "READY=1") to $NOTIFY_SOCKET; no-op without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode("utf-8"))
    return True
