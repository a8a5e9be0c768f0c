"""enforce_ro_sessions: CKF_RW_SESSION silently cleared."""

from __future__ import annotations

from p11guard.pkcs11 import constants as c
from tests.unit.test_policy_support import SLOT, engine

RW = c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION


def test_rw_flag_is_cleared() -> None:
    wrapped, backend = engine('enforce_ro_sessions = [("softhsm", true)]\n')
    assert wrapped.open_session(SLOT, RW)[0] == c.CKR_OK
    assert backend.calls == [("open_session", (SLOT, c.CKF_SERIAL_SESSION))]


def test_first_matching_rule_wins() -> None:
    wrapped, backend = engine('enforce_ro_sessions = [("softhsm", false), (".*", true)]\n')
    wrapped.open_session(SLOT, RW)
    assert backend.calls == [("open_session", (SLOT, RW))]


def test_off_by_default() -> None:
    wrapped, backend = engine()
    wrapped.open_session(SLOT, RW)
    assert backend.calls == [("open_session", (SLOT, RW))]
