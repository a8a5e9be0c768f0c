"""The performance targets of issue #7, checked against one run's medians.

Every check compares numbers from the same run (same machine, same moment,
interleaved), so machine drift cancels out.  "p11guard" in a check means the
native client (libp11guard.so) on the transport Caml Crush's client uses in
this run (D over TCP, or H with ``--transport unix``): the fair pairing for
"vs Caml Crush".  The p11-kit checks use H, because p11-kit only has a Unix
socket.

A check is PASS or FAIL only when all its numbers were measured; otherwise it
is NOT MEASURED (nothing measured) or INCOMPLETE (what was measured passes,
something is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .memory import MemoryRow
from .report import Cell
from .targets import LETTERS

# The single-thread ops of the issue (newconn has its own check).
SINGLE_OPS = ("random", "sessioninfo", "find", "ecdsa", "rsa", "aescbc", "opensession")
VS_CAMLCRUSH = 1.3
VS_P11KIT = 1.0
ECHO_LATENCY = 1.3
ECDSA_VS_CAMLCRUSH = 2.0
RSA_VS_DIRECT = 0.9
RSA_TWO_THREADS = 1.8
PROCS = 32
PROCS_VS_CAMLCRUSH = 1.3
IDLE_USS_MIB = 15.0

PASS, FAIL, INCOMPLETE, NOT_MEASURED = "PASS", "FAIL", "INCOMPLETE", "NOT MEASURED"

Cells = Mapping[tuple[str, str, str], Cell]


@dataclass(frozen=True)
class Goal:
    title: str
    measured: str
    status: str


@dataclass(frozen=True)
class Run:
    """What the checks read: the medians and who is who in this run."""

    cells: Cells
    main: str  # scenario key of the single-thread table ("t1")
    cc_transport: str = "tcp"
    gaps: Mapping[tuple[str, str], str] | None = None  # (target, op) -> why n/a
    memory: Sequence[MemoryRow] = ()
    conc_ops: Sequence[str] = ()

    @property
    def p11guard(self) -> str:
        return "native" if self.cc_transport == "tcp" else "native-unix"

    def cell(self, op: str, target: str, scenario: str | None = None) -> Cell | None:
        return self.cells.get((op, target, scenario or self.main))

    def rate(self, op: str, target: str, scenario: str | None = None) -> float | None:
        c = self.cell(op, target, scenario)
        return c.ops_per_s if c is not None and c.ops_per_s else None

    def p50(self, op: str, target: str, scenario: str | None = None) -> float | None:
        c = self.cell(op, target, scenario)
        return c.p50_us if c is not None and c.p50_us else None


def _status(values: list[bool], missing: bool) -> str:
    if not values:
        return NOT_MEASURED
    if not all(values):
        return FAIL
    return INCOMPLETE if missing else PASS


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _per_op(run: Run, title: str, num: str, den: str, threshold: float,
            ops: Sequence[str] = SINGLE_OPS) -> Goal:
    """ops/s of ``num`` over ``den`` for every op, each >= threshold."""
    parts, oks, missing, worst = [], [], False, None
    for op in ops:
        if run.gaps and (den, op) in run.gaps:
            parts.append(f"{op} n/a ({LETTERS[den]} cannot)")
            continue
        r = _ratio(run.rate(op, num), run.rate(op, den))
        if r is None:
            missing = True
            parts.append(f"{op} not measured")
            continue
        oks.append(r >= threshold)
        parts.append(f"{op} {r:.2f}x")
        if worst is None or r < worst[1]:
            worst = (op, r)
    head = f"{LETTERS[num]}/{LETTERS[den]} min {worst[1]:.2f}x ({worst[0]}): " if worst else ""
    return Goal(title, head + ", ".join(parts), _status(oks, missing))


def _single(title: str, value: float | None, ok: Callable[[float], bool],
            text: Callable[[float], str], missing: str = "not measured") -> Goal:
    if value is None:
        return Goal(title, missing, NOT_MEASURED)
    return Goal(title, text(value), PASS if ok(value) else FAIL)


def _echo(run: Run, transport: str) -> Goal:
    native = "native" if transport == "tcp" else "native-unix"
    echo = f"echo-{transport}"
    name = "TCP" if transport == "tcp" else "Unix"
    title = (f"Trivial-call latency (GetSessionInfo p50) <= {ECHO_LATENCY}x the bare C "
             f"echo round trip, {name}")
    call, floor = run.p50("sessioninfo", native), run.p50("sessioninfo", echo)
    return _single(title, _ratio(call, floor), lambda r: r <= ECHO_LATENCY,
                   lambda r: f"{LETTERS[native]} {call:,.1f} µs / {LETTERS[echo]} "
                             f"{floor:,.1f} µs = {r:.2f}x")


def _threads(run: Run) -> Goal:
    p = run.p11guard
    one, two = run.rate("rsa", p, "t1"), run.rate("rsa", p, "t2")

    def text(r: float) -> str:
        out = f"{LETTERS[p]} {two:,.0f} / {one:,.0f} ops/s = {r:.2f}x"
        # The same over Unix (H), and direct's own scaling: the machine's ceiling.
        for other in ("native-unix", "direct"):
            o1, o2 = run.rate("rsa", other, "t1"), run.rate("rsa", other, "t2")
            scaled = _ratio(o2, o1)
            if scaled is not None:
                out += f"; {LETTERS[other]} {scaled:.2f}x"
        return out

    return _single(f"2 threads RSA-2048 sign >= {RSA_TWO_THREADS}x one thread",
                   _ratio(two, one), lambda r: r >= RSA_TWO_THREADS, text)


def _procs(run: Run) -> Goal:
    p, key = run.p11guard, f"p{PROCS}"
    title = (f"{PROCS} concurrent processes: 0 errors, aggregate >= "
             f"{PROCS_VS_CAMLCRUSH}x Caml Crush")
    parts, oks, missing = [], [], False
    for op in run.conc_ops:
        mine, theirs = run.cell(op, p, key), run.cell(op, "camlcrush", key)
        if mine is None or mine.runs_ok == 0:
            missing = True
            parts.append(f"{op} not measured")
            continue
        errors = mine.errors + mine.failed_procs + (mine.runs - mine.runs_ok)
        parts.append(f"{op}: {errors} errors")
        oks.append(errors == 0)
        r = _ratio(mine.ops_per_s, theirs.ops_per_s if theirs else None)
        if r is None:
            missing = True
            parts[-1] += ", Caml Crush not measured"
            continue
        parts[-1] += f", {LETTERS[p]}/C {r:.2f}x"
        oks.append(r >= PROCS_VS_CAMLCRUSH)
    return Goal(title, "; ".join(parts) or "no concurrency op", _status(oks, missing))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _newconn(run: Run) -> Goal:
    """Judged on the mean time per new connection (1 / ops/s of the one-thread
    fork loop): exact, where two p50s often fall in the same ~6% histogram bucket."""
    p = run.p11guard
    rates = run.rate("newconn", p), run.rate("newconn", "camlcrush")
    mine, theirs = (1000.0 / r if r else None for r in rates)
    p50s = (run.p50("newconn", p), run.p50("newconn", "camlcrush"))
    mine_p50, theirs_p50 = (v / 1000 if v else None for v in p50s)
    return _single("New connection to first result (newconn: fork, dlopen, Initialize, "
                   "GetSlotList, Finalize, exit) <= Caml Crush's",
                   _ratio(mine, theirs), lambda r: r <= 1.0,
                   lambda r: f"mean {LETTERS[p]} {_ms(mine)} vs C {_ms(theirs)} ({r:.2f}x); "
                             f"p50 {_ms(mine_p50)} vs {_ms(theirs_p50)}")


def _memory(run: Run) -> Goal:
    row = next((m for m in run.memory if m.target == run.p11guard), None)
    uss = row.worker_uss_kb / 1024 if row and row.worker_uss_kb is not None else None
    rss = row.worker_rss_kb / 1024 if row and row.worker_rss_kb is not None else 0.0
    return _single(f"Idle worker USS <= {IDLE_USS_MIB:.0f} MiB (p11guard, "
                   f"{LETTERS[run.p11guard]})", uss,
                   lambda u: u <= IDLE_USS_MIB, lambda u: f"{u:.1f} MiB (RSS {rss:.1f} MiB)",
                   missing=(row.note or "not measured") if row else "not measured")


def evaluate(run: Run) -> list[Goal]:
    """Every issue target, in the issue's order."""
    p = run.p11guard
    ecdsa = _ratio(run.rate("ecdsa", p), run.rate("ecdsa", "camlcrush"))
    rsa = _ratio(run.rate("rsa", p), run.rate("rsa", "direct"))
    return [
        _per_op(run, f"Every single-thread op >= {VS_CAMLCRUSH}x Caml Crush", p, "camlcrush",
                VS_CAMLCRUSH),
        _per_op(run, "Every single-thread op >= p11-kit (both over Unix)", "native-unix",
                "p11kit", VS_P11KIT),
        _echo(run, "tcp"),
        _echo(run, "unix"),
        _single(f"ECDSA P-256 sign >= {ECDSA_VS_CAMLCRUSH}x Caml Crush", ecdsa,
                lambda r: r >= ECDSA_VS_CAMLCRUSH, lambda r: f"{LETTERS[p]}/C {r:.2f}x"),
        _single(f"RSA-2048 sign >= {RSA_VS_DIRECT:.0%} of direct", rsa,
                lambda r: r >= RSA_VS_DIRECT, lambda r: f"{LETTERS[p]}/A {r:.0%}"),
        _threads(run),
        _procs(run),
        _newconn(run),
        _memory(run),
    ]


def markdown(goals: Sequence[Goal], main_label: str) -> list[str]:
    """The "Targets" section that opens the report."""
    passed = sum(g.status == PASS for g in goals)
    lines = ["## Targets", "",
             f"Issue #7's targets against this run's medians ({passed}/{len(goals)} pass). "
             f"p11guard = libp11guard.so on Caml Crush's transport ({main_label}); every ratio "
             "is between columns of this same run.", ""]
    lines += ["| target | measured | result |", "|:--|:--|:--|"]
    for g in goals:
        status = f"**{g.status}**" if g.status == FAIL else g.status
        lines.append(f"| {g.title} | {g.measured} | {status} |")
    return lines
