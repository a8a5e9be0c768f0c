"""Medians over rounds, the Markdown tables and the JSON record of a run.

Cells are keyed (op, target, scenario key): "t1" is one thread, "t2" two
threads in one process, "p32" 32 processes at once (see runner.Scenario).
Footnotes are numbered across the whole report (``Notes``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .memory import MemoryRow
from .runner import RunResult, Scenario
from .targets import LETTERS, POLICY_TWINS, TITLES, Target


@dataclass(frozen=True)
class Cell:
    """The median of one (op, target, scenario) over the rounds that produced a
    measurement."""

    ops_per_s: float | None
    p50_us: float | None
    runs_ok: int
    runs: int
    errors: int  # failed operations inside successful runs, summed
    note: str | None  # the first failure or error code, for the footnotes
    failed_procs: int = 0  # multi-process runs: processes that measured nothing, summed


Cells = Mapping[tuple[str, str, str], Cell]


def summarize(results: Sequence[RunResult], op: str, target: str,
              scenario: str = "t1") -> Cell:
    mine = [r for r in results if r.op == op and r.target == target and r.scenario == scenario]
    ok = [r for r in mine if r.ok]
    errors = sum(r.errors for r in ok)
    failed_procs = sum(r.failed_procs for r in ok)
    note = next((r.failure for r in mine if r.failure), None)
    if note is None and (errors or failed_procs):
        first = next(r.first_error for r in ok if r.errors or r.failed_procs)
        note = f"{errors} failed operations, first {first}"
    if not ok:
        return Cell(None, None, 0, len(mine), errors, note, failed_procs)
    return Cell(statistics.median(r.ops_per_s for r in ok),
                statistics.median(r.p50_us for r in ok), len(ok), len(mine), errors, note,
                failed_procs)


def summarize_all(results: Sequence[RunResult]) -> dict[tuple[str, str, str], Cell]:
    keys = dict.fromkeys((r.op, r.target, r.scenario) for r in results)
    return {k: summarize(results, *k) for k in keys}


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def _row(cols: Sequence[str]) -> str:
    return "| " + " | ".join(cols) + " |"


def _head(cols: Sequence[str]) -> list[str]:
    return [_row(cols), "|" + "|".join([":--", *["--:"] * (len(cols) - 1)]) + "|"]


@dataclass
class Notes:
    """Numbered footnotes shared by every table of the report."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> str:
        """Register a note; returns its marker, e.g. " [3]"."""
        self.items.append(" ".join(text.split()))
        return f" [{len(self.items)}]"

    def lines(self) -> list[str]:
        return [f"- [{i}] {note}" for i, note in enumerate(self.items, 1)]


def ratio_columns(targets: Sequence[Target]) -> list[tuple[str, str, str]]:
    """(title, numerator, denominator) of the main table's ratio columns.

    vs direct: what a proxy keeps.  vs Caml Crush: targets on its transport
    only (B always: the same client).  H/I: both over Unix.  Policy twins vs
    the same path pass-through."""
    names = [t.name for t in targets]
    by_name = {t.name: t for t in targets}
    cols: list[tuple[str, str, str]] = []
    if "direct" in names:
        cols += [(f"{t.letter}/A", t.name, "direct") for t in targets
                 if t.name in ("p11guard", "camlcrush", "native", "native-unix", "p11kit")]
    if "camlcrush" in names:
        cc = by_name["camlcrush"].transport
        cols += [(f"{t.letter}/C", t.name, "camlcrush") for t in targets
                 if t.name == "p11guard"
                 or (t.name in ("native", "native-unix") and t.transport == cc)]
    if "native-unix" in names and "p11kit" in names:
        cols.append(("H/I", "native-unix", "p11kit"))
    for t in targets:
        base = POLICY_TWINS.get(t.name)
        if base in names:
            cols.append((f"{t.letter}/{LETTERS[base]}", t.name, base))
    return cols


def _cell_text(cells: Cells, op: str, t: Target, scenario: str, notes: Notes,
               label: str) -> str:
    if not t.shows(op):
        return ""
    if t.unavailable:
        return "n/a"
    if op in t.gaps:
        return "n/a" + notes.add(f"{label}, {t.letter}: {t.gaps[op]}")
    cell = cells.get((op, t.name, scenario))
    if cell is None:
        return "-"
    text = rate(cell.ops_per_s)
    if cell.note:
        text += notes.add(f"{label}, {t.letter}: {cell.note} "
                          f"({cell.runs_ok}/{cell.runs} runs measured)")
    return text


def main_table(ops: Sequence[str], targets: Sequence[Target], cells: Cells, scenario: str,
               notes: Notes) -> list[str]:
    """Median ops/s per op and target, with the ratio columns."""
    cols = ratio_columns(targets)
    lines = ["Median operations per second (higher is better); ratios are ops/s of the "
             "column over ops/s of the reference.", ""]
    lines += _head(["op", *(f"{t.letter}: {t.title}" for t in targets), *(c[0] for c in cols)])
    for op in ops:
        row = [op, *(_cell_text(cells, op, t, scenario, notes, op) for t in targets)]
        for _, num, den in cols:
            a, b = cells.get((op, num, scenario)), cells.get((op, den, scenario))
            row.append(ratio(a.ops_per_s if a else None, b.ops_per_s if b else None))
        lines.append(_row(row))
    return lines


def latency_table(ops: Sequence[str], targets: Sequence[Target], cells: Cells,
                  scenario: str) -> list[str]:
    lines = ["Median p50 latency per operation, µs (lower is better):", ""]
    lines += _head(["op", *(t.letter for t in targets)])
    for op in ops:
        row = [op]
        for t in targets:
            cell = cells.get((op, t.name, scenario))
            if not t.shows(op):
                row.append("")
            elif t.unavailable or op in t.gaps or cell is None or cell.p50_us is None:
                row.append("n/a")
            else:
                row.append(f"{cell.p50_us:,.1f}")
        lines.append(_row(row))
    return lines


def floor_table(targets: Sequence[Target], cells: Cells, scenario: str) -> list[str]:
    """GetSessionInfo p50 of every proxy over the bare C echo on its transport."""
    echo = {t.transport: t for t in targets if t.is_echo and not t.unavailable}
    rows = []
    for t in targets:
        if t.is_echo or t.transport not in echo or t.unavailable:
            continue
        mine = cells.get(("sessioninfo", t.name, scenario))
        floor = cells.get(("sessioninfo", echo[t.transport].name, scenario))
        if mine is None or floor is None or mine.p50_us is None or floor.p50_us is None:
            continue
        rows.append(_row([f"{t.letter}: {t.title}", t.transport or "", f"{mine.p50_us:,.1f}",
                          f"{floor.p50_us:,.1f} ({echo[t.transport].letter})",
                          ratio(mine.p50_us, floor.p50_us)]))
    if not rows:
        return []
    return ["GetSessionInfo p50 over the bare C echo round trip of the same size on the same "
            "transport (1.00x = the proxy adds nothing to a round trip):", "",
            *_head(["path", "transport", "sessioninfo p50 µs", "echo p50 µs", "ratio"]), *rows]


def concurrency_table(ops: Sequence[str], targets: Sequence[Target], scenarios:
                      Sequence[Scenario], cells: Cells, notes: Notes) -> list[str]:
    """Aggregate ops/s per (op, scenario) and target, then the thread scaling."""
    if not ops or not targets or not scenarios:
        return []
    names = [t.name for t in targets]
    pairs = [(f"{LETTERS[n]}/C", n, "camlcrush") for n in ("native", "native-unix")
             if n in names and "camlcrush" in names]
    if "native-unix" in names and "p11kit" in names:
        pairs.append(("H/I", "native-unix", "p11kit"))
    lines = ["Aggregate operations per second under load: N threads in one client process "
             "(each with its own session), or N single-thread client processes measuring at "
             "the same time (summed). Errors are footnoted.", ""]
    lines += _head(["op, load", *(f"{t.letter}: {t.title}" for t in targets),
                    *(p[0] for p in pairs)])
    for op in ops:
        for sc in scenarios:
            label = f"{op}, {sc.label}"
            row = [label, *(_cell_text(cells, op, t, sc.key, notes, label) for t in targets)]
            for _, num, den in pairs:
                a, b = cells.get((op, num, sc.key)), cells.get((op, den, sc.key))
                row.append(ratio(a.ops_per_s if a else None, b.ops_per_s if b else None))
            lines.append(_row(row))
    threads = [sc for sc in scenarios if sc.kind == "threads" and sc.n > 1]
    if threads and any(sc.key == "t1" for sc in scenarios):
        lines += ["", "Thread scaling: ops/s with N threads over ops/s with one thread, same "
                  "client process (2.00x = perfect on two threads):", ""]
        lines += _head(["op", *(f"{t.letter} {sc.n}T/1T" for t in targets for sc in threads)])
        for op in ops:
            row = [op]
            for t in targets:
                one = cells.get((op, t.name, "t1"))
                for sc in threads:
                    n = cells.get((op, t.name, sc.key))
                    row.append(ratio(n.ops_per_s if n else None, one.ops_per_s if one else None))
            lines.append(_row(row))
    return lines


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.1f}"


def memory_table(rows: Sequence[MemoryRow], notes: Notes) -> list[str]:
    if not rows:
        return []
    lines = ["Memory with one idle client (connected, initialised, logged in, one session), "
             "MiB. USS = the worker's private pages (Private_Clean + Private_Dirty); RSS also "
             "counts pages shared with the listener and with other processes.", ""]
    lines += _head(["server (client)", "listener RSS", "worker RSS", "worker USS",
                    "server processes"])
    for m in rows:
        label = f"{LETTERS[m.target]}: {TITLES[m.target]}"
        mark = notes.add(f"memory, {LETTERS[m.target]}: {m.note}") if m.note else ""
        lines.append(_row([label + mark, _mib(m.listener_rss_kb), _mib(m.worker_rss_kb),
                           _mib(m.worker_uss_kb), str(m.processes)]))
    return lines


def policy_costs(ops: Sequence[str], targets: Sequence[Target], cells: Cells,
                 scenario: str) -> list[str]:
    """The policy's cost in time per operation: pass-through ops/s over policy ops/s, - 1."""
    names = [t.name for t in targets]
    lines = []
    for t in targets:
        base = POLICY_TWINS.get(t.name)
        if base not in names:
            continue
        costs = []
        for op in ops:
            a, b = cells.get((op, t.name, scenario)), cells.get((op, base, scenario))
            if a and b and a.ops_per_s and b.ops_per_s:
                costs.append(f"{op} {100 * (b.ops_per_s / a.ops_per_s - 1):+.0f}%")
        if costs:
            lines.append(f"- {t.letter} vs {LETTERS[base]}, time per operation with the "
                         f"policy: {', '.join(costs)}.")
    return lines


OP_NOTES = {
    "connect": "connect = Initialize + GetSlotList + Finalize in one process. The Caml Crush "
               "client (B, C) keeps its socket open across Finalize; libp11guard.so (D, H) "
               "connects in C_Initialize, so D and H also pay a new connection and server "
               "worker per iteration.",
    "newconn": "newconn = what a short-lived tool pays: each iteration forks a child that "
               "dlopen()s the client library, C_Initialize, C_GetSlotList, C_Finalize and "
               "exits; the latency is fork to exit status.",
}


def markdown(ops: Sequence[str], targets: Sequence[Target], cells: Cells,
             header: Sequence[str], *, scenario: str = "t1") -> str:
    """The single-thread part of the report on its own (tables and notes)."""
    notes = Notes()
    lines = [*header, "", *main_table(ops, targets, cells, scenario, notes), "",
             *latency_table(ops, targets, cells, scenario), ""]
    lines += trailer(ops, targets, cells, scenario, notes)
    return "\n".join(lines) + "\n"


def trailer(ops: Sequence[str], targets: Sequence[Target], cells: Cells, scenario: str,
            notes: Notes) -> list[str]:
    """The notes under the tables: policy costs, op remarks, unavailable targets,
    footnotes."""
    lines = policy_costs(ops, targets, cells, scenario)
    lines += [f"- {OP_NOTES[op]}" for op in ops if op in OP_NOTES]
    for t in targets:
        if t.unavailable:
            reason = " ".join(t.unavailable.split())  # one Markdown list line
            lines.append(f"- {t.letter}, {t.title}, unavailable: {reason}")
    return lines + notes.lines()


def record(meta: dict[str, Any], targets: Sequence[Target], results: Sequence[RunResult],
           cells: Cells, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to redo the tables later, including every single run."""
    medians: dict[str, dict[str, dict[str, Any]]] = {}
    for (op, target, scenario), cell in cells.items():
        medians.setdefault(scenario, {}).setdefault(op, {})[target] = asdict(cell)
    return {
        "meta": meta,
        "targets": [{"name": t.name, "letter": t.letter, "title": t.title,
                     "module": t.module, "transport": t.transport,
                     "unavailable": t.unavailable, "gaps": t.gaps} for t in targets],
        "medians": medians,
        "runs": [{k: v for k, v in asdict(r).items() if k != "raw"} | {"raw": r.raw}
                 for r in results],
    } | (extra or {})
