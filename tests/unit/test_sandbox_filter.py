"""The seccomp filter (evaluated by a small BPF interpreter, then by the kernel), the
[sandbox] configuration, the privilege drop and the systemd helpers."""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from p11guard.config import ConfigError, parse_server_config
from p11guard.config.model import SandboxConfig
from p11guard.server import sandbox as sb
from p11guard.server import systemd

ALLOW = sb.SECCOMP_RET_ALLOW
KILL = sb.SECCOMP_RET_KILL_PROCESS
NR = sb.SYSCALLS


def run_bpf(prog: list[sb.Insn], nr: int, args: tuple[int, ...] = (),
            arch: int = sb.AUDIT_ARCH_X86_64) -> int:
    """Evaluate a classic-BPF seccomp program on one system call (the subset we emit)."""
    full = (list(args) + [0] * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)
    acc, pc = 0, 0
    while True:
        assert 0 <= pc < len(prog), "jumped out of the program"
        code, jt, jf, k = prog[pc]
        if code == sb.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == sb.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == sb.BPF_JGE_K:
            pc += 1 + (jt if acc >= k else jf)
        elif code == sb.BPF_JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == sb.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.fixture
def prog() -> list[sb.Insn]:
    return sb.build_filter(SandboxConfig(), pid=4321)


def test_program_shape(prog: list[sb.Insn]) -> None:
    assert len(prog) < sb.BPF_MAXINSNS
    assert all(0 <= jt <= 255 and 0 <= jf <= 255 for _, jt, jf, _ in prog)
    assert prog[-1] == (sb.BPF_RET_K, 0, 0, KILL)


def test_plain_calls(prog: list[sb.Insn]) -> None:
    for name in ("read", "write", "openat", "mmap", "futex", "exit_group", "getrandom",
                 "fsync", "flock", "sendmsg", "recvfrom"):
        assert run_bpf(prog, NR[name]) == ALLOW, name
    for name in ("execve", "execveat", "fork", "vfork", "ptrace", "connect", "bind", "accept",
                 "listen", "mount", "setuid", "setresuid", "chroot", "unshare", "setns",
                 "process_vm_readv", "bpf", "perf_event_open", "kexec_load", "init_module",
                 "seccomp", "memfd_create"):
        assert run_bpf(prog, NR[name]) == KILL, name


def test_conditional_calls(prog: list[sb.Insn]) -> None:
    thread_flags = 0x3D0F00  # glibc's pthread_create flags (CLONE_THREAD among them)
    assert run_bpf(prog, NR["clone"], (thread_flags,)) == ALLOW
    assert run_bpf(prog, NR["clone"], (0x11,)) == KILL  # fork() = SIGCHLD
    assert run_bpf(prog, NR["clone3"]) == sb.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run_bpf(prog, NR["ioctl"], (2, sb.TCGETS)) == ALLOW
    assert run_bpf(prog, NR["ioctl"], (0, 0x5412)) == KILL  # TIOCSTI
    assert run_bpf(prog, NR["prctl"], (sb.PR_SET_NAME,)) == ALLOW
    assert run_bpf(prog, NR["prctl"], (sb.PR_SET_DUMPABLE, 1)) == KILL
    assert run_bpf(prog, NR["kill"], (4321, 6)) == ALLOW
    assert run_bpf(prog, NR["kill"], (1, 9)) == KILL
    assert run_bpf(prog, NR["kill"], (4321 | 1 << 32, 9)) == KILL  # the high word counts
    assert run_bpf(prog, NR["tgkill"], (4321, 4322, 6)) == ALLOW
    assert run_bpf(prog, NR["prlimit64"], (0, 4, 0, 0x7FFF0000)) == ALLOW  # read only
    assert run_bpf(prog, NR["prlimit64"], (0, 4, 0x7FFF0000, 0)) == KILL
    assert run_bpf(prog, NR["socket"], (socket.AF_UNIX, 2)) == (
        sb.SECCOMP_RET_ERRNO | errno.EACCES)
    assert run_bpf(prog, NR["socket"], (socket.AF_INET, 1)) == KILL


def test_other_abis_and_unknown_numbers(prog: list[sb.Insn]) -> None:
    assert run_bpf(prog, NR["read"], arch=0x40000003) == KILL  # i386
    assert run_bpf(prog, NR["read"] | sb.X32_SYSCALL_BIT) == KILL  # x32
    assert run_bpf(prog, sb.LAST_KNOWN + 5) == sb.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert run_bpf(prog, 400) == KILL  # a gap in the table


def test_configuration_changes_the_program() -> None:
    cfg = SandboxConfig(action="errno", allow=("socket", "connect"), deny=("rename",))
    prog = sb.build_filter(cfg, pid=1)
    assert run_bpf(prog, NR["socket"], (socket.AF_INET,)) == ALLOW  # unrestricted now
    assert run_bpf(prog, NR["connect"]) == ALLOW
    assert run_bpf(prog, NR["rename"]) == sb.SECCOMP_RET_ERRNO | errno.EPERM
    assert run_bpf(prog, NR["execve"]) == sb.SECCOMP_RET_ERRNO | errno.EPERM
    log_prog = sb.build_filter(SandboxConfig(action="log"), pid=1)
    assert run_bpf(log_prog, NR["execve"]) == sb.SECCOMP_RET_LOG


MIN = '[[listen]]\ntcp = "127.0.0.1:1"\n[modules]\nsofthsm = "/x.so"\n'


def test_sandbox_table() -> None:
    cfg = parse_server_config(MIN + '[sandbox]\naction = "trap"\nallow = ["socket"]\n'
                              'deny = ["rename"]\n', "s.toml")
    assert cfg.sandbox == SandboxConfig(True, "trap", ("socket",), ("rename",))
    assert parse_server_config(MIN, "s.toml").sandbox == SandboxConfig()
    for bad, message in (
        ('[sandbox]\naction = "maybe"\n', "sandbox.action: unknown action 'maybe'"),
        ('[sandbox]\nallow = ["nosuchcall"]\n', "unknown system call 'nosuchcall'"),
        ('[sandbox]\nseccomp = "yes"\n', "sandbox.seccomp: must be true or false"),
        ('[sandbox]\nfoo = 1\n', "sandbox.foo: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            parse_server_config(MIN + bad, "s.toml")


def in_child(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child; its exit code, or -signal."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reported through the exit status
        code = 0
        try:
            fn()
        except BaseException as exc:
            print(f"child: {exc!r}", file=sys.stderr)
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(sb.seccomp_supported() is not None, reason="no seccomp here")
def test_kernel_enforces_the_filter(tmp_path: Path) -> None:
    def allowed_work() -> None:
        sb.harden_process()
        sb.install_seccomp(SandboxConfig())
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(1))  # clone with CLONE_THREAD
        t.start()
        t.join()
        (tmp_path / "f").write_text("token object")
        os.rename(tmp_path / "f", tmp_path / "g")
        assert (tmp_path / "g").read_text() == "token object" and out == [1]
        assert sb.process_status()["Seccomp"] == "2"
        with pytest.raises(PermissionError):
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # syslog(3) fails quietly

    assert in_child(allowed_work) == 0
    for forbidden in (lambda: socket.socket(), os.fork,
                      lambda: sb.prctl(sb.PR_SET_DUMPABLE, 1),
                      lambda: os.execv("/bin/true", ["true"])):
        def attempt(call: Callable[[], object] = forbidden) -> None:
            sb.harden_process()
            sb.install_seccomp(SandboxConfig())
            call()

        assert in_child(attempt) == -31  # SIGSYS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_drop_privileges_and_hardening() -> None:
    def drop() -> None:
        creds = sb.resolve_user("nobody", None)
        assert creds is not None and creds.uid == 65534
        os.chdir("/tmp")
        sb.drop_privileges(creds, chroot="/")  # chroot first, then the ids
        sb.harden_process()
        assert os.getcwd() == "/"
        assert os.getresuid() == (65534,) * 3 and os.getgroups() == [creds.gid]
        assert sb.prctl(sb.PR_GET_DUMPABLE) == 0
        assert sb.prctl(sb.PR_GET_NO_NEW_PRIVS) == 1
        import resource

        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        with pytest.raises(PermissionError):
            os.setuid(0)

    assert in_child(drop) == 0
    with pytest.raises(OSError, match="unknown user"):
        sb.resolve_user("no-such-user-p11guard", None)
    with pytest.raises(OSError, match="unknown group"):
        sb.resolve_user("nobody", "no-such-group-p11guard")
    assert sb.resolve_user(None, None) is None


def test_listen_fds_environment() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_sockets(env) == [] and env == {}  # not our pid: ignored, cleared
    assert systemd.listen_sockets({}) == []
    assert systemd.listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}) == []


def test_sd_notify(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path)}
        notifier = systemd.Notifier(env)
        assert "NOTIFY_SOCKET" not in env
        assert notifier.ready("serving")
        message = manager.recv(1024).decode().split("\n")
        assert message[:2] == ["READY=1", f"MAINPID={os.getpid()}"]
        assert message[2] == "STATUS=serving"
        assert notifier.stopping() and manager.recv(1024) == b"STOPPING=1"
        notifier.close()
    assert not systemd.Notifier({}).ready()
