"""Tests of the benchmark harness: p11bench against real SoftHSM2 (and Caml Crush).

Run with:  .venv/bin/pytest bench/tests
Each test gets its own SoftHSM2 token directory and SOFTHSM2_CONF (tmp_path);
servers are started by the harness itself and stopped by PID.  No timing
assertions: speed is what bench/run.py reports, not what a test checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))

from benchkit import memory, report  # noqa: E402
from benchkit.runner import (  # noqa: E402
    ALL_OPS,
    RunResult,
    RunSettings,
    Scenario,
    run,
    run_once,
)
from benchkit.servers import P11KIT_SERVER  # noqa: E402
from benchkit.softhsm import SOFTHSM_MODULE, Token, make_token  # noqa: E402
from benchkit.targets import P11KIT_CLIENT, Setup, Target  # noqa: E402

P11BENCH = BENCH / "p11bench"
CAMLCRUSH_TCP = Path("/usr/lib/x86_64-linux-gnu/caml-crush/libp11clienttcp.so")

needs_softhsm = pytest.mark.skipif(not Path(SOFTHSM_MODULE).exists(), reason="no SoftHSM2")
needs_camlcrush = pytest.mark.skipif(
    not (CAMLCRUSH_TCP.exists() and Path("/usr/bin/pkcs11proxyd").exists()),
    reason="no Debian caml-crush")


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    subprocess.run(["make", "-C", str(BENCH), "p11bench"], check=True, capture_output=True)


@pytest.fixture
def token(tmp_path: Path) -> Token:
    return make_token(tmp_path / "softhsm")


def p11bench(token: Token, *args: str, module: str | None = SOFTHSM_MODULE,
             env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([str(P11BENCH), *(["--module", module] if module else []), *args],
                          env=env if env is not None else token.env(),
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {})


@needs_softhsm
@pytest.mark.parametrize("op", ALL_OPS)
def test_every_op_runs_exact_iterations(token: Token, op: str) -> None:
    rc, out = p11bench(token, "--token-label", token.label, "--pin", token.pin,
                       "--op", op, "--iterations", "25", "--warmup", "0")
    assert rc == 0, out
    assert out["count"] == 25 and out["errors"] == 0
    assert out["ops_per_s"] > 0 and out["latency_us"]["p50"] > 0


@needs_softhsm
def test_threads_share_iterations_and_leave_no_token_object(token: Token) -> None:
    rc, out = p11bench(token, "--token-label", token.label, "--pin", token.pin,
                       "--op", "find", "--iterations", "101", "--threads", "4",
                       "--warmup", "0.05")
    assert rc == 0 and out["count"] == 101 and out["threads"] == 4
    # The find object is a token object; it must be destroyed at the end.
    objects = list((token.conf.parent / "tokens").rglob("*.object"))
    assert [p.name for p in objects] == ["token.object"]


@needs_softhsm
def test_time_based_run(token: Token) -> None:
    rc, out = p11bench(token, "--token-label", token.label, "--op", "random",
                       "--seconds", "0.3", "--warmup", "0")
    assert rc == 0 and out["count"] > 0
    assert 0.29 < out["elapsed_s"] < 1.0


@needs_softhsm
@pytest.mark.parametrize(("args", "message"), [
    (("--token-label", "nosuch", "--op", "random"), "no token labelled"),
    (("--token-label", "bench", "--pin", "0000", "--op", "rsa"), "C_Login: 0xa0"),
    (("--token-label", "bench", "--op", "rsa"), "needs --pin"),
])
def test_setup_failures_are_json(token: Token, args: tuple[str, ...], message: str) -> None:
    rc, out = p11bench(token, *args, "--iterations", "1")
    assert rc == 1 and message in out["error"]
    assert "0000" not in json.dumps(out)  # never echo a PIN


def test_bad_module_and_bad_arguments(tmp_path: Path) -> None:
    token = Token(conf=tmp_path / "none.conf")
    rc, out = p11bench(token, "--op", "random", module=str(tmp_path / "missing.so"))
    assert rc == 1 and "dlopen" in out["error"]
    for bad in (["--op", "nope"], ["--op", "random", "--threads", "0"],
                ["--op", "random", "--seconds", "-1"], ["--op", "connect", "--threads", "2"],
                ["--op", "newconn", "--threads", "2"], ["--op", "echo", "--echo", "udp"],
                ["--op", "echo", "--request-bytes", "0"],
                ["--op", "echo", "--reply-bytes", "65537"], ["--op"], []):
        rc, _ = p11bench(token, *bad)
        assert rc == 2, bad
    rc, _ = p11bench(token, "--op", "random", module=None)  # a module is needed
    assert rc == 2


@needs_softhsm
def test_p11bench_is_clean_under_valgrind(token: Token) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("no valgrind")
    for op in ("aescbc", "find", "connect", "newconn", "echo"):
        proc = subprocess.run(
            ["valgrind", "-q", "--error-exitcode=99", str(P11BENCH), "--module", SOFTHSM_MODULE,
             "--token-label", token.label, "--pin", token.pin, "--op", op,
             "--iterations", "5", "--warmup", "0"],
            env=token.env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_report_medians_ratios_and_unavailable() -> None:
    def res(target: str, r: int, rate: float, failure: str | None = None) -> RunResult:
        return RunResult(target, "ecdsa", r, ops_per_s=rate, count=10, p50_us=1.0,
                         failure=failure)
    results = [res("direct", 1, 100), res("direct", 2, 300), res("direct", 3, 200),
               res("camlcrush", 1, 50), res("camlcrush", 2, 0, "timed out after 61s"),
               res("camlcrush", 3, 30)]
    targets = [Target("direct"), Target("p11guard", unavailable="server\nexited"),
               Target("camlcrush")]
    cells = report.summarize_all(results)
    assert cells[("ecdsa", "direct", "t1")].ops_per_s == 200
    assert cells[("ecdsa", "camlcrush", "t1")].ops_per_s == 40
    assert cells[("ecdsa", "camlcrush", "t1")].runs_ok == 2
    table = report.markdown(["ecdsa"], targets, cells, ["# t"])
    row = next(line for line in table.splitlines() if line.startswith("| ecdsa"))
    assert row.split(" | ")[1:3] == ["200", "n/a"]
    assert "0.20x" in row  # C/A
    assert "- B, p11guard (CC client), unavailable: server exited" in table
    assert "timed out" in table  # the failed run is footnoted


@needs_softhsm
@needs_camlcrush
def test_direct_and_camlcrush_targets_end_to_end(tmp_path: Path) -> None:
    token = make_token(tmp_path / "softhsm")
    setup = Setup(BENCH.parent, tmp_path, token, unix=False, log=lambda _m: None)
    try:
        targets = [setup.build("direct"), setup.build("camlcrush")]
        assert [t.unavailable for t in targets] == [None, None]
        settings = RunSettings(P11BENCH, token.label, token.pin, 0.2, 0.0, 1)
        for target in targets:
            for op in ("random", "rsa", "newconn"):
                result = run_once(settings, target, op, 1)
                assert result.ok and result.errors == 0, result.failure
        server = setup.servers["camlcrush"]
    finally:
        setup.stop()
    assert not server.alive()


@needs_softhsm
@needs_camlcrush
def test_run_py_quick_subset(tmp_path: Path) -> None:
    # Every part of the report, small: two targets and the echo floor, a thread and
    # a process scenario, the memory of Caml Crush's server, the targets section.
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--targets", "A,C,J", "--ops",
         "random,sessioninfo", "--load", "t2,p2", "--load-ops", "sessioninfo,random",
         "--load-targets", "A,C", "--rounds", "2",
         "--seconds", "0.2", "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| random |" in out and "| sessioninfo |" in out
    for section in ("## Targets", "## Under load", "## Memory", "## Notes"):
        assert section in out, section
    assert "| sessioninfo, 2 processes |" in out
    assert "| C: Caml Crush |" in out  # its row in the echo floor table
    md = next(tmp_path.glob("*.md"))
    assert md.read_text() in out
    data = json.loads(md.with_suffix(".json").read_text())
    assert len(data["runs"]) == 2 * (2 * 2 + 1 + 2 * 2 * 2)  # rounds * (main + load)
    medians = data["medians"]
    assert medians["t1"]["sessioninfo"]["echo-tcp"]["ops_per_s"] > 0
    assert medians["p2"]["sessioninfo"]["camlcrush"]["runs_ok"] == 2
    assert medians["t2"]["random"]["camlcrush"]["ops_per_s"] > 0
    [mem] = data["memory"]
    assert mem["target"] == "camlcrush" and mem["worker_uss_kb"] > 0, mem
    assert {g["status"] for g in data["goals"]} <= {"PASS", "FAIL", "INCOMPLETE",
                                                    "NOT MEASURED"}


# ---------------------------------------------------------------------------
# p11bench's newer modes: echo, newconn, --sync, --setup-lock


def test_echo_over_tcp_and_unix_leaves_nothing_behind() -> None:
    before = set(Path("/tmp").glob("p11bench-echo-*"))
    for transport in ("tcp", "unix"):
        rc, out = p11bench(Token(conf=Path("/nonexistent")), "--op", "echo", "--echo",
                           transport, "--iterations", "200", "--threads", "2",
                           "--warmup", "0.01", module=None)
        assert rc == 0, out
        assert out["module"] == f"echo:{transport}"
        assert out["count"] == 200 and out["errors"] == 0
        assert (out["request_bytes"], out["reply_bytes"]) == (52, 68)
    assert set(Path("/tmp").glob("p11bench-echo-*")) == before


def test_echo_sizes_are_configurable() -> None:
    rc, out = p11bench(Token(conf=Path("/nonexistent")), "--op", "echo", "--request-bytes",
                       "4096", "--reply-bytes", "1", "--iterations", "20", "--warmup", "0",
                       module=None)
    assert rc == 0 and out["count"] == 20
    assert (out["request_bytes"], out["reply_bytes"]) == (4096, 1)


def test_newconn_reports_the_failing_step(tmp_path: Path) -> None:
    token = Token(conf=tmp_path / "none.conf")
    rc, out = p11bench(token, "--op", "newconn", "--iterations", "3", "--warmup", "0",
                       module=str(tmp_path / "missing.so"))
    # The parent never loads the module: the children fail, at dlopen (step 1).
    assert rc == 0 and out["count"] == 0 and out["errors"] == 3
    assert out["first_error"] == "0x8000c001"


@needs_softhsm
def test_sync_waits_for_the_go_line(token: Token) -> None:
    proc = subprocess.Popen(
        [str(P11BENCH), "--module", SOFTHSM_MODULE, "--token-label", token.label, "--op",
         "random", "--iterations", "5", "--warmup", "0", "--sync"],
        env=token.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    ready = json.loads(proc.stdout.readline())
    assert ready == {"ready": True, "pid": proc.pid}
    assert proc.poll() is None  # waiting for us
    out, _ = proc.communicate("\n", timeout=60)
    assert json.loads(out.strip().splitlines()[-1])["count"] == 5


@needs_softhsm
def test_setup_lock_lets_processes_log_in_together(token: Token, tmp_path: Path) -> None:
    # SoftHSM2 rewrites its token file at every C_Login; a process reading it at
    # that moment may not find the token.  The lock serialises exactly that part.
    cmd = [str(P11BENCH), "--module", SOFTHSM_MODULE, "--token-label", token.label,
           "--pin", token.pin, "--op", "random", "--iterations", "5", "--warmup", "0",
           "--setup-lock", str(tmp_path / "lock")]
    procs = [subprocess.Popen(cmd, env=token.env(), stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outs
    assert all(json.loads(o.strip().splitlines()[-1])["count"] == 5 for o in outs)


@needs_softhsm
def test_run_procs_sums_processes(token: Token, tmp_path: Path) -> None:
    settings = RunSettings(P11BENCH, token.label, token.pin, 0.2, 0.0, 1,
                           setup_lock=tmp_path / "lock")
    target = Target("direct", module=SOFTHSM_MODULE, env=token.env())
    result = run(settings, target, "sessioninfo", 1, Scenario("procs", 3))
    assert result.ok and result.procs == 3 and result.failed_procs == 0
    parts = result.raw["processes"]
    assert len(parts) == 3
    assert result.count == sum(p["count"] for p in parts)
    assert result.ops_per_s == pytest.approx(sum(p["ops_per_s"] for p in parts))


@needs_softhsm
@pytest.mark.skipif(not (P11KIT_SERVER.exists() and P11KIT_CLIENT.exists()),
                    reason="no p11-kit server/client")
def test_p11kit_target_and_its_worker_memory(tmp_path: Path) -> None:
    token = make_token(tmp_path / "softhsm")
    setup = Setup(BENCH.parent, tmp_path, token, unix=False, log=lambda _m: None)
    try:
        target = setup.build("p11kit")
        assert target.unavailable is None and target.transport == "unix"
        assert "aescbc" in target.gaps
        settings = RunSettings(P11BENCH, token.label, token.pin, 0.2, 0.0, 1)
        for op in ("sessioninfo", "ecdsa", "newconn"):
            result = run_once(settings, target, op, 1)
            assert result.ok and result.errors == 0, (op, result.failure)
        # The gap is real: p11-kit cannot pass the CBC IV (CKR_MECHANISM_INVALID).
        result = run_once(settings, target, "aescbc", 1, iterations=1, warmup=0.0)
        assert not result.ok and result.first_error == "0x70"
        server = setup.servers["p11kit"]
        row = memory.measure(settings, target, server.proc.pid, server.address)
        assert row.note is None, row.note
        assert row.worker_pid not in (None, server.proc.pid)
        assert row.worker_uss_kb and row.worker_rss_kb and row.listener_rss_kb
        assert 0 < row.worker_uss_kb <= row.worker_rss_kb
    finally:
        setup.stop()
    assert not server.alive()
