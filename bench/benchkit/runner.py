"""Run p11bench once and turn its JSON line into a typed result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .targets import Target

ALL_OPS = ("random", "sessioninfo", "find", "digest", "ecdsa", "rsa", "aescbc",
           "opensession", "connect")


@dataclass
class RunResult:
    """One p11bench process: either measurements or an error message."""

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
    failure: str | None = None  # the run produced no measurement
    raw: dict[str, Any] = field(default_factory=dict)

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
    threads: int


def _parse(line: str, result: RunResult) -> None:
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


def run_once(settings: RunSettings, target: Target, op: str, round_no: int,
             *, iterations: int | None = None, warmup: float | None = None) -> RunResult:
    """Run p11bench for (target, op); never raises for a failing run."""
    result = RunResult(target.name, op, round_no)
    cmd = [str(settings.p11bench), "--module", target.module,
           "--token-label", settings.token_label, "--pin", settings.pin, "--op", op,
           "--warmup", str(settings.warmup if warmup is None else warmup),
           "--threads", str(1 if op == "connect" else settings.threads)]
    cmd += ["--iterations", str(iterations)] if iterations else ["--seconds", str(settings.seconds)]
    # Generous: key generation through a proxy and a slow start must not be cut short.
    timeout = settings.seconds + settings.warmup + 60.0
    proc = subprocess.Popen(cmd, env=target.env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's group only
        proc.communicate()
        result.failure = f"timed out after {timeout:.0f}s"
        return result
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        result.failure = f"exit status {proc.returncode}, no output {tail[0]}".strip()
        return result
    try:
        _parse(lines[-1], result)
    except (ValueError, KeyError, TypeError) as exc:
        result.failure = f"unreadable output ({exc}): {lines[-1][:120]}"
    return result
