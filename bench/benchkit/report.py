"""Medians over rounds, the Markdown table and the JSON record of a run."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from .runner import RunResult
from .targets import LETTERS, POLICY_TWINS, Target


@dataclass(frozen=True)
class Cell:
    """The median of one (op, target) over the rounds that produced a measurement."""

    ops_per_s: float | None
    p50_us: float | None
    runs_ok: int
    runs: int
    errors: int  # failed operations inside successful runs, summed
    note: str | None  # the first failure or error code, for the footnotes


def summarize(results: list[RunResult], op: str, target: str) -> Cell:
    mine = [r for r in results if r.op == op and r.target == target]
    ok = [r for r in mine if r.ok]
    errors = sum(r.errors for r in ok)
    note = next((r.failure for r in mine if r.failure), None)
    if note is None and errors:
        note = f"{errors} failed operations, first {next(r.first_error for r in ok if r.errors)}"
    if not ok:
        return Cell(None, None, 0, len(mine), errors, note)
    return Cell(statistics.median(r.ops_per_s for r in ok),
                statistics.median(r.p50_us for r in ok), len(ok), len(mine), errors, note)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def markdown(ops: list[str], targets: list[Target], cells: dict[tuple[str, str], Cell],
             header: list[str]) -> str:
    """The report: ops/s medians, ratios vs direct and vs Caml Crush, p50 latencies."""
    names = [t.name for t in targets]
    ratio_cols: list[tuple[str, str, str]] = []  # (title, numerator, denominator)
    for t in targets:
        if t.name in ("p11guard", "camlcrush", "native") and "direct" in names:
            ratio_cols.append((f"{t.letter}/A", t.name, "direct"))
    for t in targets:
        if t.name in ("p11guard", "native") and "camlcrush" in names:
            ratio_cols.append((f"{t.letter}/C", t.name, "camlcrush"))
    # With a policy vs the same path pass-through: what the policy costs.
    for t in targets:
        base = POLICY_TWINS.get(t.name)
        if base in names:
            ratio_cols.append((f"{t.letter}/{LETTERS[base]}", t.name, base))

    lines = [*header, ""]
    lines.append("Median operations per second (higher is better); ratios are ops/s "
                 "of the column over ops/s of the reference.")
    lines.append("")
    cols = ["op", *(f"{t.letter}: {t.title}" for t in targets), *(c[0] for c in ratio_cols)]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join([":--", *["--:"] * (len(cols) - 1)]) + "|")
    footnotes: list[str] = []

    def mark(op: str, t: Target) -> str:
        cell = cells[(op, t.name)]
        text = "n/a" if t.unavailable else _rate(cell.ops_per_s)
        if cell.note and not t.unavailable:
            footnotes.append(f"{op}, {t.letter}: {cell.note} "
                             f"({cell.runs_ok}/{cell.runs} runs measured)")
            text += f" [{len(footnotes)}]"
        return text

    for op in ops:
        row = [op, *(mark(op, t) for t in targets)]
        for _, num, den in ratio_cols:
            row.append(_ratio(cells[(op, num)].ops_per_s, cells[(op, den)].ops_per_s))
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Median p50 latency per operation, µs (lower is better):", ""]
    cols = ["op", *(f"{t.letter}" for t in targets)]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join([":--", *["--:"] * (len(cols) - 1)]) + "|")
    for op in ops:
        row = [op]
        for t in targets:
            p50 = cells[(op, t.name)].p50_us
            row.append("n/a" if t.unavailable or p50 is None else f"{p50:,.1f}")
        lines.append("| " + " | ".join(row) + " |")

    unavailable = [t for t in targets if t.unavailable]
    lines.append("")
    # The policy's cost in time per operation: pass-through ops/s over policy ops/s, - 1.
    for t in targets:
        base = POLICY_TWINS.get(t.name)
        if base not in names:
            continue
        costs = []
        for op in ops:
            with_policy, without = cells[(op, t.name)].ops_per_s, cells[(op, base)].ops_per_s
            if with_policy and without:
                costs.append(f"{op} {100 * (without / with_policy - 1):+.0f}%")
        if costs:
            lines.append(f"- {t.letter} vs {LETTERS[base]}, time per operation with the "
                         f"policy: {', '.join(costs)}.")
    if "connect" in ops:
        # The same op measures different work depending on the client library.
        lines.append("- connect = Initialize + GetSlotList + Finalize. The Caml Crush client "
                     "(B, C) keeps its socket open across Finalize; libp11guard.so (D) "
                     "connects in C_Initialize, so D also pays a new connection and server "
                     "worker per iteration.")
    for t in unavailable:
        reason = " ".join((t.unavailable or "").split())  # one Markdown list line
        lines.append(f"- {t.letter}, {t.title}, unavailable: {reason}")
    for i, note in enumerate(footnotes, 1):
        lines.append(f"- [{i}] {' '.join(note.split())}")
    return "\n".join(lines) + "\n"


def record(meta: dict[str, Any], targets: list[Target], ops: list[str],
           results: list[RunResult], cells: dict[tuple[str, str], Cell]) -> dict[str, Any]:
    """Everything needed to redo the table later, including every single run."""
    return {
        "meta": meta,
        "targets": [{"name": t.name, "letter": t.letter, "title": t.title,
                     "module": t.module, "unavailable": t.unavailable} for t in targets],
        "medians": {op: {t.name: asdict(cells[(op, t.name)]) for t in targets} for op in ops},
        "runs": [{k: v for k, v in asdict(r).items() if k != "raw"} | {"raw": r.raw}
                 for r in results],
    }
