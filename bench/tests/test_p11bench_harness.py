"""Tests of the benchmark harness: p11bench against real SoftHSM2 (and Caml Crush).

Run with:  .venv/bin/pytest bench/tests
Each test gets its own SoftHSM2 token directory and SOFTHSM2_CONF (tmp_path);
servers are started by the harness itself and stopped by PID.
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

from benchkit import report  # noqa: E402
from benchkit.runner import ALL_OPS, RunResult, RunSettings, run_once  # noqa: E402
from benchkit.softhsm import SOFTHSM_MODULE, Token, make_token  # noqa: E402
from benchkit.targets import Setup, Target  # noqa: E402

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


def p11bench(token: Token, *args: str, module: str = SOFTHSM_MODULE,
             env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([str(P11BENCH), "--module", module, *args],
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
                ["--op"], []):
        rc, _ = p11bench(token, *bad)
        assert rc == 2, bad


@needs_softhsm
def test_p11bench_is_clean_under_valgrind(token: Token) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("no valgrind")
    for op in ("aescbc", "find", "connect"):
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
    cells = {("ecdsa", t.name): report.summarize(results, "ecdsa", t.name) for t in targets}
    assert cells[("ecdsa", "direct")].ops_per_s == 200
    assert cells[("ecdsa", "camlcrush")].ops_per_s == 40
    assert cells[("ecdsa", "camlcrush")].runs_ok == 2
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
            for op in ("random", "rsa"):
                result = run_once(settings, target, op, 1)
                assert result.ok and result.errors == 0, result.failure
        server = setup.servers["camlcrush"]
    finally:
        setup.stop()
    assert not server.alive()


@needs_softhsm
@needs_camlcrush
def test_run_py_quick_subset(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--targets", "A,C,D", "--ops", "random,find",
         "--rounds", "2", "--seconds", "0.2", "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| random |" in proc.stdout and "| find |" in proc.stdout
    md = list(tmp_path.glob("*.md"))
    data = json.loads(md[0].with_suffix(".json").read_text())
    assert len(data["runs"]) >= 2 * 2 * 2
    assert data["medians"]["find"]["camlcrush"]["ops_per_s"] > 0
