"""Privilege drop and the seccomp sandbox, observed from outside (needs root).

The server starts as root, binds, drops to ``nobody``/``nogroup``; its workers
then run with NoNewPrivs, no core dumps, not dumpable, and after C_Initialize
under the seccomp allow-list.  A PKCS#11 module that makes a forbidden system
call (a tiny test module built here with cc) kills its own worker only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11guard.client import WireClient
from tests.support.net import free_tcp_port
from tests.support.pki import audit_events, start_toml_server
from tests.support.servers import P11GUARD, Server
from tests.support.softhsm import SOFTHSM_MODULE, Token, make_token

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

CKR_OK = 0
NOBODY = 65534
NOGROUP = 65534

# A PKCS#11 module whose C_GetSlotList opens an Internet socket, as a module
# "phoning home" would.  Everything the test does not call is left NULL.
EVIL_MODULE_C = r"""
#define _GNU_SOURCE
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef unsigned long CK_RV;
struct flist { unsigned char major, minor; void *fns[68]; };
struct info { unsigned char cmaj, cmin; char manufacturer[32]; unsigned long flags;
              char description[32]; unsigned char lmaj, lmin; };

static CK_RV ev_initialize(void *args) { (void)args; return 0; }
static CK_RV ev_finalize(void *res) { (void)res; return 0; }
static CK_RV ev_get_info(struct info *info) {
    memset(info, ' ', sizeof *info);
    info->cmaj = 2; info->cmin = 40; info->flags = 0; info->lmaj = 1; info->lmin = 0;
    return 0;
}
static CK_RV ev_get_slot_list(unsigned char present, unsigned long *list,
                              unsigned long *count) {
    (void)present; (void)list;
    int fd = socket(AF_INET, SOCK_STREAM, 0);   /* forbidden in the sandbox */
    if (fd < 0) return 0x5;                      /* CKR_GENERAL_ERROR */
    close(fd);
    *count = 0;
    return 0;
}
static struct flist list;
CK_RV C_GetFunctionList(struct flist **out) {
    list.major = 2; list.minor = 40;
    list.fns[0] = (void *)ev_initialize;
    list.fns[1] = (void *)ev_finalize;
    list.fns[2] = (void *)ev_get_info;
    list.fns[3] = (void *)C_GetFunctionList;
    list.fns[4] = (void *)ev_get_slot_list;
    *out = &list;
    return 0;
}
"""


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="p11guard-hardening-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nobody_token(world_dir: Path) -> Token:
    token = make_token(world_dir / "softhsm")
    for root, dirs, files in os.walk(world_dir / "softhsm"):
        for name in dirs + files:
            os.chown(os.path.join(root, name), NOBODY, NOGROUP)
    os.chown(world_dir / "softhsm", NOBODY, NOGROUP)
    return token


@pytest.fixture
def evil_module(world_dir: Path) -> Path:
    src = world_dir / "evil.c"
    src.write_text(EVIL_MODULE_C)
    lib = world_dir / "libevil.so"
    subprocess.run(["cc", "-std=c11", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)],
                   check=True, capture_output=True)
    return lib


def config(port: int, modules: dict[str, str], sandbox: str = "") -> str:
    mods = "\n".join(f'{alias} = "{path}"' for alias, path in modules.items())
    return f"""
[server]
user = "nobody"
group = "nogroup"
shutdown_grace = 1

[[listen]]
tcp = "127.0.0.1:{port}"

[modules]
{mods}

[policy]
preset = "none"
{sandbox}
"""


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def core_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def session(c: WireClient, alias: bytes) -> int:
    assert c.rv("SetupArch", 1) == 1
    assert c.rv("LoadModule", alias) == CKR_OK
    assert c.rv("Initialize") == CKR_OK
    rv, slots, _ = c.call("GetSlotList", 1, 16)
    assert rv == CKR_OK
    rv, handle = c.call("OpenSession", slots[0], 4 | 2)  # serial, read-write
    assert rv == CKR_OK
    return int(handle)


def worker_of(server: Server, client: WireClient) -> int:
    """The worker serving ``client``: the pid in the audit line naming the client's
    address (the start-up probe's worker logs its own line, in either order)."""
    host, port = client.sock.getsockname()[:2]
    peer = f"{host}:{port}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for event in audit_events(server):
            if event.get("event") == "connected" and event.get("peer") == peer:
                return int(str(event["pid"]))
        time.sleep(0.05)
    raise AssertionError(f"no audit line for the connection from {peer}")


def test_workers_run_unprivileged_and_hardened(world_dir: Path, nobody_token: Token) -> None:
    port = free_tcp_port()
    server = start_toml_server(world_dir / "srv", config(port, {"softhsm": SOFTHSM_MODULE}),
                               nobody_token.env, wait=f"127.0.0.1:{port}")
    try:
        listener = status(server.proc.pid)
        assert listener["Uid"].split() == [str(NOBODY)] * 4
        assert listener["Gid"].split() == [str(NOGROUP)] * 4
        assert listener["Groups"] == str(NOGROUP)
        assert listener["NoNewPrivs"] == "1" and listener["CapEff"] == "0" * 16
        with WireClient.connect(f"127.0.0.1:{port}") as c:
            handle = session(c, b"softhsm")
            assert c.rv("Login", handle, 1, b"1234") == CKR_OK  # the token is nobody's
            rv, data = c.call("GenerateRandom", handle, 16)
            assert rv == CKR_OK and len(data) == 16
            pid = worker_of(server, c)
            assert pid in children(server.proc.pid)
            st = status(pid)
            assert st["Uid"].split() == [str(NOBODY)] * 4
            assert st["Gid"].split() == [str(NOGROUP)] * 4
            assert st["NoNewPrivs"] == "1"
            assert st["CapEff"] == st["CapPrm"] == "0" * 16
            assert st["Seccomp"] == "2"  # filter mode, installed after C_Initialize
            # Every child, pre-forked spare workers included, was forked after the drop.
            for child in children(server.proc.pid):
                other = status(child)
                assert other["Uid"].split() == [str(NOBODY)] * 4
                assert other["NoNewPrivs"] == "1" and other["CapEff"] == "0" * 16
            assert core_limit(pid) == "0 0"
            # Not dumpable: the kernel gives its /proc files to root, so its own uid
            # (and any other process of that user) cannot ptrace it or read its memory.
            assert os.stat(f"/proc/{pid}/mem").st_uid == 0
            peek = subprocess.run(["cat", f"/proc/{pid}/environ"], user=NOBODY, group=NOGROUP,
                                  extra_groups=[], capture_output=True, text=True)
            assert peek.returncode != 0 and "Permission denied" in peek.stderr
    finally:
        server.stop()
    assert "running as nobody" in server.log_text()


def test_forbidden_syscall_kills_only_that_worker(world_dir: Path, nobody_token: Token,
                                                  evil_module: Path) -> None:
    port = free_tcp_port()
    server = start_toml_server(
        world_dir / "srv",
        config(port, {"softhsm": SOFTHSM_MODULE, "evil": str(evil_module)}),
        nobody_token.env, wait=f"127.0.0.1:{port}")
    address = f"127.0.0.1:{port}"
    try:
        with WireClient.connect(address) as good:
            handle = session(good, b"softhsm")
            with WireClient.connect(address) as bad:
                assert bad.rv("SetupArch", 1) == 1
                assert bad.rv("LoadModule", b"evil") == CKR_OK
                assert bad.rv("Initialize") == CKR_OK  # sandbox goes on here
                with pytest.raises((ConnectionError, OSError)):
                    bad.call("GetSlotList", 0, 0)  # socket(AF_INET) -> SIGSYS
            # The other worker and the listener are untouched.
            rv, data = good.call("GenerateRandom", handle, 8)
            assert rv == CKR_OK and len(data) == 8
            with WireClient.connect(address) as again:
                session(again, b"softhsm")
        deadline = time.monotonic() + 5
        while "killed by SIGSYS" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.proc.poll() is None
    finally:
        server.stop()
    log = server.log_text()
    assert "killed by SIGSYS: the seccomp sandbox stopped a system call" in log
    assert "[sandbox] allow" in log


def test_errno_action_and_sandbox_off(world_dir: Path, nobody_token: Token,
                                      evil_module: Path) -> None:
    """action = "errno": the call fails inside the module, the worker lives on.
    seccomp = false: the call succeeds, and the log says the sandbox is off."""
    for sandbox, expected in (('[sandbox]\naction = "errno"', 0x5), ("[sandbox]\nseccomp = false",
                                                                    CKR_OK)):
        port = free_tcp_port()
        server = start_toml_server(
            world_dir / f"srv{port}", config(port, {"evil": str(evil_module)}, sandbox),
            nobody_token.env, wait=f"127.0.0.1:{port}")
        try:
            with WireClient.connect(f"127.0.0.1:{port}") as c:
                assert c.rv("SetupArch", 1) == 1
                assert c.rv("LoadModule", b"evil") == CKR_OK
                assert c.rv("Initialize") == CKR_OK
                assert c.call("GetSlotList", 0, 0)[0] == expected
                assert c.rv("Finalize") == CKR_OK
        finally:
            server.stop()
        assert ("sandbox off" in server.log_text()) == (expected == CKR_OK)


def test_binds_a_privileged_port_before_dropping(world_dir: Path, nobody_token: Token) -> None:
    """Ports below 1024 need root: bound first, then the drop."""
    with socket.socket() as probe:
        port = 0
        for candidate in range(900, 1000):
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = candidate
            break
    assert port, "no free port below 1024"
    server = start_toml_server(world_dir / "srv", config(port, {"softhsm": SOFTHSM_MODULE}),
                               nobody_token.env, wait=f"127.0.0.1:{port}")
    try:
        with WireClient.connect(f"127.0.0.1:{port}") as c:
            session(c, b"softhsm")
        assert status(server.proc.pid)["Uid"].split()[0] == str(NOBODY)
    finally:
        server.stop()


def test_refuses_to_start_when_the_user_is_unknown(world_dir: Path,
                                                   nobody_token: Token) -> None:
    conf = world_dir / "bad.toml"
    conf.write_text(config(free_tcp_port(), {"softhsm": SOFTHSM_MODULE}).replace(
        'user = "nobody"', 'user = "no-such-user-p11guard"'))
    out = subprocess.run([*P11GUARD, "serve", "--config", str(conf), "--foreground"],
                         env=nobody_token.env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "unknown user 'no-such-user-p11guard'" in out.stderr
