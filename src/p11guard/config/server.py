"""Load a server configuration: p11guard TOML or Caml Crush's pkcs11proxyd.conf."""

from __future__ import annotations

import re
from pathlib import Path

from p11guard.config.model import Listener, ServerConfig, TlsConfig
from p11guard.config.netplex import netplex_to_config
from p11guard.config.tomlconf import toml_to_config
from p11guard.policy.model import ConfigError, Mode
from p11guard.policy.readers.ocamllex import decode_source

__all__ = [
    "ConfigError",
    "Listener",
    "ServerConfig",
    "TlsConfig",
    "detect_format",
    "load_server_config",
    "parse_server_config",
]

# A Netplex file has its "netplex {" at the start of a line (after its comments).
_NETPLEX_START = re.compile(r"^\s*netplex\s*\{", re.MULTILINE)


def detect_format(text: str, file: str = "") -> str:
    """``"toml"`` or ``"camlcrush"``: by extension, else by the first word."""
    if file.endswith(".toml"):
        return "toml"
    if _NETPLEX_START.search(text):
        return "camlcrush"
    return "toml"


def parse_server_config(text: str, file: str, *, mode: Mode = "strict") -> ServerConfig:
    """Interpret ``text``; ``file`` locates relative paths and messages.

    ``mode`` applies to a Caml Crush filter.conf (TOML files say it themselves).
    """
    if detect_format(text, file) == "camlcrush":
        return netplex_to_config(text, file, mode=mode)
    return toml_to_config(text, file)


def load_server_config(path: str | Path, *, mode: Mode = "strict") -> ServerConfig:
    """Read the server configuration at ``path`` (format detected)."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return parse_server_config(decode_source(data), file, mode=mode)
