"""The audit log: one JSON object per line on the logger ``p11guard.audit``.

Every blocking decision is logged; at ``debug >= 2`` every non-blocking one
too (a rewrite, a filtered list, a call that passed its rules).  A record
carries time, worker pid, peer, module alias, function, rule and CK_RV; never
an argument value, so never a PIN or key material.

Routing is the server's: ``p11guard serve`` gives ``p11guard.audit`` its own
handler on the server's log target (stderr, or syslog as ``p11guard-audit``),
so each audit record is one bare JSON object per line.  :func:`configure` does
the same for tools outside the server.  ``log_subchannel`` (Caml Crush's
Netplex subchannel) becomes a child logger ``p11guard.audit.<name>`` and a
``channel`` field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

from p11guard.pkcs11 import constants as c

AUDIT_LOGGER: Final = "p11guard.audit"


def configure(stream: Any = None) -> logging.Logger:
    """Give ``p11guard.audit`` its JSON-lines handler (stderr), once."""
    logger = logging.getLogger(AUDIT_LOGGER)
    if not any(getattr(h, "_p11guard_audit", False) for h in logger.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._p11guard_audit = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def rv_name(rv: int) -> str:
    try:
        return c.name_of("CKR", rv)
    except (KeyError, ValueError):  # pragma: no cover - name_of renders unknowns
        return f"{rv:#x}"


class Auditor:
    """Writes the decisions of one worker (one connection, one module alias)."""

    __slots__ = ("alias", "channel", "debug", "logger", "peer", "pid")

    def __init__(self, *, peer: str, pid: int, alias: str, debug: int = 0,
                 subchannel: str = "") -> None:
        self.peer = peer
        self.pid = pid
        self.alias = alias
        self.debug = debug
        self.channel = subchannel
        name = f"{AUDIT_LOGGER}.{subchannel}" if subchannel else AUDIT_LOGGER
        self.logger = logging.getLogger(name)

    @property
    def verbose(self) -> bool:
        """Non-blocking decisions are logged too (debug >= 2)."""
        return self.debug >= 2

    def _emit(self, decision: str, function: str, rule: str, rv: int | None,
              detail: str | None) -> None:
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "pid": self.pid,
            "peer": self.peer,
            "module": self.alias,
            "function": function,
            "rule": rule,
            "decision": decision,
        }
        if rv is not None:
            record["rv"] = rv_name(rv)
        if detail:
            record["detail"] = detail
        if self.channel:
            record["channel"] = self.channel
        level = logging.WARNING if decision in ("block", "error") else logging.INFO
        self.logger.log(level, json.dumps(record, separators=(",", ":")))

    def block(self, function: str, rule: str, rv: int, detail: str | None = None) -> None:
        """A call refused (always logged)."""
        self._emit("block", function, rule, rv, detail)

    def error(self, function: str, rule: str, rv: int, detail: str | None = None) -> None:
        """A rule or the backend failed unexpectedly; the call got ``rv`` (always logged)."""
        self._emit("error", function, rule, rv, detail)

    def allow(self, function: str, rule: str, detail: str | None = None) -> None:
        """A non-blocking decision (pass, rewrite, filter): logged at debug >= 2."""
        if self.debug >= 2:
            self._emit("allow", function, rule, None, detail)

    def rewrite(self, function: str, rule: str, detail: str) -> None:
        """The call went on changed (flags, filtered list): logged at debug >= 2."""
        if self.debug >= 2:
            self._emit("rewrite", function, rule, None, detail)

    def info(self, function: str, rule: str, detail: str) -> None:
        """Start-up facts (debug level 3 configuration dump), logged at debug >= 3."""
        if self.debug >= 3:
            self._emit("config", function, rule, None, detail)
