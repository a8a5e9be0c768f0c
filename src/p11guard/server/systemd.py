"""systemd integration without a dependency: socket activation and sd_notify.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as file
descriptors 3, 4, ... and sets ``LISTEN_PID`` to our pid and ``LISTEN_FDS`` to
their count.  Readiness (sd_notify(3)): a datagram ``READY=1`` to the Unix
socket named by ``NOTIFY_SOCKET`` (a leading ``@`` means the abstract
namespace).  Both are no-ops when the variables are absent, so
``p11guard serve`` runs the same with or without systemd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("p11guard.systemd")

SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64  # far more than any sensible unit passes


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed us (none without socket activation).

    The variables are removed from the environment either way so that nothing we
    start later takes the sockets for its own.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", None)
    count_text = env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid_text is None or count_text is None:
        return []
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        log.info("LISTEN_PID=%s is not this process: socket activation ignored", pid_text)
        return []
    if not count_text.isdigit() or not 0 < int(count_text) <= MAX_LISTEN_FDS:
        log.warning("LISTEN_FDS=%r is not a sensible count: socket activation ignored",
                    count_text)
        return []
    out = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count_text)):
        try:
            sock = socket.socket(fileno=fd)  # family and type read from the descriptor
        except OSError as exc:
            log.warning("LISTEN_FDS: descriptor %d is not a socket (%s)", fd, exc)
            continue
        if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            log.warning("LISTEN_FDS: descriptor %d is not a TCP or Unix stream socket "
                        "(ignored)", fd)
            sock.detach()
            continue
        os.set_inheritable(fd, False)
        out.append(sock)
    return out


class Notifier:
    """sd_notify: connected once (before the privilege drop), used afterwards."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        self.sock: socket.socket | None = None
        address = env.pop("NOTIFY_SOCKET", None)
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket path: not notifying", address)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as exc:
            log.warning("cannot reach the service manager at NOTIFY_SOCKET: %s", exc)
            sock.close()
            return
        self.sock = sock

    def notify(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.send("\n".join(fields).encode())
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.notify(*fields)

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
