"""Build and run the native client and its test programs (shared by the client tests)."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO / "native" / "client"
NATIVE_TESTS = REPO / "tests" / "native"
LIB = CLIENT_DIR / "build" / "libp11guard.so"
ASAN_LIB = CLIENT_DIR / "build" / "asan" / "libp11guard.so"
DRIVER = NATIVE_TESTS / "build" / "driver"
ASAN_DRIVER = NATIVE_TESTS / "build" / "asan" / "driver"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"



class _Stoppable(Protocol):
    def stop(self) -> object: ...


S = TypeVar("S", bound=_Stoppable)


def build_all() -> None:
    """make the library (plain + ASan) and the driver; serialised across processes."""
    (CLIENT_DIR / "build").mkdir(exist_ok=True)
    with open(CLIENT_DIR / "build" / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        for target in (["-C", str(CLIENT_DIR), "all", "asan"], ["-C", str(NATIVE_TESTS)]):
            proc = subprocess.run(["make", "-s", *target], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"make {target} failed:\n{proc.stdout}\n{proc.stderr}")


def sanitizer_env(env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=86"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=87"
    return env


def run_driver(
    args: list[str], env: dict[str, str], *, asan: bool = False, timeout: float = 120,
    lib: Path | None = None, valgrind: bool = False,
) -> subprocess.CompletedProcess[str]:
    module = str(lib or (ASAN_LIB if asan else LIB))
    cmd = [str(ASAN_DRIVER if asan else DRIVER), module, *args]
    if asan:
        env = sanitizer_env(env)
    if valgrind:
        cmd = ["valgrind", "-q", "--error-exitcode=88", "--leak-check=full",
               "--errors-for-leak-kinds=definite", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def direct_env(token_env: dict[str, str]) -> dict[str, str]:
    env = dict(token_env)
    for key in list(env):
        if key.startswith("PKCS11PROXY_"):
            del env[key]
    return env


def sanitizer_report(proc: subprocess.CompletedProcess[str]) -> str | None:
    """The sanitizer's complaint in a run's stderr, if any."""
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        at = proc.stderr.find(marker)
        if at >= 0:
            return proc.stderr[max(0, at - 200) : at + 3000]
    return None


def run_restart_scenario(env: dict[str, str], stop_server: Callable[[], object],
                         start_server: Callable[[], S]) -> tuple[
                             subprocess.CompletedProcess[str], S]:
    """The ASan driver's "restart" scenario: once it is connected and logged in
    (READY1), ``stop_server()``; once its calls fail cleanly (READY2),
    ``start_server()``; the driver then reconnects and works again.

    Returns the driver's result and the restarted server (the caller stops it;
    on an error here it is stopped before the error propagates).
    """
    proc = subprocess.Popen([str(ASAN_DRIVER), str(ASAN_LIB), "restart"],
                            env=sanitizer_env(env), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    restarted: S | None = None
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "READY1"
        stop_server()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "READY2"
        restarted = start_server()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    except BaseException:
        if restarted is not None:
            restarted.stop()
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), restarted
