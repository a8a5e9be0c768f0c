"""The PNG chart next to the Markdown report: grouped bars of ops/s, log scale.

matplotlib is optional (``pip install -e '.[bench]'``, which ``make bench`` does):
without it, ``write_png`` returns the reason and the run goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import Cells
from .runner import Scenario
from .targets import Target

# One colour per target in every panel (matplotlib's tab10 and tab20 colours).
COLOURS = {
    "direct": "#1f77b4", "p11guard": "#ff7f0e", "camlcrush": "#2ca02c", "native": "#d62728",
    "native-unix": "#9467bd", "p11kit": "#8c564b", "echo-tcp": "#7f7f7f",
    "echo-unix": "#c7c7c7", "p11guard+ps1": "#ffbb78", "camlcrush+ps1": "#98df8a",
    "native+ps1": "#ff9896",
}


def _bars(ax: Any, groups: Sequence[tuple[str, str, str]], targets: Sequence[Target],
          cells: Cells, title: str) -> None:
    """One panel: a group of bars per (label, op, scenario), a bar per target;
    an op the target cannot do is marked n/a at the foot of its slot."""
    shown = [t for t in targets if not t.unavailable]
    width = 0.8 / max(len(shown), 1)
    for i, t in enumerate(shown):
        xs, ys = [], []
        for g, (_, op, scenario) in enumerate(groups):
            x = g - 0.4 + width * (i + 0.5)
            cell = cells.get((op, t.name, scenario))
            if cell is not None and cell.ops_per_s:
                xs.append(x)
                ys.append(cell.ops_per_s)
            elif op in t.gaps:
                ax.annotate("n/a", (x, 0), xycoords=("data", "axes fraction"),
                            xytext=(0, 3), textcoords="offset points", ha="center",
                            fontsize=6, rotation=90)
        ax.bar(xs, ys, width, label=f"{t.letter}: {t.title}", color=COLOURS.get(t.name))
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], rotation=30, ha="right")
    ax.set_ylabel("ops/s (log)")
    ax.set_title(title)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def write_png(path: Path, ops: Sequence[str], targets: Sequence[Target], cells: Cells,
              main: str, conc_ops: Sequence[str], conc_targets: Sequence[Target],
              scenarios: Sequence[Scenario], title: str) -> str | None:
    """Write the chart; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install -e '.[bench]'"
    conc_groups = [(f"{op} {sc.label}", op, sc.key) for op in conc_ops for sc in scenarios]
    panels = 2 if conc_groups and conc_targets else 1
    fig, axes = plt.subplots(panels, 1, figsize=(13, 5.5 * panels), squeeze=False)
    _bars(axes[0][0], [(op, op, main) for op in ops], targets, cells,
          f"{title}: one client thread")
    if panels == 2:
        _bars(axes[1][0], conc_groups, conc_targets, cells, "Under load (aggregate ops/s)")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        return f"cannot write {path}: {exc}"
    finally:
        plt.close(fig)
    return None
