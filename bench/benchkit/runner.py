"""Run p11bench (one process, or N at once) and turn its JSON line into a typed result."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .targets import Target

ALL_OPS = ("random", "sessioninfo", "find", "digest", "ecdsa", "rsa", "aescbc",
           "opensession", "newconn", "connect")
# The list: every op a PKCS#11 application pays a proxy for, plus what a
# short-lived tool pays (newconn).  digest and connect stay available (--ops).
DEFAULT_OPS = ("random", "sessioninfo", "find", "ecdsa", "rsa", "aescbc", "opensession",
               "newconn")
# Ops that Initialize/Finalize or fork per iteration: one thread only.
SINGLE_THREAD_OPS = ("connect", "newconn")


@dataclass(frozen=True)
class Scenario:
    """How much load one measurement puts on a target: N threads in one
    p11bench, or N p11bench processes started together (one thread each)."""

    kind: str  # "threads" | "procs"
    n: int

    @property
    def key(self) -> str:
        return f"{self.kind[0]}{self.n}"

    @property
    def label(self) -> str:
        unit = "thread" if self.kind == "threads" else "process"
        plural = "es" if unit == "process" else "s"
        return f"{self.n} {unit}{plural if self.n != 1 else ''}"

    @classmethod
    def parse(cls, key: str) -> Scenario:
        kinds = {"t": "threads", "p": "procs"}
        if len(key) < 2 or key[0] not in kinds or not key[1:].isdigit() or int(key[1:]) < 1:
            raise ValueError(f"bad scenario {key!r} (t<N> or p<N>)")
        return cls(kinds[key[0]], int(key[1:]))


SINGLE = Scenario("threads", 1)


@dataclass
class RunResult:
    """One measurement: a p11bench process, or N of them summed.

    Either measurements or ``failure`` (the run produced no measurement)."""

    target: str
    op: str
    round: int
    ops_per_s: float = 0.0
    count: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    first_error: str | None = None
    failure: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    scenario: str = SINGLE.key
    procs: int = 1
    failed_procs: int = 0  # processes of a multi-process run that measured nothing

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class RunSettings:
    p11bench: Path
    token_label: str
    pin: str
    seconds: float
    warmup: float
    threads: int  # of the main table (its scenario is t<threads>)
    setup_lock: Path | None = None  # for processes started together (see p11bench.c)


def parse_line(line: str, result: RunResult) -> None:
    """Fill ``result`` from p11bench's JSON result line (raises on garbage)."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    result.raw = data
    if "error" in data:
        result.failure = str(data["error"])
        return
    result.ops_per_s = float(data["ops_per_s"])
    result.count = int(data["count"])
    result.errors = int(data["errors"])
    result.elapsed_s = float(data["elapsed_s"])
    latency = data.get("latency_us", {})
    result.p50_us = float(latency.get("p50", 0.0))
    result.p99_us = float(latency.get("p99", 0.0))
    if data.get("first_error") is not None:
        result.first_error = str(data["first_error"])
    if result.count == 0:
        result.failure = f"no successful operation (first error {result.first_error})"


def command(settings: RunSettings, target: Target, op: str, *, threads: int,
            iterations: int | None = None, warmup: float | None = None,
            sync: bool = False) -> list[str]:
    """The p11bench command line for (target, op)."""
    cmd = [str(settings.p11bench)]
    if target.is_echo:
        cmd += ["--op", "echo", "--echo", target.transport or "tcp"]
    else:
        cmd += ["--module", target.module, "--token-label", settings.token_label,
                "--pin", settings.pin, "--op", op]
    cmd += ["--warmup", str(settings.warmup if warmup is None else warmup),
            "--threads", str(1 if op in SINGLE_THREAD_OPS else threads)]
    cmd += ["--iterations", str(iterations)] if iterations else ["--seconds", str(settings.seconds)]
    if sync:
        cmd.append("--sync")
    if settings.setup_lock is not None and not target.is_echo:
        cmd += ["--setup-lock", str(settings.setup_lock)]
    return cmd


def _timeout(settings: RunSettings) -> float:
    # Generous: key generation through a proxy and a slow start must not be cut short.
    return settings.seconds + settings.warmup + 60.0


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group only
    proc.communicate()


def _finish(result: RunResult, out: bytes, err: bytes, returncode: int | None) -> RunResult:
    lines = [ln for ln in out.decode(errors="replace").strip().splitlines()
             if '"ready"' not in ln]
    if not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        result.failure = f"exit status {returncode}, no output {tail[0]}".strip()
        return result
    try:
        parse_line(lines[-1], result)
    except (ValueError, KeyError, TypeError) as exc:
        result.failure = f"unreadable output ({exc}): {lines[-1][:120]}"
    return result


def run_once(settings: RunSettings, target: Target, op: str, round_no: int,
             *, iterations: int | None = None, warmup: float | None = None,
             scenario: Scenario = SINGLE) -> RunResult:
    """Run p11bench for (target, op) with ``scenario.n`` threads; never raises for
    a failing run."""
    threads = scenario.n if scenario.kind == "threads" else 1
    result = RunResult(target.name, op, round_no, scenario=scenario.key)
    cmd = command(settings, target, op, threads=threads, iterations=iterations, warmup=warmup)
    timeout = _timeout(settings)
    proc = subprocess.Popen(cmd, env=target.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        result.failure = f"timed out after {timeout:.0f}s"
        return result
    return _finish(result, out, err, proc.returncode)


class SyncedProcess:
    """A p11bench started with --sync: wait for its ready line, then release it."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        # Closed by collect() or kill(); a file, not a pipe, so that nothing blocks
        # on a full stderr pipe while we wait for other processes.
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr,
                                     start_new_session=True)
        self.out = b""
        self.ready = False
        self.eof = False

    def feed(self) -> None:
        """Read what its stdout has (the selector said it is readable)."""
        assert self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            self.eof = True
        self.out += chunk
        self.ready = self.ready or b'"ready"' in self.out

    def go(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(b"\n")
            self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not flush it again

    def collect(self, result: RunResult, timeout: float) -> RunResult:
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            result.failure = f"timed out after {timeout:.0f}s"
            return result
        finally:
            self.stderr.seek(0)
            err = self.stderr.read()
            self.stderr.close()
        return _finish(result, self.out + rest, err, self.proc.returncode)

    def kill(self) -> None:
        _kill(self.proc)
        self.stderr.close()


def wait_ready(procs: list[SyncedProcess], timeout: float) -> None:
    """Until every process has printed its ready line or ended (or the timeout)."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        for p in procs:
            assert p.proc.stdout is not None
            sel.register(p.proc.stdout, selectors.EVENT_READ, p)
        while any(not (p.ready or p.eof) for p in procs):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for key, _ in sel.select(left):
                p = key.data
                p.feed()
                if p.ready or p.eof:
                    sel.unregister(key.fileobj)


def aggregate(target: str, op: str, round_no: int, scenario: Scenario,
              parts: list[RunResult]) -> RunResult:
    """N concurrent processes as one result: ops/s and counts summed, the median
    of their p50s, and a failure only when no process measured anything."""
    result = RunResult(target, op, round_no, scenario=scenario.key, procs=len(parts))
    ok = [r for r in parts if r.ok]
    result.failed_procs = len(parts) - len(ok)
    result.raw = {"processes": [r.raw for r in parts]}
    failures = [r.failure for r in parts if r.failure]
    if not ok:
        result.failure = f"all {len(parts)} processes failed, first: {failures[0]}"
        return result
    result.ops_per_s = sum(r.ops_per_s for r in ok)
    result.count = sum(r.count for r in ok)
    result.errors = sum(r.errors for r in ok)
    result.elapsed_s = max(r.elapsed_s for r in ok)
    result.p50_us = statistics.median(r.p50_us for r in ok)
    result.p99_us = max(r.p99_us for r in ok)
    errors = [r.first_error for r in ok if r.first_error]
    if failures:
        result.first_error = f"{len(failures)} process(es) failed, first: {failures[0]}"
    elif errors:
        result.first_error = errors[0]
    return result


def run_procs(settings: RunSettings, target: Target, op: str, round_no: int,
              scenario: Scenario) -> RunResult:
    """``scenario.n`` single-thread p11bench processes measuring at the same time.

    Each sets up (connects, logs in, makes its key) and warms up, then waits; when
    all are ready they are released together, so their measured windows overlap.
    """
    cmd = command(settings, target, op, threads=1, sync=True)
    procs: list[SyncedProcess] = []
    try:
        for _ in range(scenario.n):
            procs.append(SyncedProcess(cmd, target.env))
        wait_ready(procs, _timeout(settings) + 0.5 * scenario.n)
        for p in procs:
            p.go()
        parts = [p.collect(RunResult(target.name, op, round_no), _timeout(settings))
                 for p in procs]
    except BaseException:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        raise
    return aggregate(target.name, op, round_no, scenario, parts)


def run(settings: RunSettings, target: Target, op: str, round_no: int,
        scenario: Scenario = SINGLE) -> RunResult:
    """One measurement of (target, op) under ``scenario``."""
    if scenario.kind == "procs":
        return run_procs(settings, target, op, round_no, scenario)
    return run_once(settings, target, op, round_no, scenario=scenario)
