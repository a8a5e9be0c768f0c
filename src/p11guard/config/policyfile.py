"""Load a policy file named by a server configuration: filter.conf or TOML."""

from __future__ import annotations

from pathlib import Path

from p11guard.policy.model import Mode
from p11guard.policy.readers.common import ReadResult
from p11guard.policy.readers.filterconf import read_filter_conf
from p11guard.policy.readers.toml import read_policy_toml


def load_policy_file(path: str | Path, *, mode: Mode = "strict") -> ReadResult:
    """A ``.toml`` file is a p11guard policy (its own ``mode`` applies); anything
    else is a Caml Crush filter.conf, matched with ``mode``."""
    if str(path).endswith(".toml"):
        return read_policy_toml(path)
    return read_filter_conf(path, mode=mode)
