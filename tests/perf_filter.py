"""Cost of the filter: ECDSA P-256 sign through p11guard, pass-through vs a policy with
allowed_labels + forbidden_mechanisms.  Run: ``.venv/bin/python -m tests.perf_filter``.

Each round is C_SignInit + C_Sign from one Python wire client; rounds of the two
configurations are interleaved (A/B/A/B...) so machine noise hits both alike.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from p11guard.pkcs11 import constants as c
from tests.support.filter import ec_keypair, running, session
from tests.support.softhsm import make_token

RULES = ('allowed_labels = [("softhsm", ["app_.*", "shared"])]\n'
         'forbidden_mechanisms = [("softhsm", [CKM_RSA_X_509, CKM_RSA_PKCS, CKM_SHA_1])]\n')
DIGEST = b"\x11" * 32


def measure(n: int = 2000, rounds: int = 5) -> tuple[float, float]:
    """Best per-sign time (µs) of (pass-through, filtered)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        token = make_token(root / "hsm")
        with running("p11guard", token, root / "plain") as plain, \
                running("p11guard", token, root / "filtered", RULES) as filtered, \
                session(plain) as (ca, sa, _), session(filtered) as (cb, sb, _):
            _, ka = ec_keypair(ca, sa, b"app_bench")
            _, kb = ec_keypair(cb, sb, b"app_bench")
            best = [float("inf"), float("inf")]
            for _ in range(rounds):
                for i, (client, s, key) in enumerate(((ca, sa, ka), (cb, sb, kb))):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        assert client.rv("SignInit", s, (c.CKM_ECDSA, b""), key) == c.CKR_OK
                        assert client.call("Sign", s, DIGEST)[0] == c.CKR_OK
                    best[i] = min(best[i], (time.perf_counter() - t0) / n * 1e6)
            return best[0], best[1]


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    plain, filtered = measure(n)
    print(f"ECDSA P-256 SignInit+Sign, best of 5 x {n}:")
    print(f"  pass-through      {plain:8.1f} us/op")
    print(f"  labels+mechanisms {filtered:8.1f} us/op")
    print(f"  ratio             {filtered / plain:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
