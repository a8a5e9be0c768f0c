"""Per-worker cache of object attributes the rules need (CKA_LABEL, CKA_ID, ...).

Caml Crush reads CKA_LABEL and CKA_ID of every handle on every call (four
GetAttributeValue calls).  We read the attributes the active rules need once
per object, in one or two calls, and keep them until something can have
changed them:

* C_SetAttributeValue / C_DestroyObject on that object drop its entry;
* C_CloseSession / C_CloseAllSessions (session objects die, handles may be
  reused), C_Login / C_LoginUser / C_Logout (private objects appear and
  disappear), C_Initialize / C_Finalize drop everything.

Calls on different sessions run in parallel threads, so a read that raced with
an invalidation must not store what it read: every invalidation bumps a
generation counter and a read stores only if the counter did not move.

Limitation (documented in docs/filter.md): another process changing a token
object's label is not seen until one of the events above.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Final

from p11guard.pkcs11 import constants as c

CK_UNAVAILABLE_INFORMATION: Final = (1 << 64) - 1
# First read: one call with buffers this big; most labels and ids fit.
FIRST_GUESS: Final = 256
# A label or id longer than this is treated as unreadable (the object is then
# hidden by the label/id rules) rather than allocated.
MAX_ATTRIBUTE_LEN: Final = 64 * 1024
# Entries kept before the cache starts over (bounded memory per worker).
MAX_ENTRIES: Final = 100_000

# rvs of GetAttributeValue that still carry per-attribute results.
_PARTIAL_OK: Final = frozenset(
    {c.CKR_OK, c.CKR_ATTRIBUTE_TYPE_INVALID, c.CKR_ATTRIBUTE_SENSITIVE}
)

Attributes = dict[int, bytes | None]
Key = tuple[int | None, int]


class ObjectCache:
    """Attribute values per (slot, object handle); None = the object has no
    readable value for that attribute."""

    def __init__(self, backend: Any, types: Iterable[int] = ()) -> None:
        self._backend = backend
        self._types: tuple[int, ...] = tuple(dict.fromkeys(types))
        self._entries: dict[Key, Attributes] = {}
        self._lock = threading.Lock()
        self._generation = 0
        self.reads = 0  # backend GetAttributeValue calls made (tests, stats)

    # -- configuration --------------------------------------------------------

    def want(self, *types: int) -> None:
        """Also fetch ``types`` whenever an object is read (units call this at build)."""
        merged = dict.fromkeys((*self._types, *types))
        self._types = tuple(merged)
        self.clear()

    @property
    def types(self) -> tuple[int, ...]:
        return self._types

    # -- lookups ----------------------------------------------------------------

    def get(self, session: int, slot: int | None, handle: int,
            types: Iterable[int] | None = None) -> tuple[int, Attributes]:
        """(rv, attributes) of object ``handle``, read through ``session`` if not cached.

        rv is CKR_OK when the object could be read (attributes it lacks are
        None); otherwise the backend's error, and nothing is cached.
        """
        key = (slot, handle)
        entry = self._entries.get(key)
        if entry is not None and types is None:
            return c.CKR_OK, entry  # entries always hold every type of ``want``
        wanted = self._types if types is None else tuple(types)
        if entry is not None and all(t in entry for t in wanted):
            return c.CKR_OK, entry
        all_types = tuple(dict.fromkeys((*self._types, *wanted)))
        generation = self._generation
        rv, values = self._read(session, handle, all_types)
        if rv != c.CKR_OK:
            return rv, values
        with self._lock:
            if generation == self._generation:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                merged = dict(self._entries.get(key, {}))
                merged.update(values)
                self._entries[key] = merged
                return rv, merged
        return rv, values

    def _read(self, session: int, handle: int, types: tuple[int, ...]) -> tuple[int, Attributes]:
        backend = self._backend
        self.reads += 1
        rv, answers = backend.get_attribute_value(
            session, handle, [(t, FIRST_GUESS) for t in types])
        if rv == c.CKR_BUFFER_TOO_SMALL:
            # Ask for the lengths, then read with exactly those.
            self.reads += 2
            rv, answers = backend.get_attribute_value(session, handle, [(t, None) for t in types])
            if rv not in _PARTIAL_OK:
                return rv, {}
            request: list[tuple[int, int | None]] = []
            for t, _value, length in answers:
                ok = length != CK_UNAVAILABLE_INFORMATION and length <= MAX_ATTRIBUTE_LEN
                request.append((t, length if ok else None))
            rv, answers = backend.get_attribute_value(session, handle, request)
        if rv not in _PARTIAL_OK:
            return rv, {}
        out: Attributes = {}
        for t, value, _length in answers:
            out[int(t)] = value
        return c.CKR_OK, out

    # -- invalidation -------------------------------------------------------------

    def invalidate(self, handle: int) -> None:
        """Forget ``handle`` in every slot (SetAttributeValue, DestroyObject)."""
        with self._lock:
            self._generation += 1
            for key in [k for k in self._entries if k[1] == handle]:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
