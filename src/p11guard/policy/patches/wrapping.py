"""``wrapping_format_patch``: wrapped keys carry their attributes, authenticated.

C_WrapKey: the token wraps as usual; the blob gets the key's attributes and a
MAC (``policy/wrapformat.py``).  C_UnwrapKey: the MAC is checked, the
template may not contradict the blob, then the token unwraps ``W``.  So a
key cannot be unwrapped twice with different rights (once to decrypt, once
to wrap) nor imported from a blob the proxy did not make.

Which format a wrap produces and which ones an unwrap accepts is set per
policy by ``policy/presets.py`` (``WrapSettings`` in ``state.scratch``):

* a configured ``wrapping_format_patch`` (filter.conf): Caml Crush's format,
  byte-compatible with Caml Crush 1.0.12 (same ``wrapping_format_key``);
* the presets: p11guard format v1 (binds key type, value length, every usage
  and the wrapping mechanism);
* both configured: wraps in Caml Crush's format, accepts both.

Unlike Caml Crush this unit is not terminal: it rewrites the arguments and
lets the engine make the token call, so later checks still run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy import wrapformat as wf
from p11guard.policy.patches.common import (
    Patch,
    read,
    segregated,
    template_view,
    ulong,
    ulong_bytes,
)
from p11guard.policy.patches.templates import FALSE, TRUE, sanitized
from p11guard.policy.rules.calls import Call

SCRATCH_KEY: Final = "wrapping_format"
# Set by the token itself: never put in an unwrap template.
_TOKEN_SET: Final = frozenset({c.CKA_ALWAYS_SENSITIVE, c.CKA_NEVER_EXTRACTABLE, c.CKA_LOCAL})


@dataclass(frozen=True)
class WrapSettings:
    produce: str  # "camlcrush" or "p11guard"
    accept: frozenset[str]
    key: bytes | None  # None: no key could be loaded -> wrap/unwrap refused

    def __repr__(self) -> str:  # never the key
        return f"WrapSettings({self.produce}, {sorted(self.accept)})"


class WrappingFormat(Patch):
    name = "wrapping_format_patch"
    functions = frozenset({"C_WrapKey", "C_UnwrapKey"})
    after_functions = functions
    has_after = True

    def settings(self) -> WrapSettings:
        found = self.state.scratch.get(SCRATCH_KEY)
        if isinstance(found, WrapSettings):
            return found
        return WrapSettings("camlcrush", frozenset({"camlcrush"}),
                            self.state.policy.wrapping_format_key)

    # -- C_UnwrapKey -------------------------------------------------------------

    def check(self, call: Call) -> int | None:
        settings = self.settings()
        if settings.key is None:
            return self.block(call, c.CKR_FUNCTION_FAILED, "no wrapping format key")
        if call.function != "C_UnwrapKey":
            return None
        blob = bytes(call.get("wrapped") or b"")
        found: wf.Unwrapped | None = None
        if "p11guard" in settings.accept and wf.is_p11guard_blob(blob):
            try:
                found = wf.p11guard_unwrap(settings.key, blob)
            except wf.FormatError:
                found = None
        if found is None and "camlcrush" in settings.accept:
            try:
                found = wf.camlcrush_unwrap(settings.key, blob,
                                            segregate=segregated(self.state))
            except wf.FormatError:
                # Caml Crush's code for a short or forged blob.
                return self.block(call, c.CKR_FUNCTION_FAILED, "blob MAC invalid")
        if found is None:
            return self.block(call, c.CKR_WRAPPED_KEY_INVALID, "blob MAC invalid")
        template: list[tuple[int, bytes]] = list(call.get("template") or [])
        view = template_view(template)
        for attr, value in found.booleans.items():
            if attr in view and view[attr] is not value:
                return self.block(call, c.CKR_TEMPLATE_INCONSISTENT,
                                  "template contradicts the wrapped key's attributes")
        if (found.key_class is not None and c.CKA_CLASS in view
                and view[c.CKA_CLASS] != found.key_class):
            return self.block(call, c.CKR_TEMPLATE_INCONSISTENT, "class differs from the blob")
        if found.format == "p11guard":
            refused = self._p11guard_template(call, found, view, template)
            if refused is not None:
                return refused
        key_class = template_view(template).get(c.CKA_CLASS)
        if not isinstance(key_class, int):
            return self.block(call, c.CKR_FUNCTION_FAILED, "no CKA_CLASS")
        call.set("wrapped", found.wrapped)
        call.set("template", sanitized(template, key_class))
        call.notes[SCRATCH_KEY] = found
        return None

    def _p11guard_template(self, call: Call, found: wf.Unwrapped, view: dict[int, Any],
                           template: list[tuple[int, bytes]]) -> int | None:
        mech = call.get("mechanism")
        if found.mechanism is not None and int(mech[0]) != found.mechanism:
            return self.block(call, c.CKR_WRAPPED_KEY_INVALID, "wrapped with another mechanism")
        if found.key_type is not None and c.CKA_KEY_TYPE in view \
                and view[c.CKA_KEY_TYPE] != found.key_type:
            return self.block(call, c.CKR_TEMPLATE_INCONSISTENT, "key type differs from the blob")
        # The key comes back with the rights it had: absent entries from the blob.
        if c.CKA_CLASS not in view and found.key_class is not None:
            template.append((c.CKA_CLASS, ulong_bytes(found.key_class)))
        if c.CKA_KEY_TYPE not in view and found.key_type is not None:
            template.append((c.CKA_KEY_TYPE, ulong_bytes(found.key_type)))
        for attr, value in found.booleans.items():
            if attr not in view and attr not in _TOKEN_SET:
                template.append((attr, TRUE if value else FALSE))
        return None

    # -- after the token call ---------------------------------------------------------

    def after(self, call: Call, result: Any) -> Any:
        if call.function == "C_UnwrapKey":
            return self._after_unwrap(call, result)
        return self._after_wrap(call, result)

    def _after_unwrap(self, call: Call, result: Any) -> Any:
        found = call.notes.get(SCRATCH_KEY)
        rv, handle = result
        if rv != c.CKR_OK or not isinstance(found, wf.Unwrapped) or found.format != "p11guard":
            return result
        # The token decided the length from W: it must be the one that was bound.
        session = call.session
        _rv, got = self.state.backend.get_attribute_value(
            session, handle, [(c.CKA_KEY_TYPE, 8), (c.CKA_VALUE_LEN, 8)])
        values = {t: (ulong(v) if v is not None else None) for t, v, _n in got}
        # SoftHSM2 reports CKA_VALUE_LEN 0 for unwrapped keys (and refuses it in
        # the template): checked where the token knows it.  W itself, whose
        # length fixes the key's for the key-wrap mechanisms, is under the MAC.
        got_len = values.get(c.CKA_VALUE_LEN)
        if (found.key_type is not None and values.get(c.CKA_KEY_TYPE) != found.key_type) or (
                found.value_len is not None and got_len and got_len != found.value_len):
            self.state.backend.destroy_object(session, handle)
            call.notes["blocked_by"] = self.name
            self.state.audit.block(call.function, self.name, c.CKR_WRAPPED_KEY_INVALID,
                                   "unwrapped key differs from the bound type/length")
            return (c.CKR_WRAPPED_KEY_INVALID, 0)
        return result

    def _after_wrap(self, call: Call, result: Any) -> Any:
        rv, out, length = result
        if rv not in (c.CKR_OK, c.CKR_BUFFER_TOO_SMALL):
            return result
        settings = self.settings()
        assert settings.key is not None  # check() refused otherwise
        seg = segregated(self.state)
        trailer = wf.trailer_len(settings.produce, segregate=seg)
        if rv == c.CKR_BUFFER_TOO_SMALL or out is None:
            return (rv, None, int(length) + trailer)
        session = call.session
        key = int(call.get("key"))
        rv_read, view = read(self.state, session, key)
        if rv_read != c.CKR_OK:
            return (c.CKR_KEY_NOT_WRAPPABLE, None, 0)
        raw = {t: (TRUE if v else FALSE) for t, v in view.items() if isinstance(v, bool)}
        key_class = view.get(c.CKA_CLASS)
        if settings.produce == "p11guard":
            blob = wf.p11guard_wrap(
                settings.key, bytes(out), key_class=key_class, key_type=view.get(c.CKA_KEY_TYPE),
                value_len=view.get(c.CKA_VALUE_LEN), mechanism=int(call.get("mechanism")[0]),
                attributes=dict(raw))
        else:
            blob = wf.camlcrush_wrap(settings.key, bytes(out), key_class, dict(raw),
                                     segregate=seg)
        out_len = call.get("out_len")
        if out_len is not None and len(blob) > int(out_len):
            return (c.CKR_BUFFER_TOO_SMALL, None, len(blob))
        return (c.CKR_OK, blob, len(blob))
