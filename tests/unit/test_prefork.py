"""Pre-forked spare workers: the hand-off protocol, the cffi type list, the seccomp
program built ahead, the configuration keys."""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

import pytest

from p11guard.config.model import SandboxConfig
from p11guard.config.tomlconf import toml_to_config
from p11guard.policy.model import ConfigError
from p11guard.server import prefork, sandbox
from p11guard.wire import rpc
from p11guard.wire.procedures import PROGRAM, TABLES, VERSION_P11GUARD

SRC = Path(__file__).resolve().parents[2] / "src" / "p11guard"
TYPE_LITERAL = re.compile(r'ffi\.(?:new|cast|typeof|sizeof|offsetof|alignof)\(\s*"([^"]+)"')


def test_every_c_type_literal_in_the_sources_is_parsed_ahead() -> None:
    from cffi.model import PrimitiveType

    from p11guard.pkcs11.binding import ffi

    used: set[str] = set()
    for path in SRC.rglob("*.py"):
        used |= set(TYPE_LITERAL.findall(path.read_text()))
    assert used, "the scan found no ffi calls: the pattern is stale"
    typedefs, structs, _ = ffi.list_types()

    def ours(name: str) -> bool:  # declared by the binding's FFI (another FFI has its own)
        base = re.sub(r"[\s*]*(\[\d*\])?$", "", name)
        return (base in typedefs or base in PrimitiveType.ALL_PRIMITIVE_TYPES
                or base.removeprefix("struct ") in structs)

    missing = sorted(name for name in used - set(prefork.C_TYPES) if ours(name))
    assert not missing, f"add these to prefork.C_TYPES (parsed once in the listener): {missing}"


def test_warm_cffi_types_fills_cffi_s_cache() -> None:
    from p11guard.pkcs11.binding import ffi

    prefork.warm_cffi_types()
    for name in prefork.C_TYPES:
        assert ffi.typeof(name) is ffi.typeof(name)


def _tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


def test_hand_off_passes_the_socket_the_listener_index_and_the_peer() -> None:
    ours, theirs = prefork.control_pair()
    server, client, accepted = _tcp_pair()
    try:
        peer = f"127.0.0.1:{client.getsockname()[1]}"
        prefork.send_connection(ours, accepted, 2, peer)
        accepted.close()  # the listener keeps no copy
        received = prefork.receive_connection(theirs)
        assert received is not None
        conn, index, got_peer = received
        assert (index, got_peer) == (2, peer)
        assert conn.family == socket.AF_INET and conn.type == socket.SOCK_STREAM
        assert conn.getblocking()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.sendall(b"pong")
        assert client.recv(4) == b"pong"
        conn.close()
    finally:
        for s in (ours, theirs, server, client):
            s.close()


def test_hand_off_of_a_unix_connection() -> None:
    ours, theirs = prefork.control_pair()
    a, b = socket.socketpair()
    try:
        prefork.send_connection(ours, a, 0, "unix:pid=1,uid=2,gid=3")
        a.close()
        received = prefork.receive_connection(theirs)
        assert received is not None
        conn, index, peer = received
        assert (conn.family, index, peer) == (socket.AF_UNIX, 0, "unix:pid=1,uid=2,gid=3")
        b.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.close()
    finally:
        for s in (ours, theirs, b):
            s.close()


def test_a_spare_sees_the_listener_go_away() -> None:
    ours, theirs = prefork.control_pair()
    ours.close()
    try:
        assert prefork.receive_connection(theirs) is None
    finally:
        theirs.close()


def test_a_spare_whose_ready_message_was_not_read_sees_the_listener_go_away() -> None:
    ours, theirs = prefork.control_pair()
    theirs.sendall(prefork.READY)
    ours.close()  # unread data: the spare's recv fails with ECONNRESET
    try:
        assert prefork.receive_connection(theirs) is None
    finally:
        theirs.close()


def test_a_hand_off_without_a_descriptor_is_refused() -> None:
    ours, theirs = prefork.control_pair()
    try:
        ours.sendall(b"\0\0\0\0peer")
        with pytest.raises(OSError, match="malformed hand-off"):
            prefork.receive_connection(theirs)
    finally:
        ours.close()
        theirs.close()


def test_run_spare_prepares_reports_ready_then_serves_one_connection() -> None:
    ours, theirs = prefork.control_pair()
    a, b = socket.socketpair()
    steps: list[str] = []
    served: list[tuple[int, str]] = []

    def serve(conn: socket.socket, index: int, peer: str, ctrl: socket.socket) -> None:
        served.append((index, peer))
        assert ctrl is theirs and ctrl.fileno() >= 0, "kept: channels join through it"
        conn.close()

    try:
        prefork.send_connection(ours, a, 1, "unix")  # queued before the spare reads
        ours.close()
        prefork.run_spare(theirs, lambda: steps.append("prepared"), serve)
        assert steps == ["prepared"]
        assert served == [(1, "unix")]
    finally:
        for s in (a, b, theirs):
            s.close()


def test_run_spare_returns_when_the_listener_closes() -> None:
    ours, theirs = prefork.control_pair()
    served: list[str] = []
    try:
        def prepare() -> None:
            ours.close()

        prefork.run_spare(theirs, prepare, lambda *_: served.append("served"))
        assert served == []
    finally:
        theirs.close()


def test_preload_skips_what_does_not_load(tmp_path: Path) -> None:
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_bytes(b"nothing")
    assert prefork.preload_modules([str(not_a_module), str(tmp_path / "absent.so")]) == {}


def test_seccomp_program_built_ahead_is_the_one_installed() -> None:
    cfg = SandboxConfig()
    sandbox.prepare_seccomp(cfg)
    try:
        prepared = sandbox._program(cfg)
        assert prepared is sandbox._program(cfg), "install_seccomp reuses it"
        assert sandbox._program(SandboxConfig(action="log")) is not prepared
        assert prepared.len == len(sandbox.build_filter(cfg, os.getpid()))
        # In another process (a forked worker) the program would name the wrong pid.
        sandbox._prepared = (os.getpid() + 1, cfg, prepared)
        assert sandbox._program(cfg) is not prepared
    finally:
        sandbox._prepared = None


def _server_toml(extra: str) -> str:
    return ('[server]\n' + extra + '\n[[listen]]\ntcp = "127.0.0.1:4444"\n'
            '[modules]\nsofthsm = "/usr/lib/softhsm/libsofthsm2.so"\n')


def test_spare_worker_settings() -> None:
    default = toml_to_config(_server_toml(""), "p.toml")
    assert (default.spare_workers, default.preload_modules) == (1, True)
    cfg = toml_to_config(_server_toml("spare_workers = 0\npreload_modules = false"), "p.toml")
    assert (cfg.spare_workers, cfg.preload_modules) == (0, False)
    with pytest.raises(ConfigError, match="between 0 and 64"):
        toml_to_config(_server_toml("spare_workers = 65"), "p.toml")
    with pytest.raises(ConfigError, match="true or false"):
        toml_to_config(_server_toml('preload_modules = "yes"'), "p.toml")


def test_rehearsal_calls_are_a_v4_clients_first_calls() -> None:
    data = prefork.rehearsal_calls()
    reader = rpc.RecordReader(1 << 16)
    reader.feed(data)
    names = []
    while (record := reader.pop()) is not None:
        call = rpc.parse_call(record)
        assert (call.program, call.version) == (PROGRAM, VERSION_P11GUARD)
        names.append(TABLES[VERSION_P11GUARD][call.procedure].name)
    assert names == ["SetupArch", "GetInfo"]


def test_a_spare_rehearses_without_loading_a_module() -> None:
    """WorkerProgram.rehearse serves the pretend calls and leaves the preloaded
    modules to the real client."""
    from p11guard.server.serve import ServeOptions, WorkerProgram

    cfg = toml_to_config(_server_toml(""), "p.toml")
    program = WorkerProgram(cfg, ServeOptions())
    preloaded = {"/usr/lib/softhsm/libsofthsm2.so": object()}
    program._preloaded = dict(preloaded)
    program.rehearse()
    assert program._preloaded == preloaded


def test_a_rehearsal_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from p11guard.server.serve import ServeOptions, WorkerProgram

    program = WorkerProgram(toml_to_config(_server_toml(""), "p.toml"), ServeOptions())
    with caplog.at_level("DEBUG"):
        program.rehearse()
    assert caplog.records == []
    assert not logging.getLogger("p11guard.worker").disabled
