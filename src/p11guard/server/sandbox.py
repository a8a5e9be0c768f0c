"""Privilege drop and the worker sandbox (Linux).

Order of steps (replaces Caml Crush's empty ``C_Daemonize`` hook; see
docs/deployment.md):

listener, once, as root:
  1. read the configuration, open the logs, import everything a worker needs
     (after a chroot or the drop the Python tree may be unreadable);
  2. bind the listeners (ports < 1024 allowed) or adopt systemd's (LISTEN_FDS);
  3. build the TLS context (reads the private key) and the identity lists;
  4. chroot (optional), then :func:`drop_privileges`: setgroups, setresgid,
     setresuid, and check that root cannot be regained;
  5. :func:`harden_process`: PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE 0 (no ptrace
     attach, no /proc/PID/mem, no core), RLIMIT_CORE 0 - workers hold PINs;
  6. tell systemd READY=1, accept.
each worker (forked after 4-5: a spare forked ahead, or forked on accept):
  7. a spare only, before it has a client: dlopen the configured modules (no
     C_Initialize; ``preload_modules``) and :func:`prepare_seccomp`;
  8. TLS handshake, identity, refusal of unknown peers (before any PKCS#11 call);
  9. LoadModule, Initialize (the module opens its files, threads, devices);
  10. :func:`install_seccomp`: the allow-list filter, on every thread (TSYNC).

The seccomp filter is a hand-built classic BPF program (no dependency).  It
allows the system calls a worker, CPython and an ordinary PKCS#11 module make
after initialisation: file I/O (token files), memory, threads, time, the
connected socket.  It denies creating sockets, connecting, exec, fork,
ptrace, mount, privilege and namespace changes.  A few calls are allowed only
with safe arguments: clone only for threads, ioctl only for a handful of
harmless requests, prctl only for reading state and naming threads, kill and
tgkill only towards the worker itself, prlimit64 only for reading, and socket
fails with EACCES for Unix sockets (a module's syslog(3) call then drops its
message instead of killing the worker).
"""

from __future__ import annotations

import ctypes
import errno
import grp
import logging
import os
import platform
import pwd
import resource
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from ..config.model import SandboxConfig, SeccompAction
from ..policy.model import ConfigError

log = logging.getLogger("p11guard.sandbox")

# --- prctl / seccomp constants (linux/prctl.h, linux/seccomp.h, linux/filter.h) ------

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NAME = 15
PR_GET_NAME = 16
PR_GET_SECCOMP = 21
PR_CAPBSET_READ = 23
PR_GET_TIMERSLACK = 30
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_VMA = 0x53564D41  # glibc names anonymous mappings (2.38+)

SYS_SECCOMP_X86_64 = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CKR_GENERAL_ERROR = 0x5

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K
BPF_MAXINSNS = 4096

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
OFF_NR = 0
OFF_ARCH = 4


def _arg_low(n: int) -> int:
    return 16 + 8 * n  # little-endian: the low 32 bits come first


def _arg_high(n: int) -> int:
    return 16 + 8 * n + 4


CLONE_THREAD = 0x00010000
AF_UNIX = 1
TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = (
    0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)

X86_64_LOW = """
read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction
rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select sched_yield
mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep getitimer alarm
setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg recvmsg shutdown bind
listen getsockname getpeername socketpair setsockopt getsockopt clone fork vfork execve exit
wait4 kill uname semget semop semctl shmdt msgget msgsnd msgrcv msgctl fcntl flock fsync
fdatasync truncate ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink
symlink readlink chmod fchmod chown fchown lchown umask gettimeofday getrlimit getrusage sysinfo
times ptrace getuid syslog getgid setuid setgid geteuid getegid setpgid getppid getpgrp setsid
setreuid setregid getgroups setgroups setresuid getresuid setresgid getresgid getpgid setfsuid
setfsgid getsid capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend
sigaltstack utime mknod uselib personality ustat statfs fstatfs sysfs getpriority setpriority
sched_setparam sched_getparam sched_setscheduler sched_getscheduler sched_get_priority_max
sched_get_priority_min sched_rr_get_interval mlock munlock mlockall munlockall vhangup
modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex setrlimit chroot sync acct settimeofday
mount umount2 swapon swapoff reboot sethostname setdomainname iopl ioperm create_module
init_module delete_module get_kernel_syms query_module quotactl nfsservctl getpmsg putpmsg
afs_syscall tuxcall security gettid readahead setxattr lsetxattr fsetxattr getxattr lgetxattr
fgetxattr listxattr llistxattr flistxattr removexattr lremovexattr fremovexattr tkill time futex
sched_setaffinity sched_getaffinity set_thread_area io_setup io_destroy io_getevents io_submit
io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old
remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64 timer_create
timer_settime timer_gettime timer_getoverrun timer_delete clock_settime clock_gettime
clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill utimes vserver mbind
set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify
mq_getsetattr kexec_load waitid add_key request_key keyctl ioprio_set ioprio_get inotify_init
inotify_add_watch inotify_rm_watch migrate_pages openat mkdirat mknodat fchownat futimesat
newfstatat unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat pselect6 ppoll
unshare set_robust_list get_robust_list splice tee sync_file_range vmsplice move_pages utimensat
epoll_pwait signalfd timerfd_create eventfd fallocate timerfd_settime timerfd_gettime accept4
signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev rt_tgsigqueueinfo
perf_event_open recvmmsg fanotify_init fanotify_mark prlimit64 name_to_handle_at
open_by_handle_at clock_adjtime syncfs sendmmsg setns getcpu process_vm_readv process_vm_writev
kcmp finit_module sched_setattr sched_getattr renameat2 seccomp getrandom memfd_create
kexec_file_load bpf execveat userfaultfd membarrier mlock2 copy_file_range preadv2 pwritev2
pkey_mprotect pkey_alloc pkey_free statx io_pgetevents rseq
"""  # numbers 0..334, in order
X86_64_HIGH = """
pidfd_send_signal io_uring_setup io_uring_enter io_uring_register open_tree move_mount fsopen
fsconfig fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2
process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset landlock_add_rule
landlock_restrict_self memfd_secret process_mrelease futex_waitv set_mempolicy_home_node
"""  # numbers 424..450, in order


def _table() -> dict[str, int]:
    names: dict[str, int] = {}
    for base, text in ((0, X86_64_LOW), (424, X86_64_HIGH)):
        for offset, name in enumerate(text.split()):
            names[name] = base + offset
    return names


SYSCALLS: Mapping[str, int] = _table()
LAST_KNOWN = max(SYSCALLS.values())

# Allowed without conditions after C_Initialize.
DEFAULT_ALLOW: tuple[str, ...] = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2",
    "pwritev2", "lseek", "close", "close_range", "open", "openat", "stat", "fstat", "lstat",
    "newfstatat", "statx", "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents64", "getcwd", "fcntl", "flock", "fsync", "fdatasync", "ftruncate",
    "fallocate", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat",
    "rmdir", "fchmod", "umask", "dup", "dup2", "dup3", "pipe2", "mmap", "munmap", "mprotect",
    "mremap", "madvise", "brk", "mlock", "munlock", "mlock2", "msync", "mincore", "membarrier",
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "gettid", "getpid", "getppid", "getuid", "geteuid", "getgid",
    "getegid", "getresuid", "getresgid", "getgroups", "getpgrp", "getrlimit", "getrusage",
    "times", "sysinfo", "uname", "clock_gettime", "clock_getres", "gettimeofday", "time",
    "nanosleep", "clock_nanosleep", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
    "rt_sigpending", "sigaltstack", "restart_syscall", "exit", "exit_group", "poll", "ppoll",
    "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "recvfrom",
    "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername", "getrandom",
)

# Allowed only with some arguments (see _conditional); naming one in ``allow``
# lifts the condition.
CONDITIONAL = ("clone", "clone3", "ioctl", "prctl", "kill", "tgkill", "tkill", "prlimit64",
               "socket", "socketpair")
SAFE_IOCTLS = (TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX)
SAFE_PRCTLS = (PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP, PR_CAPBSET_READ,
               PR_GET_TIMERSLACK, PR_GET_NO_NEW_PRIVS, PR_SET_VMA)

ACTIONS: Mapping[SeccompAction, int] = {
    "kill": SECCOMP_RET_KILL_PROCESS,
    "trap": SECCOMP_RET_TRAP,
    "errno": SECCOMP_RET_ERRNO | errno.EPERM,
    "log": SECCOMP_RET_LOG,
}

Insn = tuple[int, int, int, int]  # code, jt, jf, k


def _stmt(code: int, k: int) -> Insn:
    return (code, 0, 0, k & 0xFFFFFFFF)


def _jump(code: int, k: int, jt: int, jf: int) -> Insn:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _one_of(offset: int, values: Iterable[int], deny: int) -> list[Insn]:
    """Allow when the 32-bit word at ``offset`` is one of ``values``; else ``deny``."""
    out = [_stmt(BPF_LD_W_ABS, offset)]
    for value in values:
        out += [_jump(BPF_JEQ_K, value, 0, 1), _stmt(BPF_RET_K, SECCOMP_RET_ALLOW)]
    out.append(_stmt(BPF_RET_K, deny))
    return out


def _conditional(name: str, deny: int, pid: int) -> list[Insn]:
    """The checks of one conditionally allowed call (run once its number matched)."""
    if name == "clone":  # threads only: a new process would escape nothing, but exec...
        return [_stmt(BPF_LD_W_ABS, _arg_low(0)),
                _jump(BPF_JSET_K, CLONE_THREAD, 0, 1),
                _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
                _stmt(BPF_RET_K, deny)]
    if name == "clone3":  # flags sit behind a pointer; ENOSYS makes glibc use clone
        return [_stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)]
    if name == "ioctl":  # the request is an unsigned int: the low word is all of it
        return _one_of(_arg_low(1), SAFE_IOCTLS, deny)
    if name == "prctl":  # no PR_SET_DUMPABLE 1, no PR_SET_SECCOMP games
        return _one_of(_arg_low(0), SAFE_PRCTLS, deny)
    if name in ("kill", "tgkill"):  # only towards ourselves (abort(), raise())
        return [_stmt(BPF_LD_W_ABS, _arg_high(0)),
                _jump(BPF_JEQ_K, 0, 0, 3),
                _stmt(BPF_LD_W_ABS, _arg_low(0)),
                _jump(BPF_JEQ_K, pid, 0, 1),
                _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
                _stmt(BPF_RET_K, deny)]
    if name == "socket":
        # Modules syslog(3) their errors (SoftHSM does): a Unix socket is refused
        # quietly, and libc drops the message.  Any other family is the action.
        return [_stmt(BPF_LD_W_ABS, _arg_low(0)),
                _jump(BPF_JEQ_K, AF_UNIX, 0, 1),
                _stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno.EACCES),
                _stmt(BPF_RET_K, deny)]
    if name == "socketpair":  # a channel (server/channels.py): two connected Unix ends
        return _one_of(_arg_low(0), (AF_UNIX,), deny)
    if name == "tkill":
        return [_stmt(BPF_RET_K, deny)]
    if name == "prlimit64":  # reading only: new_limit (arg 2) must be NULL
        return [_stmt(BPF_LD_W_ABS, _arg_low(2)),
                _jump(BPF_JEQ_K, 0, 0, 3),
                _stmt(BPF_LD_W_ABS, _arg_high(2)),
                _jump(BPF_JEQ_K, 0, 0, 1),
                _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
                _stmt(BPF_RET_K, deny)]
    raise AssertionError(name)


def allowed_set(cfg: SandboxConfig) -> tuple[list[str], list[str]]:
    """(unconditionally allowed, conditionally allowed) names for ``cfg``."""
    plain = [n for n in DEFAULT_ALLOW if n not in cfg.deny]
    plain += [n for n in cfg.allow if n not in plain]
    conditional = [n for n in CONDITIONAL if n not in cfg.allow and n not in cfg.deny]
    return plain, conditional


def build_filter(cfg: SandboxConfig, pid: int) -> list[Insn]:
    """The BPF program for x86-64.  Every block ends in a return: no long jumps."""
    deny = ACTIONS[cfg.action]
    prog: list[Insn] = [
        _stmt(BPF_LD_W_ABS, OFF_ARCH),
        _jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),  # another ABI (i386 int 0x80)
        _stmt(BPF_LD_W_ABS, OFF_NR),
        _jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),  # the x32 ABI
        # Newer than our table: "not implemented" lets a newer libc fall back.
        _jump(BPF_JGE_K, LAST_KNOWN + 1, 0, 1),
        _stmt(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    plain, conditional = allowed_set(cfg)
    for name in plain:
        prog += [_jump(BPF_JEQ_K, SYSCALLS[name], 0, 1), _stmt(BPF_RET_K, SECCOMP_RET_ALLOW)]
    for name in conditional:
        block = _conditional(name, deny, pid)
        # A block may load an argument into the accumulator; it always ends in a
        # return, so the comparisons after it still see the system call number.
        prog.append(_jump(BPF_JEQ_K, SYSCALLS[name], 0, len(block)))
        prog += block
    prog.append(_stmt(BPF_RET_K, deny))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp filter too long ({len(prog)} instructions)")
    return prog


# --- installing ---------------------------------------------------------------------


class _SockFilter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    fn = _c().prctl
    fn.restype = ctypes.c_int
    rv = int(fn(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)))
    if rv < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return rv


def seccomp_supported() -> str | None:
    """None when the sandbox can be installed here, else why not."""
    if platform.system() != "Linux":
        return "not Linux"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"no system call table for {platform.machine()} (x86-64 only)"
    try:
        prctl(PR_GET_SECCOMP)
    except OSError as exc:
        return f"the kernel has no seccomp ({exc.strerror})"
    return None


# (pid, configuration, program): built ahead by a spare worker (prepare_seccomp).
_prepared: tuple[int, SandboxConfig, _SockFprog] | None = None


def _compile(cfg: SandboxConfig) -> _SockFprog:
    prog = build_filter(cfg, os.getpid())
    filters = (_SockFilter * len(prog))(*[_SockFilter(*insn) for insn in prog])
    return _SockFprog(len(prog), filters)  # keeps ``filters`` alive (ctypes _objects)


def prepare_seccomp(cfg: SandboxConfig) -> None:
    """Build this process's filter now, before it has a client (a spare worker);
    :func:`install_seccomp` then only installs it.  The program names the pid."""
    global _prepared
    _prepared = (os.getpid(), cfg, _compile(cfg))


def _program(cfg: SandboxConfig) -> _SockFprog:
    if _prepared is not None and _prepared[0] == os.getpid() and _prepared[1] == cfg:
        return _prepared[2]
    return _compile(cfg)


def install_seccomp(cfg: SandboxConfig) -> None:
    """Install the filter on every thread of this process; raises OSError on failure."""
    fprog = _program(cfg)
    # Required for an unprivileged process; set by harden_process already.
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    syscall = _c().syscall
    syscall.restype = ctypes.c_long
    for flags in (SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG,
                  SECCOMP_FILTER_FLAG_TSYNC):
        rv = int(syscall(ctypes.c_long(SYS_SECCOMP_X86_64), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                         ctypes.c_long(flags), ctypes.byref(fprog)))
        if rv == 0:
            return
        err = ctypes.get_errno()
        if rv > 0:
            raise OSError(errno.EBUSY, f"seccomp: thread {rv} could not be synchronised")
        if err != errno.EINVAL:  # EINVAL: an old kernel without the LOG flag
            raise OSError(err, f"seccomp: {os.strerror(err)}")
    raise OSError(errno.EINVAL, "seccomp: the kernel refused the filter")


# --- privileges ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int
    gid: int
    name: str


def resolve_user(user: str | None, group: str | None) -> Credentials | None:
    """The uid/gid to drop to; a name or a number; the group defaults to the user's.

    Raises OSError (the command line reports it as "cannot start").
    """
    if user is None and group is None:
        return None
    if user is None:
        raise OSError("group is set without user")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise OSError(f"unknown user {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(
                group).gr_gid
        except KeyError:
            raise OSError(f"unknown group {group!r}") from None
    return Credentials(pw.pw_uid, gid, pw.pw_name)


def drop_privileges(creds: Credentials | None, chroot: str | None = None) -> None:
    """chroot (optional), then become ``creds`` for good; raises on any failure."""
    if chroot is not None:
        os.chroot(chroot)
        os.chdir("/")
    if creds is None:
        if os.geteuid() == 0:
            log.warning("running as root: set user (and group) to drop privileges")
        return
    if os.geteuid() != 0:
        if (os.getuid(), os.getgid()) != (creds.uid, creds.gid):
            raise PermissionError(f"cannot switch to user {creds.name}: not running as root")
        return
    os.setgroups([creds.gid])
    os.setresgid(creds.gid, creds.gid, creds.gid)
    os.setresuid(creds.uid, creds.uid, creds.uid)
    # Verify: a silent partial failure would leave a root-capable process.
    if os.getresuid() != (creds.uid,) * 3 or os.getresgid() != (creds.gid,) * 3:
        raise PermissionError("privilege drop did not take effect")
    if set(os.getgroups()) - {creds.gid}:
        raise PermissionError("supplementary groups are still set")
    if creds.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise PermissionError("root could be regained after the privilege drop")
    log.info("running as %s (uid %d, gid %d)", creds.name, creds.uid, creds.gid)


def harden_process() -> None:
    """No new privileges, not dumpable (no ptrace attach, no core), no core files."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def process_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (tests and diagnostics)."""
    out: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


# --- configuration ([sandbox]) ---------------------------------------------------------

Fail = Callable[..., ConfigError]
SANDBOX_KEYS = frozenset({"seccomp", "action", "allow", "deny"})


def _names(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of system call names")
    for name in value:
        if name not in SYSCALLS:
            raise ValueError(f"{what}: unknown system call {name!r}")
    return tuple(cast(list[str], value))


def read_sandbox(raw: object, *, fail: Fail) -> SandboxConfig:
    """The ``[sandbox]`` table of a TOML server file (absent: the defaults)."""
    if raw is None:
        return SandboxConfig()
    if not isinstance(raw, dict):
        raise fail("sandbox", "must be a table")
    table: dict[str, Any] = raw
    for key in table:
        if key not in SANDBOX_KEYS:
            raise fail(f"sandbox.{key}", f"unknown key {key!r}")
    seccomp = table.get("seccomp", True)
    if not isinstance(seccomp, bool):
        raise fail("sandbox.seccomp", "must be true or false")
    action = table.get("action", "kill")
    if action not in ACTIONS:
        raise fail("sandbox.action", f"unknown action {action!r} (kill, trap, errno, log)")
    try:
        allow = _names(table.get("allow", []), "allow")
        deny = _names(table.get("deny", []), "deny")
    except ValueError as exc:
        raise fail("sandbox." + str(exc).split(" ", 1)[0].rstrip(":"), str(exc)) from None
    return SandboxConfig(seccomp=seccomp, action=cast(SeccompAction, action), allow=allow,
                         deny=deny)


def sigsys_hint() -> str:
    return ("the seccomp sandbox stopped a system call outside the allow-list (the kernel "
            "log names it: dmesg / journalctl -k, 'audit: type=1326 ... syscall=N'); "
            "if the PKCS#11 module needs it, add its name to [sandbox] allow, or run once "
            "with [sandbox] action = \"log\" to list what the module uses")



# --- in the worker: install after C_Initialize ---------------------------------------------

Handler = Callable[[int, tuple[Any, ...]], tuple[Any, ...]]
_installed = False  # in this (worker) process
_install_lock = threading.Lock()


def sandbox_after_initialize(handler: Handler, cfg: SandboxConfig,
                             abort: Callable[[], None]) -> Handler:
    """Wrap a dispatcher handler: the first successful Initialize installs the filter.

    The module has then opened what it needs (token files, devices, threads).
    If the filter cannot be installed the connection is ended (fail closed):
    ``abort`` stops the worker's loop and the module is finalized on the way out.
    """
    from ..wire.procedures import BY_NAME

    initialize = BY_NAME["Initialize"].number

    def handle(number: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        global _installed
        result = handler(number, args)
        # Once per process, whichever protocol version's wrapper sees Initialize first
        # (a second filter could not be installed anyway: seccomp(2) is not allowed).
        if number == initialize and result[0] == 0 and not _installed:
            with _install_lock:
                if _installed:
                    return result
                try:
                    install_seccomp(cfg)
                except OSError as exc:
                    log.error("cannot install the seccomp sandbox, closing the connection: %s",
                              exc)
                    abort()
                    return (CKR_GENERAL_ERROR,)
                _installed = True
            log.debug("seccomp sandbox installed (action %s)", cfg.action)
        return result

    return handle
