"""One test per filter.conf option, against SoftHSM2, through the wire protocol.

Each runs against p11guard and, where Caml Crush behaves the same, against
Debian's pkcs11proxyd with the same files (compatibility).  Where Caml Crush
is weak, the test shows the weakness on pkcs11proxyd and p11guard's fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p11guard.pkcs11 import constants as c
from tests.support.filter import (
    CKF_RW_SERIAL,
    aes_key,
    direct_tool,
    ec_keypair,
    filter_text,
    find_all,
    running,
    session,
    start,
)
from tests.support.softhsm import SOFTHSM_MODULE, Token

BOTH = ["camlcrush", "p11guard"]
ECDSA = (c.CKM_ECDSA, b"")
DIGEST = b"\x11" * 32


def audit_records(log_text: str) -> list[dict[str, object]]:
    out = []
    for line in log_text.splitlines():
        start_at = line.find('{"time"')
        if start_at >= 0:
            out.append(json.loads(line[start_at:]))
    return out


# -- modules ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_modules_alias_escape(kind: str, token: Token, tmp_path: Path) -> None:
    """A second, pattern alias lets a Caml Crush client pick a name no rule covers."""
    modules = f'[("softhsm", "{SOFTHSM_MODULE}"), ("soft.*", "{SOFTHSM_MODULE}")]'
    rule = 'forbidden_mechanisms = [("softhsm", [CKM_ECDSA])]\n'
    with running(kind, token, tmp_path, rule, modules=modules) as server:
        with session(server) as (client, s, _):
            _, priv = ec_keypair(client, s, b"k")
            assert client.rv("SignInit", s, ECDSA, priv) == c.CKR_MECHANISM_INVALID
        if kind == "camlcrush":
            with session(server, alias=b"softX") as (client, s, _):
                _, priv = ec_keypair(client, s, b"k")
                assert client.rv("SignInit", s, ECDSA, priv) == c.CKR_OK  # escaped
        else:
            from p11guard.client import WireClient

            with WireClient.connect(server.address) as client:
                assert client.rv("SetupArch", 1) == 1
                assert client.rv("LoadModule", b"softX") == c.CKR_GENERAL_ERROR


# -- forbidden_mechanisms ----------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_forbidden_mechanisms(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS, CKM_SHA_1])]\n'
    with running(kind, token, tmp_path, rule) as server, session(server) as (client, s, slot):
        rv, _, n = client.call("GetMechanismList", slot, 0)
        assert rv == c.CKR_OK
        rv, mechs, n2 = client.call("GetMechanismList", slot, n)
        assert rv == c.CKR_OK and n2 == n == len(mechs)
        assert c.CKM_RSA_PKCS not in mechs and c.CKM_SHA_1 not in mechs
        assert c.CKM_SHA256 in mechs and c.CKM_ECDSA in mechs
        rv, _, n3 = client.call("GetMechanismList", slot, n - 1)
        assert (rv, n3) == (c.CKR_BUFFER_TOO_SMALL, n)
        assert client.call("GetMechanismInfo", slot, c.CKM_RSA_PKCS)[0] == (
            c.CKR_MECHANISM_INVALID)
        assert client.call("GetMechanismInfo", slot, c.CKM_SHA256)[0] == c.CKR_OK
        _, priv = ec_keypair(client, s, b"k")
        assert client.rv("SignInit", s, (c.CKM_RSA_PKCS, b""), priv) == c.CKR_MECHANISM_INVALID
        assert client.rv("DigestInit", s, (c.CKM_SHA_1, b"")) == c.CKR_MECHANISM_INVALID
        # Everything else still works.
        assert client.rv("SignInit", s, ECDSA, priv) == c.CKR_OK
        rv, sig = client.call("Sign", s, DIGEST)
        assert rv == c.CKR_OK and len(sig) == 64


# -- allowed_labels / allowed_ids ----------------------------------------------------------

LABELS = 'allowed_labels = [("softhsm", ["app_.*"])]\n'


@pytest.mark.parametrize("kind", BOTH)
def test_allowed_labels(kind: str, token: Token, tmp_path: Path) -> None:
    with running(kind, token, tmp_path, LABELS) as server, session(server) as (client, s, _):
        _, ok = ec_keypair(client, s, b"app_sign")
        assert aes_key(client, s, b"secret")[0] == c.CKR_ATTRIBUTE_VALUE_INVALID
        found = find_all(client, s)
        assert ok in found and len(found) == 2  # the pair; nothing else
        assert client.rv("SignInit", s, ECDSA, ok) == c.CKR_OK
        assert client.call("Sign", s, DIGEST)[0] == c.CKR_OK


@pytest.mark.parametrize("kind", BOTH)
def test_hidden_objects_everywhere(kind: str, token: Token, tmp_path: Path) -> None:
    """Caml Crush calls the token for GetAttributeValue on a hidden object and
    leaks its answer (CKR_ATTRIBUTE_SENSITIVE, bug B4); p11guard never does."""
    direct_tool(token, "--keygen", "--key-type", "AES:32", "--label", "hidden", "--id", "07",
                "--sensitive")
    with running(kind, token, tmp_path, LABELS) as server, session(server) as (client, s, _):
        assert find_all(client, s) == []
        # Handles are small integers in SoftHSM: find the hidden key's by trying.
        answers = {}
        for h in range(1, 20):
            rv, _ = client.call("GetAttributeValue", s, h, [(c.CKA_VALUE, b"", 0)])
            answers[h] = rv
        leaks = [h for h, rv in answers.items() if rv != c.CKR_OBJECT_HANDLE_INVALID]
        if kind == "camlcrush":
            assert leaks and all(answers[h] == c.CKR_ATTRIBUTE_SENSITIVE for h in leaks)
            hidden = leaks[0]
            assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), hidden) == (
                c.CKR_OBJECT_HANDLE_INVALID)
        else:
            assert leaks == []


@pytest.mark.parametrize("kind", BOTH)
def test_newline_label_bypass(kind: str, token: Token, tmp_path: Path) -> None:
    """Caml Crush: pattern + "$" matches before a newline (bug B5)."""
    direct_tool(token, "--keygen", "--key-type", "AES:32", "--label", "app_x\nsecret",
                "--id", "08")
    with running(kind, token, tmp_path, LABELS) as server, session(server) as (client, s, _):
        found = find_all(client, s)
        created = aes_key(client, s, b"app_y\nsecret")[0]
        if kind == "camlcrush":
            assert len(found) == 1 and created == c.CKR_OK
        else:
            assert found == [] and created == c.CKR_ATTRIBUTE_VALUE_INVALID


@pytest.mark.parametrize("kind", BOTH)
def test_allowed_ids(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'allowed_ids = [("softhsm", ["a1.*"])]\n'
    with running(kind, token, tmp_path, rule) as server, session(server) as (client, s, _):
        assert aes_key(client, s, b"k", key_id=b"\xb2")[0] == c.CKR_ATTRIBUTE_VALUE_INVALID
        rv, key = aes_key(client, s, b"k", key_id=b"\xa1\x05")
        assert rv == c.CKR_OK
        assert find_all(client, s) == [key]
        assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), key) == c.CKR_OK


@pytest.mark.parametrize("kind", BOTH)
def test_find_objects_state_is_per_session(kind: str, token: Token, tmp_path: Path) -> None:
    """FindObjects after FindObjectsFinal: not initialised (same answer from both)."""
    with running(kind, token, tmp_path, LABELS) as server, session(server) as (client, s, _):
        _, key = aes_key(client, s, b"app_1")
        assert client.rv("FindObjectsInit", s, []) == c.CKR_OK
        assert client.call("FindObjects", s, 10)[:2] == (c.CKR_OK, [key])
        assert client.rv("FindObjectsFinal", s) == c.CKR_OK
        assert client.call("FindObjects", s, 10)[0] == c.CKR_OPERATION_NOT_INITIALIZED


# -- forbidden_functions -------------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_forbidden_functions(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'forbidden_functions = [("softhsm", [C_GenerateRandom, C_DestroyObject])]\n'
    with running(kind, token, tmp_path, rule) as server, session(server) as (client, s, _):
        assert client.call("GenerateRandom", s, 16)[0] == c.CKR_FUNCTION_NOT_SUPPORTED
        _, key = aes_key(client, s, b"k")
        assert client.rv("DestroyObject", s, key) == c.CKR_FUNCTION_NOT_SUPPORTED
        assert client.rv("SeedRandom", s, b"x") in (c.CKR_OK, c.CKR_RANDOM_SEED_NOT_SUPPORTED)
        assert client.rv("DigestInit", s, (c.CKM_SHA256, b"")) == c.CKR_OK


# -- enforce_ro_sessions -------------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_enforce_ro_sessions(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'enforce_ro_sessions = [("softhsm", yes)]\n'
    with running(kind, token, tmp_path, rule) as server, \
            session(server, flags=CKF_RW_SERIAL) as (client, s, _):
        rv, info = client.call("GetSessionInfo", s)
        assert rv == c.CKR_OK and not info["flags"] & c.CKF_RW_SESSION
        assert aes_key(client, s, b"k", token=True)[0] == c.CKR_SESSION_READ_ONLY
        assert aes_key(client, s, b"k", token=False)[0] == c.CKR_OK


# -- forbid_admin_operations ---------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_forbid_admin_operations(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'forbid_admin_operations = [("softhsm", true)]\n'
    with running(kind, token, tmp_path, rule) as server, \
            session(server, login=False) as (client, s, slot):
            assert client.rv("Login", s, c.CKU_SO, b"5678") == c.CKR_USER_TYPE_INVALID
            assert client.rv("Login", s, c.CKU_USER, b"1234") == c.CKR_OK
            assert client.rv("Logout", s) == c.CKR_OK
            assert client.rv("CloseSession", s) == c.CKR_OK
            # C_InitToken takes the SO PIN directly: Caml Crush lets it reach the token,
            # an SO-PIN guessing oracle and a token-wipe primitive (bug B11).
            rv = client.rv("InitToken", slot, b"0000", b"x".ljust(32))
            if kind == "camlcrush":
                assert rv == c.CKR_PIN_INCORRECT
            else:
                assert rv == c.CKR_FUNCTION_NOT_SUPPORTED


# -- remove_padding_oracles ------------------------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_remove_padding_oracles(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'remove_padding_oracles = [("softhsm", [encrypt])]\n'
    pad = (c.CKM_AES_CBC_PAD, b"\0" * 16)
    with running(kind, token, tmp_path, rule) as server, session(server) as (client, s, _):
        _, key = aes_key(client, s, b"k")
        assert client.rv("EncryptInit", s, pad, key) == c.CKR_MECHANISM_INVALID
        assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), key) == c.CKR_OK
        assert client.call("Encrypt", s, b"\0" * 16)[0] == c.CKR_OK
        # The decryption side is where the oracle is: Caml Crush never checks it (bug B8).
        rv = client.rv("DecryptInit", s, pad, key)
        assert rv == (c.CKR_OK if kind == "camlcrush" else c.CKR_MECHANISM_INVALID)


# -- filter_actions_pre / filter_actions_post -------------------------------------------------

@pytest.mark.parametrize("kind", BOTH)
def test_demo_action_c_login_hook(kind: str, token: Token, tmp_path: Path) -> None:
    rule = 'filter_actions_pre = [("softhsm", [(C_Login, c_Login_hook)])]\n'
    with running(kind, token, tmp_path, rule) as server, \
            session(server, login=False) as (client, s, _):
        assert client.rv("Login", s, c.CKU_USER, b"9999") == c.CKR_PIN_LOCKED
        assert client.rv("Login", s, c.CKU_USER, b"1234") == c.CKR_OK


def test_python_hook(token: Token, tmp_path: Path) -> None:
    rule = ('filter_actions_post = [("softhsm", [(C_GenerateRandom, '
            '"tests.support.filter:refuse_random")])]\n')
    with running("p11guard", token, tmp_path, rule) as server, \
            session(server) as (client, s, _):
        assert client.call("GenerateRandom", s, 64)[0] == c.CKR_DATA_LEN_RANGE
        rv, data = client.call("GenerateRandom", s, 16)
        assert rv == c.CKR_OK and len(data) == 16


def test_unresolvable_action_refuses_to_start(token: Token, tmp_path: Path) -> None:
    text = filter_text('filter_actions_post = [("softhsm", '
                       '[(C_WrapKey, "no_such_module_xyz:hook")])]\n')
    with pytest.raises(RuntimeError) as err:
        start("p11guard", token, tmp_path / "p11guard", text).stop()
    assert "no_such_module_xyz" in str(err.value) and "cannot import" in str(err.value)


# -- debug / log_subchannel: the audit log -------------------------------------------------------

def test_audit_log(token: Token, tmp_path: Path) -> None:
    rule = 'forbid_admin_operations = [("softhsm", true)]\n'
    with running("p11guard", token, tmp_path, rule) as server:
        with session(server, login=False) as (client, s, _):
            assert client.rv("Login", s, c.CKU_SO, b"5678") == c.CKR_USER_TYPE_INVALID
        text = server.log_text()
    (record,) = [r for r in audit_records(text) if r.get("function") == "C_Login"]
    assert record["rule"] == "forbid_admin_operations"
    assert record["rv"] == "CKR_USER_TYPE_INVALID" and record["decision"] == "block"
    assert record["module"] == "softhsm" and record["channel"] == "filter"
    assert str(record["peer"]).startswith("127.0.0.1:") and isinstance(record["pid"], int)
    assert "5678" not in text


# -- check-config / convert-config ----------------------------------------------------------------

def test_check_config_cli(tmp_path: Path) -> None:
    conf = tmp_path / "filter.conf"
    conf.write_text(filter_text(LABELS + 'forbidden_mechanisms = [("softhsm", [CKM_RSA_X_509])]\n'))
    out = subprocess.run([sys.executable, "-m", "p11guard", "check-config", str(conf)],
                         capture_output=True, text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path.cwd() / "src")})
    assert out.returncode == 0, out.stderr
    assert "CKM_RSA_X_509" in out.stdout and "'app_.*'" in out.stdout
