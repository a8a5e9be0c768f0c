"""Time the worker's per-call Python path in-process (no network): a developer tool.

Builds the same stack as a real worker (Dispatcher + DispatcherV4 + the policy
engine + the LoadModule guard) over a throwaway SoftHSM2 token, then feeds a
Connection pre-encoded call records through an in-memory stream and reports
microseconds per call.  Profile with ``--profile``.

    .venv/bin/python tools/hotpath.py [--calls N] [--op sessioninfo|random] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from p11guard.wire import rpc  # noqa: E402
from p11guard.wire.codec import CODECS_BY_VERSION  # noqa: E402
from p11guard.wire.procedures import PROGRAM  # noqa: E402

CHUNK = 2000


class ScriptedStream:
    """recv_into hands out one scripted record per call; replies are kept or counted."""

    def __init__(self, records: list[bytes], repeat: bytes, count: int) -> None:
        self.records = list(records)
        self.repeat = repeat
        self.count = count
        self.replies: list[bytes] = []
        self.sent = 0
        self.marks: list[float] = []  # CPU time every CHUNK calls

    def recv_into(self, buf: bytearray) -> int:
        if self.records:
            data = self.records.pop(0)
        elif self.count > 0:
            if self.count % CHUNK == 0:
                self.marks.append(time.process_time())
            self.count -= 1
            data = self.repeat
        else:
            return 0
        buf[: len(data)] = data
        return len(data)

    def recv(self, n: int) -> bytes:
        raise AssertionError("recv_into expected")

    def sendall(self, data: bytes | bytearray) -> None:
        self.sent += 1
        if len(self.replies) < 16:
            self.replies.append(bytes(data))

    def shutdown(self, how: int) -> None:
        pass


def record(version: int, xid: int, name: str, *args: Any) -> bytes:
    codec = next(c for c in CODECS_BY_VERSION[version].values() if c.procedure.name == name)
    body = codec.args.encode(args)
    return rpc.frame(rpc.call(xid, PROGRAM, version, codec.procedure.number, body))


def first_slot(env: dict[str, str], module: str) -> int:
    out = subprocess.run(["pkcs11-tool", "--module", module, "-L"], env=env,
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Slot ") and "(0x" in line:
            return int(line.split("(0x")[1].split(")")[0], 16)
    raise SystemExit("no slot")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--op", default="sessioninfo", choices=("sessioninfo", "random"))
    ap.add_argument("--version", type=int, default=4, choices=(3, 4))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from tests.support.softhsm import make_token

    work = Path(tempfile.mkdtemp(prefix="hotpath-"))
    token = make_token(work / "token")
    import os
    os.environ.update(token.env)
    slot = first_slot(token.env, token.module)

    from p11guard.pkcs11.binding import Module
    from p11guard.policy.engine import EngineContext, wrap_module
    from p11guard.policy.readers.filterconf import parse_filter_conf
    from p11guard.server.dispatch import Dispatcher
    from p11guard.server.dispatch_v4 import DispatcherV4
    from p11guard.server.worker import Connection, Handler, WorkerSettings
    from p11guard.wire.codec import Limits

    limits = Limits()
    policy = parse_filter_conf(
        f'modules = [("softhsm", "{token.module}")]\n').policy
    dispatcher = Dispatcher(
        {"softhsm": token.module}, Module, limits,
        wrap_backend=lambda m, alias: wrap_module(m, policy, alias, EngineContext(
            peer="bench", pid=os.getpid())))
    handlers: dict[int, Handler] = {3: dispatcher.handle, 4: DispatcherV4(dispatcher).handle}
    v = args.version
    init_args: tuple[Any, ...] = (0,) if v == 4 else ()
    setup = [
        record(v, 1, "SetupArch", 1),
        record(v, 2, "LoadModule", b"softhsm"),
        record(v, 3, "Initialize", *init_args),
        record(v, 4, "OpenSession", slot, 0x6),
    ]
    # The session handle SoftHSM2 gives the first session is 1.
    repeat = (record(v, 5, "GetSessionInfo", 1) if args.op == "sessioninfo"
              else record(v, 5, "GenerateRandom", 1, 32))
    stream = ScriptedStream(setup, repeat, args.calls)
    conn = Connection(stream, handlers.pop(3), WorkerSettings(limits=limits), handlers)
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    conn.run()
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    dispatcher.close()
    chunks = [b - a for a, b in zip(stream.marks, stream.marks[1:], strict=False)]
    best = min(chunks) / CHUNK * 1e6 if chunks else float("nan")
    print(f"{args.op} v{v}: best {best:.2f} us CPU/call (chunks of {CHUNK}); "
          f"{elapsed / args.calls * 1e6:.2f} us/call wall over {args.calls} calls "
          f"({stream.sent} replies; last reply {stream.replies[-1][4:].hex()[:96]}...)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
