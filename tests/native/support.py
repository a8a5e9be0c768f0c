"""Build and run the native client and its test programs (shared by the client tests)."""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO / "native" / "client"
NATIVE_TESTS = REPO / "tests" / "native"
LIB = CLIENT_DIR / "build" / "libp11guard.so"
ASAN_LIB = CLIENT_DIR / "build" / "asan" / "libp11guard.so"
DRIVER = NATIVE_TESTS / "build" / "driver"
ASAN_DRIVER = NATIVE_TESTS / "build" / "asan" / "driver"
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


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
