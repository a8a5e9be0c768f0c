"""`p11guard check-config`: effective policy per alias, located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from p11guard.cli import main
from p11guard.policy.check import describe_config
from p11guard.policy.model import ConfigError

FILTER = """\
modules = [("softhsm", "/usr/lib/softhsm/libsofthsm2.so"), ("other", "/x.so")]
forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]
allowed_labels = [("soft.*", ["app_.*"])]
forbid_admin_operations = [(".*", true)]
remove_padding_oracles = [("softhsm", [encrypt])]
wrapping_format_key = "00112233445566778899aabbccddeeff"
"""


def test_filter_conf(tmp_path: Path) -> None:
    path = tmp_path / "filter.conf"
    path.write_text(FILTER)
    text = describe_config(path)
    assert "Caml Crush filter.conf, OK" in text
    soft, other = text.split("module 'other'")
    assert "CKM_RSA_PKCS" in soft and "'app_.*'" in soft
    assert "C_DecryptInit" in soft  # the strict coverage is shown
    assert "CKM_RSA_PKCS" not in other and "no filtering" in other
    assert "wrapping_format_key: set" in text and "00112233" not in text


def test_policy_toml(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('preset = "none"\n[modules]\nsofthsm = "/l.so"\n'
                    '[[forbidden_functions]]\nalias = "softhsm"\nfunctions = ["C_InitToken"]\n')
    text = describe_config(path)
    assert "p11guard policy, OK" in text and "C_InitToken" in text


def test_errors_are_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "filter.conf"
    path.write_text(FILTER + 'filter_actions_post = [("softhsm", '
                    '[(C_GetAttributeValue, "no_such_module_xyz:hook")])]\n')
    with pytest.raises(ConfigError) as err:
        describe_config(path)
    assert str(err.value).startswith(f"{path}:7: filter_actions_post:")
    assert main(["check-config", str(path)]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_preset_is_implemented(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[modules]\nsofthsm = "/l.so"\n')
    text = describe_config(path)
    assert "not implemented" not in text and "patchset1" in text
    # A check writes nothing: it says where the secure default's key will be made.
    assert not (tmp_path / "wrapping_format.key").exists()
