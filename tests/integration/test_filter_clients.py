"""Filter options seen by real applications: pkcs11-tool through Debian's Caml Crush
client library and through libp11guard.so, against p11guard (and pkcs11proxyd)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from p11guard.paths import client_library
from tests.support.filter import direct_tool, running
from tests.support.servers import CAMLCRUSH_TCP, Server
from tests.support.softhsm import Token

_LIB = client_library()
CLIENTS = [pytest.param(CAMLCRUSH_TCP, id="camlcrush-client"),
           pytest.param(str(_LIB), id="libp11guard",
                        marks=pytest.mark.skipif(_LIB is None, reason="libp11guard.so not built"))]
LOGIN = ("--login", "--pin", "1234")


def tool(lib: str, server: Server, *args: str, check: bool = True
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pkcs11-tool", "--module", lib, *args], env=server.client_env(),
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"pkcs11-tool {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


@pytest.mark.parametrize("lib", CLIENTS)
@pytest.mark.parametrize("kind", ["p11guard", "camlcrush"])
def test_forbidden_mechanism_with_pkcs11_tool(lib: str, kind: str, token: Token,
                                              tmp_path: Path) -> None:
    rule = 'forbidden_mechanisms = [("softhsm", [CKM_ECDSA, CKM_SHA_1])]\n'
    with running(kind, token, tmp_path, rule) as server:
        # pkcs11-tool -M does the size query, then fetches the (filtered) list.
        listing = tool(lib, server, "-M").stdout
        assert "ECDSA," not in listing.replace("ECDSA-", "") and "SHA-1," not in listing
        assert "SHA256" in listing
        tool(lib, server, *LOGIN, "--keypairgen", "--key-type", "EC:prime256v1",
             "--id", "01", "--label", "ec")
        data = tmp_path / "data"
        data.write_bytes(b"\x11" * 32)
        refused = tool(lib, server, *LOGIN, "--sign", "-m", "ECDSA", "--id", "01",
                       "--input-file", str(data), "--output-file", str(tmp_path / "sig"),
                       check=False)
        assert refused.returncode != 0 and "CKR_MECHANISM_INVALID" in refused.stderr
        # Other calls still work.
        digest = tool(lib, server, "--hash", "-m", "SHA256", "--input-file", str(data),
                      "--output-file", str(tmp_path / "h"))
        assert digest.returncode == 0 and (tmp_path / "h").stat().st_size == 32


@pytest.mark.parametrize("lib", CLIENTS)
def test_allowed_labels_with_pkcs11_tool(lib: str, token: Token, tmp_path: Path) -> None:
    direct_tool(token, "--keygen", "--key-type", "AES:32", "--label", "hidden", "--id", "07")
    direct_tool(token, "--keygen", "--key-type", "AES:32", "--label", "app_visible",
                "--id", "08")
    rule = 'allowed_labels = [("softhsm", ["app_.*"])]\n'
    with running("p11guard", token, tmp_path, rule) as server:
        objects = tool(lib, server, *LOGIN, "-O").stdout
        assert "app_visible" in objects and "hidden" not in objects
        refused = tool(lib, server, *LOGIN, "--keygen", "--key-type", "AES:32",
                       "--label", "other", check=False)
        assert refused.returncode != 0 and "CKR_ATTRIBUTE_VALUE_INVALID" in refused.stderr
