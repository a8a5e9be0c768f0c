#!/usr/bin/env python3
"""Compare PKCS#11 latency/throughput: SoftHSM2 direct, p11guard and Caml Crush.

Creates a throwaway SoftHSM2 token, starts the servers on loopback or Unix
sockets, and runs p11bench for every (op, target) in interleaved rounds
(A B C D, A B C D, ...) so that machine drift hits every target alike; the
table reports medians over rounds.  See docs/benchmarks.md.

    python3 bench/run.py             # full run, about 5 minutes
    python3 bench/run.py --quick     # about 1 minute
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from benchkit import report
from benchkit.runner import ALL_OPS, RunResult, RunSettings, run_once
from benchkit.softhsm import make_token
from benchkit.targets import (
    ALL_TARGETS,
    DEFAULT_TARGETS,
    LETTERS,
    POLICY_SUFFIX,
    POLICY_TWINS,
    Setup,
    Target,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _csv(value: str, allowed: tuple[str, ...], aliases: dict[str, str]) -> list[str]:
    out: list[str] = []
    for item in (v.strip() for v in value.split(",") if v.strip()):
        name = aliases.get(item.upper(), item.lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"{item!r}: choose from {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ops", type=lambda v: _csv(v, ALL_OPS, {}), default=list(ALL_OPS),
                   help=f"comma-separated, default all: {','.join(ALL_OPS)}")
    p.add_argument("--targets", default=list(DEFAULT_TARGETS),
                   type=lambda v: _csv(v, ALL_TARGETS, {v: k for k, v in LETTERS.items()}),
                   help="comma-separated names or letters (A=direct, B=p11guard, "
                        "C=camlcrush, D=native; E, F, G = B, C, D with patchset 1: "
                        "p11guard+ps1, camlcrush+ps1, native+ps1); default A-D")
    p.add_argument("--patchset1", action="store_true",
                   help="also run every selected proxy target (B, C, D) with Caml Crush's "
                        "patchset 1 in its filter.conf (E, F, G), interleaved, and report "
                        "the ratio to pass-through")
    p.add_argument("--policy", type=Path,
                   help="filter.conf lines for the E, F, G servers instead of "
                        "bench/benchkit/patchset1.conf")
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per run (default 0.3)")
    p.add_argument("--threads", type=int, default=1, help="p11bench threads (connect: 1)")
    p.add_argument("--quick", action="store_true",
                   help="short runs and 2 rounds (about 1 minute)")
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    p.add_argument("--out", type=Path, default=BENCH / "results",
                   help="where <timestamp>.md and .json go (default bench/results)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--p11bench", type=Path, default=BENCH / "p11bench")
    args = p.parse_args(argv)
    if args.patchset1:
        with_twins: list[str] = []
        for name in args.targets:
            twin = name + POLICY_SUFFIX
            with_twins += [name] + ([twin] if twin in POLICY_TWINS else [])
        args.targets = list(dict.fromkeys(with_twins))
    if args.policy is not None and not args.policy.is_file():
        p.error(f"--policy {args.policy}: no such file")
    quick = args.quick
    if args.seconds is None:
        args.seconds = 0.5 if quick else 2.0
    if args.rounds is None:
        args.rounds = 2 if quick else 3
    if args.warmup is None:
        args.warmup = 0.1 if quick else 0.3
    if args.seconds <= 0 or args.rounds < 1 or args.warmup < 0 or not 1 <= args.threads <= 256:
        p.error("need --seconds > 0, --rounds >= 1, --warmup >= 0, 1 <= --threads <= 256")
    return args


def ensure_p11bench(path: Path) -> None:
    """Build bench/p11bench when missing or older than its source."""
    source = BENCH / "p11bench.c"
    if path != BENCH / "p11bench":
        if not os.access(path, os.X_OK):
            raise SystemExit(f"{path}: not an executable")
        return
    if path.exists() and path.stat().st_mtime >= source.stat().st_mtime:
        return
    log("building p11bench (make -C bench)")
    try:
        subprocess.run(["make", "-C", str(BENCH), "p11bench"], check=True,
                       stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot build p11bench: {exc}") from None


def _cmd_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _cmd_output(["git", "rev-parse", "--short", "HEAD"]),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "softhsm": _cmd_output(["softhsm2-util", "--version"]),
        "caml_crush": _cmd_output(["dpkg-query", "-W", "-f", "${Version}",
                                   "caml-crush-server"]),
        "transport": args.transport,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "policy": str(args.policy) if args.policy else "patchset1.conf",
    }


def probe(settings: RunSettings, target: Target) -> None:
    """One cheap call chain end to end; a target that fails it is marked unavailable."""
    if target.unavailable:
        return
    result = run_once(settings, target, "random", 0, iterations=1, warmup=0.0)
    if not result.ok:
        target.unavailable = f"probe failed: {result.failure}"


def measure(settings: RunSettings, targets: list[Target], ops: list[str],
            rounds: int) -> list[RunResult]:
    live = [t for t in targets if not t.unavailable]
    results: list[RunResult] = []
    total = rounds * len(ops) * len(live)
    started = time.monotonic()
    for r in range(1, rounds + 1):
        for op in ops:
            for target in live:  # A B C D within each (round, op): drift cancels out
                result = run_once(settings, target, op, r)
                results.append(result)
                what = (f"{result.ops_per_s:,.0f} ops/s" if result.ok
                        else f"FAILED: {result.failure}")
                log(f"[{len(results)}/{total} {time.monotonic() - started:.0f}s] "
                    f"round {r} {op:<11} {target.letter} {target.name:<9} {what}")
    return results


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally that stops the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    ensure_p11bench(args.p11bench)
    meta = environment(args)
    workdir = Path(tempfile.mkdtemp(prefix="p11bench-"))
    setup: Setup | None = None
    try:
        token = make_token(workdir / "softhsm")
        policy = args.policy.read_text() if args.policy else ""
        setup = Setup(REPO, workdir, token, unix=args.transport == "unix", log=log,
                      policy=policy)
        targets = [setup.build(name) for name in args.targets]
        settings = RunSettings(args.p11bench, token.label, token.pin, args.seconds,
                               args.warmup, args.threads)
        for target in targets:
            probe(settings, target)
            state = f"unavailable: {target.unavailable}" if target.unavailable else target.module
            log(f"target {target.letter} {target.name}: {state}")
        results = measure(settings, targets, args.ops, args.rounds)
        for name, server in setup.servers.items():
            if not server.alive():
                log(f"warning: {name} server died during the run: {server.log_tail(2)}")
    finally:
        if setup is not None:
            setup.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    cells = {(op, t.name): report.summarize(results, op, t.name)
             for op in args.ops for t in targets}
    header = [
        f"# p11guard benchmark {meta['date']}",
        "",
        f"commit {meta['commit']}, {meta['cpu']} ({meta['cpus']} CPUs), kernel "
        f"{meta['kernel']}, SoftHSM {meta['softhsm']}, Caml Crush {meta['caml_crush']}.",
        f"Transport {meta['transport']}, {meta['threads']} thread(s), {meta['seconds']} s "
        f"measured after {meta['warmup']} s warm-up per run, median of {meta['rounds']} "
        "interleaved round(s).",
    ]
    table = report.markdown(args.ops, targets, cells, header)
    print(table)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        md_path = args.out / f"{stamp}.md"
        md_path.write_text(table)
        data = report.record(meta | {"argv": sys.argv[1:]}, targets, args.ops, results, cells)
        (args.out / f"{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {md_path} and {md_path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
