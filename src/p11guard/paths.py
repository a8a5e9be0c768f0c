"""Where p11guard's built artefacts live."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# A source checkout: src/p11guard -> repo root.
_REPO = _PACKAGE.parents[1]


def client_library() -> Path | None:
    """The absolute path of libp11guard.so, or None when it is not built."""
    candidates = []
    env = os.environ.get("P11GUARD_CLIENT_LIB")
    if env:
        candidates.append(Path(env))
    candidates += [
        _REPO / "native" / "client" / "build" / "libp11guard.so",
        _PACKAGE / "data" / "libp11guard.so",
    ]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    return None


def repo_root() -> Path:
    return _REPO
