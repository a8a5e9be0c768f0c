"""The C client's codec table is generated from the Python procedure table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

from p11guard.wire import procedures as P

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "native" / "client" / "p11g_procs.h"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_c_procs", REPO / "tools" / "gen_c_procs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_c_procs"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_header_is_fresh() -> None:
    assert HEADER.read_text() == _generator().generate(), (
        "native/client/p11g_procs.h is stale: run `python tools/gen_c_procs.py`"
    )


def test_header_rows_match_python_table() -> None:
    gen = _generator()
    rows = re.findall(r'\{(\d+), "(\w+)", "(\w*)", "(\w+)"\}', HEADER.read_text())
    assert len(rows) == len(P.PROCEDURES) == 69
    for number, name, args, result in rows:
        proc = P.BY_NUMBER[int(number)]
        assert proc.name == name
        assert args == "".join(gen.KIND_CHAR[f.kind] for f in proc.args)
        assert result == "".join(gen.KIND_CHAR[f.kind] for f in proc.result)
        assert result.startswith("H")  # the rv


def test_check_mode_detects_staleness(tmp_path: Path) -> None:
    gen = _generator()
    stale = tmp_path / "p11g_procs.h"
    stale.write_text("/* old */\n")
    assert gen.main(["--check", str(stale)]) == 1
    assert gen.main([str(stale)]) == 0
    assert gen.main(["--check", str(stale)]) == 0
