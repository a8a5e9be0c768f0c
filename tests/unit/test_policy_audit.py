"""The audit log: JSON lines, blocking always, non-blocking at debug >= 2, no secrets."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from p11guard.pkcs11 import constants as c
from p11guard.policy.audit import AUDIT_LOGGER, Auditor, configure
from tests.unit.test_policy_support import SESSION, engine


def lines(caplog: Any) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name.startswith(AUDIT_LOGGER)]


def test_blocking_decision_is_one_json_line(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    wrapped, _ = engine('forbid_admin_operations = [("softhsm", true)]\n')
    assert wrapped.login(SESSION, c.CKU_SO, b"so-pin-5678") == c.CKR_USER_TYPE_INVALID
    (record,) = lines(caplog)
    assert record["function"] == "C_Login"
    assert record["rule"] == "forbid_admin_operations"
    assert record["rv"] == "CKR_USER_TYPE_INVALID"
    assert record["decision"] == "block"
    assert record["pid"] == 4242 and record["peer"] == "test-peer"
    assert record["module"] == "softhsm" and "time" in record
    assert "5678" not in caplog.text


def test_non_blocking_only_at_debug_2(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    rule = 'forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]\n'
    wrapped, _ = engine(rule)
    wrapped.sign_init(SESSION, (c.CKM_ECDSA, None), 1)
    assert lines(caplog) == []
    wrapped, _ = engine(rule + "debug = 2\n")
    wrapped.sign_init(SESSION, (c.CKM_ECDSA, None), 1)
    (record,) = lines(caplog)
    assert record["decision"] == "allow" and record["rule"] == "forbidden_mechanisms"


def test_debug_3_dumps_the_effective_policy_without_the_key(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    engine('debug = 3\nwrapping_format_key = "00112233445566778899aabbccddeeff"\n')
    (record,) = lines(caplog)
    assert record["decision"] == "config" and "forbidden_mechanisms" in record["detail"]
    assert "00112233" not in caplog.text


def test_log_subchannel_is_a_child_logger(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    wrapped, _ = engine('log_subchannel = filter\nforbidden_functions = [("softhsm", [C_Sign])]\n')
    wrapped.sign(SESSION, b"x", 10)
    (rec,) = [r for r in caplog.records if r.name.startswith(AUDIT_LOGGER)]
    assert rec.name == "p11guard.audit.filter"
    assert json.loads(rec.getMessage())["channel"] == "filter"


def test_configure_gives_bare_json_lines() -> None:
    stream = io.StringIO()
    logger = configure(stream)
    try:
        Auditor(peer="p", pid=1, alias="a").block("C_Sign", "r", c.CKR_MECHANISM_INVALID)
        assert json.loads(stream.getvalue())["rv"] == "CKR_MECHANISM_INVALID"
    finally:
        for h in [h for h in logger.handlers if getattr(h, "_p11guard_audit", False)]:
            logger.removeHandler(h)
        logger.propagate = True
