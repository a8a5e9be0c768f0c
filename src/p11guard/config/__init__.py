"""Server configuration: p11guard TOML or Caml Crush's pkcs11proxyd.conf."""

from p11guard.config.model import Listener, ServerConfig, TlsConfig
from p11guard.config.server import detect_format, load_server_config, parse_server_config
from p11guard.policy.model import ConfigError

__all__ = [
    "ConfigError",
    "Listener",
    "ServerConfig",
    "TlsConfig",
    "detect_format",
    "load_server_config",
    "parse_server_config",
]
