"""Throwaway SoftHSM2 tokens for tests: each gets its own directory and SOFTHSM2_CONF."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
USER_PIN = "1234"
SO_PIN = "5678"
TOKEN_LABEL = "test"


@dataclass
class Token:
    """A SoftHSM2 configuration with one initialised token."""

    root: Path
    conf: Path
    label: str = TOKEN_LABEL
    user_pin: str = USER_PIN
    so_pin: str = SO_PIN
    module: str = SOFTHSM_MODULE
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment a process loading SoftHSM2 (directly or as a server) needs."""
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.conf)
        env.update(self.extra_env)
        return env


def make_token(root: Path, label: str = TOKEN_LABEL, extra_tokens: tuple[str, ...] = ()) -> Token:
    """Create a SoftHSM2 config under ``root`` and initialise token(s) in it."""
    tokens = root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    token = Token(root=root, conf=conf, label=label)
    for lbl in (label, *extra_tokens):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", lbl,
             "--pin", USER_PIN, "--so-pin", SO_PIN],
            env=token.env, check=True, capture_output=True,
        )
    return token
