"""A throwaway SoftHSM2 token with its own SOFTHSM2_CONF (never the system one)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "bench"
USER_PIN = "1234"
SO_PIN = "5678"


@dataclass(frozen=True)
class Token:
    """One initialised token: how to reach it and how to log in."""

    conf: Path
    label: str = LABEL
    pin: str = USER_PIN
    module: str = SOFTHSM_MODULE

    def env(self) -> dict[str, str]:
        """Environment for a process that loads SoftHSM2 (p11bench direct, or a server)."""
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.conf)
        return env


def make_token(root: Path) -> Token:
    """Write a private softhsm2.conf under ``root`` and initialise one token in it."""
    tokens = root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    token = Token(conf=conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", token.label,
         "--pin", token.pin, "--so-pin", SO_PIN],
        env=token.env(), check=True, capture_output=True,
    )
    return token
