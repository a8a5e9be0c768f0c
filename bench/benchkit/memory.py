"""Memory of a proxy server with one idle client: listener RSS, worker RSS and USS.

The client is a real p11bench through the target's client library, started with
--sync: it connects, initialises, opens a session, logs in and warms up, then
waits, so its server worker is idle and has done everything an idle worker has.
The worker is found by its socket, not by guessing from the process tree (a
server may keep spare workers): the server-side end of the established
connection on the server's address, and the descendant of the server process
that holds it.

USS (unique set size) is what the worker costs on its own: Private_Clean +
Private_Dirty from /proc/PID/smaps_rollup.  RSS also counts the pages it shares
with the listener (copy-on-write after fork) and with every other process
(libraries).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .runner import RunResult, RunSettings, SyncedProcess, command, wait_ready
from .targets import Target

PROC = Path("/proc")
SETTLE_S = 0.3  # after the client is ready: let the server finish its own bookkeeping
TCP_ESTABLISHED = "01"
UNIX_CONNECTED = "03"


@dataclass
class MemoryRow:
    """One server with one idle client; sizes in KiB, None when not found."""

    target: str  # the client's target name (which server and client library)
    listener_pid: int
    listener_rss_kb: int | None = None
    worker_pid: int | None = None
    worker_rss_kb: int | None = None
    worker_uss_kb: int | None = None
    processes: int = 0  # the server's processes, listener included, with the client on
    note: str | None = None


def smaps_rollup(pid: int, proc: Path = PROC) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup (empty when unreadable)."""
    out: dict[str, int] = {}
    try:
        text = (proc / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
            out[parts[0][:-1]] = int(parts[1])
    return out


def uss_kb(rollup: dict[str, int]) -> int | None:
    if "Private_Clean" not in rollup or "Private_Dirty" not in rollup:
        return None
    return rollup["Private_Clean"] + rollup["Private_Dirty"]


def _ppid(stat: str) -> int:
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(root: int, proc: Path = PROC) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = _ppid((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tcp_server_inodes(port: int, table: str) -> set[int]:
    """Inodes of established sockets whose local port is ``port`` (/proc/net/tcp text)."""
    inodes: set[int] = set()
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or f[3] != TCP_ESTABLISHED:
            continue
        if int(f[1].rsplit(":", 1)[1], 16) == port and f[9] != "0":
            inodes.add(int(f[9]))
    return inodes


def unix_server_inodes(path: str, table: str) -> set[int]:
    """Inodes of connected sockets bound to ``path`` (/proc/net/unix text): the
    accepted ends carry the listening socket's path, the clients' ends none."""
    inodes: set[int] = set()
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7] == path and f[5] == UNIX_CONNECTED:
            inodes.add(int(f[6]))
    return inodes


def server_inodes(address: str, proc: Path = PROC) -> set[int]:
    if address.startswith("/"):
        return unix_server_inodes(address, (proc / "net" / "unix").read_text())
    port = int(address.rsplit(":", 1)[1])
    return tcp_server_inodes(port, (proc / "net" / "tcp").read_text())


def socket_holders(pids: Iterable[int], inodes: set[int], proc: Path = PROC) -> list[int]:
    """The processes among ``pids`` with an open descriptor on one of ``inodes``."""
    wanted = {f"socket:[{i}]" for i in inodes}
    holders = []
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(fd_dir / fd) in wanted:
                        holders.append(pid)
                        break
    return holders


def inspect(listener: int, address: str, proc: Path = PROC) -> MemoryRow:
    """Measure the server rooted at ``listener`` whose one client is connected now."""
    row = MemoryRow("", listener)
    row.listener_rss_kb = smaps_rollup(listener, proc).get("Rss")
    tree = descendants(listener, proc)
    row.processes = len(tree)
    holders = [p for p in socket_holders(tree, server_inodes(address, proc), proc)
               if p != listener]
    if not holders:
        row.note = f"no server process holds the client's connection on {address}"
        return row
    # A worker may hand the socket to a child (p11-kit execs p11-kit-remote): the
    # deepest holder is the one doing the work.
    row.worker_pid = max(holders, key=lambda p: len(_ancestry(p, listener, proc)))
    rollup = smaps_rollup(row.worker_pid, proc)
    row.worker_rss_kb = rollup.get("Rss")
    row.worker_uss_kb = uss_kb(rollup)
    if len(holders) > 1:
        row.note = f"{len(holders)} processes hold the connection; the deepest is shown"
    return row


def _ancestry(pid: int, root: int, proc: Path) -> list[int]:
    chain = [pid]
    while pid not in (root, 0, 1):
        try:
            pid = _ppid((proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            break
        chain.append(pid)
    return chain


def measure(settings: RunSettings, target: Target, listener: int, address: str) -> MemoryRow:
    """Connect one idle client of ``target`` and measure its server."""
    cmd = command(settings, target, "sessioninfo", threads=1, iterations=1, warmup=0.2,
                  sync=True)
    client = SyncedProcess(cmd, target.env)
    try:
        wait_ready([client], settings.warmup + 60.0)
        if not client.ready:
            client.kill()
            return MemoryRow(target.name, listener, note="the idle client never got ready")
        time.sleep(SETTLE_S)
        row = inspect(listener, address)
        row.target = target.name
    except BaseException:
        client.kill()
        raise
    client.go()
    result = client.collect(RunResult(target.name, "sessioninfo", 0), 30.0)
    if not result.ok and row.note is None:
        row.note = f"the idle client failed afterwards: {result.failure}"
    return row
