"""The ``p11guard`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .config.server import ServerConfig


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.serve import ServeOptions, serve

    config = _load(args.config)
    if config is None:
        return 2
    options = ServeOptions(
        foreground=args.foreground, pid_file=args.pid_file,
        debug_pkcs11=args.debug_pkcs11, verbose=args.verbose,
    )
    try:
        return serve(config, options)
    except OSError as exc:
        print(f"p11guard: cannot start: {exc}", file=sys.stderr)
        return 1


def _load(path: str) -> ServerConfig | None:
    from .config.server import ConfigError, load_server_config

    try:
        return load_server_config(Path(path))
    except ConfigError as exc:
        print(f"p11guard: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"p11guard: cannot read {path}: {exc.strerror}", file=sys.stderr)
    return None


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .policy.check import describe_config

    try:
        text = describe_config(Path(args.path))
    except Exception as exc:  # ConfigError and OSError both end here
        print(f"p11guard: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _cmd_convert_config(args: argparse.Namespace) -> int:
    from .config.server import ConfigError
    from .policy.readers.filterconf import read_filter_conf
    from .policy.writer import to_toml

    try:
        policy = read_filter_conf(Path(args.path), validate=False)
    except (ConfigError, OSError) as exc:
        print(f"p11guard: {exc}", file=sys.stderr)
        return 2
    text = to_toml(policy.policy)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_client_lib(args: argparse.Namespace) -> int:
    from .paths import client_library

    path = client_library()
    if path is None:
        print("p11guard: libp11guard.so is not built (run `make build`)", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep_running=not args.once, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p11guard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"p11guard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy server")
    p.add_argument("--config", required=True,
                   help="p11guard TOML file or Caml Crush pkcs11proxyd.conf")
    p.add_argument("--foreground", "-fg", action="store_true", help="do not daemonize")
    p.add_argument("--pid-file", "-pid", help="write the listener's PID here")
    p.add_argument("--debug-pkcs11", action="store_true",
                   help="log each PKCS#11 call and its return code (never PINs or key bytes)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", help="validate a configuration and print the policy")
    p.add_argument("path")
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("convert-config", help="convert a Caml Crush filter.conf to TOML")
    p.add_argument("path")
    p.add_argument("--output", "-o")
    p.set_defaults(func=_cmd_convert_config)

    p = sub.add_parser("client-lib", help="print the path of libp11guard.so")
    p.set_defaults(func=_cmd_client_lib)

    p = sub.add_parser("demo", help="throwaway SoftHSM2 token + proxy + a client using it")
    p.add_argument("--once", action="store_true", help="stop after showing the client")
    p.add_argument("--port", type=int, default=4444)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
