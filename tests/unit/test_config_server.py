"""Server configuration: Caml Crush's pkcs11proxyd.conf and p11guard TOML."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p11guard.config import ConfigError, Listener, load_server_config, parse_server_config
from p11guard.config.model import parse_host_port, parse_mode
from p11guard.config.server import detect_format

DATA = Path(__file__).parent.parent / "data" / "config"
DEBIAN_CONF = Path("/etc/pkcs11proxyd/pkcs11proxyd.conf")
DEBIAN_FILTER = Path("/etc/pkcs11proxyd/filter.conf")
KEY_LINE = 'wrapping_format_key = "00112233445566778899aabbccddeeff"'


# --- netplex ---------------------------------------------------------------------------


def test_interop_sample_tcp() -> None:
    cfg = load_server_config(DATA / "pkcs11proxyd-tcp.conf")
    assert cfg.source_format == "camlcrush"
    assert cfg.listeners == (Listener("tcp", host="127.0.0.1", port=14444),)
    assert cfg.log_target == "stderr" and cfg.tls is None
    assert cfg.max_connections == 100
    assert cfg.policy.modules[0].alias == "softhsm"
    assert cfg.policy.source == str(DATA / "filter-minimal.conf")  # relative to the conf
    notices = "\n".join(cfg.notices)
    for key in ("controller.max_level", "controller.socket_directory", "service.conn_limit",
                "service.workload_manager.type", "service.workload_manager.max_jobs_per_thread"):
        assert f"netplex.{key}: not applicable" in notices
    assert "pkcs11proxyd-tcp.conf:3: netplex.controller.max_level: not applicable" in notices


@pytest.mark.parametrize(("capacity", "spares", "notice"),
                         [(None, 1, False), (0, 0, False), (3, 3, False), (500, 64, True)])
def test_min_free_jobs_capacity_is_spare_workers(tmp_path: Path, capacity: int | None,
                                                 spares: int, notice: bool) -> None:
    """Netplex's idle job slots kept ready are p11guard's pre-forked spare workers."""
    service = ("" if capacity is None
               else f"workload_manager {{ min_free_jobs_capacity = {capacity}; }};")
    cfg = parse_server_config(netplex(tmp_path, service=service), str(tmp_path / "p.conf"))
    assert cfg.spare_workers == spares
    assert any("using 64" in n for n in cfg.notices) == notice


def test_interop_sample_unix() -> None:
    cfg = load_server_config(DATA / "pkcs11proxyd-unix.conf")
    assert cfg.listeners == (Listener("unix", path=str(DATA / "p11.sock"), mode=0o660),)


def test_interop_sample_tls() -> None:
    cfg = load_server_config(DATA / "pkcs11proxyd-tls.conf", mode="compat")
    assert cfg.tls is not None
    assert cfg.tls.cert_file == str(DATA / "certs/server.pem")
    assert cfg.tls.key_file == str(DATA / "certs/server.key")
    assert cfg.tls.ca_file == str(DATA / "certs/ca.pem")
    assert cfg.tls.algorithms == "NORMAL:-VERS-ALL:+VERS-TLS1.2"
    assert cfg.tls.peer_auth == "required"
    assert cfg.tls.allowed_clients_cert_path == str(DATA / "clients")
    assert (cfg.user, cfg.group, cfg.log_target) == ("p11", "p11", "syslog")
    assert cfg.max_connections == 7
    assert cfg.policy.mode == "compat"


@pytest.mark.skipif(not DEBIAN_CONF.exists(), reason="caml-crush-server not installed")
def test_debian_files(tmp_path: Path) -> None:
    # As shipped, Caml Crush refuses to start (filter.conf lacks its wrapping key):
    with pytest.raises(ConfigError) as info:
        load_server_config(DEBIAN_CONF)
    assert info.value.option == "wrapping_format_key"
    # With the key set, the unchanged pkcs11proxyd.conf loads.
    conf = tmp_path / "pkcs11proxyd.conf"
    shutil.copy(DEBIAN_CONF, conf)
    conf.write_text(conf.read_text().replace('"/etc/pkcs11proxyd/filter.conf"', '"filter.conf"'))
    text = DEBIAN_FILTER.read_text().replace(f"(*\n{KEY_LINE}\n*)", KEY_LINE)
    (tmp_path / "filter.conf").write_text(text)
    cfg = load_server_config(conf)
    assert cfg.listeners == (Listener("tcp", host="127.0.0.1", port=4444),)
    assert (cfg.user, cfg.group) == ("Debian-pkcs11proxyd", "Debian-pkcs11proxyd")
    assert cfg.log_target == "syslog" and cfg.tls is None and cfg.max_connections == 100
    assert len(cfg.notices) >= 5


NETPLEX = """netplex {{
  service {{
    protocol {{ address {{ type = "internet"; bind = "127.0.0.1:1"; }}; }};
    processor {{ type = "rpc_pkcs11"; filter_config = "{filter}"; {processor} }};
    {service}
  }}
  {netplex}
}}
"""


def netplex(tmp_path: Path, processor: str = "", service: str = "", top: str = "") -> str:
    filter_conf = DATA / "filter-minimal.conf"
    return NETPLEX.format(filter=filter_conf, processor=processor, service=service, netplex=top)


@pytest.mark.parametrize(
    ("kwargs", "line", "option", "fragment"),
    [
        ({"processor": "colour = 1;"}, 4, "netplex.service.processor.colour",
         "unknown parameter 'colour'"),
        ({"service": "frob { };"}, 5, "netplex.service.frob", "unknown section 'frob'"),
        ({"top": "controller { logging { type = \"file\"; }; };"}, 7,
         "netplex.controller.logging.type", "unsupported logging type 'file'"),
        ({"processor": "use_ssl = true;"}, 4, "netplex.service.processor",
         "use_ssl = true needs a tls"),
        ({"processor": "use_ssl = 1;"}, 4, "netplex.service.processor.use_ssl",
         "expected true or false"),
        ({"service": "workload_manager { max_threads = 0; };"}, 5,
         "netplex.service.workload_manager.max_threads", "at least 1"),
        ({"service": "workload_manager { min_free_jobs_capacity = -1; };"}, 5,
         "netplex.service.workload_manager.min_free_jobs_capacity", "0 or more"),
        ({"processor": "use_ssl = true; tls { x509 { trust { crt_file = \"ca\"; }; }; };"}, 4,
         "netplex.service.processor.tls", "tls needs x509"),
        ({"top": "service { };"}, 7, None, "exactly one service"),
    ],
)
def test_netplex_errors(tmp_path: Path, kwargs: dict[str, str], line: int,
                        option: str | None, fragment: str) -> None:
    file = str(tmp_path / "p.conf")
    with pytest.raises(ConfigError) as info:
        parse_server_config(netplex(tmp_path, **kwargs), file)
    err = info.value
    assert (err.file, err.line, err.option) == (file, line, option)
    assert fragment in str(err)
    assert str(err).startswith(f"{file}:{line}: ")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ('type = "internet"; bind = "127.0.0.1";', "expected host:port"),
        ('type = "internet"; bind = "127.0.0.1:99999";', "bad port"),
        ('type = "internet";', "needs bind"),
        ('type = "local";', "needs path"),
        ('type = "local"; path = "/s"; local_chmod = "0o1777";', "out of range"),
        ('type = "container";', "unsupported address type"),
        ('bind = "127.0.0.1:1";', "needs a type"),
    ],
)
def test_netplex_address_errors(tmp_path: Path, address: str, fragment: str) -> None:
    text = netplex(tmp_path).replace('type = "internet"; bind = "127.0.0.1:1";', address)
    with pytest.raises(ConfigError) as info:
        parse_server_config(text, str(tmp_path / "p.conf"))
    assert info.value.line == 3 and fragment in str(info.value)


def test_netplex_filter_errors_point_into_filter_conf(tmp_path: Path) -> None:
    bad = tmp_path / "filter.conf"
    bad.write_text('modules = [("a", "/x.so")]\nforbidden_mechanisms = [("a", [CKM_NOPE])]\n')
    text = netplex(tmp_path).replace(str(DATA / "filter-minimal.conf"), "filter.conf")
    with pytest.raises(ConfigError) as info:
        parse_server_config(text, str(tmp_path / "p.conf"))
    assert str(info.value) == (
        f"{bad}:2: forbidden_mechanisms: unknown mechanism 'CKM_NOPE'"
    )


def test_netplex_missing_filter_config(tmp_path: Path) -> None:
    text = netplex(tmp_path).replace(f'filter_config = "{DATA / "filter-minimal.conf"}";', "")
    with pytest.raises(ConfigError) as info:
        parse_server_config(text, str(tmp_path / "p.conf"))
    assert "filter_config is required" in str(info.value)


def test_netplex_libnames_and_legacy_tls_are_notices(tmp_path: Path) -> None:
    text = netplex(tmp_path, processor='libnames = "a:/x.so;"; cafile = "x"; use_ssl = false;')
    cfg = parse_server_config(text, str(tmp_path / "p.conf"))
    assert any("processor.libnames: not applicable" in n for n in cfg.notices)
    assert any("processor.cafile: not applicable" in n for n in cfg.notices)


# --- TOML --------------------------------------------------------------------------------


def test_toml_full_sample() -> None:
    cfg = load_server_config(DATA / "server.toml")
    assert cfg.source_format == "toml"
    assert cfg.listeners == (
        Listener("tcp", host="127.0.0.1", port=4444),
        Listener("unix", path=str(DATA / "p11guard.sock"), mode=0o660),
    )
    assert (cfg.max_connections, cfg.max_record_size, cfg.shutdown_grace) == (50, 1 << 20, 5.0)
    assert (cfg.user, cfg.group, cfg.log_target) == ("p11guard", "p11guard", "syslog")
    assert cfg.pid_file == str(DATA / "run/p11guard.pid")
    assert cfg.tls is not None and cfg.tls.ca_file == str(DATA / "certs/ca.pem")
    assert cfg.policy.preset == "patchset1"
    eff = cfg.policy.for_alias("softhsm")
    assert eff.forbid_admin_operations and eff.forbidden_functions == {"C_InitToken", "C_SetPIN"}
    assert cfg.notices == ()


def test_toml_minimal_is_the_secure_default() -> None:
    cfg = load_server_config(DATA / "server-minimal.toml")
    assert cfg.policy.preset == "patchset1" and cfg.policy.mode == "strict"
    assert cfg.max_connections == 100 and cfg.max_record_size == 16 * 1024 * 1024
    assert cfg.shutdown_grace == 10.0 and cfg.log_target == "stderr" and cfg.tls is None
    assert cfg.listeners == (Listener("unix", path="/run/p11guard.sock"),)


def test_toml_with_filter_conf() -> None:
    cfg = load_server_config(DATA / "server-filterconf.toml")
    assert cfg.policy.mode == "compat" and cfg.policy.preset is None
    assert cfg.policy.source == str(DATA / "filter-full.conf")


MIN_TOML = '[[listen]]\ntcp = "127.0.0.1:4444"\n[modules]\na = "/x.so"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1\n" + MIN_TOML, "s.toml:1: colour: unknown key 'colour'"),
        ("[server]\nmax_connections = 0\n" + MIN_TOML,
         "s.toml:2: server.max_connections: must be between 1 and 100000"),
        ("[server]\nmax_record_size = 10\n" + MIN_TOML,
         "s.toml:2: server.max_record_size: must be between"),
        ("[server]\nlog = \"file\"\n" + MIN_TOML, "s.toml:2: server.log: must be"),
        ("[server]\nshutdown_grace = -1\n" + MIN_TOML, "s.toml:2: server.shutdown_grace:"),
        ("[server]\nthreads = 4\n" + MIN_TOML, "s.toml:2: server.threads: unknown key"),
        ('[modules]\na = "/x.so"\n', "s.toml: listen: at least one [[listen]]"),
        ('[[listen]]\ntcp = "127.0.0.1"\n[modules]\na = "/x.so"\n',
         "s.toml:1: listen: bad address '127.0.0.1'"),
        ('[[listen]]\ntcp = "127.0.0.1:1"\nunix = "/s"\n[modules]\na = "/x.so"\n',
         "s.toml:1: listen: a listener needs exactly one of tcp or unix"),
        ('[[listen]]\nunix = "/s"\nmode = "0999"\n[modules]\na = "/x.so"\n',
         "s.toml:1: listen: bad file mode '0999'"),
        ('[[listen]]\ntcp = "127.0.0.1:1"\nmode = "0600"\n[modules]\na = "/x.so"\n',
         "s.toml:1: listen: mode only applies to unix listeners"),
        (MIN_TOML + "[tls]\ncert_file = \"c\"\n", "s.toml:5: tls: cert_file and key_file"),
        (MIN_TOML + "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\npeer_auth = \"maybe\"\n",
         "s.toml:8: tls.peer_auth: unknown value 'maybe'"),
        (MIN_TOML + "[policy]\nfile = \"f.conf\"\n", "s.toml:6: policy.file: a policy file holds"),
        (MIN_TOML + "[policy]\ncolour = 1\n", "s.toml:6: policy.colour: unknown option"),
        (MIN_TOML + "[[policy.allowed_labels]]\nalias = \"zz\"\nlabels = []\n",
         "s.toml:5: allowed_labels: alias pattern 'zz' matches no configured module alias"),
        ('[[listen]]\ntcp = "127.0.0.1:1"\n', "s.toml: modules: no module configured"),
        ("[[listen]\n", "s.toml:1: invalid TOML"),
    ],
)
def test_toml_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config(text, "s.toml")
    assert str(info.value).startswith(expected)


def test_detect_format() -> None:
    assert detect_format("(* c *)\nnetplex {", "x.conf") == "camlcrush"
    assert detect_format("[server]\n", "x.conf") == "toml"
    assert detect_format("netplex {", "x.toml") == "toml"


def test_helpers() -> None:
    assert parse_host_port("[::1]:80") == ("::1", 80)
    assert parse_host_port("*:80") == ("0.0.0.0", 80)
    assert parse_mode("0660") == parse_mode("0o660") == parse_mode(0o660) == 0o660
    with pytest.raises(ValueError):
        parse_mode(True)
    assert str(Listener("unix", path="/s", mode=0o600)) == "unix:/s (mode 0600)"
    assert str(Listener("tcp", host="::1", port=1)) == "tcp:[::1]:1"


# --- robustness ------------------------------------------------------------------------

_NETPLEX_PIECES = ["netplex", "service", "processor", "protocol", "address", "{", "}", "=",
                   ";", '"x"', "1", "true", "(*", "*)", " ", "\n", "type", '"internet"',
                   "bind", '"127.0.0.1:1"', "filter_config", "tls", "x509"]
_TOML_PIECES = ["[[listen]]\n", "[server]\n", "[tls]\n", "[policy]\n", "[modules]\n",
                'tcp = "127.0.0.1:1"\n', "unix = 3\n", 'a = "/x"\n', "mode = 7\n",
                "file = 1\n", "max_connections = true\n", "[[policy.allowed_ids]]\n",
                'alias = ".*"\n', 'ids = ["["]\n', "log = []\n", "x = {}\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_NETPLEX_PIECES), max_size=40).map(" ".join))
def test_netplex_reader_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_server_config(text, "/nonexistent/fuzz.conf")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOML_PIECES), max_size=12).map("".join))
def test_toml_reader_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_server_config(text, "/nonexistent/fuzz.toml")
