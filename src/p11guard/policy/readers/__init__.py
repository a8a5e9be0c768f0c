"""Policy readers: Caml Crush's filter.conf and p11guard's TOML policy."""

from p11guard.policy.readers.common import ReadResult
from p11guard.policy.readers.filterconf import parse_filter_conf, read_filter_conf
from p11guard.policy.readers.toml import parse_policy_toml, read_policy_toml

__all__ = [
    "ReadResult",
    "parse_filter_conf",
    "parse_policy_toml",
    "read_filter_conf",
    "read_policy_toml",
]
