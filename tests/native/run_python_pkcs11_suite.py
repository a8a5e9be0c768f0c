"""Run python-pkcs11's own test suite directly against SoftHSM2 and through
libp11guard.so + a proxy server, and compare the sets of passing tests.

The suite ships in python-pkcs11's PyPI sdist; it is fetched once with
``pip download`` into tests/native/build/python-pkcs11/.

    python tests/native/run_python_pkcs11_suite.py [--server camlcrush|p11guard|none] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.native.support import LIB, SOFTHSM, build_all  # noqa: E402
from tests.support.servers import start_server  # noqa: E402
from tests.support.softhsm import SO_PIN, USER_PIN, make_token  # noqa: E402

VERSION = "0.10.1"
CACHE = REPO / "tests" / "native" / "build" / "python-pkcs11"


@dataclass
class SuiteResult:
    label: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    returncode: int = 0
    messages: dict[str, str] = field(default_factory=dict)


def suite_dir() -> Path:
    """The sdist's tests/ directory, downloaded and unpacked once."""
    tests = CACHE / f"python_pkcs11-{VERSION}" / "tests"
    if tests.is_dir():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"python-pkcs11=={VERSION}", "-d", str(CACHE)],
        check=True, capture_output=True, timeout=600,
    )
    archive = next(CACHE.glob("python*pkcs11-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE, filter="data")
    return tests


def run_suite(label: str, env: dict[str, str], work: Path, timeout: float = 600) -> SuiteResult:
    # Only tests/ is copied: the sdist's uncompiled pkcs11/ must not shadow the
    # installed package.
    dest = work / f"suite-{label}"
    shutil.copytree(suite_dir(), dest / "tests")
    junit = work / f"{label}.xml"
    env = dict(env, PKCS11_TOKEN_LABEL="test", PKCS11_TOKEN_PIN=USER_PIN,
               PKCS11_TOKEN_SO_PIN=SO_PIN, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(dest), "-o", "addopts=", f"--junitxml={junit}", "tests"],
        cwd=dest, env=env, capture_output=True, text=True, timeout=timeout,
    )
    result = SuiteResult(label, returncode=proc.returncode)
    if not junit.exists():
        raise RuntimeError(f"suite did not run ({label}):\n{proc.stdout}\n{proc.stderr}")
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        tags = {child.tag for child in case}
        if "skipped" in tags:
            result.skipped.append(name)
        elif tags & {"failure", "error"}:
            result.failed.append(name)
            for child in case:
                if child.tag in ("failure", "error"):
                    result.messages[name] = (child.get("message") or "")[:300]
        else:
            result.passed.append(name)
    return result


def run_direct(work: Path) -> SuiteResult:
    token = make_token(work / "direct-token")
    env = dict(token.env, PKCS11_MODULE=SOFTHSM)
    return run_suite("direct", env, work)


def run_proxied(kind: str, work: Path) -> SuiteResult:
    # Short paths: Netplex keeps Unix sockets under the server directory.
    token = make_token(work / f"{kind[:2]}-t")
    server = start_server(kind, token, work / f"{kind[:2]}-s")
    # The suite enables its SoftHSM2-only tests by the module's file name; the
    # token behind the proxy is SoftHSM2, so give it that name.
    alias = work / f"{kind}-lib" / "libsofthsm2.so"
    alias.parent.mkdir()
    alias.symlink_to(LIB)
    try:
        env = server.client_env(PKCS11_MODULE=str(alias))
        return run_suite(kind, env, work)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", choices=["camlcrush", "p11guard"])
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    build_all()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = [run_direct(work)]
        for kind in ns.server or ["p11guard"]:
            results.append(run_proxied(kind, work))
    direct = set(results[0].passed)
    report: dict[str, dict[str, Any]] = {r.label: {"passed": len(r.passed), "failed": len(r.failed),
                        "skipped": len(r.skipped),
                        "lost": sorted(direct - set(r.passed)),
                        "gained": sorted(set(r.passed) - direct)} for r in results}
    if ns.json:
        print(json.dumps({"report": report, "results": [asdict(r) for r in results]}, indent=1))
    else:
        for label, rep in report.items():
            print(f"{label}: {rep['passed']} passed, {rep['failed']} failed, "
                  f"{rep['skipped']} skipped")
            lost_msgs = next(r.messages for r in results if r.label == label)
            for name in rep["lost"]:
                print(f"   lost: {name}: {lost_msgs.get(name, '')[:120]}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO / "src"))
    raise SystemExit(main())
