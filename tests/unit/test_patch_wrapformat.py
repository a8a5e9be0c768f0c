"""The two wrapping formats, the presets and the per-installation key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.policy import presets
from p11guard.policy import wrapformat as wf
from p11guard.policy.patches import PATCHES
from p11guard.policy.readers.names import PATCH_ACTIONS

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
W = bytes.fromhex("1fa68b0a8112b447aef34bd8fb5a7b829d3e862371d2cfe5")
T, F = b"\x01", b"\x00"
ATTRS = {c.CKA_SENSITIVE: T, c.CKA_EXTRACTABLE: T, c.CKA_ALWAYS_SENSITIVE: T,
         c.CKA_NEVER_EXTRACTABLE: F, c.CKA_ENCRYPT: T, c.CKA_DECRYPT: T, c.CKA_WRAP: F,
         c.CKA_UNWRAP: F, c.CKA_PRIVATE: T, c.CKA_DERIVE: F}


def test_camlcrush_test_vector() -> None:
    blob = wf.camlcrush_wrap(KEY, W, c.CKO_SECRET_KEY, ATTRS)
    assert blob == W + bytes.fromhex("00000004" "01010100010100000100"
                                     "232557120377f5ed891a7a90c67077d5")
    got = wf.camlcrush_unwrap(KEY, blob)
    assert got.wrapped == W and got.key_class == c.CKO_SECRET_KEY
    assert got.booleans[c.CKA_DECRYPT] is True and got.booleans[c.CKA_WRAP] is False


def test_cmac_is_rfc4493() -> None:
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    assert wf.cmac(key, b"").hex() == "bb1d6929e95937287fa37d129b756746"


@pytest.mark.parametrize("blob", [
    b"short",
    W + bytes.fromhex("00000004" "01010100010100000100") + bytes(16),
])
def test_camlcrush_forged_or_short(blob: bytes) -> None:
    with pytest.raises(wf.FormatError):
        wf.camlcrush_unwrap(KEY, blob)


def test_camlcrush_absent_attributes_and_segregation() -> None:
    blob = wf.camlcrush_wrap(KEY, W, None, {c.CKA_SIGN: T}, segregate=True)
    assert len(blob) == len(W) + 34
    got = wf.camlcrush_unwrap(KEY, blob, segregate=True)
    assert got.key_class is None and got.booleans == {c.CKA_SIGN: True}


def test_p11guard_format_binds_everything() -> None:
    blob = wf.p11guard_wrap(KEY, W, key_class=c.CKO_SECRET_KEY, key_type=c.CKK_AES,
                            value_len=16, mechanism=c.CKM_AES_KEY_WRAP, attributes=ATTRS)
    assert len(blob) == len(W) + wf.P11G_TRAILER_LEN and wf.is_p11guard_blob(blob)
    got = wf.p11guard_unwrap(KEY, blob)
    assert (got.wrapped, got.key_type, got.value_len, got.mechanism) == (
        W, c.CKK_AES, 16, c.CKM_AES_KEY_WRAP)
    for i in range(len(blob)):  # any changed byte is caught
        bad = blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:]
        with pytest.raises(wf.FormatError):
            wf.p11guard_unwrap(KEY, bad)
    with pytest.raises(wf.FormatError):
        wf.p11guard_unwrap(bytes(16), blob)
    # Formats never verify as each other, even under the same key.
    with pytest.raises(wf.FormatError):
        wf.camlcrush_unwrap(KEY, blob)


def test_every_camlcrush_patch_is_a_unit() -> None:
    assert set(PATCHES) == PATCH_ACTIONS
    assert {a for _, a in presets.PATCHSET1} | {a for _, a in presets.PATCHSET2} <= PATCH_ACTIONS


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "wrapping_format.key"
    key, created = presets.load_or_create_key(path)
    assert created and len(key) == 16 and path.stat().st_mode & 0o777 == 0o600
    assert presets.load_or_create_key(path) == (key, False)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="too open"):
        presets.load_or_create_key(path)
    os.chmod(path, 0o600)
    path.write_text("zz\n")
    with pytest.raises(ValueError, match="32 hexadecimal"):
        presets.load_or_create_key(path)


def test_key_file_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p11guard.policy.model import ModuleEntry, Policy

    conf = tmp_path / "server.toml"
    conf.write_text("")
    policy = Policy(modules=(ModuleEntry("softhsm", "/x.so"),), preset="patchset1",
                    source=str(conf))
    monkeypatch.delenv(presets.KEY_FILE_ENV, raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert presets.key_file(policy) == tmp_path / "wrapping_format.key"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert presets.key_file(policy) == tmp_path / "state" / "wrapping_format.key"
    monkeypatch.setenv(presets.KEY_FILE_ENV, str(tmp_path / "k"))
    assert presets.key_file(policy) == tmp_path / "k"
    errors, notices = presets.prepare(policy)
    assert errors == [] and "generated" in notices[0]
    assert presets.needs_installation_key(policy)
    from dataclasses import replace
    assert not presets.needs_installation_key(replace(policy, wrapping_format_key=KEY))
    assert not presets.needs_installation_key(replace(policy, preset=None))
