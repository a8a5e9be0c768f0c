#!/usr/bin/env python3
"""The p11guard benchmark suite: SoftHSM2 direct vs p11guard, Caml Crush and p11-kit.

Creates a throwaway SoftHSM2 token, starts the servers on loopback or Unix
sockets, and runs p11bench for every (op, target) and every load scenario in
interleaved rounds (A B C D ..., A B C D ...) so that machine drift hits every
target alike; the tables report medians over rounds.  Then measures each
server's memory with one idle client, checks the issue's targets against the
same run, and writes <timestamp>.md, .json and .png.  See docs/benchmarks.md.

    python3 bench/run.py             # everything, about 15 minutes on 2 CPUs
    python3 bench/run.py --quick     # about 2-3 minutes
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
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from benchkit import chart, goals, memory, report
from benchkit.runner import (
    ALL_OPS,
    DEFAULT_OPS,
    SINGLE_THREAD_OPS,
    RunResult,
    RunSettings,
    Scenario,
    run,
    run_once,
)
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
DEFAULT_LOAD = "t2,t8,p8,p32"
QUICK_LOAD = "t2,p32"  # --quick: the two scenarios the targets name
# rsa: the token does the work, so this shows whether the proxy lets calls run in
# parallel; sessioninfo: no work at all, so this shows the proxy's own cost per
# call under load.  Every other op lies between the two.
DEFAULT_LOAD_OPS = ("rsa", "sessioninfo")
DEFAULT_LOAD_TARGETS = ("direct", "camlcrush", "native", "native-unix", "p11kit")
QUICK_LOAD_TARGETS = ("direct", "camlcrush", "native")
# The servers whose memory is measured, each through the client that names it.
MEMORY_TARGETS = ("native", "p11guard", "camlcrush", "p11kit")

Job = tuple[str, Target, Scenario]


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


def _targets(value: str) -> list[str]:
    return _csv(value, ALL_TARGETS, {v: k for k, v in LETTERS.items()})


def _scenarios(value: str) -> list[Scenario]:
    if value.strip().lower() == "none":
        return []
    try:
        out = [Scenario.parse(v.strip().lower()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return list(dict.fromkeys(out))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--ops", type=lambda v: _csv(v, ALL_OPS, {}), default=list(DEFAULT_OPS),
                   help=f"comma-separated, from {','.join(ALL_OPS)}; default "
                        f"{','.join(DEFAULT_OPS)}")
    p.add_argument("--targets", type=_targets, default=list(DEFAULT_TARGETS),
                   help="comma-separated names or letters: A=direct, B=p11guard (Caml Crush "
                        "client), C=camlcrush, D=native (TCP), H=native-unix, I=p11kit, "
                        "J=echo-tcp, K=echo-unix; E, F, G = B, C, D with patchset 1 "
                        "(p11guard+ps1, camlcrush+ps1, native+ps1); default A-D,H-K")
    p.add_argument("--patchset1", action="store_true",
                   help="also run every selected proxy target (B, C, D) with Caml Crush's "
                        "patchset 1 in its filter.conf (E, F, G), interleaved, and report "
                        "the ratio to pass-through")
    p.add_argument("--policy", type=Path,
                   help="filter.conf lines for the E, F, G servers instead of "
                        "bench/benchkit/patchset1.conf")
    p.add_argument("--load", type=_scenarios, default=None,
                   help=f"load scenarios: t<N> = N threads in one process, p<N> = N "
                        f"processes at once; 'none' to skip (default {DEFAULT_LOAD}; "
                        f"--quick {QUICK_LOAD})")
    p.add_argument("--load-ops", type=lambda v: _csv(v, ALL_OPS, {}),
                   default=list(DEFAULT_LOAD_OPS),
                   help=f"ops of the load scenarios (default {','.join(DEFAULT_LOAD_OPS)})")
    p.add_argument("--load-targets", type=_targets,
                   help="targets of the load scenarios (default A,C,D,I; --quick A,C,D)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory table")
    p.add_argument("--seconds", type=float, help="measured seconds per run (default 1.2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per run (default 0.2)")
    p.add_argument("--threads", type=int, default=1,
                   help="p11bench threads of the main table (connect, newconn: 1)")
    p.add_argument("--quick", action="store_true",
                   help="short runs, 2 rounds, fewer load targets (about 2-3 minutes)")
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                   help="of the Caml Crush client targets (B, C, E, F); D is always TCP, "
                        "H and I always Unix")
    p.add_argument("--out", type=Path, default=BENCH / "results",
                   help="where <timestamp>.md, .json and .png go (default bench/results)")
    p.add_argument("--no-save", action="store_true", help="print the report only")
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
        args.seconds = 0.5 if quick else 1.2
    if args.rounds is None:
        # Five short rounds rather than three long ones: the median of five ignores
        # two disturbed rounds (the machine is shared).
        args.rounds = 2 if quick else 5
    if args.warmup is None:
        args.warmup = 0.1 if quick else 0.2
    if args.load is None:
        args.load = _scenarios(QUICK_LOAD if quick else DEFAULT_LOAD)
    if args.load_targets is None:
        args.load_targets = list(QUICK_LOAD_TARGETS if quick else DEFAULT_LOAD_TARGETS)
    if args.seconds <= 0 or args.rounds < 1 or args.warmup < 0 or not 1 <= args.threads <= 256:
        p.error("need --seconds > 0, --rounds >= 1, --warmup >= 0, 1 <= --threads <= 256")
    if any(sc.n > 256 for sc in args.load):
        p.error("--load: at most 256 threads or processes")
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

    def version(package: str) -> str:
        return _cmd_output(["dpkg-query", "-W", "-f", "${Version}", package])

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _cmd_output(["git", "rev-parse", "--short", "HEAD"]),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "softhsm": _cmd_output(["softhsm2-util", "--version"]),
        "caml_crush": version("caml-crush-server"),
        "p11_kit": version("p11-kit"),
        "transport": args.transport,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "load": [sc.key for sc in args.load],
        "policy": str(args.policy) if args.policy else "patchset1.conf",
    }


def probe(settings: RunSettings, target: Target) -> None:
    """One cheap call chain end to end; a target that fails it is marked unavailable.
    Then each known gap once: an op that works after all is measured."""
    if target.unavailable:
        return
    result = run_once(settings, target, "sessioninfo" if target.is_echo else "random", 0,
                      iterations=1, warmup=0.0)
    if not result.ok:
        target.unavailable = f"probe failed: {result.failure}"
        return
    for op in list(target.gaps):
        result = run_once(settings, target, op, 0, iterations=1, warmup=0.0)
        if result.ok and not result.errors:
            del target.gaps[op]
        else:
            why = result.failure or f"first error {result.first_error}"
            target.gaps[op] += f"; probe: {why}"


def plan_round(ops: list[str], targets: list[Target], main: Scenario, load_ops: list[str],
               load_targets: list[Target], load: list[Scenario]) -> list[Job]:
    """The jobs of one round, in order: the main table (op by op, every target in
    turn), then each load scenario likewise.  A thread scenario also gets its
    one-thread reference when the main table lacks it."""
    jobs: list[Job] = [(op, t, main) for op in ops for t in targets if t.runs(op)]
    seen = {(op, t.name, sc.key) for op, t, sc in jobs}
    scenarios = list(load)
    if any(sc.kind == "threads" and sc.n > 1 for sc in load):
        scenarios.insert(0, Scenario("threads", 1))
    for sc in scenarios:
        for op in load_ops:
            if sc.kind == "threads" and sc.n > 1 and op in SINGLE_THREAD_OPS:
                continue
            for t in load_targets:
                if t.is_echo or not t.runs(op) or (op, t.name, sc.key) in seen:
                    continue
                seen.add((op, t.name, sc.key))
                jobs.append((op, t, sc))
    return jobs


def measure(settings: RunSettings, plan: list[Job], rounds: int) -> list[RunResult]:
    results: list[RunResult] = []
    total = rounds * len(plan)
    started = time.monotonic()
    for r in range(1, rounds + 1):
        for op, target, sc in plan:  # A B C D within each (round, op): drift cancels out
            result = run(settings, target, op, r, sc)
            results.append(result)
            what = (f"{result.ops_per_s:,.0f} ops/s" if result.ok
                    else f"FAILED: {result.failure}")
            if result.ok and (result.errors or result.failed_procs):
                what += f" ({result.errors} errors, {result.failed_procs} failed processes)"
            spent = time.monotonic() - started
            eta = spent / len(results) * (total - len(results))
            log(f"[{len(results)}/{total} {spent:.0f}s, ~{eta:.0f}s left] round {r} "
                f"{op:<11} {sc.label:<12} {target.letter} {target.name:<11} {what}")
    return results


def measure_memory(settings: RunSettings, setup: Setup,
                   targets: dict[str, Target]) -> list[memory.MemoryRow]:
    rows = []
    for name in MEMORY_TARGETS:
        target = targets.get(name)
        if target is None or target.unavailable or target.server is None:
            continue
        server = setup.servers[target.server]
        address = server.addresses[target.transport or "tcp"]
        row = memory.measure(settings, target, server.proc.pid, address)
        log(f"memory {target.letter} {name}: listener RSS {row.listener_rss_kb} kB, worker "
            f"{row.worker_pid} RSS {row.worker_rss_kb} kB USS {row.worker_uss_kb} kB"
            + (f" ({row.note})" if row.note else ""))
        rows.append(row)
    return rows


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally that stops the servers


def build_report(args: argparse.Namespace, meta: dict[str, Any], targets: list[Target],
                 load_targets: list[Target], cells: report.Cells,
                 mem: list[memory.MemoryRow], checked: list[goals.Goal],
                 main: Scenario, chart_note: str) -> str:
    notes = report.Notes()
    p11guard = "D, TCP" if args.transport == "tcp" else "H, Unix"
    lines = [
        f"# p11guard benchmark {meta['date']}",
        "",
        f"commit {meta['commit']}, {meta['cpu']} ({meta['cpus']} CPUs), kernel "
        f"{meta['kernel']}, SoftHSM {meta['softhsm']}, Caml Crush {meta['caml_crush']}, "
        f"p11-kit {meta['p11_kit']}.",
        f"Caml Crush client over {meta['transport']}; {meta['seconds']} s measured after "
        f"{meta['warmup']} s warm-up per run, median of {meta['rounds']} interleaved "
        f"round(s). {chart_note}",
        "",
        *goals.markdown(checked, p11guard),
        "",
        f"## One client thread ({main.label})",
        "",
        *report.main_table(args.ops, targets, cells, main.key, notes),
        "",
        *report.latency_table(args.ops, targets, cells, main.key),
        "",
    ]
    floor = report.floor_table(targets, cells, main.key)
    if floor:
        lines += [*floor, ""]
    load = report.concurrency_table(args.load_ops, load_targets,
                                    [Scenario("threads", 1), *args.load] if args.load else [],
                                    cells, notes)
    if load:
        lines += ["## Under load", "", *load, ""]
    mem_lines = report.memory_table(mem, notes)
    if mem_lines:
        lines += ["## Memory", "", *mem_lines, ""]
    lines += ["## Notes", "", *report.trailer(args.ops, targets, cells, main.key, notes)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    ensure_p11bench(args.p11bench)
    meta = environment(args)
    main_sc = Scenario("threads", args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="p11bench-"))
    setup: Setup | None = None
    mem: list[memory.MemoryRow] = []
    try:
        token = make_token(workdir / "softhsm")
        policy = args.policy.read_text() if args.policy else ""
        setup = Setup(REPO, workdir, token, unix=args.transport == "unix", log=log,
                      policy=policy)
        built = {name: setup.build(name)
                 for name in dict.fromkeys(args.targets + args.load_targets)}
        targets = [built[n] for n in args.targets]
        load_targets = [built[n] for n in args.load_targets] if args.load else []
        # The lock serialises token-file access of processes started together.
        settings = RunSettings(args.p11bench, token.label, token.pin, args.seconds,
                               args.warmup, args.threads, setup_lock=workdir / "setup.lock")
        for target in built.values():
            probe(settings, target)
            state = f"unavailable: {target.unavailable}" if target.unavailable else (
                target.module or f"echo over {target.transport}")
            log(f"target {target.letter} {target.name}: {state}")
            for op, why in target.gaps.items():
                log(f"  {op}: n/a ({why})")
        plan = plan_round(args.ops, targets, main_sc, args.load_ops, load_targets, args.load)
        results = measure(settings, plan, args.rounds)
        if not args.no_memory:
            mem = measure_memory(settings, setup, built)
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

    cells = report.summarize_all(results)
    gaps = {(t.name, op): why for t in built.values() for op, why in t.gaps.items()}
    checked = goals.evaluate(goals.Run(cells, main_sc.key, args.transport, gaps, mem,
                                       args.load_ops if args.load else ()))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    png = args.out / f"{stamp}.png"
    chart_note = "No chart (--no-save)."
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        no_chart = chart.write_png(png, args.ops, targets, cells, main_sc.key, args.load_ops,
                                   load_targets, [Scenario("threads", 1), *args.load],
                                   f"p11guard benchmark {meta['date']}")
        chart_note = (f"Chart: [{png.name}]({png.name})." if no_chart is None
                      else f"No chart: {no_chart}.")
        if no_chart is not None:
            log(f"no chart: {no_chart}")
    text = build_report(args, meta, targets, load_targets, cells, mem, checked, main_sc,
                        chart_note)
    print(text)
    if not args.no_save:
        md_path = args.out / f"{stamp}.md"
        md_path.write_text(text)
        extra = {"memory": [asdict(m) for m in mem], "goals": [asdict(g) for g in checked]}
        data = report.record(meta | {"argv": sys.argv[1:]}, list(built.values()), results,
                             cells, extra)
        (args.out / f"{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {md_path}, {md_path.with_suffix('.json').name}"
            + ("" if chart_note.startswith("No chart") else f", {png.name}"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
