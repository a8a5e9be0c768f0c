"""Unit tests of the benchmark kit's pure logic: scenarios, the plan of a round,
aggregation of processes, the report tables, the issue's target checks, and the
/proc parsing of the memory table.  No process is started here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402  (bench/run.py)
from benchkit import goals, memory, report  # noqa: E402
from benchkit.report import Cell  # noqa: E402
from benchkit.runner import (  # noqa: E402
    RunResult,
    RunSettings,
    Scenario,
    aggregate,
    command,
)
from benchkit.targets import KNOWN_GAPS, Target, native_transport  # noqa: E402


def cell(rate: float | None, p50: float | None = None, **kw: int) -> Cell:
    return Cell(rate, p50, kw.get("runs_ok", 3), kw.get("runs", 3), kw.get("errors", 0),
                None, kw.get("failed_procs", 0))


# --- scenarios, commands, plan ------------------------------------------------


@pytest.mark.parametrize(("key", "kind", "n", "label"), [
    ("t1", "threads", 1, "1 thread"), ("t8", "threads", 8, "8 threads"),
    ("p32", "procs", 32, "32 processes"), ("p1", "procs", 1, "1 process"),
])
def test_scenario_parse_and_label(key: str, kind: str, n: int, label: str) -> None:
    sc = Scenario.parse(key)
    assert (sc.kind, sc.n, sc.key, sc.label) == (kind, n, key, label)


@pytest.mark.parametrize("bad", ["", "t", "x2", "t0", "p-1", "tt"])
def test_scenario_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        Scenario.parse(bad)


def test_command_lines() -> None:
    settings = RunSettings(Path("/b/p11bench"), "bench", "1234", 1.5, 0.2, 1,
                           setup_lock=Path("/w/lock"))
    native = Target("native", module="/lib.so", transport="tcp")
    cmd = command(settings, native, "rsa", threads=2, sync=True)
    assert cmd[:3] == ["/b/p11bench", "--module", "/lib.so"]
    assert cmd[cmd.index("--op") + 1] == "rsa" and cmd[cmd.index("--threads") + 1] == "2"
    assert "--sync" in cmd and cmd[cmd.index("--setup-lock") + 1] == "/w/lock"
    assert cmd[cmd.index("--seconds") + 1] == "1.5"
    # newconn and connect are single-threaded whatever the scenario.
    cmd = command(settings, native, "newconn", threads=8, iterations=3)
    assert cmd[cmd.index("--threads") + 1] == "1" and "--seconds" not in cmd
    # The echo floor has no module, no token and no lock.
    echo = Target("echo-unix", transport="unix")
    cmd = command(settings, echo, "sessioninfo", threads=1)
    assert cmd[1:5] == ["--op", "echo", "--echo", "unix"]
    assert "--module" not in cmd and "--pin" not in cmd and "--setup-lock" not in cmd


def test_targets_runs_shows_and_transports() -> None:
    echo = Target("echo-tcp", transport="tcp")
    assert echo.runs("sessioninfo") and not echo.runs("rsa")
    assert echo.shows("sessioninfo") and not echo.shows("rsa")
    p11kit = Target("p11kit", gaps={"aescbc": "no IV"})
    assert not p11kit.runs("aescbc") and p11kit.shows("aescbc") and p11kit.runs("rsa")
    assert not Target("direct", unavailable="gone").runs("rsa")
    assert ("p11kit", "aescbc") in KNOWN_GAPS
    assert native_transport("native", "unix") == "tcp"
    assert native_transport("native-unix", "tcp") == "unix"
    assert native_transport("camlcrush", "unix") == "unix"
    assert native_transport("native+ps1", "unix") == "tcp"


def test_plan_round_interleaves_and_adds_one_thread_references() -> None:
    a, c, j = Target("direct"), Target("camlcrush"), Target("echo-tcp", transport="tcp")
    i = Target("p11kit", gaps={"aescbc": "x"})
    t1, t2, p8 = Scenario("threads", 1), Scenario("threads", 2), Scenario("procs", 8)
    plan = bench_run.plan_round(["sessioninfo", "aescbc"], [a, c, j, i], t1,
                                ["rsa", "sessioninfo", "newconn"], [a, c, j], [t2, p8])
    keys = [(op, t.letter, sc.key) for op, t, sc in plan]
    # Main table: op by op, every target in turn; the echo on its row only; no gap.
    assert keys[:6] == [("sessioninfo", "A", "t1"), ("sessioninfo", "C", "t1"),
                        ("sessioninfo", "J", "t1"), ("sessioninfo", "I", "t1"),
                        ("aescbc", "A", "t1"), ("aescbc", "C", "t1")]
    rest = keys[6:]
    # rsa and newconn at one thread are missing from the main table: added once;
    # sessioninfo at one thread is not repeated; no echo under load; newconn is
    # never multi-threaded but may run as processes.
    assert ("rsa", "A", "t1") in rest and ("newconn", "C", "t1") in rest
    assert ("sessioninfo", "A", "t1") not in rest
    assert not any(t == "J" for _, t, _ in rest)
    assert ("newconn", "A", "t2") not in rest and ("newconn", "A", "p8") in rest
    assert len(keys) == len(set(keys))


def test_parse_args_defaults_and_quick() -> None:
    full = bench_run.parse_args([])
    assert [sc.key for sc in full.load] == ["t2", "t8", "p8", "p32"]
    assert full.load_targets == ["direct", "camlcrush", "native", "native-unix", "p11kit"]
    assert "newconn" in full.ops and "digest" not in full.ops
    quick = bench_run.parse_args(["--quick"])
    assert [sc.key for sc in quick.load] == ["t2", "p32"]
    assert quick.seconds < full.seconds and quick.rounds < full.rounds
    assert bench_run.parse_args(["--load", "none"]).load == []
    args = bench_run.parse_args(["--targets", "a,H,i,k", "--patchset1"])
    assert args.targets == ["direct", "native-unix", "p11kit", "echo-unix"]
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--load", "q3"])


# --- aggregation and medians ------------------------------------------------------


def test_aggregate_sums_processes_and_counts_failures() -> None:
    sc = Scenario("procs", 3)
    ok1 = RunResult("native", "rsa", 1, ops_per_s=100, count=150, p50_us=10, p99_us=30,
                    elapsed_s=1.5)
    ok2 = RunResult("native", "rsa", 1, ops_per_s=50, count=75, errors=2, p50_us=20,
                    p99_us=90, elapsed_s=1.6, first_error="0x30")
    bad = RunResult("native", "rsa", 1, failure="C_Login: 0xa0")
    r = aggregate("native", "rsa", 1, sc, [ok1, ok2, bad])
    assert r.ok and r.scenario == "p3" and r.procs == 3 and r.failed_procs == 1
    assert (r.ops_per_s, r.count, r.errors) == (150, 225, 2)
    assert (r.p50_us, r.p99_us, r.elapsed_s) == (15, 90, 1.6)
    assert r.first_error is not None and "C_Login" in r.first_error
    none = aggregate("native", "rsa", 1, sc, [bad, bad])
    assert not none.ok and none.failure is not None and "all 2" in none.failure


def test_summarize_keeps_scenarios_apart_and_counts_failed_processes() -> None:
    results = [RunResult("native", "rsa", r, ops_per_s=v, count=1, p50_us=1.0, scenario=s,
                         failed_procs=f, first_error="x" if f else None)
               for r, v, s, f in [(1, 10, "t1", 0), (2, 30, "t1", 0), (1, 100, "p8", 1),
                                  (2, 300, "p8", 0), (3, 200, "p8", 0)]]
    cells = report.summarize_all(results)
    assert cells[("rsa", "native", "t1")].ops_per_s == 20
    p8 = cells[("rsa", "native", "p8")]
    assert p8.ops_per_s == 200 and p8.failed_procs == 1 and p8.note is not None


# --- tables ---------------------------------------------------------------------


def targets_all() -> list[Target]:
    return [Target("direct"), Target("p11guard", transport="tcp"),
            Target("camlcrush", transport="tcp"), Target("native", transport="tcp"),
            Target("native-unix", transport="unix"),
            Target("p11kit", transport="unix", gaps={"aescbc": "no IV"}),
            Target("echo-tcp", transport="tcp"), Target("echo-unix", transport="unix")]


def test_ratio_columns_pair_by_transport() -> None:
    titles = [c[0] for c in report.ratio_columns(targets_all())]
    assert titles == ["B/A", "C/A", "D/A", "H/A", "I/A", "B/C", "D/C", "H/I"]
    unix_cc = [Target("camlcrush", transport="unix"), Target("native", transport="tcp"),
               Target("native-unix", transport="unix")]
    assert [c[0] for c in report.ratio_columns(unix_cc)] == ["H/C"]


def test_main_table_echo_cells_gaps_and_floor() -> None:
    targets = targets_all()
    cells = {(op, t.name, "t1"): cell(1000.0, 50.0) for op in ("sessioninfo", "aescbc")
             for t in targets if t.runs(op)}
    cells[("sessioninfo", "echo-tcp", "t1")] = cell(50000.0, 20.0)
    cells[("sessioninfo", "echo-unix", "t1")] = cell(100000.0, 10.0)
    notes = report.Notes()
    lines = report.main_table(["sessioninfo", "aescbc"], targets, cells, "t1", notes)
    aes = next(ln for ln in lines if ln.startswith("| aescbc"))
    cols = aes.split(" | ")
    assert cols[6] == "n/a [1]" and cols[7:9] == ["", ""]  # p11-kit's gap; no echo
    assert notes.items == ["aescbc, I: no IV"]
    info = next(ln for ln in lines if ln.startswith("| sessioninfo"))
    assert "50,000" in info and "100,000" in info
    floor = "\n".join(report.floor_table(targets, cells, "t1"))
    assert "| D: p11guard (native, TCP) | tcp | 50.0 | 20.0 (J) | 2.50x |" in floor
    assert "| I: p11-kit (Unix) | unix | 50.0 | 10.0 (K) | 5.00x |" in floor


def test_concurrency_table_and_scaling() -> None:
    targets = [Target("camlcrush", transport="tcp"), Target("native", transport="tcp")]
    scenarios = [Scenario("threads", 1), Scenario("threads", 2), Scenario("procs", 32)]
    cells = {("rsa", "camlcrush", "t1"): cell(500.0), ("rsa", "camlcrush", "t2"): cell(500.0),
             ("rsa", "native", "t1"): cell(500.0), ("rsa", "native", "t2"): cell(950.0),
             ("rsa", "camlcrush", "p32"): cell(400.0),
             ("rsa", "native", "p32"): Cell(800.0, 1.0, 3, 3, 0, "1 failed operations", 0)}
    notes = report.Notes()
    text = "\n".join(report.concurrency_table(["rsa"], targets, scenarios, cells, notes))
    assert "| rsa, 32 processes | 400 | 800 [1] | 2.00x |" in text
    assert "| rsa | 1.00x | 1.90x |" in text  # C 2T/1T, D 2T/1T
    assert report.concurrency_table([], targets, scenarios, cells, notes) == []


def test_memory_table() -> None:
    rows = [memory.MemoryRow("native", 10, 40960, 11, 30720, 8192, 3),
            memory.MemoryRow("p11kit", 20, note="no server process holds it")]
    notes = report.Notes()
    text = "\n".join(report.memory_table(rows, notes))
    assert "| D: p11guard (native, TCP) | 40.0 | 30.0 | 8.0 | 3 |" in text
    assert "| I: p11-kit (Unix) [1] | - | - | - | 0 |" in text
    assert notes.items == ["memory, I: no server process holds it"]


# --- the targets ------------------------------------------------------------


def good_run() -> dict[tuple[str, str, str], Cell]:
    """Cells where every target of the issue is met."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for op in goals.SINGLE_OPS:
        cells[(op, "camlcrush", "t1")] = cell(1000.0)
        cells[(op, "native", "t1")] = cell(2500.0)
        cells[(op, "native-unix", "t1")] = cell(3000.0)
        cells[(op, "p11kit", "t1")] = cell(2000.0)
        cells[(op, "direct", "t1")] = cell(2600.0)
    cells[("sessioninfo", "native", "t1")] = cell(2500.0, 24.0)
    cells[("sessioninfo", "echo-tcp", "t1")] = cell(5000.0, 20.0)
    cells[("sessioninfo", "native-unix", "t1")] = cell(3000.0, 12.0)
    cells[("sessioninfo", "echo-unix", "t1")] = cell(9000.0, 10.0)
    cells[("rsa", "native", "t2")] = cell(4600.0)
    for op in ("rsa", "sessioninfo"):
        cells[(op, "native", "p32")] = cell(2000.0)
        cells[(op, "camlcrush", "p32")] = cell(1000.0)
    cells[("newconn", "native", "t1")] = cell(200.0, 4000.0)
    cells[("newconn", "camlcrush", "t1")] = cell(100.0, 9000.0)
    return cells


MEM = [memory.MemoryRow("native", 1, 40000, 2, 30000, 9000, 3)]


def check(cells: dict[tuple[str, str, str], Cell], transport: str = "tcp",
          mem: list[memory.MemoryRow] = MEM) -> dict[str, goals.Goal]:
    run = goals.Run(cells, "t1", transport, {("p11kit", "aescbc"): "no IV"}, mem,
                    ("rsa", "sessioninfo"))
    return {g.title: g for g in goals.evaluate(run)}


def test_goals_all_pass() -> None:
    result = check(good_run())
    assert len(result) == 10
    assert {g.status for g in result.values()} == {"PASS"}, result
    vs_p11kit = next(g for t, g in result.items() if "p11-kit" in t)
    assert "aescbc n/a (I cannot)" in vs_p11kit.measured


def test_goals_fail_incomplete_and_not_measured() -> None:
    cells = good_run()
    cells[("random", "native", "t1")] = cell(1200.0)  # 1.2x Caml Crush: < 1.3x
    del cells[("find", "native-unix", "t1")]
    cells[("sessioninfo", "native", "p32")] = cell(2000.0, errors=1)
    del cells[("rsa", "native", "t2")]
    by_word = check(cells, mem=[memory.MemoryRow("native", 1, note="idle client failed")])
    first = next(iter(by_word.values()))  # vs Caml Crush: random is 1.2x
    assert first.status == "FAIL" and first.measured.startswith("D/C min 1.20x (random)")
    vs_p11kit = next(g for t, g in by_word.items() if "p11-kit" in t)
    assert vs_p11kit.status == "INCOMPLETE" and "find not measured" in vs_p11kit.measured
    procs = next(g for t, g in by_word.items() if t.startswith("32 concurrent"))
    assert procs.status == "FAIL" and "sessioninfo: 1 errors" in procs.measured
    threads = next(g for t, g in by_word.items() if t.startswith("2 threads"))
    assert threads.status == "NOT MEASURED"
    mem = next(g for t, g in by_word.items() if t.startswith("Idle worker"))
    assert (mem.status, mem.measured) == ("NOT MEASURED", "idle client failed")


def test_goals_thresholds_at_the_edges() -> None:
    cells = good_run()
    cells[("ecdsa", "native", "t1")] = cell(1999.0)  # 1.999x Caml Crush
    cells[("newconn", "native", "t1")] = cell(100.0, 9500.0)  # equal mean: still <=
    cells[("sessioninfo", "native", "t1")] = cell(2500.0, 26.0)  # 1.3x echo exactly
    result = check(cells)
    ecdsa = next(g for t, g in result.items() if t.startswith("ECDSA"))
    assert ecdsa.status == "FAIL"
    newconn = next(g for t, g in result.items() if t.startswith("New connection"))
    assert newconn.status == "PASS"
    assert newconn.measured == "mean D 10.0 ms vs C 10.0 ms (1.00x); p50 9.5 ms vs 9.0 ms"
    echo_tcp = next(g for t, g in result.items() if t.endswith("TCP"))
    assert echo_tcp.status == "PASS" and "1.30x" in echo_tcp.measured


def test_goals_use_the_unix_native_client_with_a_unix_caml_crush() -> None:
    cells = good_run()
    for op in goals.SINGLE_OPS:
        cells[(op, "native", "t1")] = cell(1.0)  # D irrelevant now
    result = check(cells, transport="unix",
                   mem=[memory.MemoryRow("native-unix", 1, 1, 2, 1, 1024, 2)])
    first = next(iter(result.values()))
    assert first.status == "PASS" and first.measured.startswith("H/C")


def test_goals_markdown() -> None:
    lines = goals.markdown([goals.Goal("x", "1.0x", "PASS"), goals.Goal("y", "0.5x", "FAIL")],
                           "D, TCP")
    assert lines[0] == "## Targets" and "(1/2 pass)" in lines[2]
    assert "| y | 0.5x | **FAIL** |" in lines


# --- /proc parsing for the memory table -----------------------------------------------

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid inode
   0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1
   1: 0100007F:9C40 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2222 1
   2: 0100007F:D431 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3333 1
   3: 0100007F:9C40 0100007F:D432 06 00000000:00000000 03:00000000 00000000     0        0 0 3
"""

UNIX = """Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4444 /tmp/x/p11.sock
0000000000000000: 00000003 00000000 00000000 0001 03 5555 /tmp/x/p11.sock
0000000000000000: 00000003 00000000 00000000 0001 03 6666
0000000000000000: 00000003 00000000 00000000 0001 03 7777 /tmp/y/other.sock
"""


def test_server_socket_inodes() -> None:
    assert memory.tcp_server_inodes(0x9C40, TCP) == {2222}  # not the listener, the client
    assert memory.tcp_server_inodes(1, TCP) == set()
    assert memory.unix_server_inodes("/tmp/x/p11.sock", UNIX) == {5555}


def fake_proc(root: Path, procs: dict[int, tuple[int, list[str], str]]) -> Path:
    """pid -> (ppid, fd link targets, smaps_rollup text)."""
    for pid, (ppid, fds, rollup) in procs.items():
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (a (weird) name) S {ppid} 1 1 0\n")
        (d / "smaps_rollup").write_text(rollup)
        for n, link in enumerate(fds):
            (d / "fd" / str(n)).symlink_to(link)
    (root / "net").mkdir()
    (root / "net" / "unix").write_text(UNIX)
    (root / "net" / "tcp").write_text(TCP)
    (root / "self").mkdir()
    return root


ROLLUP = """00400000-7fff [rollup]
Rss:               30000 kB
Pss:               12000 kB
Private_Clean:      1000 kB
Private_Dirty:      7000 kB
"""


def test_inspect_finds_the_worker_by_its_socket(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {
        100: (1, ["socket:[4444]"], "Rss: 40000 kB\n"),  # listener: listening socket
        101: (100, ["socket:[9999]"], ROLLUP),            # a spare worker: other socket
        102: (100, ["socket:[2222]", "/dev/null"], ROLLUP),  # the worker (TCP)
        103: (100, ["socket:[5555]"], ROLLUP),            # the worker (Unix)
        104: (103, ["socket:[5555]"], "Rss: 9000 kB\nPrivate_Clean: 1 kB\n"
                                      "Private_Dirty: 2 kB\n"),  # its exec'd child
        200: (1, ["socket:[2222]"], ROLLUP),              # not below the listener
    })
    assert sorted(memory.descendants(100, proc)) == [100, 101, 102, 103, 104]
    row = memory.inspect(100, "127.0.0.1:40000", proc)
    assert (row.listener_rss_kb, row.worker_pid, row.processes) == (40000, 102, 5)
    assert (row.worker_rss_kb, row.worker_uss_kb, row.note) == (30000, 8000, None)
    row = memory.inspect(100, "/tmp/x/p11.sock", proc)
    assert (row.worker_pid, row.worker_uss_kb) == (104, 3)  # the deepest holder
    assert row.note is not None and "2 processes" in row.note
    row = memory.inspect(100, "/tmp/nothing.sock", proc)
    assert row.worker_pid is None and row.note is not None


def test_smaps_rollup_and_uss(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {5: (1, [], ROLLUP)})
    rollup = memory.smaps_rollup(5, proc)
    assert rollup["Rss"] == 30000 and memory.uss_kb(rollup) == 8000
    assert memory.smaps_rollup(6, proc) == {} and memory.uss_kb({}) is None
