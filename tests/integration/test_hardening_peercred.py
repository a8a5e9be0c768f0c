"""Unix-socket identities: the peer's uid/gid (SO_PEERCRED, SO_PEERGROUPS) select the
``[[identity]]`` rule; a peer that matches none is refused before any PKCS#11 call."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11guard.client import WireClient
from p11guard.wire import rpc
from p11guard.wire.codec import PROCEDURE_CODECS
from p11guard.wire.procedures import BY_NAME, PROGRAM
from tests.support.pki import audit_events, start_toml_server
from tests.support.softhsm import SOFTHSM_MODULE, Token

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

NOBODY = 65534
CKR_OK = 0
CKR_GENERAL_ERROR = 5


@pytest.fixture
def world_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="p11guard-peercred-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def setup_arch_as(uid: int, gid: int, path: Path) -> str:
    """Connect as uid/gid in a forked child and send SetupArch; what happened?"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        result = b"error"
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                proc = BY_NAME["SetupArch"]
                body = PROCEDURE_CODECS[proc.number].args.encode((1,))
                s.sendall(rpc.frame(rpc.call(1, PROGRAM, 3, proc.number, body)))
                result = b"answered" if s.recv(4096) else b"closed"
        except (ConnectionResetError, BrokenPipeError):  # closed with our call unread,
            result = b"closed"  # or before it was even sent (the refusal came first)
        except OSError as exc:
            result = f"oserror {exc}".encode()
        finally:
            os.write(w, result)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_unix_peer_identity(world_dir: Path, token: Token) -> None:
    sock = world_dir / "p11guard.sock"
    conf = f"""
[[listen]]
unix = "{sock}"
mode = "0666"

[modules]
signing = "{SOFTHSM_MODULE}"
admin = "{SOFTHSM_MODULE}"

[policy]
preset = "none"

[[identity]]
name = "root"
uid = 0
modules = ["admin", "signing"]
admin = true

[[identity]]
name = "signers"
gid = 4242
modules = ["signing"]
"""
    server = start_toml_server(world_dir / "srv", conf, token.env, wait=sock)
    try:
        with WireClient.connect(str(sock)) as c:  # we are root
            assert c.rv("SetupArch", 1) == 1
            assert c.rv("LoadModule", b"admin") == CKR_OK
        assert setup_arch_as(NOBODY, NOBODY, sock) == "closed"  # no rule for nobody
        assert setup_arch_as(NOBODY, 4242, sock) == "answered"  # by group
        events = audit_events(server)
    finally:
        server.stop()
    connected = [e for e in events if e["event"] == "connected"]
    refused = [e for e in events if e["event"] == "refused"]
    assert {e["identity"] for e in connected} >= {"root", "signers"}
    assert refused and refused[0]["uid"] == NOBODY and refused[0]["gid"] == NOBODY
    assert refused[0]["reason"] == "no [[identity]] rule matches"
    assert refused[0]["peer"] == "unix" and isinstance(refused[0]["peer_pid"], int)
