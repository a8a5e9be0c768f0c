"""`p11guard demo` (what `make run` does): a throwaway SoftHSM2 token, the proxy
in front of it with the default policy, and a real PKCS#11 client using it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .paths import client_library

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
USER_PIN = "1234"
SO_PIN = "12345678"
LABEL = "p11guard-demo"


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def _make_token(root: Path) -> dict[str, str]:
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL,
                    "--pin", USER_PIN, "--so-pin", SO_PIN],
                   env=env, check=True, capture_output=True)
    return env


def _write_config(root: Path, port: int) -> Path:
    config = root / "p11guard.toml"
    config.write_text(
        "# Written by `p11guard demo`: one TCP listener on loopback, one module alias,\n"
        "# no [policy] section, so the secure default policy applies.\n"
        "[[listen]]\n"
        f'tcp = "127.0.0.1:{port}"\n\n'
        "[modules]\n"
        f'softhsm = "{SOFTHSM}"\n'
    )
    return config


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _client_module() -> tuple[str, str] | None:
    lib = client_library()
    if lib is not None:
        return str(lib), "libp11guard.so (p11guard's client library)"
    caml = "/usr/lib/x86_64-linux-gnu/caml-crush/libp11clienttcp.so"
    if Path(caml).exists():
        return caml, "Debian's Caml Crush client library"
    return None


def _show(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        sys.stdout.write(out.stderr)


def run_demo(keep_running: bool = True, port: int = 4444) -> int:
    for tool in ("softhsm2-util", "pkcs11-tool"):
        if shutil.which(tool) is None:
            print(f"p11guard demo: {tool} is missing (run `make build`)", file=sys.stderr)
            return 1
    root = Path(tempfile.mkdtemp(prefix="p11guard-demo-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        _say(f"throwaway SoftHSM2 token '{LABEL}' in {root}")
        server_env = _make_token(root)
        config = _write_config(root, port)
        _say(f"starting the proxy: p11guard serve --config {config} --foreground")
        proc = subprocess.Popen(
            [sys.executable, "-m", "p11guard", "serve", "--config", str(config), "--foreground"],
            env=server_env,
        )
        if not _wait_port(port, proc):
            print(f"p11guard demo: the server did not start on 127.0.0.1:{port}", file=sys.stderr)
            return 1
        client = _client_module()
        if client is None:
            print("p11guard demo: no client library (build libp11guard.so with `make build`)",
                  file=sys.stderr)
            return 1
        module, what = client
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=f"127.0.0.1:{port}",
                   PKCS11PROXY_LIBNAME="softhsm")
        env.pop("SOFTHSM2_CONF", None)
        _say(f"a client using the proxy through {what}")
        base = ["pkcs11-tool", "--module", module]
        _show([*base, "--list-slots"], env)
        _show([*base, "--token-label", LABEL, "--login", "--pin", USER_PIN, "--keypairgen",
               "--key-type", "EC:prime256v1", "--id", "01", "--label", "demo-key"], env)
        # SoftHSM2 2.6 offers plain CKM_ECDSA: the client hashes, the token signs.
        digest = root / "message.sha256"
        digest.write_bytes(hashlib.sha256(b"hello from p11guard\n").digest())
        sig = root / "message.sig"
        login = ["--token-label", LABEL, "--login", "--pin", USER_PIN]
        _show([*base, *login, "--sign", "--id", "01", "-m", "ECDSA", "-i", str(digest),
               "-o", str(sig)], env)
        _show([*base, *login, "--verify", "--id", "01", "-m", "ECDSA", "-i", str(digest),
               "--signature-file", str(sig)], env)
        _show([*base, "--token-label", LABEL, "--login", "--pin", USER_PIN, "--list-objects"],
              env)
        if not keep_running:
            return 0
        _say("the proxy keeps running; in another shell:")
        print(f"  export PKCS11PROXY_SOCKET_PATH=127.0.0.1:{port} PKCS11PROXY_LIBNAME=softhsm")
        print(f"  pkcs11-tool --module {module} --token-label {LABEL} --login --pin {USER_PIN} -O")
        _say("Ctrl-C stops it and deletes the token")
        with contextlib.suppress(KeyboardInterrupt):
            proc.wait()
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
